"""Interactive DAgger without a human: the scripted expert labels the policy's own states.

    summary = dagger(DaggerConfig(checkpoint="runs/mw5", prompt_dataset="data/mw5_prompts.json",
                                  tasks=("reach-v3",), rounds=3, out="runs/dagger_reach"))

Round 0 is the imitation-learning checkpoint (behaviour cloning on expert demonstrations is
DAgger's first iteration, the one with beta = 1). Each further round k:

1. **Roll out** the round k-1 policy, prompted with held-out demonstrations exactly as
   ``scripts/eval.py`` prompts it, on ``episodes_per_round`` episodes per task whose starting
   layouts come from the ``dagger`` seed stream (never an evaluation, prompt or training layout).
2. **Label** every visited state with the scripted expert's action while the policy's action is
   executed (with probability ``beta`` per step the expert's action is executed instead).
3. **Aggregate**: append each episode, failures included, to ``OUT/dagger.zarr`` with the
   observations the policy saw and ``action`` = the expert's labels (episode source 1 = policy;
   ``executed_action`` keeps what was actually executed). There is no ``step_source`` key:
   that key marks a human-intervention store, where only corrected steps carry loss and failed
   episodes are dropped; here every step has a correct label, so every step is supervised.
4. **Fine-tune** on the original dataset plus all DAgger episodes so far (a dataset JSON with
   both, ``include_failures`` on), initialised from the round k-1 weights with a fresh optimizer
   and schedule, as a normal training run in ``OUT/round-k/`` (so ``scripts/eval.py
   --checkpoint OUT/round-k`` works). The original train/validation split is kept and every
   DAgger episode goes to training, so validation losses compare across rounds.
5. **Evaluate** the new checkpoint prompted on the evaluation seed stream
   (``OUT/round-k/eval_prompted.json``); ``OUT/dagger.json`` holds the per-round table.

Re-running the same command continues after the last completed round: rollouts already in the
store are not redone (episodes are identified by their seeds), an interrupted fine-tune resumes
from its last checkpoint, and a finished evaluation is read back.

Expert labels off the expert's own path: Meta-World's scripted policies are functions of the
current observation, so any state can be labelled. The robosuite experts are state machines
whose phase advances on their own timers and checks; before each label their phase is brought
back in line with the simulator (``sync_phase``: a gripper already down at the object skips to
the descent, fingers already closing on it to the close phase, an object already lifted to the
lift phase, a descent that drifted goes back to the approach, a retreat from an undone task
starts over). An expert with neither property is refused.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from icrt.errors import UserError
from icrt.fsutil import atomic_write_text, check_output_dir

log = logging.getLogger(__name__)

STORE_NAME = "dagger.zarr"
STATE_NAME = "dagger.json"


@dataclass(frozen=True)
class DaggerConfig:
    """Interactive DAgger: scripted-expert labels on the policy's own rollouts, then fine-tuning
    on the aggregated data, for several rounds (scripts/dagger.py)."""

    # Imitation-learning checkpoint directory, or its run directory (its latest checkpoint).
    checkpoint: str = ""
    # Dataset JSON the checkpoint was trained on (default: the one its config.json records).
    dataset_json: str | None = None
    # Dataset JSON of held-out demonstrations that prompt every rollout (as scripts/eval.py).
    prompt_dataset: str | None = None
    # Run directory: dagger.zarr, round-<k>/ checkpoints and evaluations, dagger.json.
    out: str = "runs/dagger"
    # Tasks to collect DAgger data on and evaluate (default: the checkpoint's training tasks).
    tasks: tuple[str, ...] | None = None
    # DAgger rounds after round 0 (the starting checkpoint); a larger number continues a run.
    rounds: int = 3
    # Policy rollouts per task per round, each labelled by the expert at every step.
    episodes_per_round: int = 20
    # Probability per step of executing the expert's action instead of the policy's (0: pure
    # policy rollouts; the starting checkpoint already is DAgger's beta = 1 iteration).
    beta: float = 0.0
    # Episode length limit of rollouts and evaluations (default: the environment's).
    max_steps: int | None = None
    # Demonstrations shown before each rollout and evaluation episode.
    num_prompts: int = 1
    # Chunk execution in rollouts and evaluations, as in scripts/eval.py: ensemble (temporal
    # ensembling) or open_loop.
    execution: Literal["ensemble", "open_loop"] = "ensemble"
    # Actions executed per chunk in open_loop mode (default: the whole chunk).
    open_loop_steps: int | None = None
    # Temporal-ensembling decay m in exp(-m * i), i = 0 for the oldest prediction.
    ensemble_decay: float = 0.01
    # Optimizer steps of each round's fine-tune.
    finetune_steps: int = 300
    # Peak learning rate of each round's fine-tune (cosine decay to 0, no warm-up).
    lr: float = 3e-4
    # Sequences per optimizer step of the fine-tune (default: the checkpoint's batch size).
    batch_size: int | None = None
    # Evaluation episodes per task after every round (prompted, evaluation seed stream).
    eval_episodes: int = 20
    # Parallel worker processes for rollouts and evaluations.
    workers: int = 2
    # Torch threads per worker process.
    threads_per_worker: int = 1
    # Base seed: rollout layouts, prompt choices, action sampling and fine-tune sampling.
    seed: int = 0
    # Device of the policy in rollouts, evaluation and fine-tuning: auto, cpu, cuda, cuda:N.
    device: str = "auto"

    def __post_init__(self) -> None:
        from icrt.config import _positive

        for name in ("rounds", "episodes_per_round", "num_prompts", "finetune_steps",
                     "eval_episodes", "workers", "threads_per_worker"):
            _positive(getattr(self, name), "--" + name.replace("_", "-"))
        _positive(self.lr, "--lr")
        if self.batch_size is not None:
            _positive(self.batch_size, "--batch-size")
        if self.max_steps is not None:
            _positive(self.max_steps, "--max-steps")
        if self.open_loop_steps is not None:
            _positive(self.open_loop_steps, "--open-loop-steps")
        _positive(self.ensemble_decay, "--ensemble-decay", allow_zero=True)
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"--beta must be in [0, 1] (got {self.beta}).")
        if self.tasks is not None and not self.tasks:
            raise ValueError("--tasks needs at least one task name.")


# Fields a continued run may change (they do not change what a round produces).
_FREE_FIELDS = ("rounds", "workers", "threads_per_worker", "device")


# ------------------------------------------------------------------------- one labelled episode


@dataclass(frozen=True)
class _Rollout:
    episode: Any  # icrt.eval.rollout._Episode: checkpoint, env, task, seed, prompts, options
    beta: float


_EXPERTS: dict[tuple[str, str], Any] = {}  # per worker process: one expert per task


def _labeller(env_name: str, task: str) -> Any:
    """The scripted expert of ``task``, checked to be able to label states off its own path."""
    from icrt.envs.base import make_expert

    expert = make_expert(env_name, task)
    if not (getattr(expert, "stateless", False) or hasattr(expert, "sync_phase")):
        raise UserError(f"The {env_name} expert for '{task}' is a planner with memory that "
                        f"cannot label states off its own path, so DAgger cannot use it.")
    return expert


def run_dagger_episode(job: _Rollout) -> dict[str, Any]:
    """One prompted policy episode with the expert's label at every step (workers call it)."""
    from icrt.eval.rollout import _policy, _start_episode

    ep = job.episode
    policy = _policy(ep)
    runner, demos, _ = _start_episode(ep)
    env = runner.env
    key = (ep.env, ep.task)
    if key not in _EXPERTS:
        _EXPERTS[key] = _labeller(ep.env, ep.task)
    expert = _EXPERTS[key]
    expert.reset(env)
    policy.prompt(demos)
    policy.reset(seed=ep.seed)
    coin = np.random.default_rng([ep.seed, 4])  # the beta mixture's draws
    observations: dict[str, list[np.ndarray]] = {k: [] for k in runner.obs}
    labels, executed = [], []
    expert_steps = 0
    t0 = time.perf_counter()
    while not runner.done:
        obs = runner.obs
        if hasattr(expert, "sync_phase"):
            expert.sync_phase(env)
        label = np.asarray(expert.act(env, obs), np.float32)
        action = np.asarray(policy.act(obs), np.float32)
        if job.beta > 0 and coin.random() < job.beta:
            action = label
            policy.executed(label)  # the context holds what was executed
            expert_steps += 1
        for k, v in obs.items():
            observations[k].append(v)
        labels.append(label)
        executed.append(action)
        runner.step(action)
    result = runner.finish()
    data = {k: np.stack(v) for k, v in observations.items()}
    data["action"] = np.stack(labels)  # (T, A) the expert's labels: the training targets
    data["executed_action"] = np.stack(executed)  # (T, A) what the simulator was given
    return {
        "task": ep.task, "index": ep.index, "seed": ep.seed, "success": result.success,
        "length": result.length, "data": data, "expert_steps": expert_steps,
        "seconds": time.perf_counter() - t0, "obs_meta": env.obs_meta(), "fps": env.fps,
        "max_steps": env.max_steps,
    }


# ------------------------------------------------------------------------- the run


@dataclass
class _Setup:
    """What every round shares, checked once."""

    cfg: DaggerConfig
    out: Path
    source: Any  # icrt.train.checkpoint.Checkpoint: the round-0 checkpoint
    env: str
    tasks: list[str]
    dataset: Any  # icrt.data.spec.DatasetSpec the checkpoint was trained on
    record: dict[str, Any]  # the resolved config, compared on resume


def dagger(cfg: DaggerConfig, progress: bool = True) -> dict[str, Any]:
    """Run (or continue) the rounds of ``cfg``; returns the contents of ``OUT/dagger.json``."""
    from icrt.eval.rollout import plan_episodes

    setup = _setup(cfg)
    # the evaluation's own checks (simulator layout, prompts per task) before anything is written
    plan_episodes(_eval_config(setup, setup.source.path, episodes_per_task=1))
    state = _read_state(setup)
    _write_state(setup, state)  # from now on the run directory is recognised as this run's
    for k in range(len(state["rounds"]), cfg.rounds + 1):
        if k == 0:
            checkpoint = setup.source.path
        else:
            previous = Path(state["rounds"][k - 1]["checkpoint"])
            episodes = _collect_round(setup, k, previous, progress)
            checkpoint = _finetune(setup, k, previous, progress)
        results = _evaluate(setup, k, checkpoint, progress)
        entry = {
            "round": k,
            "checkpoint": str(checkpoint),
            "success_rate": {t: r["success_rate"] for t, r in results["tasks"].items()},
            "mean_success_rate": results["mean_success_rate"],
            "eval_episodes_per_task": results["episodes_per_task"],
        }
        if k > 0:
            entry["rollouts"] = episodes
        state["rounds"].append(entry)
        _write_state(setup, state)
        log.info("DAgger round %d: mean prompted success %.1f%%", k,
                 100 * results["mean_success_rate"])
    return state


def _setup(cfg: DaggerConfig) -> _Setup:
    """Validate the inputs against the checkpoint (one sentence per problem) before any work."""
    from icrt.data.spec import DatasetSpec
    from icrt.envs.base import check_tasks
    from icrt.train.checkpoint import read_checkpoint

    if not cfg.checkpoint:
        raise UserError("Give the imitation-learning checkpoint with --checkpoint DIR.")
    if not Path(cfg.checkpoint).exists():
        raise UserError(f"Checkpoint '{cfg.checkpoint}' does not exist.")
    if not cfg.prompt_dataset:
        raise UserError("Give held-out demonstrations to prompt the rollouts with "
                        "--prompt-dataset D.json.")
    source = read_checkpoint(cfg.checkpoint)
    env_name = source.spec.env.get("name")
    if not env_name:
        raise UserError(f"Checkpoint '{source.path}' does not record its simulator.")
    tasks = list(cfg.tasks or source.spec.tasks)
    check_tasks(env_name, tasks)
    untrained = [t for t in tasks if t not in source.spec.tasks]
    if untrained:
        raise UserError(f"Task '{untrained[0]}' is not one checkpoint '{source.path}' was trained "
                        f"on ({', '.join(source.spec.tasks)}).")
    for task in tasks:
        _labeller(env_name, task)  # an expert for every task, able to label any state
    dataset_json = cfg.dataset_json or source.config.dataset_cfg.dataset_json
    # the inputs the checkpoint was trained on (its --dataset-cfg.input-sensors, if any)
    dataset = DatasetSpec.for_run(dataclasses.replace(source.config.dataset_cfg,
                                                      dataset_json=dataset_json))
    _check_failures(dataset)
    if dataset.task_ratios:
        raise UserError(f"'{dataset.path}' groups tasks (task_grouping), which DAgger rounds do "
                        f"not carry over; give a dataset JSON without it (--dataset-json).")
    out = check_output_dir(cfg.out, "--out")
    record = json.loads(json.dumps(dataclasses.asdict(cfg)))
    record.update(checkpoint=str(source.path.resolve()), dataset_json=str(Path(dataset_json)
                                                                           .resolve()),
                  tasks=tasks, prompt_dataset=str(Path(cfg.prompt_dataset).resolve()))
    return _Setup(cfg, out, source, env_name, tasks, dataset, record)


def _check_failures(dataset: Any) -> None:
    """DAgger trains on failed rollouts too (their labels are right), which needs the dataset's
    ``include_failures``; switching it on must not add failed demonstrations the original
    training left out."""
    from icrt.data.store import EpisodeStore

    if dataset.include_failures:
        return
    for path in dataset.stores:
        failed = int(np.sum(~EpisodeStore.open(path).episode_success))
        if failed:
            raise UserError(f"Store '{path}' of '{dataset.path}' holds {failed} failed episode(s) "
                            f"its training left out; DAgger includes failures, so give a dataset "
                            f"JSON without them (--dataset-json).")


def _read_state(setup: _Setup) -> dict[str, Any]:
    """``OUT/dagger.json`` of an earlier run with the same settings, or a fresh state."""
    path = setup.out / STATE_NAME
    if not path.is_file():
        if (setup.out / STORE_NAME).exists() or any(setup.out.glob("round-*")):
            raise UserError(f"'{setup.out}' holds DAgger output but no {STATE_NAME}; use an "
                            f"empty --out.")
        return {"config": setup.record, "rounds": []}
    try:
        state = json.loads(path.read_text())
        before = state["config"]
        state["rounds"] = list(state["rounds"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"'{path}' is unreadable ({e}); use another --out.") from None
    defaults = {f.name: f.default for f in dataclasses.fields(DaggerConfig)}
    for name, value in setup.record.items():
        # a setting an older run did not record had its default then
        earlier = before.get(name, defaults.get(name))
        if name not in _FREE_FIELDS and earlier != value:
            raise UserError(f"'{setup.out}' was run with --{name.replace('_', '-')} "
                            f"{earlier!r}, not {value!r}; use the same settings or "
                            f"another --out.")
    done = len(state["rounds"]) - 1
    if done >= setup.cfg.rounds:
        log.info("'%s' already holds rounds 0..%d", setup.out, done)
    elif done >= 0:
        log.info("continuing '%s' after round %d", setup.out, done)
    state["config"] = setup.record
    return state


def _write_state(setup: _Setup, state: dict[str, Any]) -> None:
    atomic_write_text(setup.out / STATE_NAME, json.dumps(state, indent=1) + "\n")


def _eval_config(setup: _Setup, checkpoint: Path, **changes: Any) -> Any:
    from icrt.config import EvalConfig

    cfg = setup.cfg
    base = dict(checkpoint=str(checkpoint), env=setup.env, tasks=tuple(setup.tasks),
                prompt_dataset=cfg.prompt_dataset, num_prompts=cfg.num_prompts,
                episodes_per_task=cfg.eval_episodes, max_steps=cfg.max_steps,
                workers=cfg.workers, threads_per_worker=cfg.threads_per_worker, seed=cfg.seed,
                device=cfg.device, execution=cfg.execution,
                open_loop_steps=cfg.open_loop_steps, ensemble_decay=cfg.ensemble_decay)
    return EvalConfig(**{**base, **changes})


def _round_dir(setup: _Setup, k: int) -> Path:
    return setup.out / f"round-{k}"


# ------------------------------------------------------------------------- (a-c) rollouts


def _collect_round(setup: _Setup, k: int, policy: Path, progress: bool) -> dict[str, Any]:
    """Labelled rollouts of round ``k`` by the checkpoint ``policy``, appended to the store in
    job order (whatever the worker count); episodes already there are not redone."""
    import torch
    from tqdm import tqdm

    from icrt.data.store import EpisodeStore
    from icrt.envs.base import episode_seed
    from icrt.envs.episode import worker_pool
    from icrt.eval.rollout import _worker_init, close_worker_envs, plan_episodes

    cfg = setup.cfg
    n = cfg.episodes_per_round
    # the evaluation's own planning: checkpoint, simulator layout and prompts are checked there
    planned, _ = plan_episodes(_eval_config(setup, policy, episodes_per_task=n))
    jobs = [_Rollout(dataclasses.replace(
        e, seed=episode_seed(cfg.seed, "dagger", e.task, (k - 1) * n + e.index),
        video=None), cfg.beta) for e in planned]
    path = setup.out / STORE_NAME
    store = (EpisodeStore.open(path, mode="a") if path.exists()
             else EpisodeStore.create(path))
    try:
        have = set(store.episode_seed.tolist())
        todo = [j for j in jobs if j.episode.seed not in have]
        if len(todo) < len(jobs):
            log.info("round %d: %d of %d rollouts already in '%s'", k, len(jobs) - len(todo),
                     len(jobs), path)
        bar = tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc=f"dagger round {k}",
                   unit="ep", disable=not progress)
        if cfg.workers == 1 or len(todo) <= 1:
            threads = torch.get_num_threads()
            _worker_init(cfg.threads_per_worker)
            try:
                for job in todo:
                    _append(setup, store, run_dagger_episode(job))
                    bar.update(1)
            finally:
                close_worker_envs()
                torch.set_num_threads(threads)
        else:
            with worker_pool(cfg.workers, _worker_init, (cfg.threads_per_worker,)) as pool:
                futures: list[Future] = [pool.submit(run_dagger_episode, j) for j in todo]
                try:
                    for f in futures:  # in job order
                        _append(setup, store, f.result())
                        bar.update(1)
                finally:
                    for f in futures:
                        f.cancel()
        bar.close()
        return _round_summary(store, {j.episode.seed for j in jobs})
    finally:
        store.close()


def _append(setup: _Setup, store: Any, result: dict[str, Any]) -> None:
    from icrt.data.store import EpisodeStore

    store.add_episode(result["data"], task=result["task"], success=result["success"], source=1,
                      seed=result["seed"])
    if store.num_episodes == 1:
        # the original data's key metadata (rotations, delta references) so the stores combine
        original = EpisodeStore.open(setup.dataset.stores[0])
        for key in store.keys:
            extra = dict(result["obs_meta"].get(key, {}))
            if key in original.keys:
                extra.update({n: v for n, v in original.key_info(key).items()
                              if n not in ("kind", "shape", "dtype")})
            if extra:
                store.set_key_meta(key, **extra)
        cameras = [k.removeprefix("image_") for k in setup.source.spec.camera_keys]
        image_size = setup.source.spec.image_shape[0] if setup.source.spec.image_shape else 0
        store.set_attrs(fps=result["fps"], env={
            "name": setup.env, "cameras": cameras, "image_size": image_size,
            "max_steps": result["max_steps"],
            "dagger": {"checkpoint": setup.record["checkpoint"], "beta": setup.cfg.beta}})


def _round_summary(store: Any, seeds: set[int]) -> dict[str, Any]:
    """The round's rollouts: how often the policy succeeded, how far it was from the labels."""
    rows = [i for i, s in enumerate(store.episode_seed.tolist()) if s in seeds]
    gaps = []
    for i in rows:
        ep = store.episode(i, keys=["action", "executed_action"])
        gaps.append(float(np.mean(np.abs(ep["action"] - ep["executed_action"]))))
    return {"episodes": len(rows), "first_episode": min(rows), "last_episode": max(rows),
            "policy_success_rate": float(np.mean(store.episode_success[rows])),
            "steps": int(np.sum(store.episode_lengths[rows])),
            "mean_abs_label_gap": float(np.mean(gaps))}


# ------------------------------------------------------------------------- (d) fine-tune


def _finetune(setup: _Setup, k: int, previous: Path, progress: bool) -> Path:
    """Train round ``k`` on the original data plus every DAgger episode so far, starting from
    the weights of ``previous``; returns its final checkpoint. An interrupted fine-tune resumes."""
    from icrt.train.checkpoint import latest_checkpoint
    from icrt.train.loop import train

    cfg, spec = setup.cfg, setup.dataset
    run_dir = _round_dir(setup, k)
    run_dir.mkdir(parents=True, exist_ok=True)
    data_json = run_dir / "dataset.json"
    entries: list[Any] = [str(p.resolve()) for p in (*spec.stores, setup.out / STORE_NAME)]
    if spec.weights is not None:  # a mixture: the DAgger store weighs as its largest part
        weights = (*spec.weights, max(spec.weights))
        entries = [{"path": p, "weight": w} for p, w in zip(entries, weights, strict=True)]
    body = {"description": f"DAgger round {k}: '{spec.path}' plus the policy rollouts of "
                           f"rounds 1..{k}, labelled by the expert (failures included)",
            "stores": entries, "proprio_keys": list(spec.proprio_keys),
            "action_keys": list(spec.action_keys), "image_keys": list(spec.image_keys),
            "train_split": spec.train_split, "include_failures": True}
    if spec.task_names:
        body["task_names"] = list(spec.task_names)
    atomic_write_text(data_json, json.dumps(body, indent=2) + "\n")
    _write_split(setup, run_dir / "split.json")
    resume = latest_checkpoint(run_dir)
    if resume is not None and _steps_done(resume) >= cfg.finetune_steps:
        return resume  # finished before an interruption; resuming would train a step more
    base = setup.source.config
    tcfg = dataclasses.replace(base.trainer_cfg, max_steps=cfg.finetune_steps, num_workers=0)
    ocfg = dataclasses.replace(base.optimizer_cfg, lr=cfg.lr, warmup_epochs=0.0, min_lr=0.0)
    scfg = dataclasses.replace(
        base.shared_cfg, seed=base.shared_cfg.seed + 1000 * cfg.seed + k,
        batch_size=cfg.batch_size or base.shared_cfg.batch_size,
        resume=str(resume) if resume is not None else None,
        save_every=10**6, save_every_steps=0, keep_last=1)
    pcfg = dataclasses.replace(base.model_cfg.policy_cfg, pretrained_path=str(previous))
    train_cfg = dataclasses.replace(
        base, dataset_cfg=dataclasses.replace(base.dataset_cfg, dataset_json=str(data_json)),
        model_cfg=dataclasses.replace(base.model_cfg, policy_cfg=pcfg),
        optimizer_cfg=ocfg, shared_cfg=scfg, trainer_cfg=tcfg,
        logging_cfg=dataclasses.replace(base.logging_cfg, output_dir=str(setup.out),
                                        log_name=run_dir.name, log_dir=None, wandb=False),
        eval_cfg=dataclasses.replace(base.eval_cfg, eval_every=0, eval_every_steps=0),
        device=cfg.device, load_config=None)
    log.info("round %d: fine-tuning %s on '%s' for %d steps%s", k, previous, data_json,
             cfg.finetune_steps, f" (resuming {resume})" if resume else "")
    train(train_cfg, progress=progress)
    final = latest_checkpoint(run_dir)
    if final is None:  # train() always saves after its last step
        raise UserError(f"Round {k}'s fine-tune in '{run_dir}' left no checkpoint.")
    return final


def _steps_done(checkpoint: Path) -> int:
    from icrt.train.checkpoint import read_checkpoint

    state = read_checkpoint(checkpoint).train_state()
    return int(state["step"]) if state else 0


def _write_split(setup: _Setup, path: Path) -> None:
    """The starting checkpoint's train/validation split of the original episodes, plus every
    DAgger episode in training (nothing written when the checkpoint has no split.json)."""
    from icrt.data.sequence import read_split_file
    from icrt.data.store import EpisodeStore

    original = setup.source.path.parent / "split.json"
    if not original.is_file():
        log.warning("'%s' has no split.json; round fine-tunes split the data anew", original)
        return
    body = read_split_file(original)
    store = EpisodeStore.open(setup.out / STORE_NAME)
    dcfg = setup.source.config.dataset_cfg  # episodes its length filters leave out stay out
    lengths = store.episode_lengths.tolist()
    keep = [i for i, n in enumerate(lengths)
            if dcfg.min_episode_length <= n <= (dcfg.max_episode_length or n)]
    body["train"] = list(body["train"]) + [[store.store_id, i] for i in keep]
    atomic_write_text(path, json.dumps(body) + "\n")


# ------------------------------------------------------------------------- (e) evaluation


def _evaluate(setup: _Setup, k: int, checkpoint: Path, progress: bool) -> dict[str, Any]:
    """Prompted evaluation of round ``k``'s checkpoint (read back if it already ran)."""
    from icrt.eval.rollout import evaluate, read_results

    out = _round_dir(setup, k) / "eval_prompted.json"
    if out.is_file():
        results = read_results(out)
        if results.get("checkpoint") == str(checkpoint):
            return results
    return evaluate(_eval_config(setup, checkpoint, out=str(out)), progress=progress)


def format_rounds(state: dict[str, Any]) -> str:
    """Markdown table: prompted success per task (columns) for every round (rows)."""
    rounds = state["rounds"]
    if not rounds:
        return "(no rounds yet)"
    tasks = list(rounds[0]["success_rate"])
    head = "| round | " + " | ".join(tasks) + " | mean | DAgger episodes | rollout success |"
    rule = "| ---: | " + " | ".join("---:" for _ in tasks) + " | ---: | ---: | ---: |"
    lines = [head, rule]
    total = 0
    for r in rounds:
        rates = " | ".join(f"{100 * r['success_rate'][t]:.0f}%" for t in tasks)
        roll = r.get("rollouts")
        total += roll["episodes"] if roll else 0
        rollout = f"{100 * roll['policy_success_rate']:.0f}%" if roll else "-"
        lines.append(f"| {r['round']} | {rates} | {100 * r['mean_success_rate']:.1f}% | "
                     f"{total} | {rollout} |")
    return "\n".join(lines)
