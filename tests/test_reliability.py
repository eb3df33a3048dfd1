"""Nothing lost, nothing silently wrong: store damage is found, writers exclude each other,
replacements are atomic, interrupted work resumes, and checkpoints fall back to a good one."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_reach_dataset
from safetensors.torch import load_file
from test_train import tiny_args

from icrt.config import parse_config
from icrt.data.store import EpisodeStore
from icrt.errors import UserError
from icrt.train.checkpoint import (
    read_checkpoint,
    resume_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from icrt.train.loop import train

ROOT = Path(__file__).resolve().parents[1]


def _store(path: Path, episodes: int = 4, length: int = 10) -> EpisodeStore:
    store = EpisodeStore.create(path)
    for i in range(episodes):
        store.add_episode({"state": np.full((length, 3), i, np.float32),
                           "action": np.full((length, 2), -i - 1, np.float32)}, task="t")
    store.close()
    return store


# --------------------------------------------------------------------------- store damage


def test_missing_chunk_is_found_on_open_and_names_store_key_episodes(tmp_path):
    path = tmp_path / "s.zarr"
    _store(path)
    os.remove(path / "data" / "action" / "c" / "0" / "0")
    with pytest.raises(UserError, match=r"s\.zarr' is damaged: chunk file 'data/action/c/0/0' "
                                        r"of key 'action' \(episodes 0-3\) is missing"):
        EpisodeStore.open(path)
    store = EpisodeStore.open(path, check=False)
    assert any("data/action/c/0/0" in p for p in store.verify())


def test_training_refuses_a_store_with_a_missing_chunk(tmp_path):
    dataset = make_reach_dataset(tmp_path, episodes_per_task=4)
    os.remove(tmp_path / "reach.zarr" / "data" / "action" / "c" / "0" / "0")
    with pytest.raises(UserError, match=r"reach\.zarr' is damaged.*'action'"):
        train(parse_config(tiny_args(dataset, tmp_path / "run")), progress=False)


def test_all_zero_chunks_are_written_so_absence_means_damage(tmp_path):
    path = tmp_path / "z.zarr"
    store = EpisodeStore.create(path)
    store.add_episode({"state": np.zeros((5, 2), np.float32)}, task="t")  # all fill value
    assert (path / "data" / "state" / "c" / "0" / "0").is_file()
    assert (path / "meta" / "episode_task" / "c" / "0").is_file()
    assert EpisodeStore.open(path).verify() == []


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_chunk_fails_to_read_naming_key_and_episode(tmp_path, damage):
    path = tmp_path / "s.zarr"
    store = EpisodeStore.create(path)
    rng = np.random.default_rng(0)
    for _ in range(3):
        store.add_episode({"state": rng.normal(size=(10, 3)).astype(np.float32)}, task="t")
    chunk = path / "data" / "state" / "c" / "0" / "0"
    raw = bytearray(chunk.read_bytes())
    if damage == "truncate":
        raw = raw[: len(raw) // 2]
    else:  # a flipped bit inside the compressed payload: the zstd checksum catches it
        raw[len(raw) // 2] ^= 0x10
    chunk.write_bytes(bytes(raw))
    store = EpisodeStore.open(path)  # present, so open succeeds; reading fails clearly
    with pytest.raises(UserError, match=r"damaged: 'data/state' does not decode at episode 1"):
        store.episode(1)
    assert len(store.verify()) == 1


def test_corrupt_array_metadata_and_deleted_array(tmp_path):
    path = tmp_path / "s.zarr"
    _store(path)
    (path / "data" / "action" / "zarr.json").write_text("{not json")
    with pytest.raises(UserError, match=r"damaged: the metadata of 'data/action' is unreadable"):
        EpisodeStore.open(path)
    other = tmp_path / "o.zarr"
    _store(other)
    import shutil

    shutil.rmtree(other / "data" / "state")
    with pytest.raises(UserError, match=r"damaged: the array 'data/state' is missing"):
        EpisodeStore.open(other)
    (other / "zarr.json").write_text("garbage")
    with pytest.raises(UserError, match="zarr.json is invalid"):
        EpisodeStore.open(other)


def test_non_finite_values_are_refused_when_written(tmp_path):
    store = EpisodeStore.create(tmp_path / "s.zarr")
    store.add_episode({"action": np.zeros((4, 2), np.float32)}, task="t")
    bad = np.zeros((6, 2), np.float32)
    bad[3, 1] = np.nan
    with pytest.raises(UserError, match=r"Episode 1 .* non-finite value .* 'action' at step 3"):
        store.add_episode({"action": bad}, task="t")
    assert EpisodeStore.open(tmp_path / "s.zarr").num_episodes == 1
    with pytest.raises(UserError, match=r"Key 'feature_x' .* non-finite .* step 2"):
        store.write_key("feature_x", np.array([[1.0], [2.0], [np.inf], [0.0]], np.float32))


def test_check_store_script(tmp_path):
    path = tmp_path / "s.zarr"
    _store(path)
    script = str(ROOT / "scripts" / "check_store.py")
    ok = subprocess.run([sys.executable, script, str(path)], capture_output=True, text=True)
    assert ok.returncode == 0 and "ok" in ok.stdout and "4 episodes" in ok.stdout
    os.remove(path / "data" / "state" / "c" / "0" / "0")
    bad = subprocess.run([sys.executable, script, str(path)], capture_output=True, text=True)
    assert bad.returncode == 1 and "DAMAGED" in bad.stdout and "data/state/c/0/0" in bad.stdout
    assert "Traceback" not in bad.stderr


# --------------------------------------------------------------------------- one writer

_HOLDER = textwrap.dedent(
    """
    import sys, time
    from icrt.data.store import EpisodeStore
    store = EpisodeStore.open(sys.argv[1], mode="a")
    print("locked", flush=True)
    time.sleep(60)
    """
)


def test_second_writer_fails_at_once(tmp_path):
    path = tmp_path / "s.zarr"
    _store(path)
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(path)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match="is being written by another process"):
            EpisodeStore.open(path, mode="a")
        with pytest.raises(UserError, match="is being written by another process"):
            EpisodeStore.create(path, overwrite=True)
        EpisodeStore.open(path).episode(0)  # readers are never blocked
    finally:
        holder.kill()
        holder.wait()
    EpisodeStore.open(path, mode="a").close()  # the lock died with its holder


def test_dropping_one_of_two_writers_in_a_process_keeps_the_lock(tmp_path):
    import gc

    path = tmp_path / "s.zarr"
    _store(path)
    first = EpisodeStore.open(path, mode="a")
    second = EpisodeStore.open(path, mode="a")
    del first  # POSIX would drop the process's lock if this closed its own descriptor
    gc.collect()
    probe = ("import sys\nfrom icrt.data.store import EpisodeStore\nfrom icrt.errors import "
             "UserError\ntry:\n    EpisodeStore.open(sys.argv[1], mode='a')\nexcept UserError:"
             "\n    print('refused')\n")
    run = subprocess.run([sys.executable, "-c", probe, str(path)], capture_output=True, text=True)
    assert run.stdout.strip() == "refused", run.stderr
    second.close()
    run = subprocess.run([sys.executable, "-c", probe, str(path)], capture_output=True, text=True)
    assert run.stdout.strip() == "" and run.returncode == 0, run.stderr


_APPENDER = textwrap.dedent(
    """
    import sys, numpy as np
    from icrt.data.store import EpisodeStore
    from icrt.errors import UserError
    try:
        store = EpisodeStore.open(sys.argv[1], mode="a")
    except UserError as e:
        print("refused", flush=True)
        sys.exit(0)
    for i in range(15):
        store.add_episode({"state": np.zeros((5, 3), np.float32),
                           "action": np.zeros((5, 2), np.float32)}, task="t")
    store.close()
    print("wrote", flush=True)
    """
)


def test_two_appenders_never_lose_episodes(tmp_path):
    path = tmp_path / "s.zarr"
    _store(path, episodes=1)
    procs = [subprocess.Popen([sys.executable, "-c", _APPENDER, str(path)],
                              stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    wrote = outs.count("wrote")
    assert wrote >= 1 and wrote + outs.count("refused") == 2
    assert EpisodeStore.open(path).num_episodes == 1 + 15 * wrote


# --------------------------------------------------------------------------- atomic write_key

_KILLED_REWRITE = textwrap.dedent(
    """
    import os, signal, sys, numpy as np
    from icrt.data.store import EpisodeStore

    class Dying:  # rows that kill the process half way through the rewrite
        dtype = np.dtype(np.float16)
        def __init__(self, n): self.n, self.calls = n, 0
        def __len__(self): return self.n
        def __getitem__(self, s):
            self.calls += 1
            if self.calls > 3:
                os.kill(os.getpid(), signal.SIGKILL)
            start, stop, _ = s.indices(self.n)
            return np.full((stop - start, 1, 4), 7, np.float16)

    store = EpisodeStore.open(sys.argv[1], mode="a")
    store.write_key("feature_cam", Dying(store.num_steps), overwrite=True)
    """
)


def _arrays(path: Path) -> list[str]:
    return sorted(p.name for p in (path / "data").iterdir() if p.is_dir())


def test_killed_feature_rewrite_keeps_the_old_features(tmp_path):
    path = tmp_path / "s.zarr"
    store = EpisodeStore.create(path)
    for i in range(6):
        store.add_episode({"image_cam": np.full((300, 4, 4, 3), i, np.uint8)}, task="t")
    old = np.arange(store.num_steps * 4, dtype=np.float16).reshape(-1, 1, 4)
    store.write_key("feature_cam", old)
    store.close()
    proc = subprocess.run([sys.executable, "-c", _KILLED_REWRITE, str(path)])
    assert proc.returncode == -signal.SIGKILL
    np.testing.assert_array_equal(EpisodeStore.open(path).load("feature_cam"), old)
    store = EpisodeStore.open(path, mode="a")  # the writer's leftovers are rolled back
    assert _arrays(path) == ["feature_cam", "image_cam"]
    store.write_key("feature_cam", old * 2, overwrite=True)  # a rewrite that completes
    np.testing.assert_array_equal(EpisodeStore.open(path).load("feature_cam"), old * 2)
    assert _arrays(path) == ["feature_cam.v2", "image_cam"]
    store.write_key("feature_cam", old * 3, overwrite=True)
    np.testing.assert_array_equal(EpisodeStore.open(path).load("feature_cam"), old * 3)
    assert _arrays(path) == ["feature_cam", "image_cam"]


# --------------------------------------------------------------------------- collect

def _collect_cfg(out, **kw):
    from icrt.config import CollectConfig

    base = dict(env="metaworld", tasks=("reach-v3", "button-press-topdown-v3"),
                episodes_per_task=3, out=str(out), workers=1, seed=3)
    return CollectConfig(**{**base, **kw})


@pytest.mark.sim
def test_failed_overwrite_keeps_the_old_store_and_failed_fresh_collect_leaves_nothing(tmp_path):
    from icrt.data.collect import collect

    out = tmp_path / "mw.zarr"
    collect(_collect_cfg(out, tasks=("reach-v3",)), progress=False)
    before = EpisodeStore.open(out).load("state")
    with pytest.raises(UserError, match="camera"):
        collect(_collect_cfg(out, tasks=("reach-v3",), overwrite=True, image_size=16,
                             cameras=("cornr",)), progress=False)
    np.testing.assert_array_equal(EpisodeStore.open(out).load("state"), before)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".mw.zarr.lock", "mw.json", "mw.zarr"]
    fresh = tmp_path / "fresh.zarr"
    with pytest.raises(UserError, match="camera"):
        collect(_collect_cfg(fresh, tasks=("reach-v3",), image_size=16, cameras=("cornr",)),
                progress=False)
    assert not fresh.exists()
    collect(_collect_cfg(fresh, tasks=("reach-v3",), episodes_per_task=1), progress=False)


_KILLED_COLLECT = textwrap.dedent(
    """
    import os, signal, sys
    import icrt.data.store as store_module
    from icrt.config import CollectConfig
    from icrt.data.collect import collect

    original = store_module.EpisodeStore.add_episode
    def add_then_maybe_die(self, *a, **k):
        i = original(self, *a, **k)
        if i == int(sys.argv[2]):
            os.kill(os.getpid(), signal.SIGKILL)
        return i
    store_module.EpisodeStore.add_episode = add_then_maybe_die
    collect(CollectConfig(env="metaworld", tasks=("reach-v3", "button-press-topdown-v3"),
                          episodes_per_task=3, out=sys.argv[1], workers=1, seed=3,
                          prompt_episodes_per_task=1), progress=False)
    """
)


@pytest.mark.sim
def test_killed_collect_resumes_to_the_uninterrupted_result(tmp_path):
    from icrt.data.collect import collect
    from icrt.data.spec import DatasetSpec

    full = tmp_path / "full" / "mw.zarr"
    collect(_collect_cfg(full, prompt_episodes_per_task=1), progress=False)
    out = tmp_path / "killed" / "mw.zarr"
    proc = subprocess.run([sys.executable, "-c", _KILLED_COLLECT, str(out), "3"],
                          env={**os.environ, "MUJOCO_GL": "egl"})
    assert proc.returncode == -signal.SIGKILL
    assert EpisodeStore.open(out).num_episodes == 4  # episodes 0-3 committed
    DatasetSpec.load(out.with_suffix(".json"))  # the JSON exists from the first commit
    with pytest.raises(UserError, match="--resume"):
        collect(_collect_cfg(out, prompt_episodes_per_task=1), progress=False)
    with pytest.raises(UserError, match=r"different --seed"):
        collect(_collect_cfg(out, prompt_episodes_per_task=1, resume=True, seed=4),
                progress=False)
    collect(_collect_cfg(out, prompt_episodes_per_task=1, resume=True), progress=False)
    for name in ("mw.zarr", "mw_prompts.zarr"):
        a, b = EpisodeStore.open(full.with_name(name)), EpisodeStore.open(out.with_name(name))
        assert a.episode_seed.tolist() == b.episode_seed.tolist()
        assert a.episode_task_names == b.episode_task_names
        for k in a.keys:
            np.testing.assert_array_equal(a.load(k), b.load(k))
        assert a.attrs["stats"] == b.attrs["stats"]
        env_a, env_b = a.env, b.env
        assert env_a["collect"].pop("out") != env_b["collect"].pop("out")
        assert env_a == env_b
    assert json.loads(full.with_suffix(".json").read_text())["stores"] == ["mw.zarr"]


# --------------------------------------------------------------------------- training runs


@pytest.fixture(scope="module")
def reach_json(tmp_path_factory):
    return make_reach_dataset(tmp_path_factory.mktemp("rdata"), episodes_per_task=6)


def test_rejected_resume_keeps_the_runs_config(reach_json, tmp_path):
    run = train(parse_config(tiny_args(reach_json, tmp_path / "run", "--trainer-cfg.epochs", "1")),
                progress=False)
    before = (run / "config.json").read_text()
    with pytest.raises(UserError, match="num pred steps 4 but dataset .* has 2"):
        train(parse_config(tiny_args(reach_json, run, "--shared-cfg.resume", run,
                                     "--shared-cfg.num-pred-steps", "2")), progress=False)
    assert (run / "config.json").read_text() == before


def test_resume_falls_back_to_the_last_good_checkpoint(reach_json, tmp_path, caplog):
    common = ("--trainer-cfg.epochs", "3", "--shared-cfg.save-every", "1")
    full = train(parse_config(tiny_args(reach_json, tmp_path / "full", *common)), progress=False)
    run = train(parse_config(tiny_args(reach_json, tmp_path / "run", *common)), progress=False)
    newest = run / "checkpoint-2" / "train_state.pt"
    newest.write_bytes(newest.read_bytes()[:100])  # truncated by a crash of the disk
    assert "train_state.pt has 100 bytes" in verify_checkpoint(run / "checkpoint-2")
    assert resume_checkpoint(run) == run / "checkpoint-1"
    assert "skipping damaged checkpoint" in caplog.text
    with pytest.raises(UserError, match=r"checkpoint-2' is damaged .*resume from its run"):
        resume_checkpoint(run / "checkpoint-2")
    import shutil

    shutil.rmtree(run / "checkpoint-2")  # resume repeats epoch 2 from checkpoint-1
    resumed = train(parse_config(tiny_args(reach_json, run, *common, "--shared-cfg.resume", run)),
                    progress=False)
    wa = load_file(str(full / "checkpoint-2" / "model.safetensors"))
    wb = load_file(str(resumed / "checkpoint-2" / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    for ckpt in (run / "checkpoint-0", run / "checkpoint-1", run / "checkpoint-2"):
        weights = ckpt / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(UserError, match=r"Every checkpoint of .* is damaged"):
        resume_checkpoint(run)


def test_checkpoint_housekeeping(reach_json, tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    leftover = run / f".checkpoint-0.tmp-{dead.pid}"
    leftover.mkdir()
    mine = run / f".checkpoint-9.tmp-{os.getpid()}"  # a live process's save is left alone
    mine.mkdir()
    run = train(parse_config(tiny_args(reach_json, run, "--trainer-cfg.epochs", "5",
                                       "--shared-cfg.save-every", "1",
                                       "--shared-cfg.keep-last", "2")), progress=False)
    assert not leftover.exists() and mine.exists()
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-4"]
    for f in (run / "checkpoint-4").iterdir():
        assert f.stat().st_mode & 0o777 == 0o644, f
    assert (run / "checkpoint-4").stat().st_mode & 0o777 == 0o755

    # a full disk during a save: one sentence, the previous checkpoint untouched
    import icrt.train.checkpoint as ckpt_module

    ckpt = read_checkpoint(run / "checkpoint-4")
    from icrt.train.checkpoint import load_policy

    model, _ = load_policy(run / "checkpoint-4")

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt_module, "save_file", full_disk)
    before = (run / "checkpoint-4" / "model.safetensors").read_bytes()
    with pytest.raises(UserError, match=r"Saving checkpoint .*checkpoint-4' failed \(the disk is "
                                        r"full\); the previous checkpoints are intact"):
        save_checkpoint(run / "checkpoint-4", model, ckpt.config, ckpt.normalizer)
    assert (run / "checkpoint-4" / "model.safetensors").read_bytes() == before
    assert verify_checkpoint(run / "checkpoint-4") is None
    assert not list(run.glob(".checkpoint-4.tmp-*"))


def test_eval_checks_its_outputs_before_any_episode(tmp_path):
    from icrt.config import EvalConfig
    from icrt.eval.rollout import evaluate, read_results

    (tmp_path / "file").write_text("x")
    # no checkpoint is given: reaching the episodes would fail with another message
    with pytest.raises(UserError, match=r"--out .*cannot be written: .*file' is a file"):
        evaluate(EvalConfig(out=str(tmp_path / "file" / "r.json")), progress=False)
    with pytest.raises(UserError, match=r"--video-dir .*file' is a file"):
        evaluate(EvalConfig(video_dir=str(tmp_path / "file" / "v")), progress=False)
    (tmp_path / "b.json").write_text("{broken")
    with pytest.raises(UserError, match="unreadable"):
        read_results(tmp_path / "b.json")


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_save_killed_between_its_renames_is_completed(reach_json, tmp_path):
    import shutil

    from icrt.train.checkpoint import remove_save_leftovers

    run = train(parse_config(tiny_args(reach_json, tmp_path / "run", "--trainer-cfg.epochs", "2",
                                       "--shared-cfg.save-every", "1")), progress=False)
    pid = _dead_pid()
    # killed after moving best/ aside, before moving the new one in
    shutil.copytree(run / "checkpoint-0", run / f".best.old-{pid}")
    shutil.copytree(run / "checkpoint-1", run / f".best.tmp-{pid}")
    # and a save killed while writing (no manifest yet): the old one comes back
    os.replace(run / "checkpoint-1", run / f".checkpoint-1.old-{pid}")
    shutil.copytree(run / f".checkpoint-1.old-{pid}", run / f".checkpoint-1.tmp-{pid}")
    os.remove(run / f".checkpoint-1.tmp-{pid}" / "manifest.json")
    os.remove(run / f".checkpoint-1.tmp-{pid}" / "train_state.pt")
    remove_save_leftovers(run)
    assert sorted(p.name for p in run.iterdir() if p.is_dir() and p.name != "tensorboard") == [
        "best", "checkpoint-0", "checkpoint-1"]
    assert (run / "best" / "model.safetensors").read_bytes() == (
        run / "checkpoint-1" / "model.safetensors").read_bytes()
    assert verify_checkpoint(run / "checkpoint-1") is None
    assert (run / "checkpoint-1" / "train_state.pt").is_file()  # the old, complete one


def test_overwrite_killed_between_its_renames_is_completed(tmp_path):
    from icrt.data.store import finish_swap

    pid = _dead_pid()
    path = tmp_path / "mw.zarr"
    _store(tmp_path / f".mw.zarr.old-{pid}", episodes=2)
    _store(tmp_path / f".mw.zarr.collect-{pid}", episodes=5)
    finish_swap(path, "collect")
    assert EpisodeStore.open(path).num_episodes == 5
