"""One codec for training and serving: the same episode gives the same tokens and targets in
the training sample and in InContextPolicy, with rotations and delta actions."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation
from test_train import tiny_args

from icrt.config import parse_config
from icrt.data.sequence import SequenceDataset
from icrt.data.spec import DatasetSpec, write_dataset_json
from icrt.data.store import EpisodeStore
from icrt.data.transforms import rotation_to_6d
from icrt.eval.inference import InContextPolicy
from icrt.models.policy import ICRTPolicy
from icrt.train.checkpoint import Checkpoint
from icrt.train.loop import policy_spec, train

ROT = {"start": 3, "format": "quat_xyzw"}


def pose_episode(rng: np.random.Generator, length: int) -> dict[str, np.ndarray]:
    """An end effector moving towards a goal pose; actions are absolute pose targets."""
    pos = rng.uniform(-0.2, 0.2, 3) + np.array([0.5, 0.0, 0.3])
    rot = Rotation.from_rotvec(rng.normal(size=3) * 0.3)
    goal_pos, goal_rot = pos + rng.uniform(-0.2, 0.2, 3), Rotation.from_rotvec(rng.normal(size=3))
    proprio, action = [], []
    for t in range(length):
        a = min(1.0, (t + 1) / length)
        nxt_pos = pos + 0.2 * (goal_pos - pos)
        nxt_rot = Rotation.from_rotvec(0.2 * (goal_rot * rot.inv()).as_rotvec()) * rot
        proprio.append(np.concatenate([pos, rot.as_quat()]))
        action.append(np.concatenate([nxt_pos, nxt_rot.as_quat(), [a > 0.5]]))
        pos, rot = nxt_pos, nxt_rot
    return {"proprio": np.asarray(proprio, np.float32), "action": np.asarray(action, np.float32)}


@pytest.fixture(scope="module")
def pose_json(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pose")
    rng = np.random.default_rng(0)
    store = EpisodeStore.create(root / "pose.zarr", env={"name": "synthetic"}, fps=10)
    for task in ("a", "b"):
        for _ in range(4):
            store.add_episode(pose_episode(rng, int(rng.integers(20, 30))), task=task)
    store.set_key_meta("proprio", rotation=ROT)
    store.set_key_meta("action", rotation=ROT,
                       delta_reference={"key": "proprio", "pos_dims": 3})
    store.close()
    path = root / "pose.json"
    write_dataset_json(path, stores=[root / "pose.zarr"], proprio_keys=["proprio"],
                       action_keys=["action"], train_split=1.0)
    return path


def _dataset_and_policy(pose_json, tmp_path):
    cfg = parse_config(tiny_args(pose_json, tmp_path, "--shared-cfg.use-delta-action",
                                 "--dataset-cfg.proprio-noise", "0"))
    ds = SequenceDataset(cfg.dataset_cfg, cfg.shared_cfg, "train",
                         spec=DatasetSpec.load(pose_json))
    spec = policy_spec(ds, cfg)
    model = ICRTPolicy(cfg.model_cfg, spec).eval()
    policy = InContextPolicy(model, Checkpoint(Path("<memory>"), cfg, spec, ds.normalizer))
    return ds, policy


def test_action_tokens_are_normalised_with_absolute_statistics(pose_json, tmp_path):
    ds, _ = _dataset_and_policy(pose_json, tmp_path)
    assert set(ds.normalizer.modes) == {"proprio", "action", "action_target"}
    # min_max of the absolute actions maps them into [-1, 1]; delta statistics would not
    assert np.abs(ds._action).max() <= 1.0 + 1e-5
    item = ds[0]
    chunk = item["action_chunk"][item["action_mask"]]
    assert chunk.abs().max() <= 1.0 + 1e-5  # targets use the delta statistics


def test_training_sample_equals_serving_inputs_and_targets(pose_json, tmp_path):
    ds, policy = _dataset_and_policy(pose_json, tmp_path)
    store = EpisodeStore.open(ds.spec.stores[0])
    K = ds.num_pred_steps
    checked = 0
    for index in range(min(len(ds), 6)):
        item = ds[index]
        starts = torch.nonzero(item["episode_start"]).flatten().tolist()
        ends = starts[1:] + [len(item["episode"])]
        for a, b in zip(starts, ends, strict=True):
            ref = ds.episodes[int(item["episode"][a])]
            ep = store.episode(ref.index)
            T = len(ep["action"])
            n = b - a  # steps of this episode inside the window
            obs = policy._obs_tensors(ep, T)
            served_proprio = obs["proprio"][0, :n]
            raw_actions = policy.codec.actions(ep, T)
            served_actions = policy._action_inputs(raw_actions)[0, :n]
            torch.testing.assert_close(item["proprio"][a:b], served_proprio, rtol=0, atol=1e-6)
            torch.testing.assert_close(item["action"][a:b], served_actions, rtol=0, atol=1e-6)
            # the same tokens
            # (fresh copies: a matmul over a tensor that starts mid-allocation may take another
            # SIMD path and differ in the last bit)
            s_train = policy.model.state_tokens({"proprio": item["proprio"][None, a:b].clone()})
            s_serve = policy.model.state_tokens({"proprio": served_proprio[None].clone()})
            torch.testing.assert_close(s_train, s_serve, rtol=0, atol=0)
            # targets decode back to the absolute actions of the next K steps
            raw_proprio = policy.codec.proprio(ep, T)
            for t in range(n):
                valid = item["action_mask"][a + t].numpy()
                decoded = policy.codec.decode_chunk(item["action_chunk"][a + t].numpy(),
                                                    raw_proprio[t])
                want = raw_actions[np.minimum(np.arange(t, t + K), T - 1)]
                np.testing.assert_allclose(decoded[valid], want[valid], atol=2e-4)
            checked += 1
    assert checked >= 3
    # the 6D layout of the native quaternions is what both sides feed
    np.testing.assert_allclose(policy.codec.actions(ep, T)[:, 3:9],
                               rotation_to_6d(ep["action"], ROT)[:, 3:9], atol=1e-6)


def test_delta_checkpoint_serves_absolute_native_actions(pose_json, tmp_path):
    run = train(parse_config(tiny_args(pose_json, tmp_path / "run", "--trainer-cfg.epochs", "1",
                                       "--shared-cfg.use-delta-action")), progress=False)
    policy = InContextPolicy.from_checkpoint(run)
    assert policy.normalizer.target_key == "action_target"
    store = EpisodeStore.open(pose_json.parent / "pose.zarr")
    policy.prompt([store.episode(0)])
    ep = store.episode(1)
    for t in range(3):
        action = policy.act({"proprio": ep["proprio"][t]})
        assert action.shape == (8,) and np.isfinite(action).all()
        assert abs(np.linalg.norm(action[3:7]) - 1.0) < 1e-4  # a native unit quaternion
        # absolute targets near the current pose, not deltas around zero
        assert np.linalg.norm(action[:3] - ep["proprio"][t][:3]) < 1.0
        assert np.linalg.norm(action[:3]) > 0.2


def test_delta_actions_follow_the_data_unless_a_flag_says(pose_json, tmp_path, caplog):
    from icrt.config import _tristate_flags

    assert _tristate_flags(["--shared-cfg.use-delta-action", "--x"]) == [
        "--shared-cfg.use-delta-action", "True", "--x"]
    assert _tristate_flags(["--shared-cfg.no-use-delta-action"]) == [
        "--shared-cfg.use-delta-action", "False"]
    assert _tristate_flags(["--shared-cfg.use-delta-action", "False"]) == [
        "--shared-cfg.use-delta-action", "False"]
    assert parse_config(tiny_args(pose_json, tmp_path)).shared_cfg.use_delta_action is None
    # the pose store's action key declares its reference: on, said in the log, in the policy
    with caplog.at_level("INFO"):
        run = train(parse_config(tiny_args(pose_json, tmp_path / "auto", "--trainer-cfg.epochs",
                                           "1")), progress=False)
    assert "delta actions on: action key 'action' holds absolute pose targets" in caplog.text
    assert json.loads((run / "config.json").read_text())["shared_cfg"]["use_delta_action"] is None
    assert InContextPolicy.from_checkpoint(run).spec.use_delta_action is True
    # the flag wins
    cfg = parse_config(tiny_args(pose_json, tmp_path / "off", "--shared-cfg.no-use-delta-action"))
    ds = SequenceDataset(cfg.dataset_cfg, cfg.shared_cfg, "train", spec=DatasetSpec.load(pose_json))
    assert cfg.shared_cfg.use_delta_action is False and ds.codec.delta is None
