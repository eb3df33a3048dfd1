"""Interactive DAgger (icrt/rl/dagger.py): expert labels of the policy's own states, aggregated
fine-tuning with every step supervised, resumable rounds, one-sentence errors."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from helpers import reach_episode
from test_train import tiny_args

from icrt.config import CollectConfig, parse_config
from icrt.data.collect import collect
from icrt.data.sequence import STEP_SOURCE, SequenceDataset
from icrt.data.spec import write_dataset_json
from icrt.data.store import EpisodeStore
from icrt.envs.base import episode_seed, make_env, make_expert
from icrt.errors import UserError
from icrt.rl import dagger as dagger_module
from icrt.rl.dagger import DaggerConfig, _Rollout, dagger, format_rounds, run_dagger_episode
from icrt.train.checkpoint import latest_checkpoint, read_checkpoint
from icrt.train.loop import run_metrics, train

pytestmark = [pytest.mark.sim, pytest.mark.slow]

TASKS = ("reach-v3", "button-press-topdown-v3")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("dagger")
    collect(CollectConfig(tasks=TASKS, episodes_per_task=3, prompt_episodes_per_task=2,
                          out=str(root / "mw.zarr"), workers=1, train_split=0.67),
            progress=False)
    # without rebalancing, so that reach-v3's few steps always fill a window in the fine-tune
    run = train(parse_config(tiny_args(root / "mw.json", root / "run", "--trainer-cfg.epochs",
                                       "1", "--shared-cfg.seq-length", "96",
                                       "--dataset-cfg.no-rebalance-tasks")), progress=False)
    return root, run


def _cfg(root, run, out, **kw):
    base = dict(checkpoint=str(run), prompt_dataset=str(root / "mw_prompts.json"),
                out=str(out), tasks=("reach-v3",), rounds=1, episodes_per_round=2,
                max_steps=15, finetune_steps=3, lr=1e-3, eval_episodes=1, workers=1)
    return DaggerConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def one_round(trained, tmp_path_factory):
    root, run = trained
    out = tmp_path_factory.mktemp("dagger_run") / "out"
    state = dagger(_cfg(root, run, out), progress=False)
    return root, run, out, state


def test_rollouts_hold_the_policys_states_and_the_experts_labels(one_round):
    _, _, out, state = one_round
    store = EpisodeStore.open(out / "dagger.zarr")
    assert store.num_episodes == 2 and store.episode_task_names == ["reach-v3"] * 2
    assert store.episode_source.tolist() == [1, 1]  # the policy acted
    assert STEP_SOURCE not in store.keys  # not a human-intervention store: all steps supervised
    assert store.episode_seed.tolist() == [episode_seed(0, "dagger", "reach-v3", i)
                                           for i in range(2)]
    env = make_env("metaworld", "reach-v3", max_steps=15)
    expert = make_expert("metaworld", "reach-v3")
    differs = 0
    for i in range(store.num_episodes):
        ep = store.episode(i)
        obs = env.reset(int(store.episode_seed[i]))
        expert.reset(env)
        for t in range(len(ep["action"])):
            np.testing.assert_array_equal(obs["state"], ep["state"][t])  # what the policy saw
            np.testing.assert_allclose(expert.act(env, obs), ep["action"][t], atol=1e-6)
            differs += not np.allclose(ep["action"][t], ep["executed_action"][t], atol=1e-3)
            obs, _, _, _ = env.step(ep["executed_action"][t])
    env.close()
    assert differs > 0  # the policy's actions were executed, not the labels
    assert state["rounds"][1]["rollouts"]["episodes"] == 2


def test_beta_one_executes_the_expert_and_the_policy_context_gets_it(trained):
    from icrt.config import EvalConfig
    from icrt.eval.rollout import _worker_init, close_worker_envs, plan_episodes

    root, run = trained
    jobs, _ = plan_episodes(EvalConfig(checkpoint=str(run), tasks=("reach-v3",), max_steps=10,
                                       prompt_dataset=str(root / "mw_prompts.json"),
                                       episodes_per_task=1, workers=1))
    _worker_init(1)
    try:
        result = run_dagger_episode(_Rollout(jobs[0], beta=1.0))
    finally:
        close_worker_envs()
    data = result["data"]
    np.testing.assert_array_equal(data["action"], data["executed_action"])
    assert result["expert_steps"] == result["length"] == 10


def test_finetune_trains_on_aggregated_data_with_every_dagger_step_supervised(one_round):
    _, run, out, state = one_round
    round_dir = out / "round-1"
    spec = json.loads((round_dir / "dataset.json").read_text())
    assert spec["include_failures"] is True
    assert spec["stores"][-1].endswith("dagger.zarr") and len(spec["stores"]) == 2
    ckpt = read_checkpoint(round_dir)
    assert state["rounds"][1]["checkpoint"] == str(ckpt.path)
    # initialised from round 0's weights (a fresh optimizer), then trained a few steps
    source = read_checkpoint(run)
    assert ckpt.config.model_cfg.policy_cfg.pretrained_path == str(source.path)
    assert ckpt.config.shared_cfg.resume is None
    steps = [m["step"] for m in run_metrics(round_dir) if "train/loss" in m]
    assert max(steps) == 3
    before, after = source.state_dict(), ckpt.state_dict()
    diff = max(float((after[k] - before[k]).abs().max()) for k in before)
    assert 0 < diff < 0.05
    # every DAgger episode (failures included) is in training; its steps carry loss
    store = EpisodeStore.open(out / "dagger.zarr")
    assert not store.episode_success.all()  # 15 steps are too few: failures are kept
    ds = SequenceDataset(ckpt.config.dataset_cfg, ckpt.config.shared_cfg, "train",
                         split_file=round_dir / "split.json")
    dagger_store = len(spec["stores"]) - 1
    mine = [j for j, e in enumerate(ds.episodes) if e.store == dagger_store]
    assert len(mine) == store.num_episodes
    seen = 0
    for index in range(len(ds)):
        item = ds[index]
        on_dagger = torch.isin(item["episode"], torch.tensor(mine))
        seen += int(on_dagger.sum())
        assert item["loss_mask"][on_dagger].all()
    assert seen > 0
    # the original validation episodes stay in validation
    split = json.loads((round_dir / "split.json").read_text())
    assert split["val"] == json.loads((run / "split.json").read_text())["val"]


def test_resume_skips_finished_rounds_and_refuses_other_settings(trained, tmp_path):
    root, run = trained
    out = tmp_path / "out"
    first = dagger(_cfg(root, run, out), progress=False)
    ckpt1 = latest_checkpoint(out / "round-1")
    stamp = (ckpt1 / "model.safetensors").stat().st_mtime_ns
    again = dagger(_cfg(root, run, out), progress=False)  # nothing left to do
    assert again["rounds"] == first["rounds"]
    assert EpisodeStore.open(out / "dagger.zarr").num_episodes == 2
    # an interrupted round 2 (its rollouts and fine-tune done, not its evaluation) continues
    # without redoing them; round 1 is untouched
    two = dagger(_cfg(root, run, out, rounds=2), progress=False)
    assert [r["round"] for r in two["rounds"]] == [0, 1, 2]
    assert EpisodeStore.open(out / "dagger.zarr").num_episodes == 4
    ckpt2 = latest_checkpoint(out / "round-2")
    stamp2 = (ckpt2 / "model.safetensors").stat().st_mtime_ns
    state = json.loads((out / "dagger.json").read_text())
    state["rounds"] = state["rounds"][:2]
    (out / "dagger.json").write_text(json.dumps(state))
    (out / "round-2" / "eval_prompted.json").unlink()
    resumed = dagger(_cfg(root, run, out, rounds=2), progress=False)
    assert EpisodeStore.open(out / "dagger.zarr").num_episodes == 4
    assert (ckpt2 / "model.safetensors").stat().st_mtime_ns == stamp2
    assert resumed["rounds"][2]["success_rate"] == two["rounds"][2]["success_rate"]
    assert (ckpt1 / "model.safetensors").stat().st_mtime_ns == stamp
    assert "| 2 |" in format_rounds(resumed)
    with pytest.raises(UserError, match="was run with --beta 0.0, not 0.5"):
        dagger(_cfg(root, run, out, beta=0.5), progress=False)
    # a run recorded before the execution settings existed ran with their defaults
    state = json.loads((out / "dagger.json").read_text())
    for name in ("execution", "open_loop_steps", "ensemble_decay"):
        del state["config"][name]
    (out / "dagger.json").write_text(json.dumps(state))
    assert len(dagger(_cfg(root, run, out, rounds=2), progress=False)["rounds"]) == 3
    with pytest.raises(UserError, match="was run with --execution 'ensemble', not 'open_loop'"):
        dagger(_cfg(root, run, out, rounds=2, execution="open_loop"), progress=False)


def test_rollouts_and_evaluations_execute_chunks_as_asked(trained, tmp_path):
    from icrt.eval.rollout import plan_episodes

    root, run = trained
    cfg = _cfg(root, run, tmp_path / "out", execution="open_loop", open_loop_steps=2)
    setup = dagger_module._setup(cfg)
    episodes, _ = plan_episodes(dagger_module._eval_config(setup, setup.source.path))
    kwargs = dict(episodes[0].policy_kwargs)
    assert kwargs["execution"] == "open_loop" and kwargs["open_loop_steps"] == 2
    with pytest.raises(ValueError, match="--open-loop-steps must be > 0"):
        _cfg(root, run, tmp_path / "out", open_loop_steps=0)


def test_bad_inputs_are_one_sentence(trained, tmp_path, monkeypatch):
    root, run = trained
    out = tmp_path / "out"
    with pytest.raises(UserError, match="does not exist"):
        dagger(_cfg(root, tmp_path / "missing", out))
    with pytest.raises(UserError, match="Unknown metaworld task 'reach-v2'"):
        dagger(_cfg(root, run, out, tasks=("reach-v2",)))
    with pytest.raises(UserError, match="'push-v3' is not one checkpoint"):
        dagger(_cfg(root, run, out, tasks=("push-v3",)))
    with pytest.raises(UserError, match="--prompt-dataset"):
        dagger(_cfg(root, run, out, prompt_dataset=None))
    for flag in ("rounds", "workers", "episodes_per_round"):
        with pytest.raises(ValueError, match=f"--{flag.replace('_', '-')} must be > 0"):
            _cfg(root, run, out, **{flag: 0})
    with pytest.raises(ValueError, match="--beta must be in"):
        _cfg(root, run, out, beta=1.5)

    class Planner:  # an expert with memory and no way to re-plan from a given state
        def reset(self, env): ...

        def act(self, env, obs): ...

    monkeypatch.setattr("icrt.envs.base.make_expert", lambda env, task: Planner())
    with pytest.raises(UserError, match="cannot label states off its own path"):
        dagger(_cfg(root, run, out))
    monkeypatch.undo()
    assert not out.exists() or not any(out.iterdir())  # nothing written before the checks


def test_observation_layout_mismatch_is_one_sentence(tmp_path):
    # a "metaworld" checkpoint whose state has 3 values (the simulator gives 39)
    rng = np.random.default_rng(0)
    store = EpisodeStore.create(tmp_path / "odd.zarr", env={"name": "metaworld"}, fps=10)
    for _ in range(4):
        store.add_episode(reach_episode((1.0, 0.0), rng), task="reach-v3")
    store.close()
    write_dataset_json(tmp_path / "odd.json", stores=[tmp_path / "odd.zarr"],
                       proprio_keys=["state"], action_keys=["action"], train_split=1.0)
    run = train(parse_config(tiny_args(tmp_path / "odd.json", tmp_path / "run",
                                       "--trainer-cfg.epochs", "1")), progress=False)
    cfg = DaggerConfig(checkpoint=str(run), prompt_dataset=str(tmp_path / "odd.json"),
                       out=str(tmp_path / "out"), workers=1)
    with pytest.raises(UserError, match=r"expects 'state' of shape \(3,\) but metaworld"):
        dagger(cfg, progress=False)
    assert not (tmp_path / "out" / "dagger.json").exists()


def test_state_file_config_record_is_complete(one_round):
    _, _, out, state = one_round
    fields = {f.name for f in dataclasses.fields(DaggerConfig)}
    assert set(state["config"]) == fields
    assert dagger_module.STATE_NAME == "dagger.json" and (out / "dagger.json").is_file()


def _robosuite_drive(env, driver, labeller, until):
    """Drive Lift with ``driver`` until ``until(driver, cube z rise)``; ``labeller`` saw step 0
    only (as an expert whose timers kept it in the approach while a policy went ahead)."""
    obs = env.reset(3)
    driver.reset(env)
    labeller.reset(env)
    labeller.sync_phase(env)
    labeller.act(env, obs)
    z0 = env.sim_state()["cube_pos"][2]
    for _ in range(env.max_steps):
        obs, _, _, _ = env.step(driver.act(env, obs))
        if until(driver, env.sim_state()["cube_pos"][2] - z0):
            return obs
    raise AssertionError("the driver never got there")


def _robosuite_lifted(env, driver, labeller):
    return _robosuite_drive(env, driver, labeller, lambda d, rise: rise > 0.02)


def test_robosuite_expert_relabels_from_the_state_not_its_own_timeline():
    pytest.importorskip("robosuite")
    env = make_env("robosuite", "Lift")
    try:
        # on its own path, syncing changes nothing
        runs = []
        for sync in (False, True):
            obs = env.reset(0)
            expert = make_expert("robosuite", "Lift")
            expert.reset(env)
            actions = []
            for _ in range(60):
                if sync:
                    expert.sync_phase(env)
                actions.append(expert.act(env, obs))
                obs, _, _, info = env.step(actions[-1])
                if info["success"]:
                    break
            runs.append(np.stack(actions))
        np.testing.assert_array_equal(runs[0], runs[1])
        # off its path: a cube already grasped and lifted gets "keep closed", not "open"
        stale = make_expert("robosuite", "Lift")
        obs = _robosuite_lifted(env, make_expert("robosuite", "Lift"), stale)
        assert stale.act(env, obs)[6] < 0  # without syncing: still approaching, gripper open
        synced = make_expert("robosuite", "Lift")
        obs = _robosuite_lifted(env, make_expert("robosuite", "Lift"), synced)
        synced.sync_phase(env)
        assert synced.phase == "lift" and synced.act(env, obs)[6] > 0
        # down at the cube, fingers around it: "close", not "rise, open and re-align"
        for labeller, sync in ((make_expert("robosuite", "Lift"), False),
                               (make_expert("robosuite", "Lift"), True)):
            obs = _robosuite_drive(env, make_expert("robosuite", "Lift"), labeller,
                                   lambda d, rise: d.phase == "close" and d.n == 5)
            if sync:
                labeller.sync_phase(env)
            label = labeller.act(env, obs)
            assert (label[6] > 0) == sync and (label[2] > 0.5) != sync
    finally:
        env.close()
