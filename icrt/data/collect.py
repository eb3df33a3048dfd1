"""Scripted demonstrations: roll a simulator's expert per task and write an episode store.

    collect(CollectConfig(env="metaworld", tasks=("reach-v3",), episodes_per_task=20,
                          prompt_episodes_per_task=5, out="data/reach.zarr"))

writes ``data/reach.zarr`` + ``data/reach.json`` (training demonstrations) and
``data/reach_prompts.zarr`` + ``data/reach_prompts.json`` (held-out prompt demonstrations,
drawn from a different seed stream, so they never repeat a training episode).

Episodes are simulated in worker processes and written by this process in a fixed order (task,
then attempt index), so the stores are identical for the same flags whatever the worker count.
An episode ends at the first success or at the step limit; failures are retried with the next
seed unless ``keep_failures`` is set, in which case they are stored and flagged.

Nothing already collected is lost: a new store's dataset JSON is written at its first commit, so
a killed collection is usable as it stands and ``resume`` continues it to the asked count with
the same seeds (the result equals an uninterrupted run); ``overwrite`` builds the new stores
beside the old ones and swaps them in only when every task succeeded; a collection that fails
before its first episode removes the empty store it made.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from icrt.config import CollectConfig
from icrt.data.spec import write_dataset_json
from icrt.data.store import (
    EpisodeStore,
    acquire_lock,
    finish_swap,
    is_empty_store,
    lock_path,
    release_lock,
    swap_in,
)
from icrt.envs.base import check_tasks, default_cameras, episode_seed, make_env, make_expert
from icrt.envs.episode import run_episode, worker_pool
from icrt.errors import UserError
from icrt.fsutil import remove_leftovers

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Job:
    env: str
    task: str
    seed: int
    image_size: int
    cameras: tuple[str, ...]
    max_steps: int | None


# One simulator per task inside each worker process, reused across its episodes.
_WORKER_ENVS: dict[tuple, Any] = {}


def _worker_init() -> None:
    import atexit
    import warnings

    os.environ.setdefault("MUJOCO_GL", "egl")
    warnings.filterwarnings("ignore")  # simulators warn per step about clipped actions
    atexit.register(close_worker_envs)  # free GL contexts before the interpreter tears down


def close_worker_envs() -> None:
    """Close this process's cached simulators (renderers hold EGL contexts)."""
    for env, _ in _WORKER_ENVS.values():
        env.close()
    _WORKER_ENVS.clear()


def run_expert_episode(job: _Job) -> dict[str, Any]:
    """Simulate one expert episode; returns its arrays, success flag and metadata."""
    key = (job.env, job.task, job.image_size, job.cameras, job.max_steps)
    if key not in _WORKER_ENVS:
        env = make_env(job.env, job.task, image_size=job.image_size, cameras=job.cameras,
                       max_steps=job.max_steps)
        _WORKER_ENVS[key] = (env, make_expert(job.env, job.task))
    env, expert = _WORKER_ENVS[key]
    obs = env.reset(job.seed)
    expert.reset(env)
    t0 = time.perf_counter()
    ep = run_episode(env, obs, lambda o: expert.act(env, o), record=True)
    return {
        "data": ep.data,
        "success": ep.success,
        "seed": job.seed,
        "seconds": time.perf_counter() - t0,
        "obs_meta": env.obs_meta(),
        "fps": env.fps,
        "max_steps": env.max_steps,
    }


def _ordered(executor: ProcessPoolExecutor | None, jobs: list[_Job]) -> Iterator[dict]:
    """Results in job order; workers run ahead of the consumer."""
    if executor is None:
        for job in jobs:
            yield run_expert_episode(job)
        return
    futures: list[Future] = [executor.submit(run_expert_episode, j) for j in jobs]
    try:
        for f in futures:
            yield f.result()
    finally:
        for f in futures:
            f.cancel()


def _dataset_json_path(store: Path) -> Path:
    return store.with_suffix(".json")


# Fields that change what a collection writes; --resume requires them unchanged.
_CONTENT_FIELDS = ("env", "tasks", "keep_failures", "image_size", "cameras", "proprio_keys",
                   "max_steps", "seed", "max_attempts_per_episode", "train_split")


def _recorded_config(cfg: CollectConfig) -> dict[str, Any]:
    return {k: v for k, v in asdict(cfg).items() if k not in ("overwrite", "resume")}


def _open_for_resume(path: Path, cfg: CollectConfig) -> EpisodeStore:
    """Reopen a store for --resume after checking it was collected with the same settings."""
    store = EpisodeStore.open(path, mode="a")
    before = store.env.get("collect")
    if store.num_episodes and before is not None:
        now = json.loads(json.dumps(_recorded_config(cfg)))
        changed = [k for k in _CONTENT_FIELDS if before.get(k) != now.get(k)]
        if changed:
            store.close()
            raise UserError(
                f"Cannot resume '{path}': it was collected with different "
                f"--{changed[0].replace('_', '-')} ({before.get(changed[0])!r}, now "
                f"{now.get(changed[0])!r}); use the same flags or --overwrite."
            )
    foreign = sorted(set(store.tasks) - set(cfg.tasks))
    if foreign:
        store.close()
        raise UserError(f"Cannot resume '{path}': it holds task(s) {', '.join(foreign)} that "
                        f"--tasks does not list.")
    return store


def _attempt_index(cfg: CollectConfig, stream: str, task: str, seed: int, cap: int) -> int:
    """The attempt index whose episode seed is ``seed`` (seeds are a hash of the index)."""
    for i in range(cap):
        if episode_seed(cfg.seed, stream, task, i) == seed:
            return i
    raise UserError(f"An episode of '{task}' has seed {seed}, which --seed {cfg.seed} does not "
                    f"give; it was collected with other flags, so --resume cannot continue it.")


def _check_same_layout(env_name: str, tasks: tuple[str, ...], image_size: int,
                       cameras: tuple[str, ...], max_steps: int | None) -> None:
    """One store holds one observation layout: fail before collecting, not after 100 episodes."""
    if len(tasks) < 2:
        return
    shapes: dict[str, dict[str, tuple]] = {}
    for task in tasks:
        env = make_env(env_name, task, image_size=image_size, cameras=cameras,
                       max_steps=max_steps)
        try:
            shapes[task] = {k: np.shape(v) for k, v in env.reset(0).items()}
        finally:
            env.close()
    first = tasks[0]
    for task in tasks[1:]:
        for key, shape in shapes[first].items():
            if shapes[task].get(key) != shape:
                raise UserError(
                    f"{env_name} tasks '{first}' and '{task}' give '{key}' of different shapes "
                    f"({shape} vs {shapes[task].get(key)}); collect them into separate stores."
                )


def collect(cfg: CollectConfig, progress: bool = True) -> dict[str, Any]:
    """Collect demonstrations per ``cfg``; returns a summary (episodes, attempts, throughput)."""
    from tqdm import tqdm

    check_tasks(cfg.env, cfg.tasks)
    cameras = tuple(cfg.cameras) or (default_cameras(cfg.env) if cfg.image_size else ())
    if cameras and not cfg.image_size:
        raise UserError("--cameras needs --image-size N (the side length of rendered images).")
    out = Path(cfg.out)
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"--out '{out}' cannot be used: '{parent}' is a file.")
            break
    splits = [("train", out, cfg.episodes_per_task)]
    if cfg.prompt_episodes_per_task:
        splits.append(
            ("prompt", out.with_name(out.stem + "_prompts.zarr"), cfg.prompt_episodes_per_task)
        )
    for _, path, _ in splits:
        finish_swap(path, "collect")
        if path.exists() and not (cfg.overwrite or cfg.resume) and not is_empty_store(path):
            raise UserError(f"'{path}' already exists; pass --resume to continue it or "
                            f"--overwrite to replace it.")
    _check_same_layout(cfg.env, cfg.tasks, cfg.image_size, cameras, cfg.max_steps)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(out.parent, r"^\.+(.+\.zarr)\.(collect|old)-(?P<pid>\d+)(\.lock)?$",
                     "--overwrite collection")
    image_keys = [f"image_{c}" for c in cameras]
    json_fields = dict(
        proprio_keys=list(cfg.proprio_keys or (["proprio"] if cameras else ["state"])),
        action_keys=["action"],
        image_keys=image_keys,
    )

    # Where each split is written: the store itself, or (overwrite) a partial store beside it
    # that replaces it at the end; the final paths stay locked against other writers meanwhile.
    locks = [acquire_lock(path) for _, path, _ in splits]
    targets: dict[str, Path] = {}
    stores: dict[str, EpisodeStore] = {}
    executor = None
    bar = None
    summary: dict[str, Any] = {"tasks": {}, "stores": {}}
    sim_steps = 0
    t_start = time.perf_counter()
    try:
        for stream, path, _ in splits:
            if cfg.overwrite and path.exists():
                targets[stream] = path.with_name(f".{path.name}.collect-{os.getpid()}")
                stores[stream] = EpisodeStore.create(targets[stream], overwrite=True)
            elif path.exists() and (cfg.resume or is_empty_store(path)):
                targets[stream] = path
                stores[stream] = (_open_for_resume(path, cfg) if cfg.resume
                                  else EpisodeStore.create(path, overwrite=True))
            else:
                targets[stream] = path
                stores[stream] = EpisodeStore.create(path)
        done = sum(s.num_episodes for s in stores.values())
        total = sum(n for _, _, n in splits) * len(cfg.tasks)
        bar = tqdm(total=total, initial=min(done, total), desc=f"collect {cfg.env}", unit="ep",
                   disable=not progress)
        if cfg.workers > 1:
            executor = worker_pool(cfg.workers, _worker_init)
        else:
            _worker_init()
        for stream, path, wanted in splits:
            store, target = stores[stream], targets[stream]
            for task in cfg.tasks:
                cap = wanted * cfg.max_attempts_per_episode
                mine = [i for i, t in enumerate(store.episode_task_names) if t == task]
                kept = len(mine)
                attempts = next_index = 0
                if mine:  # resuming: continue after the attempt that gave the last kept one
                    last = int(store.episode_seed[mine[-1]])
                    attempts = next_index = _attempt_index(cfg, stream, task, last, cap) + 1
                while kept < wanted and attempts < cap:
                    # ask for what is missing; failures lead to another round, in attempt order
                    n = min(cap - attempts, wanted - kept)
                    jobs = [
                        _Job(cfg.env, task, episode_seed(cfg.seed, stream, task, next_index + i),
                             cfg.image_size, cameras, cfg.max_steps)
                        for i in range(n)
                    ]
                    next_index += n
                    for result in _ordered(executor, jobs):
                        attempts += 1
                        sim_steps += len(result["data"]["action"])
                        if kept >= wanted or not (result["success"] or cfg.keep_failures):
                            continue
                        store.add_episode(result["data"], task=task, success=result["success"],
                                          source=0, seed=result["seed"])
                        if store.num_episodes == 1:
                            for key, meta in result["obs_meta"].items():
                                store.set_key_meta(key, **meta)
                            store.set_attrs(
                                fps=result["fps"],
                                env={"name": cfg.env, "cameras": list(cameras),
                                     "image_size": cfg.image_size,
                                     "max_steps": result["max_steps"],
                                     "collect": _recorded_config(cfg)},
                            )
                            if target == path:  # usable (and resumable) from the first commit
                                _write_json(path, stream, cfg, json_fields)
                        kept += 1
                        bar.update(1)
                        bar.set_postfix(task=task, success=f"{kept}/{attempts}")
                summary["tasks"].setdefault(task, {})[stream] = {"kept": kept, "attempts": attempts}
                if kept < wanted:
                    raise UserError(
                        f"The {cfg.env} expert for '{task}' succeeded in only {kept} of {attempts}"
                        f" attempts; pass --keep-failures or raise --max-attempts-per-episode."
                    )
            store.close()
            summary["stores"][stream] = str(path)
        # every split succeeded: swap the rebuilt stores in, then write the dataset JSONs
        for stream, path, _ in splits:
            if targets[stream] != path:
                swap_in(targets[stream], path)
                targets[stream] = path
            _write_json(path, stream, cfg, json_fields)
    finally:
        if bar is not None:
            bar.close()
        if executor is not None:
            executor.shutdown(cancel_futures=True)
        else:
            close_worker_envs()
        for stream, path, _ in splits:
            store = stores.get(stream)
            if store is None:
                continue
            store.close()
            target = targets[stream]
            if target != path:  # a failed --overwrite: the old store stays as it was
                shutil.rmtree(target, ignore_errors=True)
                lock_path(target).unlink(missing_ok=True)
            elif store.num_episodes == 0:  # failed before its first episode: leave nothing
                shutil.rmtree(path, ignore_errors=True)
        for lock in locks:
            release_lock(lock)
    seconds = time.perf_counter() - t_start
    episodes = sum(v["kept"] for t in summary["tasks"].values() for v in t.values())
    summary.update(
        episodes=episodes,
        seconds=seconds,
        episodes_per_min=60.0 * episodes / max(seconds, 1e-9),
        sim_steps_per_s=sim_steps / max(seconds, 1e-9),
    )
    return summary


def _write_json(path: Path, stream: str, cfg: CollectConfig, fields: dict[str, Any]) -> None:
    write_dataset_json(_dataset_json_path(path), stores=[path], **fields,
                       train_split=cfg.train_split if stream == "train" else 1.0)
