"""``train(cfg)``: the whole training run, top to bottom.

init distributed -> seed per rank -> data -> model -> DDP -> optimizer -> resume -> loop
(gradient accumulation with no_sync, mixed precision, warm-up + cosine lr, clipping, a stop on a
non-finite loss) -> validation loss -> checkpoints. Works as ``python scripts/train.py`` and as
``torchrun --nproc_per_node=N scripts/train.py`` (NCCL on CUDA, gloo on CPU).
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from icrt.config import ExperimentConfig, save_config
from icrt.data.sequence import SequenceDataset
from icrt.data.spec import DatasetSpec
from icrt.errors import UserError
from icrt.fsutil import check_output_dir
from icrt.models.policy import ICRTPolicy, PolicySpec
from icrt.train import dist
from icrt.train.checkpoint import (
    check_compatible,
    latest_checkpoint,
    load_weights,
    prune_checkpoints,
    read_checkpoint,
    remove_save_leftovers,
    resume_checkpoint,
    save_checkpoint,
)
from icrt.train.log import RunLogger
from icrt.train.optim import base_lr, build_optimizer, lr_at, set_lr

log = logging.getLogger(__name__)


class TrainingDiverged(UserError):
    """The loss or the gradient became NaN/inf; the run stopped without saving."""


def policy_spec(ds: SequenceDataset, cfg: ExperimentConfig) -> PolicySpec:
    """What the training data fixes about the policy (saved with every checkpoint)."""
    stores = ds.spec.open_stores()
    keys = (*ds.spec.proprio_keys, *ds.spec.action_keys, *ds.spec.image_keys)
    key_meta = {
        k: {n: v for n, v in stores[0].key_info(k).items() if n not in ("kind", "dtype")}
        for k in keys
    }
    image_shape = None
    if ds.spec.image_keys:
        image_shape = tuple(stores[0].key_info(ds.spec.image_keys[0])["shape"])
    return PolicySpec(
        proprio_dim=ds.proprio_dim,
        action_dim=ds.action_dim,
        num_pred_steps=cfg.shared_cfg.num_pred_steps,
        max_timesteps=cfg.shared_cfg.seq_length,
        camera_keys=tuple(ds.spec.image_keys),
        image_shape=image_shape,
        proprio_keys=tuple(ds.spec.proprio_keys),
        action_keys=tuple(ds.spec.action_keys),
        key_meta=key_meta,
        rot_6d=cfg.shared_cfg.rot_6d,
        use_delta_action=cfg.shared_cfg.use_delta_action,
        tasks=tuple(ds.tasks),
        env=stores[0].env,
    )


def _autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    if precision == "32-true":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16-mixed" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.no_grad()
def validation_loss(model: ICRTPolicy, loader: DataLoader, cfg: ExperimentConfig,
                    device: torch.device) -> float:
    model.eval()
    loader.dataset.set_epoch(0)  # the same validation windows every time
    total, n = 0.0, 0
    for batch in loader:
        with _autocast(cfg.trainer_cfg.precision, device):
            out = model(_to_device(batch, device))
        total += float(out["action_loss"]) * len(batch["action"])
        n += len(batch["action"])
    model.train()
    return float(dist.all_reduce_mean(torch.tensor(total / max(n, 1))))


def train(cfg: ExperimentConfig, progress: bool = True) -> Path:
    """Run training as configured; returns the run directory."""
    info = dist.init_distributed(cfg.device)
    try:
        return _train(cfg, info, progress)
    finally:
        dist.cleanup()


def _train(cfg: ExperimentConfig, info: dist.DistInfo, progress: bool) -> Path:
    tcfg, scfg, ocfg = cfg.trainer_cfg, cfg.shared_cfg, cfg.optimizer_cfg
    device = info.device
    seed = scfg.seed + info.rank
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    if tcfg.precision == "16-mixed" and device.type != "cuda":
        raise UserError("--trainer-cfg.precision 16-mixed needs CUDA; use bf16-mixed on the CPU.")
    run_dir = cfg.logging_cfg.run_dir
    resume = read_checkpoint(resume_checkpoint(scfg.resume)) if scfg.resume else None
    if resume is None and latest_checkpoint(run_dir) is not None:
        raise UserError(
            f"Run directory '{run_dir}' already holds checkpoints; continue it with "
            f"--shared-cfg.resume {run_dir} or start elsewhere (--logging-cfg.log-name)."
        )
    if info.is_main:
        check_output_dir(run_dir, "The run directory")
        remove_save_leftovers(run_dir)
    dist.barrier()

    # ---------------------------------------------------------------- data
    split_file = run_dir / "split.json"
    vcfg = cfg.model_cfg.vision_encoder_cfg
    cached = vcfg.use_cached_features
    data_spec = DatasetSpec.load(cfg.dataset_cfg.dataset_json)
    if cached and data_spec.image_keys:
        from icrt.models.encoders.features import check_cached_features

        for path in data_spec.stores:
            check_cached_features(path, vcfg, data_spec.image_keys)
    train_ds = SequenceDataset(cfg.dataset_cfg, scfg, "train",
                               split_file=split_file if split_file.is_file() else None,
                               spec=data_spec, use_cached_features=cached)
    if info.is_main and not split_file.is_file():
        train_ds.save_split(split_file)
    dist.barrier()
    sampler = DistributedSampler(train_ds, num_replicas=info.world_size, rank=info.rank,
                                 shuffle=True, seed=scfg.seed, drop_last=True)
    pin = tcfg.pin_memory and device.type == "cuda"
    loader = DataLoader(train_ds, batch_size=scfg.batch_size, sampler=sampler,
                        num_workers=tcfg.num_workers, pin_memory=pin, drop_last=True)
    if len(loader) == 0:
        raise UserError(
            f"--shared-cfg.batch-size {scfg.batch_size} x {info.world_size} rank(s) is larger "
            f"than the {len(train_ds)} training sequences of an epoch."
        )
    val_loader = None
    if train_ds.splits["val"]:
        try:
            val_ds = SequenceDataset(cfg.dataset_cfg, scfg, "val", split_file=split_file,
                                     spec=data_spec, use_cached_features=cached)
            val_sampler = DistributedSampler(val_ds, info.world_size, info.rank, shuffle=False)
            val_loader = DataLoader(val_ds, batch_size=scfg.batch_size, sampler=val_sampler,
                                    num_workers=tcfg.num_workers, pin_memory=pin)
        except UserError as e:
            log.warning("no validation loss: %s", e)

    # ---------------------------------------------------------------- model
    spec = policy_spec(train_ds, cfg)
    model = ICRTPolicy(cfg.model_cfg, spec, vision_aug=cfg.dataset_cfg.vision_aug)
    pretrained = cfg.model_cfg.policy_cfg.pretrained_path
    if pretrained and resume is None:
        source = read_checkpoint(pretrained)
        check_compatible(source.spec, spec, f"Pretrained checkpoint '{source.path}'",
                         f"dataset '{train_ds.spec.path}'")
        load_weights(model, source.state_dict(), str(source.path))
    if resume is not None:
        check_compatible(resume.spec, spec, f"Checkpoint '{resume.path}'",
                         f"dataset '{train_ds.spec.path}'")
        load_weights(model, resume.state_dict(), str(resume.path))
    if cached and train_ds.image_keys:  # the features must come from these very weights
        for path in train_ds.spec.stores:
            check_cached_features(path, vcfg, train_ds.image_keys,
                                  encoder=model.state_encoder.vision)
    model.to(device)
    ddp: torch.nn.Module = model
    if info.distributed:
        ddp = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    if tcfg.compile:
        # in place (parameter names unchanged, so checkpoints stay plain); the backbone is
        # where the time goes, and the loss code's data-dependent masking would only break graphs
        model.backbone.compile()
    n_params = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("policy: %.2fM parameters (%.2fM trainable)", n_params / 1e6, n_train / 1e6)

    # ---------------------------------------------------------------- optimizer
    eff_batch = scfg.batch_size * tcfg.accum_iter * info.world_size
    lr = base_lr(ocfg, eff_batch)
    optimizer = build_optimizer(model.param_groups(ocfg.weight_decay), ocfg, lr)
    scaler = torch.amp.GradScaler("cuda") if tcfg.precision == "16-mixed" else None
    params = [p for p in model.parameters() if p.requires_grad]
    start_epoch, step = 0, 0
    best_success = -1.0
    ecfg = cfg.eval_cfg
    if resume is not None:
        state = resume.train_state()
        if state is None:
            raise UserError(f"Checkpoint '{resume.path}' has no train_state.pt to resume from.")
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start_epoch, step = int(state["epoch"]) + 1, int(state["step"])
        # best/ itself is the record: train_state.pt is written before that epoch's
        # evaluation (which reads the checkpoint), so it can be one evaluation behind
        best_success = max(float(state.get("best_success", -1.0)), _best_success(run_dir))
        torch.set_rng_state(state["rng_torch"])
        log.info("resuming from %s at epoch %d", resume.path, start_epoch)
    if info.is_main:  # only now: a rejected resume must not replace the run's config.json
        save_config(cfg, run_dir / "config.json")
    logger = RunLogger(cfg, run_dir, enabled=info.is_main)
    log.info("run %s: %d sequences/epoch, effective batch %d, lr %.2e", run_dir, len(train_ds),
             eff_batch, lr)
    if ocfg.warmup_epochs >= tcfg.epochs:
        log.warning("--optimizer-cfg.warmup-epochs %g is not below --trainer-cfg.epochs %d: the "
                    "learning rate never reaches %.2e in this run", ocfg.warmup_epochs,
                    tcfg.epochs, lr)

    # ---------------------------------------------------------------- loop
    from tqdm import tqdm

    steps_per_epoch = len(loader)
    for epoch in range(start_epoch, tcfg.epochs):
        sampler.set_epoch(epoch)
        train_ds.set_epoch(epoch)
        model.train()
        bar = tqdm(loader, desc=f"epoch {epoch}", disable=not (progress and info.is_main),
                   dynamic_ncols=True)
        window_loss, window_n, t_window = 0.0, 0, time.perf_counter()
        epoch_loss, epoch_n = 0.0, 0
        for it, batch in enumerate(bar):
            if it % tcfg.accum_iter == 0:
                current_lr = lr_at(epoch + it / steps_per_epoch, lr, ocfg.min_lr,
                                   ocfg.warmup_epochs, tcfg.epochs)
                set_lr(optimizer, current_lr)
            batch = _to_device(batch, device)
            sync = (it + 1) % tcfg.accum_iter == 0 or it + 1 == steps_per_epoch
            no_sync = ddp.no_sync() if info.distributed and not sync else contextlib.nullcontext()
            with no_sync:
                with _autocast(tcfg.precision, device):
                    out = ddp(batch)
                loss = out["loss"] / tcfg.accum_iter
                (scaler.scale(loss) if scaler is not None else loss).backward()
            window_loss += float(out["action_loss"])
            window_n += 1
            if not sync:
                continue
            if scaler is not None:
                scaler.unscale_(optimizer)
            # the norm is computed on all-reduced gradients, so every rank decides alike
            norm = torch.nn.utils.clip_grad_norm_(params, ocfg.clip_grad or math.inf)
            if not torch.isfinite(norm) and scaler is None:
                last = latest_checkpoint(run_dir)
                raise TrainingDiverged(
                    f"The loss became non-finite at epoch {epoch}, step {step}; training stopped"
                    f" without saving (last good checkpoint: {last or 'none'}). Lower "
                    f"--optimizer-cfg.lr or use --trainer-cfg.precision 32-true."
                )
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step % tcfg.log_every == 0 or it + 1 == steps_per_epoch:
                elapsed = time.perf_counter() - t_window
                mean_loss = float(dist.all_reduce_mean(torch.tensor(window_loss / window_n)))
                samples_s = window_n * scfg.batch_size * info.world_size / max(elapsed, 1e-9)
                metrics = {"train/loss": mean_loss, "train/lr": current_lr,
                           "train/grad_norm": float(norm), "train/samples_per_s": samples_s}
                logger.log(step, metrics, epoch=epoch + (it + 1) / steps_per_epoch)
                bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{current_lr:.2e}",
                                samples_s=f"{samples_s:.1f}")
                epoch_loss += mean_loss * window_n
                epoch_n += window_n
                window_loss, window_n, t_window = 0.0, 0, time.perf_counter()
        bar.close()

        summary = {"epoch/train_loss": epoch_loss / max(epoch_n, 1)}
        if val_loader is not None:
            summary["epoch/val_loss"] = validation_loss(model, val_loader, cfg, device)
        logger.log(step, summary, epoch=epoch + 1)
        log.info("epoch %d: %s", epoch, ", ".join(f"{k} {v:.4f}" for k, v in summary.items()))

        last_epoch = epoch + 1 == tcfg.epochs
        evaluate_now = ecfg.eval_every > 0 and ((epoch + 1) % ecfg.eval_every == 0 or last_epoch)
        if (epoch + 1) % scfg.save_every == 0 or last_epoch or evaluate_now:
            ckpt_dir = run_dir / f"checkpoint-{epoch}"
            if info.is_main:
                state = {
                    "epoch": epoch,
                    "step": step,
                    "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else None,
                    "rng_torch": torch.get_rng_state(),
                    "best_success": best_success,
                }
                save_checkpoint(ckpt_dir, model, cfg, train_ds.normalizer, state)
                prune_checkpoints(run_dir, scfg.keep_last)
                if evaluate_now:
                    best_success = _evaluate_checkpoint(ckpt_dir, epoch, step, cfg, model,
                                                        train_ds, logger, best_success, progress)
            dist.barrier()
    logger.close()
    return run_dir


def _evaluate_checkpoint(ckpt_dir: Path, epoch: int, step: int, cfg: ExperimentConfig,
                         model: ICRTPolicy, train_ds: SequenceDataset, logger: RunLogger,
                         best_success: float, progress: bool) -> float:
    """Simulator evaluation of a fresh checkpoint; keeps RUN/best/ by mean success rate."""
    import dataclasses
    import json

    from icrt.eval.rollout import evaluate, format_table

    run_dir = ckpt_dir.parent
    ecfg = dataclasses.replace(cfg.eval_cfg, checkpoint=str(ckpt_dir),
                               out=str(run_dir / "eval" / f"epoch-{epoch}.json"))
    results = evaluate(ecfg, progress=progress)
    metrics = {"eval/mean_success": results["mean_success_rate"]}
    metrics.update({f"eval/success/{t}": r["success_rate"] for t, r in results["tasks"].items()})
    logger.log(step, metrics, epoch=epoch + 1)
    log.info("evaluation after epoch %d:\n%s", epoch, format_table(results))
    if results["mean_success_rate"] > best_success:
        best_success = results["mean_success_rate"]
        summary = {"epoch": epoch, "step": step, "mean_success_rate": best_success,
                   "tasks": results["tasks"], "source": ckpt_dir.name}
        best = save_checkpoint(run_dir / "best", model, cfg, train_ds.normalizer,
                               extra_files={"eval.json": json.dumps(summary, indent=1) + "\n"})
        log.info("new best checkpoint (mean success %.1f%%) in %s", 100 * best_success, best)
    return best_success


def _best_success(run_dir: Path) -> float:
    """Mean success rate recorded in RUN/best/eval.json (-1 without one)."""
    import json

    path = run_dir / "best" / "eval.json"
    try:
        return float(json.loads(path.read_text())["mean_success_rate"])
    except (OSError, ValueError, KeyError, TypeError):
        return -1.0


def run_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The JSON lines of a run's log.txt (for tests and plots)."""
    import json

    path = Path(run_dir) / "log.txt"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
