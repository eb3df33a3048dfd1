"""Scripted Meta-World demonstrations end to end: stores, dataset JSONs, seeds, reproducibility."""

import json
import os

import numpy as np
import pytest

from icrt.config import CollectConfig
from icrt.data.collect import collect
from icrt.data.spec import DatasetSpec
from icrt.data.store import EpisodeStore
from icrt.errors import UserError

pytestmark = pytest.mark.sim

TASKS = ("reach-v3", "button-press-topdown-v3", "drawer-open-v3")


@pytest.fixture(scope="module")
def collected(tmp_path_factory):
    out = tmp_path_factory.mktemp("collect") / "mw.zarr"
    cfg = CollectConfig(env="metaworld", tasks=TASKS, episodes_per_task=2,
                        prompt_episodes_per_task=1, out=str(out), workers=2, seed=5)
    summary = collect(cfg, progress=False)
    return cfg, out, summary


def test_collect_writes_successful_episodes_for_each_task(collected):
    cfg, out, summary = collected
    store = EpisodeStore.open(out)
    assert store.num_episodes == 6
    assert sorted(store.tasks) == sorted(TASKS)
    assert store.episode_success.all()
    assert store.episode_source.tolist() == [0] * 6
    assert set(store.keys) == {"state", "proprio", "action", "reward"}
    assert store.key_info("state")["shape"] == [39]
    assert store.key_info("action")["shape"] == [4]
    assert store.env["name"] == "metaworld" and store.fps == 80.0
    assert store.attrs["stats"]["action"]["min"][0] >= -1.0
    ep = store.episode(0)
    np.testing.assert_array_equal(ep["proprio"], ep["state"][:, :4])
    assert summary["episodes"] == 9 and summary["episodes_per_min"] > 0


def test_dataset_jsons_and_held_out_prompts(collected):
    cfg, out, _ = collected
    spec = DatasetSpec.load(out.with_suffix(".json"))
    assert spec.stores == (out,)
    assert spec.proprio_keys == ("state",) and spec.action_keys == ("action",)
    prompts = out.with_name("mw_prompts.zarr")
    pspec = DatasetSpec.load(out.with_name("mw_prompts.json"))
    assert pspec.stores == (prompts,) and pspec.train_split == 1.0
    train, held_out = EpisodeStore.open(out), EpisodeStore.open(prompts)
    assert held_out.num_episodes == 3
    assert not set(train.episode_seed.tolist()) & set(held_out.episode_seed.tolist())
    # distinct seeds give distinct initial states
    first = {tuple(train.episode(i)["state"][0]) for i in range(train.num_episodes)}
    assert not first & {tuple(held_out.episode(i)["state"][0]) for i in range(3)}


def test_collect_is_reproducible_across_worker_counts(collected, tmp_path):
    cfg, out, _ = collected
    again = tmp_path / "again.zarr"
    collect(CollectConfig(env="metaworld", tasks=TASKS[:1], episodes_per_task=2,
                          out=str(again), workers=1, seed=5), progress=False)
    a, b = EpisodeStore.open(out), EpisodeStore.open(again)
    for i in range(2):  # the first task's episodes are identical
        for k in ("state", "action"):
            np.testing.assert_array_equal(a.episode(i)[k], b.episode(i)[k])


def test_collect_images_and_keep_failures(tmp_path):
    out = tmp_path / "img.zarr"
    collect(CollectConfig(env="metaworld", tasks=("reach-v3",), episodes_per_task=2,
                          out=str(out), workers=1, image_size=32, max_steps=15,
                          keep_failures=True), progress=False)
    store = EpisodeStore.open(out)
    assert store.num_episodes == 2
    assert not store.episode_success.any()  # 15 steps are too few to reach the goal
    assert store.key_info("image_corner") == {"kind": "image", "shape": [32, 32, 3],
                                              "dtype": "uint8"}
    ep = store.episode(0)
    assert ep["image_gripperPOV"].shape == (15, 32, 32, 3) and ep["image_corner"].std() > 0
    spec = json.loads(out.with_suffix(".json").read_text())
    assert spec["image_keys"] == ["image_corner", "image_gripperPOV"]
    assert spec["proprio_keys"] == ["proprio"]  # with cameras: robot-only low-dim input
    chosen = tmp_path / "chosen.zarr"
    collect(CollectConfig(env="metaworld", tasks=("reach-v3",), episodes_per_task=1,
                          out=str(chosen), workers=1, image_size=16, max_steps=3,
                          keep_failures=True, proprio_keys=("state",)), progress=False)
    assert json.loads(chosen.with_suffix(".json").read_text())["proprio_keys"] == ["state"]


def test_collect_errors(tmp_path):
    with pytest.raises(UserError, match="Unknown metaworld task 'fly-v3'"):
        collect(CollectConfig(tasks=("fly-v3",), out=str(tmp_path / "x.zarr")), progress=False)
    with pytest.raises(UserError, match="Unknown environment 'gazebo'"):
        collect(CollectConfig(env="gazebo", out=str(tmp_path / "x.zarr")), progress=False)
    with pytest.raises(UserError, match="succeeded in only 0"):
        collect(CollectConfig(tasks=("reach-v3",), episodes_per_task=1, max_steps=3,
                              workers=1, out=str(tmp_path / "y.zarr")), progress=False)
    (tmp_path / "z.zarr").mkdir()
    with pytest.raises(UserError, match="already exists"):
        collect(CollectConfig(tasks=("reach-v3",), out=str(tmp_path / "z.zarr")), progress=False)


def test_tasks_with_different_layouts_fail_before_collecting(tmp_path, monkeypatch):
    import icrt.data.collect as collect_module

    calls = []
    monkeypatch.setattr(collect_module, "run_expert_episode", lambda job: calls.append(job))
    from icrt.envs import metaworld

    original = metaworld.MetaWorldEnv._observe

    def observe(self, obs):  # pretend drawer-open has a longer state vector
        out = original(self, obs)
        if self.task == "drawer-open-v3":
            out["state"] = np.concatenate([out["state"], [0.0]]).astype(np.float32)
        return out

    monkeypatch.setattr(metaworld.MetaWorldEnv, "_observe", observe)
    with pytest.raises(UserError, match="'reach-v3' and 'drawer-open-v3' give 'state' of "
                                        "different shapes"):
        collect(CollectConfig(tasks=("reach-v3", "drawer-open-v3"), workers=1,
                              out=str(tmp_path / "x.zarr")), progress=False)
    assert not calls and not (tmp_path / "x.zarr").exists()


def test_rendering_then_importing_triton_does_not_crash():
    """Mesa's LLVM loaded before triton's segfaults a CUDA torch build; the renderer guards it."""
    import subprocess
    import sys
    from importlib.util import find_spec

    if find_spec("triton") is None:
        pytest.skip("triton is not installed")
    code = ("from icrt.envs.base import make_env\n"
            "env = make_env('metaworld', 'reach-v3', image_size=16, cameras=('corner',))\n"
            "assert env.reset(seed=0)['image_corner'].shape == (16, 16, 3)\n"
            "import triton._C.libtriton\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "MUJOCO_GL": "egl"})
    assert done.returncode == 0, done.stderr[-2000:]
