"""scripts/convert.py --format lerobot on datasets written by lerobot's own writer.

The fixtures under tests/fixtures/lerobot/ were made by ``make_fixture.py`` there with lerobot
0.4.4 (``LeRobotDataset.create`` / ``add_frame`` / ``save_episode`` / ``finalize``, codebase
v3.0), beside the exact arrays handed to it: ``v30_tiny`` (3 episodes, 2 tasks, two AV1 video
cameras, DAgger ``source``/``success`` columns) and ``v30_images`` (PNG image features).
Video is lossy: decoded frames must be within a mean absolute error of 8 (uint8) of the frames
given to the writer, and closer to them than to their neighbours in time.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from icrt.config import ConvertConfig, DatasetConfig, SharedConfig
from icrt.data.convert import convert, resize_frames
from icrt.data.sequence import SequenceDataset
from icrt.data.spec import DatasetSpec
from icrt.data.store import EpisodeStore
from icrt.errors import UserError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
av = pytest.importorskip("av")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
pc = pytest.importorskip("pyarrow.compute")

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "lerobot"
TINY = FIXTURES / "v30_tiny"
VIDEO_MAE = 8.0  # mean absolute error allowed on uint8 frames after the lossy AV1 round trip
DATA = "data/chunk-000/file-000.parquet"
EPISODES = "meta/episodes/chunk-000/file-000.parquet"
FRONT = "videos/observation.images.front/chunk-000/file-000.mp4"


@pytest.fixture(scope="module")
def tiny():
    return dict(np.load(FIXTURES / "v30_tiny_arrays.npz"))


def _convert(tmp_path, name="out", src=TINY, **flags) -> EpisodeStore:
    out = tmp_path / f"{name}.zarr"
    convert(ConvertConfig(format="lerobot", input=str(src), out=str(out), **flags),
            progress=False)
    return EpisodeStore.open(out)


def _close_frames(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape and got.dtype == np.uint8
    err = np.abs(got.astype(int) - want.astype(int)).mean(axis=(1, 2, 3))
    assert err.mean() < VIDEO_MAE, err
    # each step got its own frame, not a neighbour's
    shifted = np.abs(got[1:].astype(int) - want[:-1].astype(int)).mean(axis=(1, 2, 3))
    assert (err[1:] < shifted).all()


def _copy(tmp_path) -> Path:
    return Path(shutil.copytree(TINY, tmp_path / "ds"))


def _rewrite(path: Path, column: str, change) -> None:
    """Rewrite one column of a parquet file with pyarrow (``change`` edits a Python list)."""
    table = pq.read_table(path)
    values = table.column(column).to_pylist()
    change(values)
    i = table.column_names.index(column)
    table = table.set_column(i, column, pa.array(values, type=table.schema.field(i).type))
    pq.write_table(table, path)


def test_lerobot_v30_conversion_keeps_numbers_frames_tasks_and_dagger_columns(tmp_path, tiny):
    store = _convert(tmp_path)
    assert store.num_episodes == 3 and store.fps == 20.0
    assert store.tasks == ["pick up the red cube and place it in the bowl", "open the top drawer"]
    assert list(store.episode_task_names) == list(tiny["tasks"])
    assert set(store.keys) == {"state", "action", "image_front", "image_wrist", "step_source"}
    assert store.env["cameras"] == ["front", "wrist"] and store.env["image_size"] == 32
    assert store.key_info("state")["names"] == [f"state_{i}" for i in range(8)]
    for i in range(3):
        ep = store.episode(i)
        np.testing.assert_array_equal(ep["action"], tiny[f"ep{i}_action"])  # exact
        np.testing.assert_array_equal(ep["state"], tiny[f"ep{i}_state"])
        _close_frames(ep["image_front"], tiny[f"ep{i}_front"])
        _close_frames(ep["image_wrist"], tiny[f"ep{i}_wrist"])
        # LeRobot's source (1 human, 0 policy) -> our step_source (0 human, 1 policy)
        assert ep["step_source"].dtype == np.int8
        np.testing.assert_array_equal(ep["step_source"], 1 - tiny[f"ep{i}_source"])
    assert store.episode_success.tolist() == [True, True, False]
    assert store.episode_source.tolist() == [0, 1, 1]  # a human demo, a DAgger run, a rollout
    spec = DatasetSpec.load(tmp_path / "out.json")
    assert spec.proprio_keys == ("state",) and spec.action_keys == ("action",)
    assert spec.image_keys == ("image_front", "image_wrist")


def test_converted_dagger_store_trains_on_human_steps_of_successful_episodes(tmp_path, tiny):
    _convert(tmp_path)
    cfg = DatasetConfig(dataset_json=str(tmp_path / "out.json"), proprio_norm="none",
                        proprio_noise=0.0, non_overlapping=1)
    ds = SequenceDataset(cfg, SharedConfig(seq_length=8, num_pred_steps=2), split="train")
    assert sorted(e.index for e in ds.episodes) == [0, 1]  # the failed rollout is left out
    states = {(e, t): tiny[f"ep{e}_state"][t] for e in range(3)
              for t in range(len(tiny[f"ep{e}_state"]))}
    masked = 0
    for i in range(len(ds)):
        item = ds[i]
        assert item["image_front"].shape == (8, 32, 32, 3)
        for row, keep in zip(item["proprio"].numpy(), item["loss_mask"].numpy(), strict=True):
            (e, t), = [k for k, v in states.items() if np.array_equal(v, row)]
            assert e in (0, 1) and keep == (tiny[f"ep{e}_source"][t] == 1)
            masked += not keep
    assert masked  # windows over episode 1 hold the policy's steps, without loss


def test_lerobot_selection_flags_and_resume(tmp_path, tiny):
    small = _convert(tmp_path, "small", image_size=16, cameras=("wrist",), max_episodes=2)
    assert small.num_episodes == 2 and "image_front" not in small.keys
    assert small.env["image_size"] == 16
    for i in range(2):
        got = small.episode(i)["image_wrist"]
        _close_frames(got, resize_frames(tiny[f"ep{i}_wrist"], 16))
    with pytest.raises(UserError, match="--keys: 'observation.joint_pos' is not in"):
        _convert(tmp_path, "k", keys=("observation.joint_pos",))
    with pytest.raises(UserError, match=r"--cameras: 'side' is not in .* \(front, wrist\)"):
        _convert(tmp_path, "c", cameras=("side",))
    assert not (tmp_path / "k.zarr").exists() and not (tmp_path / "c.zarr").exists()
    # --resume after an interrupted run equals one run
    whole = _convert(tmp_path, "whole")
    _convert(tmp_path, "part", max_episodes=1)
    part = _convert(tmp_path, "part", resume=True)
    assert part.num_episodes == whole.num_episodes == 3
    for key in whole.keys:
        np.testing.assert_array_equal(whole.load(key), part.load(key))
    assert part.tasks == whole.tasks
    assert part.episode_success.tolist() == whole.episode_success.tolist()


def test_lerobot_image_features_are_read_losslessly(tmp_path):
    arrays = np.load(FIXTURES / "v30_images_arrays.npz")
    store = _convert(tmp_path, src=FIXTURES / "v30_images")
    assert store.num_episodes == 2 and store.fps == 10.0 and store.tasks == ["push the block"]
    assert "step_source" not in store.keys and store.episode_success.all()
    for i in range(2):
        ep = store.episode(i)
        np.testing.assert_array_equal(ep["state"], arrays[f"ep{i}_state"])
        np.testing.assert_array_equal(ep["action"], arrays[f"ep{i}_action"])
        np.testing.assert_array_equal(ep["image_top"], arrays[f"ep{i}_top"])  # PNG


def _encode(path: Path, frames: np.ndarray, fps: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libsvtav1", fps, options={"crf": "30", "g": "2",
                                                           "preset": "12"})
        stream.pix_fmt, stream.width, stream.height = "yuv420p", 32, 32
        for fr in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(fr, format="rgb24")))
        out.mux(stream.encode())


def test_lerobot_v21_layout_is_read_too(tmp_path, tiny):
    """v2.1 (lerobot's legacy layout: jsonl metadata, a parquet and an mp4 per episode), made
    here from the v3.0 fixture."""
    root = tmp_path / "v21"
    info = json.loads((TINY / "meta" / "info.json").read_text())
    info.update(codebase_version="v2.1",
                data_path="data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet",
                video_path="videos/chunk-{episode_chunk:03d}/{video_key}/"
                           "episode_{episode_index:06d}.mp4")
    (root / "meta").mkdir(parents=True)
    (root / "meta" / "info.json").write_text(json.dumps(info))
    tasks = ["pick up the red cube and place it in the bowl", "open the top drawer"]
    (root / "meta" / "tasks.jsonl").write_text(
        "".join(json.dumps({"task_index": i, "task": t}) + "\n" for i, t in enumerate(tasks)))
    rows = pq.read_table(TINY / DATA)
    lines = []
    for e in range(3):
        n = len(tiny[f"ep{e}_action"])
        lines.append(json.dumps({"episode_index": e, "tasks": [str(tiny["tasks"][e])],
                                 "length": n}) + "\n")
        path = root / f"data/chunk-000/episode_{e:06d}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(rows.filter(pc.equal(rows.column("episode_index"), e)), path)
        for cam in ("front", "wrist"):
            _encode(root / f"videos/chunk-000/observation.images.{cam}/episode_{e:06d}.mp4",
                    tiny[f"ep{e}_{cam}"], 20)
    (root / "meta" / "episodes.jsonl").write_text("".join(lines))
    store = _convert(tmp_path, src=root)
    assert store.num_episodes == 3 and list(store.episode_task_names) == list(tiny["tasks"])
    for e in range(3):
        ep = store.episode(e)
        np.testing.assert_array_equal(ep["action"], tiny[f"ep{e}_action"])
        _close_frames(ep["image_front"], tiny[f"ep{e}_front"])
        np.testing.assert_array_equal(ep["step_source"], 1 - tiny[f"ep{e}_source"])


def test_what_is_not_a_lerobot_dataset_is_refused(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        _convert(tmp_path, src=tmp_path / "missing")
    with pytest.raises(UserError, match="is not a LeRobot dataset: it has no meta/info.json"):
        _convert(tmp_path, src=FIXTURES)  # a folder, but no dataset
    root = _copy(tmp_path)
    info = json.loads((root / "meta" / "info.json").read_text())
    (root / "meta" / "info.json").write_text(json.dumps({**info, "codebase_version": "v1.6"}))
    with pytest.raises(UserError, match="codebase_version 'v1.6' is not supported"):
        _convert(tmp_path, src=root)
    assert not (tmp_path / "out.zarr").exists()


def test_corrupt_video_is_one_sentence_and_keeps_committed_episodes(tmp_path):
    root = _copy(tmp_path)
    video = root / FRONT
    video.write_bytes(video.read_bytes()[: int(video.stat().st_size * 0.9)])  # cut short
    with pytest.raises(UserError, match=r"file-000.mp4' episode 2: camera "
                                        r"'observation.images.front' has 10 frames .* 15 steps"):
        _convert(tmp_path, src=root)
    assert EpisodeStore.open(tmp_path / "out.zarr").num_episodes == 2
    video.write_bytes(b"\0" * 64 + (TINY / FRONT).read_bytes()[64:])  # a damaged header
    with pytest.raises(UserError, match=r"file-000.mp4' episode 0: the video of camera "
                                        r"'observation.images.front' could not be decoded"):
        _convert(tmp_path, "damaged", src=root)


def test_nan_action_and_length_mismatch_are_one_sentence(tmp_path):
    root = _copy(tmp_path)

    def nan_at(values):  # episode 1 (rows 12..28), its step 3
        values[15] = [float("nan")] * 7
    _rewrite(root / DATA, "action", nan_at)
    with pytest.raises(UserError, match=r"file-000.parquet' episode 1: 'action' has a "
                                        r"non-finite value at step 3"):
        _convert(tmp_path, src=root)
    assert EpisodeStore.open(tmp_path / "out.zarr").num_episodes == 1  # episode 0 stays

    root = Path(shutil.copytree(TINY, tmp_path / "ds2"))

    def longer(values):
        values[2] += 1
    _rewrite(root / EPISODES, "length", longer)
    with pytest.raises(UserError, match=r"file-000.parquet' episode 2 has 15 rows but the "
                                        r"episode metadata says 16 steps"):
        _convert(tmp_path, "len", src=root)
    table = pq.read_table(root / DATA).drop_columns(["observation.state"])
    pq.write_table(table, root / DATA)
    with pytest.raises(UserError, match=r"episode 0 has no column 'observation.state'"):
        _convert(tmp_path, "col", src=root)
