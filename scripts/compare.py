"""Print one success table for several policies evaluated on the same episodes.

    python scripts/compare.py --title MW5 "in-context, 1 prompt=runs/mw5/compare_prompted.json" \
        "ACT-style=runs/mw5_act/compare.json" "diffusion-style=runs/mw5_diffusion/compare.json"

`make compare` trains the ACT-style and diffusion-style presets on the MW5 demo data, evaluates
every policy on the same episodes and prints this table.
"""

import dataclasses

import tyro

from icrt.cli import run
from icrt.eval.compare import format_methods, load_methods
from icrt.fsutil import atomic_write_text


@dataclasses.dataclass(frozen=True)
class CompareCommand:
    # LABEL=RESULTS.json of scripts/eval.py, one per policy (columns in this order).
    results: tyro.conf.Positional[tuple[str, ...]]
    # Title above the table (e.g. the benchmark's name).
    title: str | None = None
    # Also write the table (Markdown) here.
    out: str | None = None


def main() -> None:
    cmd = tyro.cli(CompareCommand, description=__doc__)
    table = format_methods(load_methods(list(cmd.results)), cmd.title)
    print(table)
    if cmd.out:
        atomic_write_text(cmd.out, table + "\n")


if __name__ == "__main__":
    run(main)
