"""Prompted rollouts of a checkpoint in a simulator -> a results dict (and JSON, videos).

    results = evaluate(EvalConfig(checkpoint="runs/mw5", prompt_dataset="data/mw5_prompts.json"))
    print(format_table(results))

Each episode of a task is prompted with ``num_prompts`` demonstrations of that task drawn from
the held-out prompt dataset (never an episode of the checkpoint's training split) and runs until
the simulator reports success or the step limit. Episodes run in worker processes; everything
random about an episode (simulator seed, prompt choice, action sampling, test-time
perturbations) derives from (seed, task, episode index), so results do not depend on the number
of workers. ``eval_subset`` replaces the simulator seeds by a named subset's fixed ones
(:mod:`icrt.eval.subsets`); ``test_augmentation`` perturbs what the policy sees
(:mod:`icrt.eval.augment`); ``shuffle`` runs the tasks in a seeded random order.
"""

from __future__ import annotations

import json
import logging
import os
import time
import zlib
from collections.abc import Sequence
from concurrent.futures import as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from icrt.config import EvalConfig
from icrt.data.spec import DatasetSpec
from icrt.data.store import EpisodeStore
from icrt.envs.base import check_tasks, episode_seed, make_env
from icrt.envs.episode import EpisodeRunner, worker_pool
from icrt.errors import UserError
from icrt.eval.augment import ObservationPerturber, TestAugmentation
from icrt.eval.subsets import parse_subset
from icrt.fsutil import atomic_path, atomic_write_text, check_output_dir, check_output_file
from icrt.train.checkpoint import read_checkpoint, verify_checkpoint

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Episode:
    checkpoint: str
    env: str
    task: str
    index: int
    seed: int
    prompts: tuple[tuple[str, int], ...]  # (store path, episode index)
    env_kwargs: tuple[tuple[str, Any], ...]
    policy_kwargs: tuple[tuple[str, Any], ...]
    video: str | None
    prompt_task: str | None = None  # the task the prompts show, when it is not ``task``
    augment: TestAugmentation | None = None  # perturbations of what the policy sees


# Per worker process: the loaded policy, simulators per task and open prompt stores.
_WORKER: dict[str, Any] = {}


def _worker_init(threads: int) -> None:
    import atexit
    import warnings

    import torch

    os.environ.setdefault("MUJOCO_GL", "egl")
    warnings.filterwarnings("ignore")
    torch.set_num_threads(threads)
    atexit.register(close_worker_envs)  # free GL contexts before the interpreter tears down


def close_worker_envs() -> None:
    """Close this process's cached simulators (renderers hold EGL contexts)."""
    for env in _WORKER.get("envs", {}).values():
        env.close()
    _WORKER.pop("envs", None)


def _policy(job: _Episode, rows: int = 0) -> Any:
    """This process's policy for ``job`` (``rows`` > 0: a batched one), loaded once."""
    from icrt.eval.inference import BatchedInContextPolicy, InContextPolicy

    key = (job.checkpoint, job.policy_kwargs, rows)
    if _WORKER.get("policy_key") != key:
        options = dict(job.policy_kwargs)
        _WORKER["policy"] = (
            BatchedInContextPolicy.from_checkpoint(job.checkpoint, rows, **options) if rows
            else InContextPolicy.from_checkpoint(job.checkpoint, **options))
        _WORKER["policy_key"] = key
    return _WORKER["policy"]


def _perturber(job: _Episode) -> ObservationPerturber | None:
    """The episode's observation perturbations (None without test augmentation)."""
    return ObservationPerturber(job.augment, job.seed) if job.augment is not None else None


def _policy_obs(obs: dict[str, np.ndarray],
                perturb: ObservationPerturber | None) -> dict[str, np.ndarray]:
    """What the policy sees of ``obs``: a perturbed copy with test augmentation."""
    return obs if perturb is None else perturb(obs)


def _start_episode(job: _Episode, slot: int = 0) -> tuple[EpisodeRunner, list[dict],
                                                          set[str] | None]:
    """The simulator of ``job`` reset to its seed (one cached simulator per slot and task), its
    prompt demonstrations, and the set the runner fills with every task done at some step
    (None where the simulator cannot tell)."""
    envs = _WORKER.setdefault("envs", {})
    env_key = (slot, job.env, job.task, job.env_kwargs)
    if env_key not in envs:
        envs[env_key] = make_env(job.env, job.task, **dict(job.env_kwargs))
    env = envs[env_key]
    stores = _WORKER.setdefault("stores", {})
    demos = []
    for path, index in job.prompts:
        if path not in stores:
            stores[path] = EpisodeStore.open(path)
        demos.append(stores[path].episode(index))
    obs = env.reset(job.seed)
    done: set[str] | None = None
    watch = None
    if hasattr(env, "tasks_done"):  # which tasks got done: the evaluated, the prompted, others
        done = set()

        def watch() -> bool:
            done.update(env.tasks_done())
            return job.prompt_task in done

    return EpisodeRunner(env, obs, render=bool(job.video), watch=watch), demos, done


def _episode_result(job: _Episode, runner: EpisodeRunner, done: set[str] | None,
                    seconds: float, perturb: ObservationPerturber | None = None
                    ) -> dict[str, Any]:
    ep = runner.finish()
    if job.video:
        _write_video(Path(job.video), ep.frames, fps=min(30.0, getattr(runner.env, "fps", 30.0)))
    return {
        "task": job.task,
        "index": job.index,
        "seed": job.seed,
        "success": ep.success,
        "return": ep.total_return,
        "length": ep.length,
        "seconds": seconds,
        "prompts": [list(p) for p in job.prompts],
        "prompt_task": job.prompt_task,
        # null where the adapter cannot judge the prompted task (prompt following unmeasured)
        "prompt_task_done": (ep.watched if job.prompt_task is not None and done is not None
                             else None),
        "tasks_done": None if done is None else sorted(done),
        "video": job.video,
        # the episode's lighting per camera under test augmentation
        "augmentation": None if perturb is None else perturb.describe(),
    }


def run_prompted_episode(job: _Episode) -> dict[str, Any]:
    """One prompted episode in this process (workers call it; so can tests)."""
    policy = _policy(job)
    t0 = time.perf_counter()
    runner, demos, done = _start_episode(job)
    perturb = _perturber(job)
    policy.prompt(demos)
    policy.reset(seed=job.seed)
    while not runner.done:
        runner.step(policy.act(_policy_obs(runner.obs, perturb)))
    return _episode_result(job, runner, done, time.perf_counter() - t0, perturb)


def run_prompted_batch(jobs: list[_Episode], num_envs: int) -> list[dict[str, Any]]:
    """Episodes of ``jobs`` with ``num_envs`` simulators stepped together in this process and
    one batched policy forward per step; a finished episode's slot takes the next job at once.
    Each episode's result is what :func:`run_prompted_episode` gives (up to numerics)."""
    policy = _policy(jobs[0], rows=num_envs)
    pending = list(jobs)
    slots: list[tuple[_Episode, EpisodeRunner, set[str] | None, float,
                      ObservationPerturber | None] | None] = [None] * num_envs
    results = []
    while pending or any(slots):
        for i in range(num_envs):
            if slots[i] is None and pending:
                job = pending.pop(0)
                t0 = time.perf_counter()
                runner, demos, done = _start_episode(job, slot=i)
                policy.prompt(i, demos)
                policy.reset(i, seed=job.seed)
                slots[i] = (job, runner, done, t0, _perturber(job))
        actions = policy.act([_policy_obs(s[1].obs, s[4]) if s else None for s in slots])
        for i, slot in enumerate(slots):
            if slot is None:
                continue
            job, runner, done, t0, perturb = slot
            runner.step(actions[i])
            if runner.done:
                results.append(_episode_result(job, runner, done, time.perf_counter() - t0,
                                               perturb))
                slots[i] = None
    return results


def _run_one(job: _Episode) -> list[dict[str, Any]]:
    return [run_prompted_episode(job)]


def _run_group(unit: tuple[list[_Episode], int]) -> list[dict[str, Any]]:
    return run_prompted_batch(*unit)


def _write_video(path: Path, frames: list[np.ndarray], fps: float) -> None:
    import imageio.v2 as imageio

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        imageio.mimsave(tmp, frames, fps=fps, macro_block_size=1)


def _training_episodes(checkpoint: Path) -> set[tuple[str, int]]:
    """(store id, episode index) of the checkpoint's training split, if recorded. Split files
    written before store ids hold paths; those are resolved here, which is right only when
    evaluating from the directory training ran in."""
    split = checkpoint.parent / "split.json"
    if not split.is_file():
        return set()
    from icrt.data.sequence import read_split_file

    body = read_split_file(split)
    return {(s if s.startswith("id:") else str(Path(s).resolve()), int(i))
            for s, i in body.get("train", [])}


def _prompt_pool(cfg: EvalConfig, tasks: list[str], keys: list[str],
                 exclude: set[tuple[str, int]]) -> dict[str, list[tuple[str, int]]]:
    """Successful held-out demonstrations per task, never from the training split."""
    spec = DatasetSpec.load(cfg.prompt_dataset)
    pool: dict[str, list[tuple[str, int]]] = {t: [] for t in tasks}
    for path in spec.stores:
        store = EpisodeStore.open(path)
        for k in keys:
            store.key_info(k)  # one sentence naming store and key if it is missing
        ids = {store.store_id, str(Path(path).resolve())}
        names = store.episode_task_names
        for i in range(store.num_episodes):
            trained = any((sid, i) in exclude for sid in ids)
            if names[i] in pool and store.episode_success[i] and not trained:
                pool[names[i]].append((str(path), i))
    for task, eps in pool.items():
        if len(eps) < cfg.num_prompts:
            raise UserError(
                f"Prompt dataset '{cfg.prompt_dataset}' has {len(eps)} held-out successful "
                f"episode(s) of '{task}' but --num-prompts is {cfg.num_prompts}."
            )
    return pool


def plan_episodes(cfg: EvalConfig) -> tuple[list[_Episode], dict[str, Any]]:
    """Validate the evaluation against the checkpoint and list its episodes."""
    if not cfg.checkpoint:
        raise UserError("Give the checkpoint to evaluate with --checkpoint DIR.")
    from icrt.train.dist import resolve_device

    device = str(resolve_device(cfg.device))  # a bad --device is one sentence, before any work
    ckpt = read_checkpoint(cfg.checkpoint)
    problem = verify_checkpoint(ckpt.path, thorough=False)  # before workers load it
    if problem:
        raise UserError(f"Checkpoint '{ckpt.path}' is damaged ({problem}).")
    spec = ckpt.spec
    if not spec.in_context and not cfg.no_prompt:
        raise UserError(f"Checkpoint '{ckpt.path}' was trained without prompts (behaviour "
                        f"cloning); evaluate it with --no-prompt.")
    env_name, tasks, env_kwargs = checkpoint_env(ckpt, cfg.env, cfg.tasks, cfg.max_steps)
    if cfg.no_prompt:
        pool: dict[str, list] = {t: [] for t in tasks}
    else:
        if not cfg.prompt_dataset:
            raise UserError("Give held-out demonstrations with --prompt-dataset D.json, or "
                            "evaluate without prompts with --no-prompt.")
        keys = [*spec.proprio_keys, *spec.action_keys, *spec.camera_keys]
        prompted = _prompted_tasks(cfg, env_name, tasks, env_kwargs)
        pool = _prompt_pool(cfg, sorted(set(prompted.values())), keys,
                            _training_episodes(ckpt.path))
    subset = parse_subset(cfg.eval_subset) if cfg.eval_subset else None
    per_task = (subset.episodes_per_task if subset else
                cfg.episodes_per_task if cfg.episodes_per_task is not None else 20)
    seeds = {t: (subset.seeds(t) if subset else
                 [episode_seed(cfg.seed, "eval", t, i) for i in range(per_task)]) for t in tasks}
    order = list(tasks)
    if cfg.shuffle:  # the order episodes are run in; results stay in the given order
        rng = np.random.default_rng([cfg.seed, zlib.crc32(b"task-order")])
        order = [tasks[i] for i in rng.permutation(len(tasks))]
    augment = _test_augmentation(cfg, spec) if cfg.test_augmentation else None
    policy_kwargs = (("device", device), ("execution", cfg.execution),
                     ("open_loop_steps", cfg.open_loop_steps),
                     ("ensemble_decay", cfg.ensemble_decay),
                     ("deterministic", cfg.deterministic), ("dtype", cfg.dtype))
    jobs = []
    for task in order:
        for i in range(per_task):
            rng = np.random.default_rng([cfg.seed, zlib.crc32(task.encode()), i, 3])
            source = task if cfg.no_prompt else prompted[task]
            chosen = () if cfg.no_prompt else tuple(
                pool[source][j]
                for j in rng.choice(len(pool[source]), cfg.num_prompts, replace=False)
            )
            video = None
            if cfg.video_dir and i < cfg.videos_per_task:
                tag = "noprompt" if cfg.no_prompt else f"{cfg.num_prompts}prompt"
                video = str(Path(cfg.video_dir) / f"{task}_{tag}_ep{i:03d}.mp4")
            jobs.append(_Episode(str(ckpt.path), env_name, task, i, seeds[task][i], chosen,
                                 tuple(sorted(env_kwargs.items())), policy_kwargs, video,
                                 source if source != task else None, augment))
    meta = {"checkpoint": str(ckpt.path), "env": env_name, "tasks": tasks, "device": device,
            "trained_tasks": list(spec.tasks), "episodes_per_task": per_task,
            "task_order": order,
            "eval_subset": None if subset is None else {
                "name": subset.name, "version": subset.version, "label": subset.label,
                "episodes_per_task": per_task, "seeds": seeds},
            "test_augmentation": None if augment is None else augment.to_dict()}
    return jobs, meta


def _test_augmentation(cfg: EvalConfig, spec: Any) -> TestAugmentation:
    """The perturbations of ``cfg`` on the observation keys the checkpoint's policy reads."""
    cameras = tuple(spec.camera_keys) if (cfg.image_brightness or cfg.image_contrast
                                          or cfg.image_shift) else ()
    side = min(spec.image_shape[:2]) if cameras and spec.image_shape else 0
    if side and 2 * cfg.image_shift >= side:
        raise UserError(f"--image-shift {cfg.image_shift} must be below half the checkpoint's "
                        f"{side}-pixel camera frames.")
    return TestAugmentation(obs_noise_std=cfg.obs_noise_std, brightness=cfg.image_brightness,
                            contrast=cfg.image_contrast, shift=cfg.image_shift,
                            low_dim_keys=tuple(spec.proprio_keys) if cfg.obs_noise_std else (),
                            camera_keys=cameras)


def _prompted_tasks(cfg: EvalConfig, env_name: str, tasks: list[str],
                    env_kwargs: dict[str, Any]) -> dict[str, str]:
    """Evaluated task -> the task its prompts show (itself unless --prompt-tasks)."""
    if cfg.prompt_tasks is None:
        return {t: t for t in tasks}
    if len(cfg.prompt_tasks) != len(tasks):
        raise UserError(f"--prompt-tasks names {len(cfg.prompt_tasks)} task(s) but {len(tasks)} "
                        f"are evaluated; give one prompt task per evaluated task, in order.")
    check_tasks(env_name, cfg.prompt_tasks)
    env = make_env(env_name, tasks[0], **env_kwargs)  # can it judge the prompted task?
    try:
        env.reset(0)
        if hasattr(env, "task_success") and hasattr(env, "tasks_done"):
            env.task_success(cfg.prompt_tasks[0])
        else:  # e.g. Meta-World: each task is its own scene; success alone still says something
            log.warning("The %s adapter cannot tell whether another task was done: prompt "
                        "following is not measured, only the evaluated task's success.",
                        env_name)
    finally:
        env.close()
    return dict(zip(tasks, cfg.prompt_tasks, strict=True))


def checkpoint_env(ckpt: Any, env: str | None, tasks: Sequence[str] | None,
                   max_steps: int | None) -> tuple[str, list[str], dict[str, Any]]:
    """The simulator (default: the checkpoint's), tasks (default: its training tasks) and
    simulator arguments (its cameras and image size) to run ``ckpt`` in, checked against the
    observation and action layout it was trained on."""
    spec = ckpt.spec
    env_name = env or spec.env.get("name")
    if not env_name:
        raise UserError(f"Checkpoint '{ckpt.path}' does not record its simulator; pass --env.")
    tasks = list(tasks or spec.tasks)
    check_tasks(env_name, tasks)
    cameras = tuple(k.removeprefix("image_") for k in spec.camera_keys)
    env_kwargs: dict[str, Any] = {"cameras": cameras,
                                  "image_size": spec.image_shape[0] if spec.image_shape else 0}
    if max_steps is not None:
        env_kwargs["max_steps"] = max_steps
    _check_env_matches(env_name, tasks[0], env_kwargs, spec, ckpt.path)
    return env_name, tasks, env_kwargs


def _check_env_matches(env_name: str, task: str, env_kwargs: dict, spec: Any, path: Path) -> None:
    """The checkpoint's observation and action layout must be what the simulator produces."""
    env = make_env(env_name, task, **env_kwargs)
    try:
        obs = env.reset(0)
        missing = [k for k in (*spec.proprio_keys, *spec.camera_keys) if k not in obs]
        if missing:
            raise UserError(
                f"Checkpoint '{path}' was trained on observation key(s) {', '.join(missing)}, "
                f"which {env_name} does not provide (it has {', '.join(sorted(obs))})."
            )
        for k in spec.proprio_keys:
            want = spec.key_meta.get(k, {}).get("shape")
            if want is not None and list(np.shape(obs[k])) != list(want):
                raise UserError(
                    f"Checkpoint '{path}' expects '{k}' of shape {tuple(want)} but {env_name} "
                    f"gives {np.shape(obs[k])}."
                )
        action_shape = spec.key_meta.get(spec.action_keys[0], {}).get("shape", [])
        raw_dim = int(np.prod(action_shape)) if action_shape else spec.action_dim
        if raw_dim != env.action_dim:
            raise UserError(
                f"Checkpoint '{path}' predicts {raw_dim}-D actions but {env_name} '{task}' "
                f"takes {env.action_dim}-D actions."
            )
    finally:
        env.close()


def evaluate(cfg: EvalConfig, progress: bool = True) -> dict[str, Any]:
    """Run every episode and summarise per task (the results JSON of docs/eval.md)."""
    from tqdm import tqdm

    if cfg.out:  # before any episode: a results file that cannot be written loses the run
        check_output_file(cfg.out, "--out")
    if cfg.video_dir:
        check_output_dir(cfg.video_dir, "--video-dir")
    jobs, meta = plan_episodes(cfg)
    t0 = time.perf_counter()
    episodes: list[dict[str, Any]] = []
    desc = "eval (no prompt)" if cfg.no_prompt else f"eval ({cfg.num_prompts} prompt)"
    bar = tqdm(total=len(jobs), desc=desc, unit="ep", disable=not progress)
    # one unit of work: an episode, or (num_envs > 1) a group of episodes run together
    if cfg.num_envs == 1:
        units, run_unit = jobs, _run_one
    else:
        size = 2 * cfg.num_envs
        units = [(jobs[i:i + size], cfg.num_envs) for i in range(0, len(jobs), size)]
        run_unit = _run_group
    if cfg.workers == 1:
        threads = torch.get_num_threads()
        _worker_init(cfg.threads_per_worker)
        try:
            for unit in units:
                episodes += run_unit(unit)
                bar.update(len(unit[0]) if cfg.num_envs > 1 else 1)
        finally:
            close_worker_envs()
            torch.set_num_threads(threads)
    else:
        with worker_pool(cfg.workers, _worker_init, (cfg.threads_per_worker,)) as pool:
            futures = [pool.submit(run_unit, u) for u in units]
            for f in as_completed(futures):
                new = f.result()
                episodes += new
                done = sum(e["success"] for e in episodes)
                bar.update(len(new))
                bar.set_postfix(success=f"{done}/{len(episodes)}")
    bar.close()
    episodes.sort(key=lambda e: (meta["tasks"].index(e["task"]), e["index"]))
    per_task = {}
    for task in meta["tasks"]:
        eps = [e for e in episodes if e["task"] == task]
        per_task[task] = {
            "success_rate": float(np.mean([e["success"] for e in eps])),
            "episodes": len(eps),
            "mean_return": float(np.mean([e["return"] for e in eps])),
            "mean_length": float(np.mean([e["length"] for e in eps])),
            # whether the checkpoint was trained on this task (False: a held-out task)
            "trained_on": task in meta["trained_tasks"],
        }
        if eps and eps[0]["tasks_done"] is not None:
            # a task other than the evaluated one done (wrong object or bin), or none at all
            per_task[task]["other_task_rate"] = float(
                np.mean([bool(set(e["tasks_done"]) - {task}) for e in eps]))
            per_task[task]["nothing_done_rate"] = float(
                np.mean([not e["tasks_done"] for e in eps]))
        if eps and cfg.prompt_tasks:
            # a task --prompt-tasks prompts with itself follows its prompt when it succeeds;
            # null where the simulator cannot judge another task (Meta-World)
            done_prompted = [e["success"] if e["prompt_task"] is None else e["prompt_task_done"]
                             for e in eps]
            per_task[task]["prompt_task"] = eps[0]["prompt_task"] or task
            per_task[task]["prompt_following_rate"] = (
                None if None in done_prompted else float(np.mean(done_prompted)))
    results = {
        "checkpoint": meta["checkpoint"],
        "env": meta["env"],
        "num_prompts": 0 if cfg.no_prompt else cfg.num_prompts,
        "no_prompt": cfg.no_prompt,
        "prompt_dataset": None if cfg.no_prompt else cfg.prompt_dataset,
        "episodes_per_task": meta["episodes_per_task"],
        # a named subset (name, version, seeds per task) or null: seeds derived from --seed
        "eval_subset": meta["eval_subset"],
        # perturbations of what the policy saw (null: none)
        "test_augmentation": meta["test_augmentation"],
        "shuffle": cfg.shuffle,
        "task_order": meta["task_order"],  # the order the tasks were run in
        "seed": cfg.seed,
        "device": meta["device"],
        "dtype": cfg.dtype,
        "num_envs": cfg.num_envs,
        "tasks": per_task,
        "mean_success_rate": float(np.mean([t["success_rate"] for t in per_task.values()])),
        "mean_prompt_following_rate": (
            float(np.mean([t["prompt_following_rate"] for t in per_task.values()]))
            if cfg.prompt_tasks and all(t["prompt_following_rate"] is not None
                                        for t in per_task.values()) else None),
        "wall_seconds": time.perf_counter() - t0,
        "config": asdict(cfg),
        "episodes": episodes,
    }
    if cfg.out:
        out = Path(cfg.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, json.dumps(results, indent=1) + "\n")
    return results


def read_results(path: str | Path) -> dict[str, Any]:
    """A results JSON written by :func:`evaluate` (e.g. a --baseline), validated."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"Baseline results '{path}' do not exist.")
    try:
        body = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"Baseline results '{path}' are unreadable ({e}).") from None
    if not (isinstance(body, dict) and isinstance(body.get("tasks"), dict)
            and "mean_success_rate" in body):
        raise UserError(f"'{path}' is not a results JSON of scripts/eval.py (no tasks and "
                        f"mean_success_rate).")
    return body


def _task_label(task: str, r: dict[str, Any]) -> str:
    """The task's name, marked when the checkpoint never trained on it (results from before
    the flag was recorded are not marked)."""
    return f"{task} (held out)" if r.get("trained_on") is False else task


def format_table(results: dict[str, Any], title: str | None = None) -> str:
    """Markdown table of per-task success (and the mean); with mismatched prompts also the
    prompted task and how often it was done instead."""
    label = "no prompt" if results.get("no_prompt") else f"{results['num_prompts']} prompt(s)"
    mismatched = any("prompt_task" in r for r in results["tasks"].values())
    outcomes = all("other_task_rate" in r for r in results["tasks"].values())
    head = "| task | success | mean length | mean return |"
    rule = "| --- | ---: | ---: | ---: |"
    if outcomes:
        head += " other task done | nothing done |"
        rule += " ---: | ---: |"
    if mismatched:
        head += " prompted task | prompted task done |"
        rule += " --- | ---: |"
    extra = ""
    if results.get("eval_subset"):
        extra += f", subset {results['eval_subset']['label']}"
    if results.get("test_augmentation"):
        extra += ", test augmentation"
    lines = [f"**{title or results['env']}** ({label}, {results['episodes_per_task']} episodes "
             f"per task{extra})", "", head, rule]
    for task, r in results["tasks"].items():
        row = (f"| {_task_label(task, r)} | {100 * r['success_rate']:.0f}% | "
               f"{r['mean_length']:.0f} | "
               f"{r['mean_return']:.1f} |")
        if outcomes:
            row += f" {100 * r['other_task_rate']:.0f}% | {100 * r['nothing_done_rate']:.0f}% |"
        if mismatched:
            rate = r.get("prompt_following_rate")
            row += f" {r['prompt_task']} | {'n/a' if rate is None else f'{100 * rate:.0f}%'} |"
        lines.append(row)
    mean = f"| **mean** | **{100 * results['mean_success_rate']:.1f}%** | | |"
    if outcomes:
        mean += " | |"
    if mismatched:
        rate = results.get("mean_prompt_following_rate")
        mean += " | |" if rate is None else f" | **{100 * rate:.1f}%** |"
    lines.append(mean)
    return "\n".join(lines)


def format_comparison(results: dict[str, Any], baseline: dict[str, Any]) -> str:
    """Side-by-side markdown table of two evaluations of the same tasks (e.g. prompt vs none)."""

    def label(r: dict[str, Any]) -> str:
        return "no prompt" if r.get("no_prompt") else f"{r['num_prompts']} prompt(s)"

    a, b = label(results), label(baseline)
    lines = [f"| task | {a} | {b} | difference (points) |", "| --- | ---: | ---: | ---: |"]
    for task, r in results["tasks"].items():
        other = baseline["tasks"].get(task)
        right = f"{100 * other['success_rate']:.0f}%" if other else "-"
        diff = f"{100 * (r['success_rate'] - other['success_rate']):+.0f}" if other else "-"
        lines.append(f"| {_task_label(task, r)} | {100 * r['success_rate']:.0f}% | {right} | "
                     f"{diff} |")
    mean_a, mean_b = results["mean_success_rate"], baseline["mean_success_rate"]
    lines.append(f"| **mean** | **{100 * mean_a:.1f}%** | **{100 * mean_b:.1f}%** | "
                 f"**{100 * (mean_a - mean_b):+.1f}** |")
    return "\n".join(lines)
