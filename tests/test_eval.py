"""Simulator evaluation: results JSON, held-out prompts, videos, errors, eval during training."""

import json
import shutil

import imageio.v2 as imageio
import numpy as np
import pytest
from helpers import make_reach_dataset
from test_train import tiny_args

from icrt.config import CollectConfig, EvalConfig, parse_config
from icrt.data.collect import collect
from icrt.data.store import EpisodeStore
from icrt.errors import UserError
from icrt.eval.rollout import evaluate, format_comparison, format_table
from icrt.train.loop import run_metrics, train

pytestmark = pytest.mark.sim

TASKS = ("reach-v3", "button-press-topdown-v3")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    collect(CollectConfig(tasks=TASKS, episodes_per_task=3, prompt_episodes_per_task=2,
                          out=str(root / "mw.zarr"), workers=1, train_split=0.67),
            progress=False)
    run = train(parse_config(tiny_args(root / "mw.json", root / "run", "--trainer-cfg.epochs",
                                       "1", "--shared-cfg.seq-length", "96")), progress=False)
    return root, run


def _cfg(root, run, **kw):
    base = dict(checkpoint=str(run), prompt_dataset=str(root / "mw_prompts.json"),
                episodes_per_task=2, workers=1, max_steps=15)
    return EvalConfig(**{**base, **kw})


def test_eval_writes_valid_results_json(trained, tmp_path):
    root, run = trained
    out = tmp_path / "results.json"
    results = evaluate(_cfg(root, run, out=str(out)), progress=False)
    saved = json.loads(out.read_text())
    assert saved["env"] == "metaworld" and saved["num_prompts"] == 1
    assert saved["checkpoint"].endswith("checkpoint-0")
    assert set(saved["tasks"]) == set(TASKS)
    for r in saved["tasks"].values():
        assert set(r) == {"success_rate", "episodes", "mean_return", "mean_length",
                          "trained_on"}
        assert r["trained_on"] is True
        assert r["episodes"] == 2 and 0.0 <= r["success_rate"] <= 1.0
        assert 1 <= r["mean_length"] <= 15
    assert 0.0 <= saved["mean_success_rate"] <= 1.0 and saved["wall_seconds"] > 0
    assert len(saved["episodes"]) == 4
    prompts = EpisodeStore.open(root / "mw_prompts.zarr")
    for ep in saved["episodes"]:
        (store, index), = ep["prompts"]
        assert store.endswith("mw_prompts.zarr")
        assert prompts.episode_task_names[index] == ep["task"]  # a prompt of the same task
    assert "| reach-v3 |" in format_table(results)


def test_a_task_outside_training_is_marked_held_out(trained):
    root, run = trained
    base = evaluate(_cfg(root, run, tasks=("push-v3", "reach-v3"), no_prompt=True,
                         episodes_per_task=1), progress=False)
    assert base["tasks"]["push-v3"]["trained_on"] is False
    assert base["tasks"]["reach-v3"]["trained_on"] is True
    assert "| push-v3 (held out) |" in format_table(base)
    assert "| reach-v3 |" in format_table(base)
    other = json.loads(json.dumps(base))
    other["tasks"]["push-v3"]["success_rate"] = base["tasks"]["push-v3"]["success_rate"] + 0.5
    other["mean_success_rate"] = base["mean_success_rate"] + 0.25
    table = format_comparison(other, base)
    assert "| push-v3 (held out) |" in table and "| +50 |" in table and "**+25.0**" in table


def test_mismatched_prompts_in_metaworld_report_success_only(trained):
    """Meta-World cannot judge another task's success: --prompt-tasks still runs, prompted by
    the other task's demonstrations, with prompt following reported as unmeasured."""
    root, run = trained
    results = evaluate(_cfg(root, run, tasks=TASKS, prompt_tasks=TASKS[::-1],
                            episodes_per_task=1), progress=False)
    prompts = EpisodeStore.open(root / "mw_prompts.zarr")
    for ep in results["episodes"]:
        (_, index), = ep["prompts"]
        other = TASKS[1 - TASKS.index(ep["task"])]
        assert ep["prompt_task"] == other and prompts.episode_task_names[index] == other
        assert ep["prompt_task_done"] is None and ep["tasks_done"] is None
    reach = results["tasks"]["reach-v3"]
    assert reach["prompt_task"] == TASKS[1] and reach["prompt_following_rate"] is None
    assert results["mean_prompt_following_rate"] is None
    assert f"| {TASKS[1]} | n/a |" in format_table(results)
    # a task prompted by itself among mismatched ones: its success is its prompt following
    mixed = evaluate(_cfg(root, run, tasks=TASKS, prompt_tasks=(TASKS[0], TASKS[0]),
                          episodes_per_task=1), progress=False)
    reach, button = mixed["tasks"][TASKS[0]], mixed["tasks"][TASKS[1]]
    assert reach["prompt_task"] == TASKS[0]
    assert reach["prompt_following_rate"] == reach["success_rate"]
    assert button["prompt_task"] == TASKS[0] and button["prompt_following_rate"] is None
    assert mixed["mean_prompt_following_rate"] is None
    assert f"| {TASKS[0]} | n/a |" in format_table(mixed)


def test_prompts_never_come_from_the_training_split(trained):
    root, run = trained
    # prompting from the training store: only its validation episodes may be used
    results = evaluate(_cfg(root, run, prompt_dataset=str(root / "mw.json"),
                            episodes_per_task=3), progress=False)
    split = json.loads((run / "split.json").read_text())
    train_eps = {(s.split("/")[-1], i) for s, i in split["train"]}
    used = {(s.split("/")[-1], i) for e in results["episodes"] for s, i in e["prompts"]}
    assert used and not used & train_eps
    with pytest.raises(UserError, match="held-out successful episode"):
        evaluate(_cfg(root, run, prompt_dataset=str(root / "mw.json"), num_prompts=2),
                 progress=False)
    # evaluation seeds come from their own stream: no prompt or training episode repeats
    seeds = {e["seed"] for e in results["episodes"]}
    stored = set(EpisodeStore.open(root / "mw.zarr").episode_seed.tolist())
    stored |= set(EpisodeStore.open(root / "mw_prompts.zarr").episode_seed.tolist())
    assert not seeds & stored


def test_videos_no_prompt_and_worker_independence(trained, tmp_path):
    root, run = trained
    videos = tmp_path / "videos"
    one = evaluate(_cfg(root, run, no_prompt=True, video_dir=str(videos)), progress=False)
    assert one["num_prompts"] == 0 and all(not e["prompts"] for e in one["episodes"])
    files = sorted(p.name for p in videos.iterdir())
    assert files == ["button-press-topdown-v3_noprompt_ep000.mp4", "reach-v3_noprompt_ep000.mp4"]
    frames = imageio.mimread(videos / files[0])
    assert len(frames) >= 2 and frames[0].ndim == 3
    two = evaluate(_cfg(root, run, no_prompt=True, workers=2), progress=False)
    strip = [{k: e[k] for k in ("task", "index", "success", "length", "return")}
             for e in two["episodes"]]
    assert strip == [{k: e[k] for k in ("task", "index", "success", "length", "return")}
                     for e in one["episodes"]]


def test_mismatched_checkpoint_fails_clearly(trained, tmp_path):
    root, _ = trained
    data = make_reach_dataset(tmp_path)  # 3-D "state", 2-D actions
    other = train(parse_config(tiny_args(data, tmp_path / "run", "--trainer-cfg.epochs", "1")),
                  progress=False)
    with pytest.raises(UserError, match=r"expects 'state' of shape \(3,\) but metaworld"):
        evaluate(_cfg(root, other, env="metaworld", tasks=("reach-v3",)), progress=False)
    with pytest.raises(UserError, match="does not record its simulator|Unknown environment"):
        evaluate(_cfg(root, other, tasks=("reach-v3",)), progress=False)
    with pytest.raises(UserError, match="--prompt-dataset"):
        evaluate(_cfg(root, trained[1], prompt_dataset=None), progress=False)


def test_eval_during_training_keeps_best(trained, tmp_path):
    root, _ = trained
    run = tmp_path / "run"
    cfg = parse_config(tiny_args(root / "mw.json", run, "--trainer-cfg.epochs", "2",
                                 "--shared-cfg.seq-length", "96", "--shared-cfg.save-every", "5",
                                 "--eval-cfg.eval-every", "1", "--eval-cfg.prompt-dataset",
                                 root / "mw_prompts.json", "--eval-cfg.episodes-per-task", "1",
                                 "--eval-cfg.workers", "1", "--eval-cfg.max-steps", "10"))
    train(cfg, progress=False)
    assert (run / "best" / "model.safetensors").is_file()
    best = json.loads((run / "best" / "eval.json").read_text())
    assert best["source"] in ("checkpoint-0", "checkpoint-1")
    assert (run / "checkpoint-0").is_dir() and (run / "eval" / "epoch-1.json").is_file()
    logged = [r for r in run_metrics(run) if "eval/mean_success" in r]
    assert len(logged) == 2 and all(0 <= r["eval/success/reach-v3"] <= 1 for r in logged)
    assert best["mean_success_rate"] == max(r["eval/mean_success"] for r in logged)
    shutil.rmtree(run)


def test_results_reflect_actual_success(trained, tmp_path, monkeypatch):
    """A policy that replays Meta-World's expert must score; guards against a stuck counter."""
    root, run = trained
    import icrt.eval.inference as inference
    from icrt.envs.metaworld import MetaWorldExpert

    experts = {}

    def expert_act(self, obs):
        env = self._env_for_test
        key = env.task
        experts.setdefault(key, MetaWorldExpert(key))
        return experts[key].act(env, obs)

    from icrt.eval import rollout

    original = rollout.make_env

    def make_env(*a, **k):
        env = original(*a, **k)
        inference.InContextPolicy._env_for_test = env
        return env

    monkeypatch.setattr(rollout, "make_env", make_env)
    monkeypatch.setattr(inference.InContextPolicy, "act", expert_act)
    rollout._WORKER.clear()
    results = evaluate(_cfg(root, run, tasks=("reach-v3",), max_steps=150), progress=False)
    rollout._WORKER.clear()
    assert results["tasks"]["reach-v3"]["success_rate"] == 1.0
    assert np.mean([e["length"] for e in results["episodes"]]) < 150


@pytest.mark.parametrize("workers,num_envs", [(1, 3), (2, 2)])
def test_batched_simulators_give_the_same_results(trained, tmp_path, workers, num_envs):
    """Several simulators per process with one batched policy forward per step: the same
    episodes, successes and lengths as one episode at a time, and the same results JSON."""
    root, run = trained
    keys = ("task", "index", "seed", "success", "length", "prompts")
    one = evaluate(_cfg(root, run, episodes_per_task=3), progress=False)
    videos = tmp_path / "videos"
    batched = evaluate(_cfg(root, run, episodes_per_task=3, workers=workers,
                            num_envs=num_envs, video_dir=str(videos)), progress=False)
    assert [{k: e[k] for k in keys} for e in batched["episodes"]] == \
        [{k: e[k] for k in keys} for e in one["episodes"]]
    np.testing.assert_allclose([e["return"] for e in batched["episodes"]],
                               [e["return"] for e in one["episodes"]], rtol=1e-3, atol=1e-3)
    assert batched["num_envs"] == num_envs and one["num_envs"] == 1
    assert set(batched) == set(one) and batched["tasks"].keys() == one["tasks"].keys()
    assert sorted(p.name for p in videos.iterdir()) == [
        "button-press-topdown-v3_1prompt_ep000.mp4", "reach-v3_1prompt_ep000.mp4"]


def test_dtype_is_used_and_recorded(trained):
    """--dtype int8 acts through int8 weights (returns differ from float32's) and the results
    say so; int8 refuses batched simulators with one sentence."""
    root, run = trained
    fp32 = evaluate(_cfg(root, run), progress=False)
    int8 = evaluate(_cfg(root, run, dtype="int8"), progress=False)
    assert fp32["dtype"] == "float32" and int8["dtype"] == "int8"
    assert int8["config"]["dtype"] == "int8"
    assert [e["seed"] for e in int8["episodes"]] == [e["seed"] for e in fp32["episodes"]]
    assert [e["return"] for e in int8["episodes"]] != [e["return"] for e in fp32["episodes"]]
    with pytest.raises(ValueError, match="int8 decodes one episode per process"):
        _cfg(root, run, dtype="int8", num_envs=2)


def test_subset_augmentation_and_task_order_land_in_the_results_json(trained, tmp_path,
                                                                      monkeypatch):
    """A named subset fixes the seeds (same every run, none a collected episode's); the
    augmentation settings and the order the tasks ran in are recorded."""
    from icrt.eval import rollout
    from icrt.eval.subsets import parse_subset

    root, run = trained
    ran = []
    original = rollout.run_prompted_episode

    def recording(job):
        ran.append(job.task)
        return original(job)

    monkeypatch.setattr(rollout, "run_prompted_episode", recording)
    out = tmp_path / "results.json"
    results = evaluate(_cfg(root, run, episodes_per_task=None, eval_subset="minival",
                            test_augmentation=True, obs_noise_std=0.02, shuffle=True,
                            max_steps=5, out=str(out)), progress=False)
    saved = json.loads(out.read_text())
    subset = parse_subset("minival@v1")
    assert saved["eval_subset"] == {
        "name": "minival", "version": "v1", "label": "minival@v1", "episodes_per_task": 5,
        "seeds": {t: subset.seeds(t) for t in TASKS}}
    assert saved["episodes_per_task"] == 5
    for task in TASKS:
        assert [e["seed"] for e in saved["episodes"] if e["task"] == task] == subset.seeds(task)
        assert saved["tasks"][task]["episodes"] == 5
    stored = set(EpisodeStore.open(root / "mw.zarr").episode_seed.tolist())
    stored |= set(EpisodeStore.open(root / "mw_prompts.zarr").episode_seed.tolist())
    assert not {e["seed"] for e in saved["episodes"]} & stored
    assert saved["test_augmentation"] == {
        "obs_noise_std": 0.02, "brightness": 0.1, "contrast": 0.1, "shift": 4,
        "low_dim_keys": ["state"], "camera_keys": []}
    assert saved["shuffle"] is True and sorted(saved["task_order"]) == sorted(TASKS)
    assert list(dict.fromkeys(ran)) == saved["task_order"]  # the order episodes ran in
    assert "subset minival@v1, test augmentation" in format_table(results)
    plain = evaluate(_cfg(root, run, no_prompt=True, episodes_per_task=1, max_steps=2),
                     progress=False)
    assert plain["eval_subset"] is None and plain["test_augmentation"] is None
    assert plain["task_order"] == list(plain["tasks"]) and plain["shuffle"] is False
    assert list(saved["tasks"]) == list(plain["tasks"])  # reported in the given order
    assert plain["episodes_per_task"] == 1
    with pytest.raises(ValueError, match="fixes 5 episodes per task"):
        _cfg(root, run, eval_subset="minival")  # _cfg's explicit 2 episodes conflict


def test_shuffled_task_order_is_seeded(trained):
    root, run = trained
    tasks = ("reach-v3", "push-v3", "button-press-topdown-v3")
    orders = []
    for seed in range(4):
        cfg = _cfg(root, run, no_prompt=True, episodes_per_task=1, max_steps=1, shuffle=True,
                   seed=seed, tasks=tasks)
        results = evaluate(cfg, progress=False)
        assert list(results["tasks"]) == list(tasks)  # reported in the given order
        orders.append(tuple(results["task_order"]))
    again = _cfg(root, run, no_prompt=True, episodes_per_task=1, max_steps=1, shuffle=True,
                 seed=0, tasks=tasks)
    assert tuple(evaluate(again, progress=False)["task_order"]) == orders[0]  # same seed
    assert all(sorted(o) == sorted(orders[0]) for o in orders)
    assert len(set(orders)) > 1  # the seed draws the order


def test_augmentation_changes_what_the_policy_sees_reproducibly(trained, monkeypatch):
    """Noise reaches the policy's observations (not the simulator: with fixed actions the
    simulator's trajectory is unchanged), and the same episode seed gives the same noise."""
    import icrt.eval.inference as inference
    from icrt.eval import rollout

    root, run = trained
    seen = []

    def act(self, obs):
        seen.append(np.array(obs["state"], copy=True))
        return np.zeros(4, np.float32)

    monkeypatch.setattr(inference.InContextPolicy, "act", act)

    def states(**kw):
        seen.clear()
        rollout._WORKER.clear()
        evaluate(_cfg(root, run, tasks=("reach-v3",), episodes_per_task=1, max_steps=8, **kw),
                 progress=False)
        return np.stack(seen)

    plain = states()
    noisy = states(test_augmentation=True, obs_noise_std=0.05)
    again = states(test_augmentation=True, obs_noise_std=0.05)
    rollout._WORKER.clear()
    np.testing.assert_array_equal(noisy, again)
    assert plain.shape == noisy.shape == (8, plain.shape[1])
    assert not np.allclose(plain, noisy)
    residual = noisy - plain  # only the noise: the simulator saw the same actions
    assert 0.02 < residual.std() < 0.1 and abs(residual.mean()) < 0.02


def test_augmentation_is_the_same_with_batched_simulators(trained):
    root, run = trained
    keys = ("task", "index", "seed", "success", "length")
    aug = dict(test_augmentation=True, obs_noise_std=0.05, episodes_per_task=2)
    one = evaluate(_cfg(root, run, **aug), progress=False)
    batched = evaluate(_cfg(root, run, num_envs=2, **aug), progress=False)
    plain = evaluate(_cfg(root, run, episodes_per_task=2), progress=False)
    assert [{k: e[k] for k in keys} for e in batched["episodes"]] == \
        [{k: e[k] for k in keys} for e in one["episodes"]]
    np.testing.assert_allclose([e["return"] for e in batched["episodes"]],
                               [e["return"] for e in one["episodes"]], rtol=1e-3, atol=1e-3)
    assert not np.allclose([e["return"] for e in one["episodes"]],
                           [e["return"] for e in plain["episodes"]], rtol=1e-3, atol=1e-3)
