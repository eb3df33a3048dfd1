"""Run a simulator's scripted expert for N seeded episodes per task and print a markdown table.

Columns: success rate, mean episode length (an episode stops at its first success, as a
demonstration recording would, or at max_steps), and simulator speed measured inside
``env.step`` only (expert overhead does not count; with cameras it includes rendering): steps per
wall-clock second, and steps per CPU-second of this process, which a busy shared machine
distorts less.

    python scripts/expert_success.py --tasks base --num-seeds 50
    python scripts/expert_success.py --tasks PickPlaceMilkToBin1 PickPlaceCanToBin4 --num-seeds 10
    python scripts/expert_success.py --tasks Lift --num-seeds 5 \
        --cameras agentview robot0_eye_in_hand --image-size 84

``--tasks`` also accepts ``base`` (Lift, Stack, PickPlaceCan, NutAssemblySquare), ``family``
(all 16 PickPlace{Object}ToBin{k}) and ``all``; ``--workers 2`` splits the seeds over two
processes.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from concurrent.futures import ProcessPoolExecutor
from typing import Literal

import numpy as np
import tyro

from icrt.cli import run
from icrt.envs.base import available_tasks, check_tasks, make_env, make_expert
from icrt.envs.episode import run_episode
from icrt.errors import UserError


@dataclasses.dataclass(frozen=True)
class Args:
    # Tasks to run, or the groups base / family / all (robosuite only).
    tasks: tuple[str, ...] = ("base",)
    # Simulator adapter name.
    env: Literal["robosuite", "metaworld"] = "robosuite"
    # Episodes per task, seeds seed-start .. seed-start + num-seeds - 1.
    num_seeds: int = 50
    seed_start: int = 0
    # Cameras to render every step (to measure speed with images), at image-size pixels.
    cameras: tuple[str, ...] = ()
    image_size: int = 84
    # Override the adapter's per-task episode limit.
    max_steps: int | None = None
    # Keep stepping this many steps after the first success (0: stop at success).
    post_success_steps: int = 0
    # Worker processes (seeds are split between them); keep <= 2 on a shared machine.
    workers: int = 1
    # Print one line per episode to stderr.
    verbose: bool = False


@dataclasses.dataclass
class EpisodeResult:
    task: str
    seed: int
    success: bool
    length: int
    sim_seconds: float
    sim_cpu_seconds: float
    sim_steps: int


def expand_tasks(env: str, tasks: tuple[str, ...]) -> list[str]:
    out: list[str] = []
    for t in tasks:
        if env == "robosuite" and t in ("base", "family", "all"):
            known = available_tasks(env)
            base = known[:4]
            family = [k for k in known if k not in base]
            out += {"base": base, "family": family, "all": known}[t]
        else:
            out.append(t)
    check_tasks(env, out)
    return list(dict.fromkeys(out))


def run_chunk(args: Args, task: str, seeds: list[int]) -> list[EpisodeResult]:
    env = make_env(
        args.env,
        task,
        image_size=args.image_size if args.cameras else 0,
        cameras=args.cameras,
        max_steps=args.max_steps,
    )
    expert = make_expert(args.env, task)
    results = []
    try:
        for seed in seeds:
            obs = env.reset(seed=seed)
            expert.reset(env)
            ep = run_episode(env, obs, lambda o: expert.act(env, o),
                             post_success_steps=args.post_success_steps)
            r = EpisodeResult(task, seed, ep.success, ep.length, ep.sim_seconds,
                              ep.sim_cpu_seconds, ep.length)
            if args.verbose:
                print(f"{task} seed={seed} success={r.success} len={r.length}", file=sys.stderr)
            results.append(r)
    finally:
        env.close()
    return results


def _speed(rs: list[EpisodeResult]) -> str:
    steps = sum(r.sim_steps for r in rs)
    wall = steps / max(sum(r.sim_seconds for r in rs), 1e-9)
    cpu = steps / max(sum(r.sim_cpu_seconds for r in rs), 1e-9)
    return f"{wall:.0f} | {cpu:.0f}"


def _row(name: str, rs: list[EpisodeResult]) -> str:
    ok = [r for r in rs if r.success]
    mean_len = f"{np.mean([r.length for r in ok]):.0f}" if ok else "-"
    rate = f"{len(ok) / len(rs):.0%} ({len(ok)}/{len(rs)})"
    return f"| {name} | {len(rs)} | {rate} | {mean_len} | {_speed(rs)} |"


def markdown_table(results: list[EpisodeResult], tasks: list[str]) -> str:
    lines = [
        "| task | episodes | success rate | mean length (successes) | steps/s | steps/CPU-s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for task in tasks:
        rs = [r for r in results if r.task == task]
        if rs:
            lines.append(_row(task, rs))
    if len(tasks) > 1 and results:
        lines.append(_row("**all**", results))
    return "\n".join(lines)


def main(args: Args) -> None:
    if args.num_seeds <= 0 or args.workers <= 0:
        raise UserError("--num-seeds and --workers must be positive.")
    tasks = expand_tasks(args.env, args.tasks)
    seeds = list(range(args.seed_start, args.seed_start + args.num_seeds))
    jobs = [(task, seeds[i :: args.workers]) for task in tasks for i in range(args.workers)]
    jobs = [(t, s) for t, s in jobs if s]
    results: list[EpisodeResult] = []
    if args.workers == 1:
        for task, chunk in jobs:
            results += run_chunk(args, task, chunk)
    else:
        with ProcessPoolExecutor(args.workers) as pool:
            futures = [pool.submit(run_chunk, args, task, chunk) for task, chunk in jobs]
            for f in futures:
                results += f.result()
    cams = f", cameras {'+'.join(args.cameras)} at {args.image_size}px" if args.cameras else ""
    print(f"{args.env} experts, seeds {seeds[0]}..{seeds[-1]}{cams}\n")
    print(markdown_table(results, tasks))


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    run(lambda: main(tyro.cli(Args)))
