"""The robosuite adapter keeps the icrt Env protocol: seeded resets, observation layout, the
step tuple, the family's bin-specific success check, and a working Lift expert."""

from __future__ import annotations

import os

os.environ.setdefault("MUJOCO_GL", "egl")  # before robosuite/mujoco are imported

import numpy as np
import pytest

from icrt.envs.base import available_tasks, make_env, make_expert
from icrt.errors import UserError

pytest.importorskip("robosuite")

pytestmark = pytest.mark.sim

CAMERAS = ("agentview", "robot0_eye_in_hand")


@pytest.fixture(scope="module")
def lift_env():
    env = make_env("robosuite", "Lift", image_size=64, cameras=CAMERAS)
    yield env
    env.close()


@pytest.fixture(scope="module")
def family_env():
    env = make_env("robosuite", "PickPlaceMilkToBin2")
    yield env
    env.close()


def test_task_list() -> None:
    tasks = available_tasks("robosuite")
    assert tasks[:4] == ["Lift", "Stack", "PickPlaceCan", "NutAssemblySquare"]
    assert len(tasks) == 20
    assert "PickPlaceCerealToBin4" in tasks and "PickPlaceBreadToBin1" in tasks


def test_unknown_task_and_camera_are_user_errors() -> None:
    with pytest.raises(UserError, match="Unknown robosuite task"):
        make_env("robosuite", "PickPlaceMilkToBin5")
    with pytest.raises(UserError, match="Unknown camera"):
        make_env("robosuite", "Lift", image_size=32, cameras=("nosuchcam",))


def test_reset_is_deterministic_and_seed_dependent(lift_env) -> None:
    a = lift_env.reset(seed=3)
    cube_a = lift_env.sim_state()["cube_pos"]
    lift_env.step(np.ones(7))  # disturb the state in between
    b = lift_env.reset(seed=3)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    lift_env.reset(seed=4)
    cube_c = lift_env.sim_state()["cube_pos"]
    assert np.linalg.norm(cube_a[:2] - cube_c[:2]) > 1e-3


def test_family_positions_vary_with_seed(family_env) -> None:
    family_env.reset(seed=0)
    s0 = family_env.sim_state()
    family_env.reset(seed=1)
    s1 = family_env.sim_state()
    for obj in ("Milk", "Bread", "Cereal", "Can"):
        assert np.linalg.norm(s0[f"{obj}_pos"][:2] - s1[f"{obj}_pos"][:2]) > 1e-3, obj


def test_observation_layout(lift_env) -> None:
    obs = lift_env.reset(seed=0)
    assert set(obs) == {"state", "proprio", "object", "image_agentview",
                        "image_robot0_eye_in_hand"}
    assert np.array_equal(obs["object"], obs["state"][-len(obs["object"]):])
    assert obs["state"].dtype == np.float32 and obs["state"].ndim == 1
    assert obs["proprio"].dtype == np.float32 and obs["proprio"].shape == (9,)
    quat = obs["proprio"][3:7]
    assert abs(np.linalg.norm(quat) - 1.0) < 1e-4
    for cam in CAMERAS:
        img = obs[f"image_{cam}"]
        assert img.shape == (64, 64, 3) and img.dtype == np.uint8
        assert img.std() > 1.0  # something was rendered
    assert lift_env.obs_meta()["proprio"]["rotation"] == {"start": 3, "format": "quat_xyzw"}
    assert lift_env.action_dim == 7 and lift_env.fps == 20.0
    frame = lift_env.render()
    assert frame.shape == (64, 64, 3) and frame.dtype == np.uint8


def test_step_tuple_and_max_steps() -> None:
    env = make_env("robosuite", "Lift", max_steps=3)
    try:
        obs = env.reset(seed=0)
        size = obs["state"].shape
        dones = []
        for _ in range(3):
            obs, reward, done, info = env.step(np.zeros(env.action_dim))
            assert isinstance(reward, float) and isinstance(done, bool)
            assert isinstance(info["success"], bool) and not info["success"]
            assert obs["state"].shape == size
            dones.append(done)
        assert dones == [False, False, True]
        assert env.render().shape == (256, 256, 3)
    finally:
        env.close()


def test_family_success_only_for_the_chosen_bin(family_env) -> None:
    family_env.reset(seed=0)
    half_z = family_env.sim_state()["Milk_half"][2]

    def place_in(k: int) -> None:
        c = family_env.bin_center(k)
        family_env.set_object_pose("Milk", [c[0], c[1], 0.82 + half_z + 0.005])

    place_in(2)
    assert family_env.check_success()
    assert family_env.object_in_bin("Milk", 2)
    for k in (1, 3, 4):
        place_in(k)
        assert not family_env.check_success(), k
        assert family_env.object_in_bin("Milk", k)
    # another object in bin 2 does not count either
    family_env.reset(seed=0)
    c = family_env.bin_center(2)
    family_env.set_object_pose("Bread", [c[0], c[1], 0.87])
    assert not family_env.check_success()


def test_family_lists_every_task_done(family_env) -> None:
    """What an evaluation records: which (object, bin) pairs are done, right or wrong."""
    family_env.reset(seed=0)
    assert family_env.tasks_done() == []
    for obj, k, z in (("Milk", 3, 0.82 + family_env.sim_state()["Milk_half"][2] + 0.005),
                      ("Bread", 2, 0.87)):
        c = family_env.bin_center(k)
        family_env.set_object_pose(obj, [c[0], c[1], z])
    assert family_env.tasks_done() == ["PickPlaceMilkToBin3", "PickPlaceBreadToBin2"]


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_lift_expert_succeeds(seed: int) -> None:
    env = make_env("robosuite", "Lift")
    expert = make_expert("robosuite", "Lift")
    try:
        obs = env.reset(seed=seed)
        expert.reset(env)
        for _ in range(env.max_steps):
            obs, _, done, info = env.step(expert.act(env, obs))
            if info["success"]:
                break
        assert info["success"]
    finally:
        env.close()


@pytest.mark.slow
def test_robosuite_collect_train_eval_end_to_end(tmp_path) -> None:
    """One Lift demonstration with two cameras collected, trained on and evaluated with a prompt."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from test_train import tiny_args

    from icrt.config import CollectConfig, EvalConfig, parse_config
    from icrt.data.collect import collect
    from icrt.data.spec import DatasetSpec
    from icrt.data.store import EpisodeStore
    from icrt.eval.rollout import evaluate
    from icrt.train.loop import train

    out = tmp_path / "lift.zarr"
    collect(CollectConfig(env="robosuite", tasks=("Lift",), episodes_per_task=2,
                          prompt_episodes_per_task=1, image_size=32, cameras=CAMERAS,
                          out=str(out), workers=1), progress=False)
    store = EpisodeStore.open(out)
    assert store.num_episodes == 2 and store.episode_success.all()
    assert store.key_info("image_agentview")["shape"] == [32, 32, 3]
    assert store.key_info("proprio")["rotation"] == {"start": 3, "format": "quat_xyzw"}
    assert DatasetSpec.load(out.with_suffix(".json")).proprio_keys == ("proprio",)
    run = train(parse_config(tiny_args(
        out.with_suffix(".json"), tmp_path / "run", "--trainer-cfg.epochs", "1",
        "--shared-cfg.seq-length", "32", "--shared-cfg.batch-size", "2",
        "--model-cfg.vision-encoder-cfg.vision-encoder", "resnet18",
        "--model-cfg.vision-encoder-cfg.vision-nonpretrained")), progress=False)
    results = evaluate(EvalConfig(checkpoint=str(run), prompt_dataset=str(
        tmp_path / "lift_prompts.json"), episodes_per_task=1, workers=1, max_steps=5,
        video_dir=str(tmp_path / "videos")), progress=False)
    assert results["env"] == "robosuite" and results["tasks"]["Lift"]["episodes"] == 1
    assert results["episodes"][0]["length"] == 5
    assert (tmp_path / "videos" / "Lift_1prompt_ep000.mp4").stat().st_size > 0


def test_family_env_judges_another_pair_for_prompt_following(family_env, lift_env) -> None:
    from icrt.errors import UserError

    family_env.reset(seed=1)
    c = family_env.bin_center(3)
    half_z = family_env.sim_state()["Bread_half"][2]
    family_env.set_object_pose("Bread", [c[0], c[1], 0.82 + half_z + 0.005])
    assert family_env.task_success("PickPlaceBreadToBin3")
    assert not family_env.task_success("PickPlaceBreadToBin1")
    assert not family_env.task_success("PickPlaceMilkToBin3")
    assert not family_env.check_success()  # the env's own pair is another one
    with pytest.raises(UserError, match="Only the pick-and-place family"):
        lift_env.task_success("PickPlaceBreadToBin3")


def test_mismatched_prompts_report_prompt_following(tmp_path) -> None:
    """--prompt-tasks: episodes of one pair prompted with another pair's demonstrations."""
    from icrt.config import EvalConfig, parse_config
    from icrt.data.spec import write_dataset_json
    from icrt.data.store import EpisodeStore
    from icrt.eval.rollout import evaluate, format_table
    from icrt.train.loop import train

    env = make_env("robosuite", "PickPlaceMilkToBin1")
    try:
        obs = env.reset(0)
    finally:
        env.close()
    pairs = ("PickPlaceMilkToBin1", "PickPlaceBreadToBin2")
    rng = np.random.default_rng(0)
    for name in ("fam", "fam_prompts"):  # random data of the right layout: plumbing only
        store = EpisodeStore.create(tmp_path / f"{name}.zarr", env={"name": "robosuite"}, fps=20)
        for task in pairs:
            for _ in range(3):
                n = 20
                store.add_episode(
                    {"state": rng.normal(size=(n, *obs["state"].shape)).astype("f4"),
                     "action": rng.uniform(-1, 1, size=(n, 7)).astype("f4")}, task=task)
        store.close()
        write_dataset_json(tmp_path / f"{name}.json", stores=[tmp_path / f"{name}.zarr"],
                           proprio_keys=["state"], action_keys=["action"], train_split=1.0)
    from test_train import tiny_args

    run = train(parse_config(tiny_args(tmp_path / "fam.json", tmp_path / "run",
                                       "--trainer-cfg.epochs", "1", "--shared-cfg.seq-length",
                                       "24")), progress=False)
    results = evaluate(EvalConfig(checkpoint=str(run), tasks=pairs, prompt_tasks=pairs[::-1],
                                  prompt_dataset=str(tmp_path / "fam_prompts.json"),
                                  episodes_per_task=1,
                                  max_steps=3, workers=1), progress=False)
    milk = results["tasks"]["PickPlaceMilkToBin1"]
    assert milk["prompt_task"] == "PickPlaceBreadToBin2" and milk["prompt_following_rate"] == 0
    ep = results["episodes"][0]
    assert ep["prompt_task"] == "PickPlaceBreadToBin2" and ep["prompt_task_done"] is False
    assert "prompted task done" in format_table(results)
    assert results["mean_prompt_following_rate"] == 0.0
    # every episode records the family tasks done (none in 3 random steps)
    assert ep["tasks_done"] == [] and milk["nothing_done_rate"] == 1.0
    assert milk["other_task_rate"] == 0.0 and "nothing done" in format_table(results)
