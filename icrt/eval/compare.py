"""One table comparing several policies evaluated on the same episodes.

    python scripts/compare.py "in-context, 1 prompt=runs/mw5/eval_prompted.json" \
        "ACT-style=runs/mw5_act/compare.json" "diffusion-style=runs/mw5_diffusion/compare.json"

Each argument is ``LABEL=RESULTS.json`` (a results JSON of ``scripts/eval.py``). The table has a
row per task and a column per policy (success rate), then the mean. The evaluations must cover
the same tasks with the same episode seeds -- otherwise the numbers are not comparable and the
table is refused with one sentence naming the first difference.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from icrt.errors import UserError
from icrt.eval.rollout import read_results


def _episodes(results: dict[str, Any]) -> dict[str, list[int]]:
    """Task -> episode seeds, in order."""
    out: dict[str, list[int]] = {}
    for ep in results.get("episodes", []):
        out.setdefault(ep["task"], []).append(int(ep["seed"]))
    return {t: sorted(s) for t, s in out.items()}


def load_methods(specs: list[str]) -> dict[str, dict[str, Any]]:
    """``LABEL=PATH`` arguments -> {label: results}, checked to share tasks and episodes."""
    methods: dict[str, dict[str, Any]] = {}
    for spec in specs:
        label, sep, path = spec.partition("=")
        if not sep or not label or not path:
            raise UserError(f"'{spec}' is not LABEL=RESULTS.json.")
        if label in methods:
            raise UserError(f"Label '{label}' is given twice.")
        if not Path(path).is_file():
            raise UserError(f"Results file '{path}' (for '{label}') does not exist.")
        methods[label] = read_results(path)
    if not methods:
        raise UserError("Give at least one LABEL=RESULTS.json.")
    first_label, first = next(iter(methods.items()))
    want = _episodes(first)
    for label, r in methods.items():
        if set(r["tasks"]) != set(first["tasks"]):
            raise UserError(f"'{label}' evaluated tasks {sorted(r['tasks'])}, but "
                            f"'{first_label}' evaluated {sorted(first['tasks'])}.")
        got = _episodes(r)
        for task in want:
            if got.get(task) != want[task]:
                raise UserError(f"'{label}' and '{first_label}' ran different episodes of "
                                f"'{task}' (seeds differ); evaluate both with the same --seed, "
                                f"--episodes-per-task and subset.")
    return methods


def format_methods(methods: dict[str, dict[str, Any]], title: str | None = None) -> str:
    """Markdown: a row per task, a success column per policy, the mean last."""
    labels = list(methods)
    first = methods[labels[0]]
    n = first["episodes_per_task"]
    lines = []
    if title:
        lines += [f"**{title}** ({n} episodes per task, the same episodes for every policy)", ""]
    lines += ["| task | " + " | ".join(labels) + " |",
              "| --- |" + " ---: |" * len(labels)]
    for task in first["tasks"]:
        cells = [f"{100 * methods[m]['tasks'][task]['success_rate']:.0f}%" for m in labels]
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    means = [f"**{100 * methods[m]['mean_success_rate']:.1f}%**" for m in labels]
    lines.append("| **mean** | " + " | ".join(means) + " |")
    return "\n".join(lines)
