"""scripts/convert.py on files in the source tools' own layouts.

robomimic: HDF5 files written with h5py in robomimic's layout from real robosuite Lift episodes
(our scripted expert, with the flattened simulator states robomimic records), so re-rendering
and evaluation in the simulator are checked against the frames seen live.
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("MUJOCO_GL", "egl")  # before robosuite/mujoco are imported

import numpy as np
import pytest
import torch

from icrt.config import ConvertConfig, DatasetConfig, SharedConfig
from icrt.data.convert import convert
from icrt.data.sequence import SequenceDataset
from icrt.data.spec import DatasetSpec
from icrt.data.store import EpisodeStore
from icrt.errors import UserError

h5py = pytest.importorskip("h5py")
pytest.importorskip("robosuite")

pytestmark = pytest.mark.sim

ENV_ARGS = {"env_name": "Lift", "type": 1,
            "env_kwargs": {"robots": ["Panda"], "control_freq": 20,
                           "controller_configs": {"type": "OSC_POSE", "control_delta": True}}}


def _record_lift(episodes: int, size: int, max_steps: int = 150) -> list[dict]:
    from icrt.envs.base import make_env, make_expert

    env = make_env("robosuite", "Lift", image_size=size, cameras=("agentview",))
    expert = make_expert("robosuite", "Lift")
    out = []
    try:
        for i in range(episodes):
            obs = env.reset(seed=100 + i)
            expert.reset(env)
            rec = {k: [] for k in ("proprio", "object", "agentview", "states", "actions",
                                   "rewards")}
            for _ in range(max_steps):
                rec["proprio"].append(obs["proprio"])
                rec["object"].append(obs["object"])
                rec["agentview"].append(obs["image_agentview"])
                rec["states"].append(env.flat_state())
                action = np.asarray(expert.act(env, obs), np.float64)
                obs, reward, done, info = env.step(action)
                rec["actions"].append(action)
                rec["rewards"].append(float(info["success"]))
                if info["success"] or done:
                    break
            out.append({k: np.asarray(v) for k, v in rec.items()})
    finally:
        env.close()
    return out


def write_robomimic(path, episodes: list[dict], cameras: bool = True, valid=(2,)) -> None:
    """A robomimic-layout HDF5 file (data/demo_N/{obs/*, actions, rewards, dones, states})."""
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        data.attrs["env_args"] = json.dumps(ENV_ARGS)
        data.attrs["total"] = sum(len(e["actions"]) for e in episodes)
        for i, e in enumerate(episodes):
            g = data.create_group(f"demo_{i}")
            g.attrs["num_samples"] = len(e["actions"])
            g.create_dataset("actions", data=e["actions"])
            g.create_dataset("rewards", data=e["rewards"])
            g.create_dataset("dones", data=e["rewards"].astype(np.int64))
            g.create_dataset("states", data=e["states"])
            o = g.create_group("obs")
            o.create_dataset("robot0_eef_pos", data=e["proprio"][:, :3].astype(np.float64))
            o.create_dataset("robot0_eef_quat", data=e["proprio"][:, 3:7].astype(np.float64))
            o.create_dataset("robot0_gripper_qpos", data=e["proprio"][:, 7:9].astype(np.float64))
            o.create_dataset("object", data=e["object"].astype(np.float64))
            if cameras:
                o.create_dataset("agentview_image", data=e["agentview"])
        names = [f"demo_{i}".encode() for i in range(len(episodes))]
        mask = f.create_group("mask")
        mask.create_dataset("valid", data=[n for i, n in enumerate(names) if i in valid])
        mask.create_dataset("train", data=[n for i, n in enumerate(names) if i not in valid])


@pytest.fixture(scope="module")
def lift(tmp_path_factory):
    root = tmp_path_factory.mktemp("robomimic")
    episodes = _record_lift(3, size=32)
    write_robomimic(root / "lift.hdf5", episodes)
    write_robomimic(root / "lift_states.hdf5", episodes, cameras=False)
    return root, episodes


def test_robomimic_conversion_keeps_numbers_tasks_and_split(lift, tmp_path):
    root, episodes = lift
    out = tmp_path / "lift.zarr"
    summary = convert(ConvertConfig(format="robomimic", input=str(root / "lift.hdf5"),
                                    out=str(out)), progress=False)
    assert summary["episodes"] == 3
    store = EpisodeStore.open(out)
    assert store.tasks == ["Lift"] and store.num_episodes == 3
    assert store.env["name"] == "robosuite" and store.fps == 20.0
    assert store.attrs["valid_episodes"] == [2]
    assert store.key_info("proprio")["rotation"] == {"start": 3, "format": "quat_xyzw"}
    for i, e in enumerate(episodes):
        ep = store.episode(i)
        np.testing.assert_allclose(ep["action"], e["actions"], atol=1e-6)
        np.testing.assert_allclose(ep["proprio"], e["proprio"], atol=1e-6)
        np.testing.assert_allclose(ep["object"], e["object"], atol=1e-6)
        np.testing.assert_array_equal(ep["image_agentview"], e["agentview"])
        assert bool(store.episode_success[i]) == bool(e["rewards"].max() > 0)
    spec = DatasetSpec.load(out.with_suffix(".json"))
    assert spec.proprio_keys == ("proprio", "object") and spec.image_keys == ("image_agentview",)
    # robomimic's own split is ours: demo_2 validates, the rest train
    shared = SharedConfig(seq_length=16, num_pred_steps=2)
    cfg = DatasetConfig(dataset_json=str(out.with_suffix(".json")))
    val = SequenceDataset(cfg, shared, split="val")
    assert [(e.store, e.index) for e in val.episodes] == [(0, 2)]
    assert sorted(e.index for e in val.splits["train"]) == [0, 1]


def test_robomimic_frames_rerendered_from_states_match_live_frames(lift, tmp_path):
    root, episodes = lift
    out = tmp_path / "rendered.zarr"
    convert(ConvertConfig(format="robomimic", input=str(root / "lift_states.hdf5"),
                          out=str(out), render_cameras=("agentview",), image_size=32,
                          max_episodes=1), progress=False)
    frames = EpisodeStore.open(out).episode(0)["image_agentview"]
    live = episodes[0]["agentview"]
    assert frames.shape == live.shape and frames.dtype == np.uint8
    assert np.abs(frames.astype(int) - live.astype(int)).mean() < 1.0


def test_robomimic_resume_equals_one_run_and_existing_stores_are_kept(lift, tmp_path):
    root, _ = lift
    src = str(root / "lift.hdf5")
    whole, part = tmp_path / "whole.zarr", tmp_path / "part.zarr"
    convert(ConvertConfig(format="robomimic", input=src, out=str(whole), image_size=16),
            progress=False)
    convert(ConvertConfig(format="robomimic", input=src, out=str(part), image_size=16,
                          max_episodes=1), progress=False)  # an interrupted run
    with pytest.raises(UserError, match="already exists; pass --resume"):
        convert(ConvertConfig(format="robomimic", input=src, out=str(part), image_size=16),
                progress=False)
    with pytest.raises(UserError, match="different --image-size"):
        convert(ConvertConfig(format="robomimic", input=src, out=str(part), image_size=24,
                              resume=True), progress=False)
    summary = convert(ConvertConfig(format="robomimic", input=src, out=str(part),
                                    image_size=16, resume=True), progress=False)
    assert summary["converted_now"] == 2
    a, b = EpisodeStore.open(whole), EpisodeStore.open(part)
    assert a.num_episodes == b.num_episodes == 3 and a.attrs["valid_episodes"] == [2]
    assert b.attrs["valid_episodes"] == [2]
    for i in range(3):
        for key, value in a.episode(i).items():
            np.testing.assert_array_equal(value, b.episode(i)[key])
    assert b.episode(0)["image_agentview"].shape[1:] == (16, 16, 3)
    # --overwrite replaces it whole
    convert(ConvertConfig(format="robomimic", input=src, out=str(part), max_episodes=2,
                          overwrite=True), progress=False)
    assert EpisodeStore.open(part).num_episodes == 2


def test_converted_robomimic_dataset_trains_and_evaluates_in_robosuite(lift, tmp_path):
    from test_train import tiny_args

    from icrt.config import EvalConfig, parse_config
    from icrt.eval.rollout import evaluate
    from icrt.train.loop import train

    root, _ = lift
    out = tmp_path / "lift.zarr"
    convert(ConvertConfig(format="robomimic", input=str(root / "lift.hdf5"), out=str(out),
                          cameras=()), progress=False)  # low-dim only
    run = train(parse_config(tiny_args(out.with_suffix(".json"), tmp_path / "run",
                                       "--trainer-cfg.epochs", "1",
                                       "--shared-cfg.seq-length", "24")), progress=False)
    results = evaluate(EvalConfig(checkpoint=str(run), no_prompt=True, episodes_per_task=1,
                                  workers=1, max_steps=5), progress=False)
    assert results["env"] == "robosuite" and list(results["tasks"]) == ["Lift"]
    assert results["tasks"]["Lift"]["trained_on"] is True


def _bad_file(path, mutate) -> None:
    eps = [{"actions": np.zeros((4, 7)), "rewards": np.zeros(4), "states": np.zeros((4, 3)),
            "proprio": np.zeros((4, 9)), "object": np.zeros((4, 10)),
            "agentview": np.zeros((4, 8, 8, 3), np.uint8)} for _ in range(2)]
    mutate(eps)
    write_robomimic(path, eps, valid=())


@pytest.mark.parametrize(
    ("mutate", "flags", "match"),
    [
        (lambda e: e[1].__setitem__("actions", np.full((4, 7), np.nan)), {},
         "demo 'demo_1': 'action' has a non-finite value at step 0"),
        (lambda e: e[1].__setitem__("actions", np.zeros((5, 7))), {},
         "demo 'demo_1': 'object' has 4 steps but 'action' has 5"),
        (lambda e: None, {"keys": ("robot0_joint_pos",)},
         "--keys: 'robot0_joint_pos' is not in"),
        (lambda e: None, {"cameras": ("frontview",)}, "--cameras: 'frontview' is not in"),
    ],
)
def test_bad_robomimic_inputs_are_one_sentence_and_keep_what_was_committed(
        tmp_path, mutate, flags, match):
    path = tmp_path / "bad.hdf5"
    _bad_file(path, mutate)
    out = tmp_path / "bad.zarr"
    with pytest.raises(UserError, match=match):
        convert(ConvertConfig(format="robomimic", input=str(path), out=str(out), **flags),
                progress=False)
    if "non-finite" in match or "steps" in match:  # demo_0 was committed and stays
        assert EpisodeStore.open(out).num_episodes == 1


def test_files_of_another_format_are_refused(tmp_path):
    text = tmp_path / "notes.hdf5"
    text.write_text("hello")
    with pytest.raises(UserError, match="is not an HDF5 file"):
        convert(ConvertConfig(format="robomimic", input=str(text), out=str(tmp_path / "a.zarr")),
                progress=False)
    other = tmp_path / "other.hdf5"
    with h5py.File(other, "w") as f:
        f.create_dataset("observation/joint_pos", data=np.zeros((3, 2)))
    with pytest.raises(UserError, match="no 'data' group"):
        convert(ConvertConfig(format="robomimic", input=str(other), out=str(tmp_path / "b.zarr")),
                progress=False)
    with pytest.raises(UserError, match="does not exist"):
        convert(ConvertConfig(format="robomimic", input=str(tmp_path / "none.hdf5"),
                              out=str(tmp_path / "c.zarr")), progress=False)
    assert not (tmp_path / "a.zarr").exists() and not (tmp_path / "b.zarr").exists()


# ----------------------------------------------------------------------------- ICRT HDF5


def write_icrt(root, lengths=(5, 6, 7, 5), tasks=("pick the tiger", "pick the tiger",
                                                   "open the drawer", "open the drawer")):
    """ICRT's layout: a DROID-style HDF5 (one group per episode) plus its dataset JSON files."""
    import imageio.v3 as iio

    rng = np.random.default_rng(0)
    episodes = {}
    with h5py.File(root / "r2d2.hdf5", "w") as f:
        for i, n in enumerate(lengths):
            name = f"trajectory_{i}"
            e = {"observation/cartesian_position": rng.normal(size=(n, 6)),
                 "observation/gripper_position": rng.uniform(size=(n, 1)),
                 "action/cartesian_position": rng.normal(size=(n, 6)),
                 "action/gripper_position": rng.uniform(size=(n, 1)),
                 "observation/exterior_image_1_left":
                     rng.integers(0, 256, (n, 12, 16, 3), dtype=np.uint8),
                 "observation/wrist_image_left":
                     rng.integers(0, 256, (n, 12, 16, 3), dtype=np.uint8)}
            g = f.create_group(name)
            for k, v in e.items():
                if k.endswith("wrist_image_left"):  # one encoded (PNG) image per step
                    bufs = [np.frombuffer(iio.imwrite("<bytes>", fr, extension=".png"), np.uint8)
                            for fr in v]
                    ds = g.create_dataset(k, (n,), dtype=h5py.vlen_dtype(np.uint8))
                    for t, b in enumerate(bufs):
                        ds[t] = b
                else:
                    g.create_dataset(k, data=v)
            episodes[name] = e
    names = list(episodes)
    (root / "hdf5_keys.json").write_text(json.dumps(names))
    (root / "epi_len_mapping.json").write_text(json.dumps(dict(zip(names, lengths, strict=True))))
    verb: dict[str, list] = {}
    for name, task in zip(names, tasks, strict=True):
        verb.setdefault(task, []).append(name)
    (root / "verb_to_episode.json").write_text(json.dumps(verb))
    cfg = {"dataset_path": ["r2d2.hdf5"], "hdf5_keys": ["hdf5_keys.json"],
           "epi_len_mapping_json": "epi_len_mapping.json",
           "verb_to_episode": "verb_to_episode.json", "train_split": 0.95,
           "action_keys": ["action/cartesian_position", "action/gripper_position"],
           "image_keys": ["observation/exterior_image_1_left", "observation/wrist_image_left"],
           "proprio_keys": ["observation/cartesian_position", "observation/gripper_position"]}
    (root / "dataset_config.json").write_text(json.dumps(cfg))
    return root / "dataset_config.json", episodes


def test_icrt_hdf5_conversion_keeps_numbers_tasks_frames_and_rotations(tmp_path):
    src, episodes = write_icrt(tmp_path)
    out = tmp_path / "mt.zarr"
    convert(ConvertConfig(format="icrt", input=str(src), out=str(out)), progress=False)
    store = EpisodeStore.open(out)
    assert sorted(store.tasks) == ["open the drawer", "pick the tiger"]
    assert store.num_episodes == 4
    for i, e in enumerate(episodes.values()):
        ep = store.episode(i)
        np.testing.assert_allclose(ep["cartesian_position"],
                                   e["observation/cartesian_position"], atol=1e-6)
        np.testing.assert_allclose(ep["action_gripper_position"],
                                   e["action/gripper_position"], atol=1e-6)
        np.testing.assert_array_equal(ep["image_exterior_image_1_left"],
                                      e["observation/exterior_image_1_left"])
        np.testing.assert_array_equal(ep["image_wrist_image_left"],
                                      e["observation/wrist_image_left"])  # PNG: lossless
    euler = {"start": 3, "format": "euler_xyz"}
    assert store.key_info("cartesian_position")["rotation"] == euler
    assert store.key_info("action_cartesian_position")["rotation"] == euler
    spec = DatasetSpec.load(out.with_suffix(".json"))
    assert spec.train_split == 0.95
    assert spec.proprio_keys == ("cartesian_position", "gripper_position")
    assert spec.action_keys == ("action_cartesian_position", "action_gripper_position")
    assert spec.image_keys == ("image_exterior_image_1_left", "image_wrist_image_left")
    # ICRT's task_grouping travels into our dataset JSON
    (tmp_path / "grouping.json").write_text(json.dumps(
        {"tasks": {"pick": ["pick the tiger"], "open": ["open the drawer"]},
         "ratios": {"pick": 1.5, "open": 0.5}}))
    grouped = tmp_path / "grouped.json"
    grouped.write_text(json.dumps({**json.loads(src.read_text()),
                                   "task_grouping": "grouping.json"}))
    convert(ConvertConfig(format="icrt", input=str(grouped), out=str(tmp_path / "g.zarr")),
            progress=False)
    assert DatasetSpec.load(tmp_path / "g.json").task_ratios == {"pick the tiger": 1.5,
                                                                 "open the drawer": 0.5}
    # resized on the way in
    small = tmp_path / "small.zarr"
    convert(ConvertConfig(format="icrt", input=str(src), out=str(small), image_size=8,
                          cameras=("wrist_image_left",), max_episodes=2), progress=False)
    st = EpisodeStore.open(small)
    assert st.num_episodes == 2 and "image_exterior_image_1_left" not in st.keys
    assert st.episode(0)["image_wrist_image_left"].shape == (5, 8, 8, 3)


def test_bad_icrt_inputs_are_one_sentence(tmp_path):
    src, _ = write_icrt(tmp_path)
    body = json.loads(src.read_text())
    lengths = json.loads((tmp_path / "epi_len_mapping.json").read_text())
    lengths["trajectory_1"] = 99
    (tmp_path / "bad_len.json").write_text(json.dumps(lengths))
    cases = [
        ({**body, "epi_len_mapping_json": "bad_len.json"},
         "episode 'trajectory_1' has 6 steps but epi_len_mapping says 99"),
        ({**body, "dataset_path": ["missing.hdf5"]}, "'missing.hdf5' .* does not exist"),
        ({k: v for k, v in body.items() if k != "verb_to_episode"}, "lacks verb_to_episode"),
        ({**body, "proprio_keys": ["observation/joint_position"]},
         "episode 'trajectory_0' has no 'observation/joint_position'"),
    ]
    for i, (cfg, match) in enumerate(cases):
        path = tmp_path / f"case{i}.json"
        path.write_text(json.dumps(cfg))
        with pytest.raises(UserError, match=match):
            convert(ConvertConfig(format="icrt", input=str(path),
                                  out=str(tmp_path / f"case{i}.zarr")), progress=False)
    with pytest.raises(UserError, match="is not valid JSON"):
        convert(ConvertConfig(format="icrt", input=str(tmp_path / "r2d2.hdf5"),
                              out=str(tmp_path / "x.zarr")), progress=False)


def test_an_icrt_dataset_json_given_to_training_is_converted_once(tmp_path, caplog):
    src, episodes = write_icrt(tmp_path, lengths=(20, 22, 24, 21))
    with caplog.at_level("WARNING"):
        spec = DatasetSpec.load(src)
    assert "converting it once" in caplog.text
    assert spec.path == tmp_path / "dataset_config.icrt.json"
    assert spec.image_keys == ("image_exterior_image_1_left", "image_wrist_image_left")
    store = EpisodeStore.open(tmp_path / "dataset_config.icrt.zarr")
    assert store.num_episodes == 4 and store.attrs["convert_complete"] is True
    caplog.clear()
    with caplog.at_level("WARNING"):
        again = DatasetSpec.load(src)  # reused, not converted again
    assert again.path == spec.path and "converting" not in caplog.text
    data = SequenceDataset(DatasetConfig(dataset_json=str(src)),
                           SharedConfig(seq_length=16, num_pred_steps=2))
    item = data[0]
    assert item["image_wrist_image_left"].shape == (16, 12, 16, 3)
    assert item["proprio"].shape == (16, 10)  # xyz + Euler as 6-D rotation (declared) + gripper
    # DROID's absolute pose targets declare their reference: ICRT's delta actions train on them
    assert store.key_info("action_cartesian_position")["delta_reference"] == {
        "key": "cartesian_position", "pos_dims": 3}
    delta = SequenceDataset(DatasetConfig(dataset_json=str(src)),
                            SharedConfig(seq_length=16, num_pred_steps=2, use_delta_action=True))
    assert delta.codec.delta is not None and torch.isfinite(delta[0]["action_chunk"]).all()


def test_kill_9_mid_conversion_then_resume_equals_one_run(tmp_path):
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    rng = np.random.default_rng(0)
    eps = [{"actions": rng.normal(size=(30, 7)), "rewards": np.r_[np.zeros(29), 1.0],
            "states": np.zeros((30, 3)), "proprio": rng.normal(size=(30, 9)),
            "object": rng.normal(size=(30, 10)),
            "agentview": rng.integers(0, 256, (30, 24, 24, 3), dtype=np.uint8)}
           for _ in range(40)]
    src = tmp_path / "many.hdf5"
    write_robomimic(src, eps, valid=(5, 33))
    script = Path(__file__).resolve().parents[1] / "scripts" / "convert.py"
    out = tmp_path / "killed.zarr"
    proc = subprocess.Popen([sys.executable, str(script), "--format", "robomimic", "--input",
                             str(src), "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if EpisodeStore.open(out, check=False).num_episodes >= 3:
                break
        except UserError:
            pass
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = EpisodeStore.open(out).num_episodes
    assert 3 <= killed_at < 40  # killed mid-way, its committed episodes intact
    convert(ConvertConfig(format="robomimic", input=str(src), out=str(out), resume=True),
            progress=False)
    whole = tmp_path / "whole.zarr"
    convert(ConvertConfig(format="robomimic", input=str(src), out=str(whole)), progress=False)
    a, b = EpisodeStore.open(whole), EpisodeStore.open(out)
    assert a.num_episodes == b.num_episodes == 40
    assert a.attrs["valid_episodes"] == b.attrs["valid_episodes"] == [5, 33]
    for key in a.keys:
        np.testing.assert_array_equal(a.load(key), b.load(key))
    assert list(a.episode_ends) == list(b.episode_ends)
