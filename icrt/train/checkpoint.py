"""Checkpoint directories, written atomically by rank 0 and readable without training code.

    RUN/checkpoint-<epoch>/  model.safetensors  config.json  stats.json  train_state.pt
    RUN/best/                the same, for the best evaluation success rate

``config.json`` is the run's resolved :class:`~icrt.config.ExperimentConfig` as JSON;
``stats.json`` holds the :class:`~icrt.models.policy.PolicySpec` and the normaliser;
``train_state.pt`` holds only tensors and numbers (optimizer, step, RNG), never pickled objects.
A run on a pretrained Llama (``--model-cfg.policy-cfg.llama-ckpt-dir``) whose backbone is
(partly) frozen -- the finetune phase's LoRA, or the pretrain phase's frozen backbone -- leaves
the frozen base weights out of ``model.safetensors`` (a 7B LoRA checkpoint is megabytes):
``lora_base.json`` names the base directory and a fingerprint of its weights, and loading
rebuilds the base from that directory and refuses one whose weights differ.
A directory is first written under a temporary name, its files fsynced, and then renamed, so a
run killed at any moment (or a power cut) leaves either the old or the new checkpoint, never
half of one. ``manifest.json`` records each file's size and SHA-256, so a damaged checkpoint is
recognised (:func:`verify_checkpoint`) and resuming falls back to the last good one. A save
that fails (a full disk) removes its partial directory and leaves the previous checkpoint as
it was. Files are written 0644 and directories 0755.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from icrt.config import ExperimentConfig, config_from_dict, save_config
from icrt.data.transforms import Normalizer
from icrt.errors import UserError
from icrt.fsutil import fsync_path, pid_alive, remove_leftovers, replace_dir
from icrt.models.policy import ICRTPolicy, PolicySpec

log = logging.getLogger(__name__)

# checkpoint-<epoch> after an epoch, checkpoint-step-<step> in the middle of one
_CKPT = re.compile(r"^checkpoint-(step-)?(\d+)$")
# Temporary directories of saves (".checkpoint-3.tmp-PID", ".best.old-PID").
# (".checkpoint-3.dcp-PID": FSDP's sharded state, written by every rank before the save)
_LEFTOVER = r"^\.(checkpoint-(?:step-)?\d+|best)\.(tmp|old|dcp)-(?P<pid>\d+)$"


@dataclass
class Checkpoint:
    path: Path
    config: ExperimentConfig
    spec: PolicySpec
    normalizer: Normalizer

    def state_dict(self) -> dict[str, torch.Tensor]:
        try:
            return load_file(str(self.path / "model.safetensors"))
        except (SafetensorError, OSError, ValueError) as e:
            raise UserError(f"Checkpoint '{self.path}' has unreadable weights "
                            f"(model.safetensors: {e}).") from None

    def lora_base(self) -> dict[str, Any] | None:
        """The base model a LoRA-only checkpoint needs (None for complete checkpoints)."""
        path = self.path / "lora_base.json"
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"Checkpoint '{self.path}' has an unreadable lora_base.json "
                            f"({e}).") from None

    def train_state(self) -> dict[str, Any] | None:
        path = self.path / "train_state.pt"
        if not path.is_file():
            return None
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except (RuntimeError, OSError, ValueError, EOFError) as e:
            raise UserError(f"Checkpoint '{self.path}' has an unreadable train_state.pt "
                            f"({type(e).__name__}: {e}).") from None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def save_checkpoint(
    path: Path,
    model: ICRTPolicy,
    cfg: ExperimentConfig,
    normalizer: Normalizer,
    train_state: dict[str, Any] | None = None,
    extra_files: dict[str, str] | None = None,
    state: dict[str, torch.Tensor] | None = None,
    extra_dirs: dict[str, Path] | None = None,
) -> Path:
    """Write a checkpoint directory atomically (replacing an existing one).

    ``extra_files`` (name -> text) are written inside it before the commit (e.g. best/'s
    eval.json), so they appear together with the weights. ``state`` is the model's full state
    dict when the model itself holds shards (FSDP gathers it on every rank first);
    ``extra_dirs`` (name -> folder) are moved inside (FSDP's sharded state, written by every
    rank) and covered by the manifest."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir(parents=True)
        full = model.state_dict() if state is None else state
        base = set(lora_base_keys(model))
        weights = {k: v.detach().contiguous().cpu() for k, v in full.items() if k not in base}
        save_file(weights, str(tmp / "model.safetensors"))
        if base:
            (tmp / "lora_base.json").write_text(json.dumps({
                "path": str(Path(model.cfg.llama_ckpt_dir).resolve()),
                "fingerprint": base_fingerprint(full, sorted(base)),
                "frozen_tensors": len(base)}, indent=1) + "\n")
        save_config(cfg, tmp / "config.json")
        stats = {"spec": model.spec.to_dict(), "normalizer": normalizer.to_dict()}
        (tmp / "stats.json").write_text(json.dumps(stats, indent=1) + "\n")
        if train_state is not None:
            torch.save(train_state, tmp / "train_state.pt")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        for name, folder in (extra_dirs or {}).items():
            os.replace(folder, tmp / name)
        files = sorted(str(f.relative_to(tmp)) for f in tmp.rglob("*") if f.is_file())
        manifest: dict[str, Any] = {"files": {
            f: {"bytes": (tmp / f).stat().st_size, "sha256": _sha256(tmp / f)} for f in files}}
        if train_state is not None:  # orders a run's checkpoints (see checkpoints())
            manifest.update(epoch=int(train_state["epoch"]), step=int(train_state["step"]))
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        for f in tmp.rglob("*"):
            os.chmod(f, 0o755 if f.is_dir() else 0o644)
            fsync_path(f)
        os.chmod(tmp, 0o755)
        fsync_path(tmp)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        reason = "the disk is full" if e.errno == errno.ENOSPC else e.strerror or str(e)
        raise UserError(f"Saving checkpoint '{path}' failed ({reason}); the previous "
                        f"checkpoints are intact.") from None
    replace_dir(tmp, path)
    return path


def remove_save_leftovers(run_dir: Path) -> None:
    """Finish or undo saves of killed runs, then delete their temporary directories.

    A save killed between its two renames leaves no ``X`` but ``.X.old-PID`` (the previous
    checkpoint) and ``.X.tmp-PID`` (the new one, complete once its manifest is written): the
    complete new one is moved into place, else the old one is restored."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return
    pattern = re.compile(_LEFTOVER)
    for p in sorted(run_dir.iterdir()):
        m = pattern.match(p.name)
        target = run_dir / m.group(1) if m else None
        if target is None or target.exists() or pid_alive(int(m.group("pid"))):
            continue
        new = run_dir / f".{m.group(1)}.tmp-{m.group('pid')}"
        old = run_dir / f".{m.group(1)}.old-{m.group('pid')}"
        if (new / "manifest.json").is_file() and verify_checkpoint(new) is None:
            os.replace(new, target)
        elif old.is_dir():
            os.replace(old, target)
        else:
            continue
        log.warning("completed the interrupted save of %s", target)
        fsync_path(run_dir)
    remove_leftovers(run_dir, _LEFTOVER, "checkpoint save")


def verify_checkpoint(path: Path, thorough: bool = True) -> str | None:
    """None if the checkpoint directory is intact, else what is wrong (one phrase).

    With a manifest: every file present with its recorded size (and SHA-256 when
    ``thorough``). Without one (older checkpoints): every file parses."""
    path = Path(path)
    manifest = path / "manifest.json"
    if manifest.is_file():
        try:
            files = json.loads(manifest.read_text())["files"]
        except (ValueError, KeyError, TypeError):
            return "manifest.json is unreadable"
        for name, rec in files.items():
            f = path / name
            if not f.is_file():
                return f"{name} is missing"
            if f.stat().st_size != rec["bytes"]:
                return f"{name} has {f.stat().st_size} bytes, {rec['bytes']} were written"
            if thorough and _sha256(f) != rec["sha256"]:
                return f"{name} does not match its checksum"
        return None
    try:
        ckpt = read_checkpoint(path)
        ckpt.state_dict()
        ckpt.train_state()
    except UserError as e:
        return str(e)
    return None


def _order(p: Path, m: re.Match) -> tuple[int, int]:
    """Sort key of a checkpoint directory: the optimizer step its manifest records (checkpoints
    written before manifests carried it sort by their epoch number, before the others)."""
    try:
        step = int(json.loads((p / "manifest.json").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return (-1, int(m.group(2)))
    return (step, 0 if m.group(1) else 1)  # at equal steps the end-of-epoch one is newer


def checkpoints(run_dir: Path, complete: bool = False) -> list[Path]:
    """The run's ``checkpoint-<epoch>`` and ``checkpoint-step-<step>`` directories, newest
    first (``complete``: only those holding weights)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(_order(p, m), p.name, p) for p in run_dir.iterdir()
             if (m := _CKPT.match(p.name)) and p.is_dir()
             and (not complete or (p / "model.safetensors").is_file())]
    return [p for _, _, p in sorted(found, reverse=True)]


def resume_checkpoint(path: str | Path) -> Path:
    """The checkpoint to resume from: the one given, or a run directory's newest *intact*
    checkpoint (damaged newer ones are skipped, saying so)."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"--shared-cfg.resume '{path}' is not a checkpoint directory (it does "
                        f"not exist).")
    if (p / "model.safetensors").is_file() or p.suffix == ".pth" or p.is_file():
        p = resolve_checkpoint(p)
        problem = verify_checkpoint(p)
        if problem:
            raise UserError(f"Checkpoint '{p}' is damaged ({problem}); resume from its run "
                            f"directory '{p.parent}' to fall back to the last good one.")
        return p
    found = checkpoints(p)
    if not found:
        raise UserError(f"--shared-cfg.resume '{path}' is not a checkpoint directory and holds "
                        f"no checkpoint-<epoch> directory to resume from.")
    for ckpt in found:
        problem = verify_checkpoint(ckpt)
        if problem is None:
            return ckpt
        log.warning("skipping damaged checkpoint %s (%s)", ckpt, problem)
    raise UserError(f"Every checkpoint of '{path}' is damaged (newest: {found[0].name}, "
                    f"{verify_checkpoint(found[0])}); nothing can be resumed.")


def prune_checkpoints(run_dir: Path, keep_last: int) -> None:
    """Keep the newest ``keep_last`` checkpoint directories (0: all); best/ is never touched."""
    if keep_last <= 0:
        return
    for old in checkpoints(run_dir)[keep_last:]:
        shutil.rmtree(old)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint directory of a run (by training progress), if any."""
    found = checkpoints(run_dir, complete=True)
    return found[0] if found else None


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
        shape = cfg.model_cfg.policy_cfg.scratch_llama_config
        if shape == _EXPORT_SHAPE:  # an export carries its backbone shape inside
            cfg = dataclasses.replace(cfg, model_cfg=dataclasses.replace(
                cfg.model_cfg, policy_cfg=dataclasses.replace(
                    cfg.model_cfg.policy_cfg, scratch_llama_config=str(p / _EXPORT_SHAPE))))
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
    load_checkpoint_weights(model, ckpt)
    return model.to(device).eval(), ckpt


# ------------------------------------------------------------------------ LoRA checkpoints

# The backbone shape an export writes beside its weights (its config names it relatively).
_EXPORT_SHAPE = "backbone_params.json"


def lora_base_keys(model: ICRTPolicy) -> list[str]:
    """State-dict keys of the frozen base weights of a run on a pretrained Llama directory:
    all but the adapters, biases and norms in the finetune phase, the whole backbone in the
    pretrain phase (empty for every other policy: their checkpoints are complete)."""
    cfg = model.cfg
    if (cfg.phase not in ("finetune", "pretrain") or cfg.scratch_config is not None
            or not cfg.llama_ckpt_dir or not cfg.load_llama):
        return []
    return sorted(f"backbone.{n}" for n, p in model.backbone.named_parameters()
                  if not p.requires_grad)


def base_fingerprint(state: dict[str, torch.Tensor], keys: list[str]) -> str:
    """SHA-256 of the frozen base tensors' names, shapes and an evenly strided sample of at
    most 65,536 values each (of a model's state dict): tells base models apart without hashing
    gigabytes."""
    h = hashlib.sha256()
    for k in sorted(keys, key=_canonical):  # the same order for a LoRA-wrapped and a plain model
        t = state[k].detach()
        flat = t.flatten()
        sample = flat[:: max(1, flat.numel() // 65536)].float().cpu().contiguous()
        h.update(f"{_canonical(k)}{tuple(t.shape)}".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()


def _canonical(key: str) -> str:
    """A state-dict key without peft's ``.base_layer`` (a wrapped ``wq.weight``'s name)."""
    return key.replace(".base_layer", "")


def _starts_at_zero(model: ICRTPolicy, key: str) -> bool:
    """Whether ``key`` is one of the weights that start at zero, so a checkpoint saved without
    them computes the same: what the finetune phase adds to a backbone (LoRA adapters, ICRT's
    biases) and the goal-conditioned head's input."""
    return "lora_" in key or key.startswith("goal_in.") or (
        model.cfg.phase == "finetune" and key.startswith("backbone.") and key.endswith(".bias"))


def load_checkpoint_weights(model: ICRTPolicy, ckpt: Checkpoint) -> None:
    """Load a checkpoint's weights into ``model``; a checkpoint without its frozen base keeps
    the base weights ``model`` loaded from its base directory, after checking they are the ones
    it was trained on (also across phases: a pretrain checkpoint initialises a finetune run)."""
    base = ckpt.lora_base()
    keys: list[str] = []
    state = ckpt.state_dict()
    if base is not None:
        phase = ckpt.config.model_cfg.policy_cfg.phase
        held = "LoRA adapters" if phase == "finetune" else "the modules"
        saved = {_canonical(k) for k in state}
        keys = [k for k in model.state_dict() if k.startswith("backbone.")
                and _canonical(k) not in saved and not _starts_at_zero(model, k)]
        if not lora_base_keys(model):
            raise UserError(
                f"Checkpoint '{ckpt.path}' holds {held} trained around a frozen base model "
                f"only; it needs its base model '{base.get('path')}' as "
                f"--model-cfg.policy-cfg.llama-ckpt-dir in the {phase} phase (or an export made "
                f"with scripts/export.py --merge-lora).")
        found = base_fingerprint(model.state_dict(), keys)
        if found != base.get("fingerprint"):
            raise UserError(
                f"Checkpoint '{ckpt.path}' holds {held} trained on the base model "
                f"'{base.get('path')}' (fingerprint {str(base.get('fingerprint'))[:12]}), but "
                f"the base loaded from '{model.cfg.llama_ckpt_dir}' has other weights "
                f"(fingerprint {found[:12]}); use the original base model.")
    load_weights(model, state, str(ckpt.path), optional=keys)


def load_weights(model: ICRTPolicy, state: dict[str, torch.Tensor], source: str,
                 optional: list[str] | tuple[str, ...] = ()) -> None:
    """Load weights strictly, except for LoRA adapters and finetune-phase backbone biases the
    checkpoint never had (both start at zero, so a plain checkpoint, or one saved before the
    biases existed, loads into a finetune policy and computes what it computed), and the
    ``optional`` keys, which keep their current values.

    peft renames a wrapped ``wq.weight`` to ``wq.base_layer.weight``; names are matched with
    that part removed, so a plain checkpoint loads into a LoRA-wrapped policy.
    """
    own = model.state_dict()
    canonical = {_canonical(k): k for k in own}
    state = {canonical.get(_canonical(k), k): v for k, v in state.items()}
    unexpected = sorted(set(state) - set(own))
    missing = sorted(k for k in set(own) - set(state) - set(optional)
                     if not _starts_at_zero(model, k))
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


def export_checkpoint(src: str | Path, out: str | Path, merge_lora: bool = False,
                      overwrite: bool = False) -> dict[str, Any]:
    """Write ``src`` as an inference-only checkpoint at ``out``; with ``merge_lora`` the
    backbone's adapters are folded into its weights (its biases kept) and the export stands
    alone (no base model directory, no peft; also for a frozen pretrained backbone without
    adapters). Returns a summary."""
    from icrt.models.backbones.pretrained import merge_lora as merge

    out = Path(out)
    if out.exists() and not overwrite:
        raise UserError(f"'{out}' already exists; pass --overwrite to replace it.")
    model, ckpt = load_policy(src)
    cfg = ckpt.config
    extra: dict[str, str] = {}
    merged = 0
    if merge_lora:
        frozen_base = bool(lora_base_keys(model))
        merged = merge(model.backbone)
        if not merged and not frozen_base:
            raise UserError(f"Checkpoint '{ckpt.path}' has no LoRA adapters to merge.")
        shape = {k: v for k, v in dataclasses.asdict(model.backbone.config).items()
                 if k != "max_seq_len" and v is not None}
        extra[_EXPORT_SHAPE] = json.dumps(shape, indent=1) + "\n"
        pcfg = dataclasses.replace(cfg.model_cfg.policy_cfg, scratch_llama_config=_EXPORT_SHAPE,
                                   llama_ckpt_dir=None, phase="pretrain", pretrained_path=None)
        cfg = dataclasses.replace(cfg, model_cfg=dataclasses.replace(cfg.model_cfg,
                                                                     policy_cfg=pcfg))
        model.cfg = pcfg  # a plain policy now: saved whole (a LoRA-only one keeps lora_base)
    path = save_checkpoint(out, model, cfg, ckpt.normalizer, extra_files=extra)
    size = (path / "model.safetensors").stat().st_size
    return {"checkpoint": str(path), "source": str(ckpt.path), "merged_lora_modules": merged,
            "model_bytes": size}

