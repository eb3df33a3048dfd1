"""Does a policy read its prompt? A simulator-free check on recorded episodes.

For every task of a dataset, a few episodes are replayed with teacher forcing (their own actions
in context) after a prompt, and the policy's first predicted action at each of the first
``steps`` steps is compared with the recorded one (L1, normalised units):

* *matched*: the prompt is another episode of the same task;
* *mismatched*: the prompt is an episode of a different task.

When several tasks share one scene (the robosuite (object, bin) family) only the prompt can tell
which action comes next, so a policy that reads its prompt has a mismatched error well above the
matched one (``ratio`` = mismatched / matched > 1); a policy that ignores it has a ratio of 1.
The early steps are where the prompt matters most: later on, the query's own history tells
which object is already in hand. Episodes from a store the policy never trained on (e.g. the
``NAME_prompts`` store or held-out tasks) make it a generalisation check; episodes of the
checkpoint's training split (its run's ``split.json``) are always left out, as in evaluation.

    results = prompt_reading(policy, "data/icg_heldout.json", steps=40)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from icrt.data.spec import DatasetSpec
from icrt.data.store import EpisodeStore
from icrt.errors import UserError
from icrt.eval.inference import InContextPolicy
from icrt.eval.rollout import _training_episodes


def _episodes(dataset: str | Path, exclude: set[tuple[str, int]]
              ) -> tuple[dict[str, list[tuple[EpisodeStore, int]]], int]:
    """Successful episodes per task of a dataset JSON or a single episode store, leaving out
    the ``exclude`` (store id or path, index) pairs; also returns how many were left out."""
    path = Path(dataset)
    if not path.exists():
        raise UserError(f"Dataset '{dataset}' does not exist.")
    stores = DatasetSpec.load(path).stores if path.suffix == ".json" else [path]
    out: dict[str, list[tuple[EpisodeStore, int]]] = {}
    skipped = 0
    for p in stores:
        store = EpisodeStore.open(p)
        ids = {store.store_id, str(Path(p).resolve())}
        names, success = store.episode_task_names, store.episode_success
        for i, (task, ok) in enumerate(zip(names, success, strict=True)):
            if any((sid, i) in exclude for sid in ids):
                skipped += 1
            elif ok:
                out.setdefault(task, []).append((store, i))
    return out, skipped


def prompt_reading(policy: InContextPolicy, dataset: str | Path, *, steps: int = 40,
                   queries_per_task: int = 3, mismatched_per_query: int = 3,
                   tasks: tuple[str, ...] | None = None, seed: int = 0) -> dict[str, Any]:
    """Matched vs mismatched teacher-forced action error per task (see the module docstring).

    Each task's first episode outside the checkpoint's training split is its prompt; the next
    ``queries_per_task`` are queries. Every query is also prompted by the first episode of
    ``mismatched_per_query`` other tasks drawn at random. Returns ``{"tasks": {task:
    {"matched", "mismatched", "ratio", "queries"}}, "matched", "mismatched", "ratio",
    "steps"}`` (means over tasks)."""
    if not policy.spec.in_context:
        raise UserError("This policy was trained without prompts; there is no prompt to read.")
    by_task, trained = _episodes(dataset, _training_episodes(policy.checkpoint.path))
    if tasks:
        missing = [t for t in tasks if t not in by_task]
        if missing:
            raise UserError(f"Dataset '{dataset}' has no successful episode of "
                            f"{', '.join(missing)}.")
        by_task = {t: by_task[t] for t in tasks}
    usable = {t: eps for t, eps in by_task.items() if len(eps) >= 2}
    if len(usable) < 2:
        raise UserError(f"Dataset '{dataset}' needs at least two tasks with two or more "
                        f"successful episodes each (prompt and query); it has {len(usable)}"
                        + (f" once the {trained} episode(s) the checkpoint trained on are left "
                           f"out." if trained else "."))
    rng = np.random.default_rng(seed)

    def episode(ref: tuple[EpisodeStore, int]) -> dict[str, np.ndarray]:
        return ref[0].episode(ref[1])

    def error(prompt: dict[str, np.ndarray], query: dict[str, np.ndarray]) -> float:
        pred, target = policy.teacher_forced([prompt], query, steps)
        return float(np.abs(pred - target).mean())

    prompts = {t: episode(eps[0]) for t, eps in usable.items()}
    results: dict[str, dict[str, float]] = {}
    names = sorted(usable)
    for task in names:
        others = [t for t in names if t != task]
        matched, mismatched = [], []
        for ref in usable[task][1: 1 + queries_per_task]:
            query = episode(ref)
            matched.append(error(prompts[task], query))
            k = min(mismatched_per_query, len(others))
            for other in rng.choice(others, size=k, replace=False):
                mismatched.append(error(prompts[str(other)], query))
        m, mm = float(np.mean(matched)), float(np.mean(mismatched))
        results[task] = {"matched": m, "mismatched": mm, "ratio": mm / max(m, 1e-12),
                         "queries": len(matched)}
    m = float(np.mean([r["matched"] for r in results.values()]))
    mm = float(np.mean([r["mismatched"] for r in results.values()]))
    return {"tasks": results, "matched": m, "mismatched": mm, "ratio": mm / max(m, 1e-12),
            "steps": steps}


def format_table(results: dict[str, Any]) -> str:
    """Markdown table of :func:`prompt_reading`'s results."""
    lines = [f"teacher-forced L1 of the first {results['steps']} query steps (normalised)", "",
             "| task | matched prompt | other task's prompt | ratio |",
             "| --- | ---: | ---: | ---: |"]
    for task, r in results["tasks"].items():
        lines.append(f"| {task} | {r['matched']:.4f} | {r['mismatched']:.4f} | "
                     f"{r['ratio']:.2f} |")
    lines.append(f"| **mean** | **{results['matched']:.4f}** | **{results['mismatched']:.4f}** "
                 f"| **{results['ratio']:.2f}** |")
    return "\n".join(lines)
