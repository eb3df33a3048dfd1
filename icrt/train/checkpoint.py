"""Checkpoint directories, written atomically by rank 0 and readable without training code.

    RUN/checkpoint-<epoch>/  model.safetensors  config.json  stats.json  train_state.pt
    RUN/best/                the same, for the best evaluation success rate

``config.json`` is the run's resolved :class:`~icrt.config.ExperimentConfig` as JSON;
``stats.json`` holds the :class:`~icrt.models.policy.PolicySpec` and the normaliser;
``train_state.pt`` holds only tensors and numbers (optimizer, step, RNG), never pickled objects.
A directory is first written under a temporary name and then renamed, so a run killed at any
moment leaves either the old or the new checkpoint, never half of one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from icrt.config import ExperimentConfig, config_from_dict, save_config
from icrt.data.transforms import Normalizer
from icrt.errors import UserError
from icrt.models.policy import ICRTPolicy, PolicySpec

_CKPT = re.compile(r"^checkpoint-(\d+)$")


@dataclass
class Checkpoint:
    path: Path
    config: ExperimentConfig
    spec: PolicySpec
    normalizer: Normalizer

    def state_dict(self) -> dict[str, torch.Tensor]:
        return load_file(str(self.path / "model.safetensors"))

    def train_state(self) -> dict[str, Any] | None:
        path = self.path / "train_state.pt"
        if not path.is_file():
            return None
        return torch.load(path, map_location="cpu", weights_only=True)


def save_checkpoint(
    path: Path,
    model: ICRTPolicy,
    cfg: ExperimentConfig,
    normalizer: Normalizer,
    train_state: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint directory atomically (replacing an existing one)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(tmp / "model.safetensors"))
    save_config(cfg, tmp / "config.json")
    stats = {"spec": model.spec.to_dict(), "normalizer": normalizer.to_dict()}
    (tmp / "stats.json").write_text(json.dumps(stats, indent=1) + "\n")
    if train_state is not None:
        torch.save(train_state, tmp / "train_state.pt")
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    if old.exists():
        shutil.rmtree(old)
    return path


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The highest-numbered ``checkpoint-<epoch>`` directory of a run, if any."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in run_dir.iterdir()
             if (m := _CKPT.match(p.name)) and (p / "model.safetensors").is_file()]
    return max(found)[1] if found else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory from what a user may pass: the directory itself, a run directory
    (its latest checkpoint), the model.safetensors inside, or ICRT's ``checkpoint-N.pth``."""
    p = Path(path)
    if p.is_file() and p.name == "model.safetensors":
        p = p.parent
    if not p.exists() and p.suffix == ".pth" and p.with_suffix("").is_dir():
        p = p.with_suffix("")
    if p.is_dir() and not (p / "model.safetensors").is_file():
        latest = latest_checkpoint(p)
        if latest is not None:
            p = latest
    if not (p / "model.safetensors").is_file():
        raise UserError(f"'{path}' is not a checkpoint directory (no model.safetensors found).")
    return p


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint's config, spec and normaliser (weights load lazily)."""
    p = resolve_checkpoint(path)
    try:
        cfg = config_from_dict(ExperimentConfig, json.loads((p / "config.json").read_text()))
        stats = json.loads((p / "stats.json").read_text())
        return Checkpoint(p, cfg, PolicySpec.from_dict(stats["spec"]),
                          Normalizer.from_dict(stats["normalizer"]))
    except (OSError, KeyError, ValueError, TypeError) as e:
        raise UserError(f"Checkpoint '{p}' is incomplete or from another version: {e}") from None


def load_policy(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[ICRTPolicy, Checkpoint]:
    """Rebuild the policy of a checkpoint with its weights, in eval mode."""
    ckpt = read_checkpoint(path)
    model = ICRTPolicy(ckpt.config.model_cfg, ckpt.spec)
    load_weights(model, ckpt.state_dict(), source=str(ckpt.path))
    return model.to(device).eval(), ckpt


def load_weights(model: ICRTPolicy, state: dict[str, torch.Tensor], source: str) -> None:
    """Load weights strictly, except for LoRA adapters the checkpoint never had.

    peft renames a wrapped ``wq.weight`` to ``wq.base_layer.weight``; names are matched with
    that part removed, so a plain checkpoint loads into a LoRA-wrapped policy.
    """
    own = model.state_dict()
    canonical = {k.replace(".base_layer", ""): k for k in own}
    state = {canonical.get(k.replace(".base_layer", ""), k): v for k, v in state.items()}
    unexpected = sorted(set(state) - set(own))
    missing = sorted(k for k in set(own) - set(state) if "lora_" not in k)
    if unexpected or missing:
        raise UserError(
            f"Weights in '{source}' do not fit this policy: missing {missing[:3]}, unexpected "
            f"{unexpected[:3]} (different backbone, head or encoder settings?)."
        )
    for k, v in state.items():
        if v.shape != own[k].shape:
            raise UserError(
                f"Weights in '{source}' do not fit this policy: {k} has shape {tuple(v.shape)}, "
                f"the policy expects {tuple(own[k].shape)}."
            )
    model.load_state_dict(state, strict=False)


def check_compatible(spec: PolicySpec, other: PolicySpec, source: str, target: str) -> None:
    """Raise one sentence when a checkpoint's observation/action layout differs from data's."""
    for name in ("action_dim", "proprio_dim", "num_pred_steps", "camera_keys", "action_keys",
                 "proprio_keys"):
        a, b = getattr(spec, name), getattr(other, name)
        if a != b:
            raise UserError(
                f"{source} has {name.replace('_', ' ')} {a!r} but {target} has {b!r}; they must "
                f"match."
            )
