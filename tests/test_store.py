"""Episode store: round trip, statistics, crash safety and errors."""

import gc
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import zarr

from icrt.data.store import FORMAT, EpisodeStore, compute_stats
from icrt.errors import UserError


def _episode(i: int, length: int, image: bool = False) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(i)
    ep = {
        "state": rng.normal(size=(length, 5)).astype(np.float32),
        "action": rng.uniform(-1, 1, size=(length, 3)).astype(np.float32),
    }
    if image:
        ep["image_cam"] = rng.integers(0, 255, size=(length, 8, 8, 3), dtype=np.uint8)
    return ep


def test_round_trip(tmp_path):
    path = tmp_path / "s.zarr"
    store = EpisodeStore.create(path, env={"name": "test"}, fps=10)
    episodes = [_episode(i, 5 + i, image=True) for i in range(4)]
    tasks = ["a", "b", "a", "c"]
    for i, (ep, task) in enumerate(zip(episodes, tasks, strict=True)):
        assert store.add_episode(ep, task=task, success=i != 2, source=i % 2) == i
    store.close()

    store = EpisodeStore.open(path)
    assert store.num_episodes == 4
    assert store.tasks == ["a", "b", "c"]
    assert store.episode_task_names == tasks
    assert store.episode_success.tolist() == [True, True, False, True]
    assert store.episode_source.tolist() == [0, 1, 0, 1]
    assert store.episode_lengths.tolist() == [5, 6, 7, 8]
    assert store.num_steps == 26
    assert store.fps == 10 and store.env == {"name": "test"}
    assert store.key_info("image_cam") == {"kind": "image", "shape": [8, 8, 3], "dtype": "uint8"}
    assert store.key_info("action")["kind"] == "action"
    for i, ep in enumerate(episodes):
        got = store.episode(i)
        assert set(got) == set(ep)
        for k in ep:
            np.testing.assert_array_equal(got[k], ep[k])
    part = store.episode_slice(2, 2, 5, keys=["state"])
    np.testing.assert_array_equal(part["state"], episodes[2]["state"][2:5])


def test_stats_on_write_and_on_demand(tmp_path):
    path = tmp_path / "s.zarr"
    store = EpisodeStore.create(path)
    eps = [_episode(i, 50) for i in range(3)]
    for ep in eps:
        store.add_episode(ep, task="t")
    all_state = np.concatenate([e["state"] for e in eps])
    # on demand, before close: computed from the data
    s = store.stats("state")
    np.testing.assert_allclose(s["mean"], all_state.mean(0), rtol=1e-5, atol=1e-6)
    store.close()
    attrs = dict(zarr.open_group(str(path), mode="r").attrs)
    assert set(attrs["stats"]) == {"state", "action"}
    assert set(attrs["stats"]["state"]) == {"mean", "std", "min", "max", "q01", "q99"}
    s = EpisodeStore.open(path).stats("state")
    np.testing.assert_allclose(s["std"], all_state.std(0), rtol=1e-5)
    np.testing.assert_allclose(s["min"], all_state.min(0))
    np.testing.assert_allclose(s["max"], all_state.max(0))
    np.testing.assert_allclose(s["q99"], np.quantile(all_state, 0.99, axis=0), rtol=1e-5)
    assert np.all(s["q01"] <= s["q99"])

    # appending makes stored stats stale; readers recompute instead of returning stale values
    store = EpisodeStore.open(path, mode="a")
    store.add_episode({k: v + 100 for k, v in _episode(9, 10).items()}, task="t")
    s = EpisodeStore.open(path).stats("state")
    assert s["max"].min() > 99


def test_compute_stats_quantiles():
    x = np.arange(1001, dtype=np.float64)[:, None]
    s = compute_stats(x)
    assert s["q01"] == [10.0] and s["q99"] == [990.0] and s["mean"] == [500.0]


def test_append_mode_continues(tmp_path):
    path = tmp_path / "s.zarr"
    store = EpisodeStore.create(path)
    store.add_episode(_episode(0, 4), task="a")
    store = EpisodeStore.open(path, mode="a")
    store.add_episode(_episode(1, 6), task="b")
    store = EpisodeStore.open(path)
    assert store.num_episodes == 2 and store.tasks == ["a", "b"]
    np.testing.assert_array_equal(store.episode(1)["state"], _episode(1, 6)["state"])


def test_errors_name_store_and_key(tmp_path):
    path = tmp_path / "s.zarr"
    with pytest.raises(UserError, match="does not exist"):
        EpisodeStore.open(path)
    store = EpisodeStore.create(path)
    store.add_episode(_episode(0, 4), task="a")
    with pytest.raises(UserError, match=r"no key 'proprio'.*state"):
        store.stats("proprio")
    with pytest.raises(UserError, match="no key 'nope'"):
        EpisodeStore.open(path).episode(0, keys=["nope"])
    with pytest.raises(UserError, match="missing"):
        store.add_episode({"state": np.zeros((3, 5), np.float32)}, task="a")
    with pytest.raises(UserError, match="step shape"):
        store.add_episode({"state": np.zeros((3, 4)), "action": np.zeros((3, 3))}, task="a")
    with pytest.raises(UserError, match="different or zero lengths"):
        store.add_episode({"state": np.zeros((3, 5)), "action": np.zeros((2, 3))}, task="a")
    with pytest.raises(UserError, match="already exists"):
        EpisodeStore.create(path)
    with pytest.raises(UserError, match="read-only"):
        EpisodeStore.open(path).add_episode(_episode(1, 3), task="a")

    # a zarr group of another format, and a store of a newer version
    other = tmp_path / "other.zarr"
    zarr.open_group(str(other), mode="w").attrs.update({"format": "replay_buffer"})
    with pytest.raises(UserError, match=r"not an icrt episode store.*replay_buffer"):
        EpisodeStore.open(other)
    newer = tmp_path / "newer.zarr"
    EpisodeStore.create(newer)
    zarr.open_group(str(newer), mode="r+").attrs.update({"version": 99})
    with pytest.raises(UserError, match=r"newer.zarr.*version 99"):
        EpisodeStore.open(newer)
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(UserError, match="plain"):
        EpisodeStore.open(plain)


_WRITER = textwrap.dedent(
    """
    import sys, numpy as np
    from icrt.data.store import EpisodeStore
    store = EpisodeStore.create(sys.argv[1])
    i = 0
    while True:
        n = 30 + i % 7
        ep = {
            "state": np.full((n, 4), i, np.float32),
            "action": np.full((n, 2), -i, np.float32),
            "image_cam": np.full((n, 64, 64, 3), i % 250, np.uint8),
        }
        store.add_episode(ep, task=f"t{i % 3}", success=i % 2 == 0)
        print(i, flush=True)
        i += 1
    """
)


@pytest.mark.parametrize("delay", [0.3, 0.9, 1.7])
def test_writer_killed_mid_episode_leaves_completed_episodes(tmp_path, delay):
    path = tmp_path / "crash.zarr"
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(path)], stdout=subprocess.PIPE, text=True
    )
    # wait until a few episodes are committed, then kill without warning
    first = proc.stdout.readline()
    assert first.strip() == "0"
    time.sleep(delay)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    printed = [int(x) for x in [first, *proc.stdout.read().split()] if str(x).strip()]

    store = EpisodeStore.open(path)
    n = store.num_episodes
    # every episode it reported complete is there; at most the one in flight also committed
    assert printed[-1] + 1 <= n <= printed[-1] + 2
    for i in range(n):
        ep = store.episode(i)
        length = 30 + i % 7
        assert len(ep["state"]) == length
        assert np.all(ep["state"] == i) and np.all(ep["action"] == -i)
        assert np.all(ep["image_cam"] == i % 250)
    assert store.episode_task_names == [f"t{i % 3}" for i in range(n)]

    # reopening for append rolls back the half-written rows and continues cleanly
    store = EpisodeStore.open(path, mode="a")
    ep = {
        "state": np.full((3, 4), 7, np.float32),
        "action": np.zeros((3, 2), np.float32),
        "image_cam": np.zeros((3, 64, 64, 3), np.uint8),
    }
    store.add_episode(ep, task="new")
    store = EpisodeStore.open(path)
    assert store.num_episodes == n + 1
    assert np.all(store.episode(n)["state"] == 7)
    assert store.array("state").shape[0] == store.num_steps


def test_attrs_are_json(tmp_path):
    path = tmp_path / "s.zarr"
    store = EpisodeStore.create(path, env={"name": "x", "cameras": ["a"]}, fps=20)
    store.add_episode(_episode(0, 4), task="a")
    store.set_key_meta("state", rotation={"start": 1, "format": "quat_xyzw"})
    store.close()
    attrs = json.loads((path / "zarr.json").read_text())["attributes"]
    assert attrs["format"] == FORMAT
    assert attrs["keys"]["state"]["rotation"] == {"start": 1, "format": "quat_xyzw"}


def test_write_key_adds_a_column(tmp_path):
    path = tmp_path / "s.zarr"
    store = EpisodeStore.create(path)
    for i in range(3):
        store.add_episode(_episode(i, 4 + i), task="a")
    feats = np.arange(store.num_steps * 2, dtype=np.float32).reshape(-1, 1, 2)
    store.write_key("feature_cam", feats, encoder="tiny")
    store = EpisodeStore.open(path, mode="a")
    assert store.key_info("feature_cam") == {"kind": "feature", "shape": [1, 2],
                                             "dtype": "float32", "encoder": "tiny"}
    np.testing.assert_array_equal(store.episode(1)["feature_cam"], feats[4:9])
    with pytest.raises(UserError, match="already has key"):
        store.write_key("feature_cam", feats)
    with pytest.raises(UserError, match="has 2 rows"):
        store.write_key("feature_x", feats[:2])
    store.write_key("feature_cam", feats * 2, overwrite=True)
    np.testing.assert_array_equal(EpisodeStore.open(path).load("feature_cam"), feats * 2)
    # later episodes must provide the new key too
    with pytest.raises(UserError, match="missing"):
        store.add_episode(_episode(5, 3), task="a")


def _smooth_frames(rng, length, size):
    """Frames lz4 shrinks well (a few colour levels, as rendered scenes have)."""
    level = rng.integers(0, 4, size=(length, 1, 1, 3)) * 60
    x = np.arange(size)[None, :, None, None] // 8 * 20
    return np.broadcast_to(level + x, (length, size, size, 3)).astype(np.uint8).copy()


def _frames_store(path, episodes=6, length=70, size=24, smooth=False):
    store = EpisodeStore.create(path)
    rng = np.random.default_rng(0)
    eps = []
    for _ in range(episodes):
        ep = {"action": rng.normal(size=(length, 2)).astype(np.float32),
              "image_cam": (_smooth_frames(rng, length, size) if smooth else
                            rng.integers(0, 255, size=(length, size, size, 3), dtype=np.uint8))}
        ep["image_cam"][:20] = 0  # all-zero chunks are stored, not left empty
        store.add_episode(ep, task="t")
        eps.append(ep)
    store.write_key("feature_cam", rng.normal(size=(store.num_steps, 3, 4)).astype(np.float32))
    store.close()
    return eps


def test_frames_are_sharded_and_read_directly_as_zarr_reads_them(tmp_path):
    path = tmp_path / "s.zarr"
    _frames_store(path)
    store = EpisodeStore.open(path)
    arr = store.array("image_cam")
    assert arr.shards is not None and arr.shards[0] > arr.chunks[0]  # several chunks per file
    files = [f for f in (path / "data/image_cam/c").rglob("*") if f.is_file()]
    assert len(files) == -(-store.num_steps // arr.shards[0])
    rng = np.random.default_rng(1)
    for key in ("image_cam", "feature_cam", "action"):
        full = np.asarray(store.array(key)[: store.num_steps])
        for _ in range(30):
            a = int(rng.integers(0, store.num_steps))
            b = int(rng.integers(a, min(store.num_steps, a + 100) + 1))
            got = store.read(key, a, b)
            assert got.dtype == full.dtype and np.array_equal(got, full[a:b]), (key, a, b)
    assert store._readers["image_cam"] is not None and store._readers["feature_cam"] is not None


def test_direct_reads_of_an_unsharded_store(tmp_path):
    """Stores written before sharding (one zstd chunk per file) read the same way."""
    path = tmp_path / "s.zarr"
    store = EpisodeStore.create(path)
    arr = store._root["data"].create_array(
        "image_cam", shape=(0, 4, 4, 3), dtype=np.uint8, chunks=(7, 4, 4, 3),
        compressors=zarr.codecs.ZstdCodec(level=0, checksum=True))
    store._arrays["data", "image_cam"] = arr
    frames = np.random.default_rng(0).integers(0, 255, size=(30, 4, 4, 3), dtype=np.uint8)
    store.add_episode({"image_cam": frames, "action": np.zeros((30, 1), np.float32)}, task="t")
    store.close()
    store = EpisodeStore.open(path)
    assert store.array("image_cam").shards is None
    assert np.array_equal(store.read("image_cam", 3, 25), frames[3:25])
    assert store._readers["image_cam"] is not None


@pytest.mark.parametrize("smooth, codec", [(True, "lz4"), (False, "raw")])
def test_frames_are_lz4_blocks_when_that_halves_them_else_stored_as_they_are(
        tmp_path, smooth, codec):
    path = tmp_path / "s.zarr"
    eps = _frames_store(path, smooth=smooth)
    frames = np.concatenate([ep["image_cam"] for ep in eps])
    store = EpisodeStore.open(path)
    inner = [type(c).__name__ for c in store.array("image_cam").metadata.codecs[0].codecs]
    assert inner == (["BytesCodec", "LZ4", "Crc32cCodec"] if codec == "lz4"
                     else ["BytesCodec", "Crc32cCodec"])
    assert store.reader("image_cam").codec == codec
    rng = np.random.default_rng(2)
    for _ in range(40):  # direct reads (partial chunks, several chunks, shard borders) = zarr's
        a = int(rng.integers(0, store.num_steps))
        b = int(rng.integers(a, min(store.num_steps, a + 150) + 1))
        assert np.array_equal(store.read("image_cam", a, b), frames[a:b]), (a, b)
        assert np.array_equal(np.asarray(store.array("image_cam")[a:b]), frames[a:b])
    out = np.empty((50, *frames.shape[1:]), np.uint8)
    store.read("image_cam", 10, 60, out=out)
    assert np.array_equal(out, frames[10:60])


def test_reads_stay_right_while_another_handle_appends(tmp_path):
    """Shard indexes and open files are kept only for shards that appending cannot rewrite."""
    path = tmp_path / "s.zarr"
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 255, size=(2000, 24, 24, 3), dtype=np.uint8) for _ in range(4)]
    with EpisodeStore.create(path) as store:
        for f in frames[:3]:
            store.add_episode({"image_cam": f, "action": np.zeros((2000, 1), np.float32)},
                              task="t")
    reader = EpisodeStore.open(path)
    shard = int(reader.array("image_cam").shards[0])
    assert shard < 6000 < 2 * shard  # one complete shard, one growing
    expected = np.concatenate(frames[:3])
    assert np.array_equal(reader.read("image_cam", 0, 6000), expected)
    assert set(reader.reader("image_cam")._indexes) == {0}
    with EpisodeStore.open(path, mode="a") as writer:
        writer.add_episode({"image_cam": frames[3], "action": np.zeros((2000, 1), np.float32)},
                           task="t")
    for a, b in ((shard - 30, 6000), (5000, 6000), (0, 100)):
        assert np.array_equal(reader.read("image_cam", a, b), expected[a:b])
    fresh = EpisodeStore.open(path)
    assert np.array_equal(fresh.read("image_cam", 5900, 6100),
                          np.concatenate(frames)[5900:6100])


def test_prefetch_is_a_hint_and_damage_is_still_reported_by_the_read(tmp_path):
    path = tmp_path / "s.zarr"
    _frames_store(path)
    store = EpisodeStore.open(path)
    store.prefetch("image_cam", 0, 100)  # fine
    store.prefetch("action", 0, 100)  # low-dim keys: nothing to do
    store = EpisodeStore.open(path)
    for f in (path / "data/image_cam/c").rglob("*"):
        if f.is_file():
            f.unlink()
    store.prefetch("image_cam", 0, 100)  # missing files: no error from a hint
    with pytest.raises(UserError, match=r"damaged: 'data/image_cam' does not decode at "
                                        r"episodes 0-1 \(chunk file 'c/0/0/0/0' is missing"):
        store.read("image_cam", 0, 100)


@pytest.mark.parametrize("smooth", [True, False], ids=["lz4", "raw"])
@pytest.mark.parametrize("damage, message", [
    ("truncate", r"does not decode at episodes? [0-9-]+ \(.*truncated"),
    ("flip", r"does not decode at episodes? [0-9-]+ \(.*does not decode"),
    ("empty", r"does not decode at episodes? [0-9-]+ \(inner chunk .* is empty"),
    ("index", r"does not decode at episodes? [0-9-]+ \(the shard index .* is corrupted"),
])
def test_damaged_shard_is_one_sentence_naming_key_and_episodes(tmp_path, damage, message,
                                                                smooth):
    path = tmp_path / "s.zarr"
    _frames_store(path, smooth=smooth)
    shard = path / "data/image_cam/c/0/0/0/0"
    data = bytearray(shard.read_bytes())
    store = EpisodeStore.open(path)
    per_file = store.array("image_cam").shards[0] // store.array("image_cam").chunks[0]
    n_index = per_file * 16 + 4
    index = np.frombuffer(bytes(data[-n_index:-4]), "<u8").reshape(-1, 2).copy()
    if damage == "truncate":
        data = data[: len(data) // 2] + data[-n_index:]  # index intact, chunks cut off
        index_ok = True
    elif damage == "flip":
        off, nbytes = index[1]
        data[int(off + nbytes // 2)] ^= 0xFF
        index_ok = True
    elif damage == "empty":
        index[1] = 2**64 - 1
        index_ok = False
    else:
        data[-10] ^= 0xFF  # the index no longer matches its checksum
        index_ok = True
    if not index_ok:
        from numcodecs.checksum32 import CRC32C
        data = data[:-n_index] + bytearray(CRC32C().encode(index.tobytes()))
    shard.write_bytes(bytes(data))
    store = EpisodeStore.open(path)
    chunk = int(store.array("image_cam").chunks[0])
    rows = (store.num_steps - 3, store.num_steps) if damage == "truncate" else (chunk, 2 * chunk)
    with pytest.raises(UserError, match=r"s\.zarr' is damaged: 'data/image_cam' " + message):
        store.read("image_cam", *rows)


def test_a_store_without_its_commit_record_is_refused_in_one_sentence(tmp_path):
    """Root attributes with the format but no episode count (a store another process is still
    creating, or a damaged one) are a UserError, not a KeyError."""
    path = tmp_path / "s.zarr"
    EpisodeStore.create(path).close()
    meta = json.loads((path / "zarr.json").read_text())
    del meta["attributes"]["num_episodes"]
    (path / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match=r"s\.zarr' is damaged: its attributes lack "
                                        r"'num_episodes'"):
        EpisodeStore.open(path)


def test_kept_open_files_stay_within_a_process_wide_budget(tmp_path, monkeypatch):
    from icrt.data import chunks

    path = tmp_path / "s.zarr"
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 255, size=(12000, 24, 24, 3), dtype=np.uint8)
    with EpisodeStore.create(path) as store:
        for part in np.split(frames, 4):
            store.add_episode({"image_cam": part, "action": np.zeros((len(part), 1), np.float32)},
                              task="t")
    del store
    gc.collect()  # the writer's readers give their descriptors back
    monkeypatch.setattr(chunks, "_budget", [1])
    store = EpisodeStore.open(path)
    shard = int(store.array("image_cam").shards[0])
    assert store.num_steps // shard >= 2  # two complete shards compete for one descriptor
    for a in (0, shard, 10, shard + 10):
        assert np.array_equal(store.read("image_cam", a, a + 50), frames[a:a + 50])
    reader = store.reader("image_cam")
    assert len(reader._fds) == 1 and chunks._budget == [0]
    reader.close()
    assert reader._fds == {} and chunks._budget == [1]
    assert np.array_equal(store.read("image_cam", shard, shard + 50), frames[shard:shard + 50])
