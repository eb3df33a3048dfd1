"""Export a checkpoint as a standalone, inference-only checkpoint directory.

    python scripts/export.py --checkpoint runs/ft --out exports/ft --merge-lora

With --merge-lora the LoRA adapters of the backbone are folded into its weights (the finetune
phase's biases kept): the export needs neither peft nor the base model directory (its backbone
shape is written beside the weights), and acts exactly like the checkpoint; a checkpoint of a
frozen pretrained backbone (pretrain phase) becomes standalone the same way. Without it, the
export is the checkpoint without its optimizer state. Load the result with
InContextPolicy.from_checkpoint or scripts/eval.py --checkpoint.

Run with -h for every option.
"""

import dataclasses
import json
import logging

import tyro

from icrt.cli import run


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    """Write a standalone inference checkpoint."""

    # Checkpoint directory (or a run directory: its newest checkpoint).
    checkpoint: str
    # Output directory (a checkpoint directory).
    out: str
    # Fold the backbone's LoRA adapters into its weights and include the base model's weights.
    merge_lora: bool = False
    # Replace an existing output directory.
    overwrite: bool = False


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = tyro.cli(ExportConfig, description=__doc__)
    from icrt.train.checkpoint import export_checkpoint

    print(json.dumps(export_checkpoint(cfg.checkpoint, cfg.out, cfg.merge_lora,
                                       cfg.overwrite), indent=1))


if __name__ == "__main__":
    run(main)
