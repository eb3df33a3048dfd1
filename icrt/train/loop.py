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
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from icrt.config import ExperimentConfig, SharedConfig, save_config
from icrt.data.codec import delta_from_data
from icrt.data.sequence import SequenceDataset, collate
from icrt.data.spec import DatasetSpec
from icrt.errors import UserError
from icrt.fsutil import check_output_dir
from icrt.models.policy import ICRTPolicy, PolicySpec
from icrt.train import dist
from icrt.train.checkpoint import (
    Checkpoint,
    check_compatible,
    latest_checkpoint,
    load_checkpoint_weights,
    lora_base_keys,
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
        use_delta_action=ds.codec.use_delta_action,
        tasks=tuple(ds.tasks),
        env=stores[0].env,
        window=cfg.shared_cfg.sliding_window,
        in_context=cfg.shared_cfg.prompt,
        goal_dims=tuple(cfg.dataset_cfg.goal_dims),
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
    total = torch.zeros((), device=device)
    n = 0
    for batch in loader:
        with _autocast(cfg.trainer_cfg.precision, device):
            out = model(_to_device(batch, device))
        total += out["action_loss"].detach().float() * len(batch["action"])
        n += len(batch["action"])
    model.train()
    return float(dist.all_reduce_mean((total / max(n, 1)).cpu()))


class _SkipSampler(torch.utils.data.Sampler):
    """The epoch's sampler without its first ``skip`` indices (resuming mid-epoch)."""

    def __init__(self, sampler: DistributedSampler, skip: int) -> None:
        self.sampler, self.skip = sampler, skip

    def __iter__(self):
        it = iter(self.sampler)
        for _ in range(self.skip):
            next(it)
        yield from it

    def __len__(self) -> int:
        return len(self.sampler) - self.skip


@dataclass
class _Run:
    """What the steps of a run share (built once, then updated by the loop)."""

    cfg: ExperimentConfig
    info: dist.DistInfo
    run_dir: Path
    progress: bool
    resume: Checkpoint | None = None
    train_ds: SequenceDataset | None = None
    sampler: DistributedSampler | None = None
    val_loader: DataLoader | None = None
    model: ICRTPolicy | None = None
    ddp: torch.nn.Module | None = None
    # the full weights of the last checkpoint when the model holds shards (FSDP), for best/
    saved_weights: dict[str, torch.Tensor] | None = None
    optimizer: torch.optim.Optimizer | None = None
    scaler: torch.amp.GradScaler | None = None
    logger: RunLogger | None = None
    lr: float = 0.0
    batches_per_epoch: int = 0
    total_epochs: float = 0.0  # the schedule's length (fractional with --max-steps)
    epoch: int = 0  # next epoch to run
    skip_batches: int = 0  # batches of that epoch already trained (resuming mid-epoch)
    step: int = 0  # optimizer steps taken
    best_success: float = -1.0
    best_val: float = math.inf
    epoch_train_loss: float = 0.0
    batches_done: int = -1  # of the epoch just trained: -1 complete, else where --max-steps hit

    @property
    def device(self) -> torch.device:
        return self.info.device

    @property
    def step_dir(self) -> Path:
        """Where a mid-epoch checkpoint at the current step goes."""
        return self.run_dir / f"checkpoint-step-{self.step}"

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.batches_per_epoch / self.cfg.trainer_cfg.accum_iter)


def train(cfg: ExperimentConfig, progress: bool = True) -> Path:
    """Run training as configured; returns the run directory."""
    info = dist.init_distributed(cfg.device, cfg.trainer_cfg.dist_timeout_minutes)
    try:
        return _train(cfg, info, progress)
    finally:
        dist.cleanup()


def _train(cfg: ExperimentConfig, info: dist.DistInfo, progress: bool) -> Path:
    run = _start(cfg, info, progress)
    _build_data(run)
    _build_model(run)
    _build_optimizer(run)
    _restore(run)
    if info.is_main:  # only now: a rejected resume must not replace the run's config.json
        save_config(cfg, run.run_dir / "config.json")
    run.logger = RunLogger(cfg, run.run_dir, enabled=info.is_main)
    max_steps = cfg.trainer_cfg.max_steps
    last_epoch = math.ceil(run.total_epochs) - 1
    for epoch in range(run.epoch, last_epoch + 1):
        finished = _train_epoch(run, epoch)
        _end_epoch(run, epoch, last=finished or epoch == last_epoch)
        if finished or (max_steps and run.step >= max_steps):
            break
    run.logger.close()
    return run.run_dir


# ------------------------------------------------------------------------ the steps of a run


def _start(cfg: ExperimentConfig, info: dist.DistInfo, progress: bool) -> _Run:
    """Seeds, the run directory, and the checkpoint to resume from."""
    seed = cfg.shared_cfg.seed + info.rank
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    if cfg.trainer_cfg.precision == "16-mixed" and info.device.type != "cuda":
        raise UserError("--trainer-cfg.precision 16-mixed needs CUDA; use bf16-mixed on the CPU.")
    run_dir = cfg.logging_cfg.run_dir
    if info.is_main:
        # before any rank picks the checkpoint to resume from: a save killed after its manifest
        # but before its rename is completed here, and every rank must see the same checkpoints
        remove_save_leftovers(run_dir)
    dist.barrier()
    resume = None
    if cfg.shared_cfg.resume:
        resume = read_checkpoint(resume_checkpoint(cfg.shared_cfg.resume))
    elif latest_checkpoint(run_dir) is not None:
        raise UserError(
            f"Run directory '{run_dir}' already holds checkpoints; continue it with "
            f"--shared-cfg.resume {run_dir} or start elsewhere (--logging-cfg.log-name)."
        )
    if info.is_main:
        check_output_dir(run_dir, "The run directory")
    dist.barrier()
    return _Run(cfg, info, run_dir, progress, resume)


def _build_data(run: _Run) -> None:
    """Training windows (split saved to RUN/split.json), their sampler, validation loader."""
    cfg, info = run.cfg, run.info
    scfg, tcfg = cfg.shared_cfg, cfg.trainer_cfg
    split_file = run.run_dir / "split.json"
    vcfg = cfg.model_cfg.vision_encoder_cfg
    cached = vcfg.use_cached_features
    data_spec = DatasetSpec.for_run(cfg.dataset_cfg)  # --dataset-cfg.input-sensors applied
    _log_delta_action(scfg, data_spec)
    if scfg.num_cameras is not None and scfg.num_cameras != len(data_spec.image_keys):
        raise UserError(
            f"--shared-cfg.num-cameras {scfg.num_cameras}, but dataset '{data_spec.path}' "
            f"lists {len(data_spec.image_keys)} camera key(s) {list(data_spec.image_keys)}; the "
            f"policy takes its cameras from the dataset's image_keys or "
            f"--dataset-cfg.input-sensors.")
    if cfg.world_size is not None and cfg.world_size != info.world_size:
        raise UserError(f"--world-size {cfg.world_size}, but the launcher started "
                        f"{info.world_size} process(es).")
    if cached and data_spec.image_keys:
        from icrt.models.encoders.features import check_cached_features

        for path in data_spec.stores:
            check_cached_features(path, vcfg, data_spec.image_keys)
    run.train_ds = SequenceDataset(cfg.dataset_cfg, scfg, "train",
                                   split_file=split_file if split_file.is_file() else None,
                                   spec=data_spec, use_cached_features=cached)
    if info.is_main and not split_file.is_file():
        run.train_ds.save_split(split_file)
    dist.barrier()
    run.sampler = DistributedSampler(run.train_ds, num_replicas=info.world_size, rank=info.rank,
                                     shuffle=True, seed=scfg.seed, drop_last=True)
    run.batches_per_epoch = len(run.sampler) // scfg.batch_size
    if run.batches_per_epoch == 0:
        raise UserError(
            f"--shared-cfg.batch-size {scfg.batch_size} x {info.world_size} rank(s) is larger "
            f"than the {len(run.train_ds)} training sequences of an epoch."
        )
    run.total_epochs = (tcfg.max_steps / run.steps_per_epoch) if tcfg.max_steps else tcfg.epochs
    if run.train_ds.splits["val"]:
        try:
            val_ds = SequenceDataset(cfg.dataset_cfg, scfg, "val", split_file=split_file,
                                     spec=data_spec, use_cached_features=cached)
            val_sampler = DistributedSampler(val_ds, info.world_size, info.rank, shuffle=False)
            run.val_loader = DataLoader(val_ds, batch_size=scfg.batch_size, sampler=val_sampler,
                                        num_workers=tcfg.num_workers, pin_memory=_pin(run),
                                        collate_fn=collate)
        except UserError as e:
            log.warning("no validation loss: %s", e)


def _log_delta_action(scfg: SharedConfig, data_spec: DatasetSpec) -> None:
    """Say whether actions train as deltas, and why (the flag, or what the data declares; the
    datasets decide the same way, and the checkpoint's policy spec records it)."""
    if scfg.use_delta_action is not None:
        log.info("delta actions %s (--shared-cfg.%suse-delta-action)",
                 "on" if scfg.use_delta_action else "off", "" if scfg.use_delta_action else "no-")
        return
    store = data_spec.open_stores()[0]
    keys = (*data_spec.proprio_keys, *data_spec.action_keys)
    on, why = delta_from_data(data_spec.proprio_keys, data_spec.action_keys,
                              {k: store.key_info(k) for k in keys})
    log.info("delta actions %s: %s (--shared-cfg.%suse-delta-action to change it)",
             "on" if on else "off", why, "no-" if on else "")


def _pin(run: _Run) -> bool:
    return run.cfg.trainer_cfg.pin_memory and run.device.type == "cuda"


def _build_model(run: _Run) -> None:
    """The policy (initialised from a pretrained or resumed checkpoint), DDP, compile."""
    cfg, ds, resume = run.cfg, run.train_ds, run.resume
    spec = policy_spec(ds, cfg)
    model = ICRTPolicy(cfg.model_cfg, spec, vision_aug=cfg.dataset_cfg.vision_aug)
    pretrained = cfg.model_cfg.policy_cfg.pretrained_path
    if pretrained and resume is None:
        source = read_checkpoint(pretrained)
        check_compatible(source.spec, spec, f"Pretrained checkpoint '{source.path}'",
                         f"dataset '{ds.spec.path}'")
        load_checkpoint_weights(model, source)
    if resume is not None:
        check_compatible(resume.spec, spec, f"Checkpoint '{resume.path}'",
                         f"dataset '{ds.spec.path}'")
        load_checkpoint_weights(model, resume)
    vcfg = cfg.model_cfg.vision_encoder_cfg
    if vcfg.use_cached_features and ds.image_keys:  # features must come from these weights
        from icrt.models.encoders.features import check_cached_features

        for path in ds.spec.stores:
            check_cached_features(path, vcfg, ds.image_keys, encoder=model.state_encoder.vision)
    model.to(run.device)
    run.model, run.ddp = model, model
    if run.info.distributed and _fsdp(run):
        _shard(model, cfg.trainer_cfg.precision)
    elif run.info.distributed:
        device_ids = [run.device] if run.device.type == "cuda" else None
        run.ddp = DistributedDataParallel(model, device_ids=device_ids)
    elif cfg.trainer_cfg.strategy == "fsdp":
        log.warning("--trainer-cfg.strategy fsdp in a single process: nothing to shard")
    if cfg.trainer_cfg.compile:
        # in place (parameter names unchanged, so checkpoints stay plain); the backbone is
        # where the time goes, and the loss code's data-dependent masking would only break graphs
        model.backbone.compile()
    n_params = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("policy: %.2fM parameters (%.2fM trainable)", n_params / 1e6, n_train / 1e6)


def _fsdp(run: _Run) -> bool:
    return run.cfg.trainer_cfg.strategy == "fsdp" and run.info.distributed


def _shard(model: ICRTPolicy, precision: str) -> None:
    """FSDP2: each backbone block is its own unit (its weights are gathered just for its
    forward and backward), the rest of the policy the root unit. bf16-mixed computes in bf16
    and reduces gradients in fp32; fp32 master weights stay sharded. Forward inputs are left
    as they come (``cast_forward_inputs=False``): the training step's autocast casts what each
    operation computes on, as under DDP, so targets and the rotary table stay fp32."""
    import torch.distributed as torch_dist
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    with torch.no_grad():  # ranks seed differently: start from rank 0's weights, as DDP does
        for t in [*model.parameters(), *model.buffers()]:
            torch_dist.broadcast(t.data, src=0)
    mp = MixedPrecisionPolicy()
    if precision == "bf16-mixed":
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                  cast_forward_inputs=False)
    for block in model.backbone.layers:
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)


@contextlib.contextmanager
def _fsdp_no_sync(model: torch.nn.Module):
    """Gradient accumulation under FSDP2: no reduce-scatter until the last micro-batch."""
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def _full_state(run: _Run) -> dict[str, torch.Tensor] | None:
    """The full model state dict gathered from every rank's shards (all ranks call this) under
    FSDP, for the consolidated model.safetensors; None otherwise (the model's own)."""
    if not _fsdp(run):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(
        run.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _save_sharded(run: _Run, ckpt_dir: Path) -> Path:
    """Every rank writes its shards of the weights and optimizer state with
    torch.distributed.checkpoint into a staging folder, which rank 0's save then moves into the
    checkpoint as ``sharded/``."""
    import torch.distributed as torch_dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    pid = [os.getpid()]
    torch_dist.broadcast_object_list(pid, src=0)  # names the folder after rank 0's save
    staging = ckpt_dir.with_name(f".{ckpt_dir.name}.dcp-{pid[0]}")
    if run.info.is_main and staging.exists():
        shutil.rmtree(staging)
    dist.barrier()
    model_sd, optim_sd = get_state_dict(run.model, run.optimizer)
    base = set(lora_base_keys(run.model))  # a LoRA run's frozen base comes from its directory
    model_sd = {k: v for k, v in model_sd.items() if k not in base}
    dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(staging))
    dist.barrier()
    return staging


def _load_sharded(run: _Run, folder: Path) -> None:
    """Weights and optimizer state of a sharded checkpoint, each rank reading its shards."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_state_dict,
        set_state_dict,
    )

    if not folder.is_dir():
        raise UserError(f"Checkpoint '{folder.parent}' has no sharded/ state to resume an FSDP "
                        f"run from.")
    model_sd, optim_sd = get_state_dict(run.model, run.optimizer)
    base = set(lora_base_keys(run.model))
    state = {"model": {k: v for k, v in model_sd.items() if k not in base},
             "optimizer": optim_sd}
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(run.model, run.optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optimizer"],
                   options=StateDictOptions(strict=not base))


def _build_optimizer(run: _Run) -> None:
    cfg = run.cfg
    ocfg, tcfg = cfg.optimizer_cfg, cfg.trainer_cfg
    eff_batch = cfg.shared_cfg.batch_size * tcfg.accum_iter * run.info.world_size
    run.lr = base_lr(ocfg, eff_batch)
    run.optimizer = build_optimizer(run.model.param_groups(ocfg.weight_decay), ocfg, run.lr)
    if tcfg.precision == "16-mixed":
        run.scaler = torch.amp.GradScaler("cuda")
    log.info("run %s: %d sequences/epoch, effective batch %d, lr %.2e", run.run_dir,
             len(run.train_ds), eff_batch, run.lr)
    if ocfg.warmup_epochs >= run.total_epochs:
        length = (f"the {run.total_epochs:g} epochs of --trainer-cfg.max-steps {tcfg.max_steps}"
                  if tcfg.max_steps else f"--trainer-cfg.epochs {tcfg.epochs}")
        log.warning("--optimizer-cfg.warmup-epochs %g is not below %s: the learning rate never "
                    "reaches %.2e in this run", ocfg.warmup_epochs, length, run.lr)


def _restore(run: _Run) -> None:
    """Optimizer, progress and every RNG from the resumed checkpoint's train_state.pt."""
    if run.resume is None:
        return
    state = run.resume.train_state()
    if state is None:
        raise UserError(f"Checkpoint '{run.resume.path}' has no train_state.pt to resume from.")
    saved = state.get("strategy", "ddp")
    if saved != run.cfg.trainer_cfg.strategy:
        raise UserError(f"Checkpoint '{run.resume.path}' was trained with --trainer-cfg.strategy "
                        f"{saved}; resume it with the same strategy.")
    if _fsdp(run):
        _load_sharded(run, run.resume.path / "sharded")
    else:
        run.optimizer.load_state_dict(state["optimizer"])
    if run.scaler is not None and state.get("scaler"):
        run.scaler.load_state_dict(state["scaler"])
    run.step = int(state["step"])
    done = int(state.get("batches_done", -1))  # -1 (or absent): the epoch was complete
    if 0 <= done < run.batches_per_epoch:
        run.epoch, run.skip_batches = int(state["epoch"]), done
    else:
        run.epoch, run.skip_batches = int(state["epoch"]) + 1, 0
    # best/ itself is the record: train_state.pt is written before that epoch's
    # evaluation (which reads the checkpoint), so it can be one evaluation behind
    run.best_success = max(float(state.get("best_success", -1.0)), _best_success(run.run_dir))
    run.best_val = min(float(state.get("best_val", math.inf)), _best_val(run.run_dir))
    ranks = state.get("rng_ranks")
    if run.info.distributed and ranks is not None and len(ranks) == run.info.world_size:
        _set_rng_state(ranks[run.info.rank])
    else:
        if run.info.distributed:
            log.warning("checkpoint %s holds the random state of %d rank(s), not of each of "
                        "these %d: every rank continues from rank 0's (stochastic heads and "
                        "augmentations do not resume exactly)", run.resume.path,
                        len(ranks) if ranks else 1, run.info.world_size)
        _set_rng_state(state)
    log.info("resuming from %s at epoch %d (batch %d), step %d", run.resume.path, run.epoch,
             run.skip_batches, run.step)


def _train_epoch(run: _Run, epoch: int) -> bool:
    """One epoch (or what remains of it); True when --trainer-cfg.max-steps is reached."""
    cfg = run.cfg
    tcfg, scfg, ocfg = cfg.trainer_cfg, cfg.shared_cfg, cfg.optimizer_cfg
    info, device = run.info, run.device
    run.sampler.set_epoch(epoch)
    run.train_ds.set_epoch(epoch)
    skip = run.skip_batches
    run.skip_batches = 0
    # the loader's own generator, a function of (seed, rank, epoch): starting an epoch draws
    # the workers' base seed from it, which from the global stream would shift the noise of
    # every later step of a run resumed mid-epoch (it starts the epoch's loader a second time)
    seed = int(np.random.SeedSequence([scfg.seed, info.rank, epoch]).generate_state(1)[0])
    loader = DataLoader(run.train_ds, batch_size=scfg.batch_size,
                        sampler=_SkipSampler(run.sampler, skip * scfg.batch_size),
                        num_workers=tcfg.num_workers, pin_memory=_pin(run), drop_last=True,
                        collate_fn=collate, generator=torch.Generator().manual_seed(seed))
    from tqdm import tqdm

    bar = tqdm(loader, desc=f"epoch {epoch}", initial=skip, total=run.batches_per_epoch,
               disable=not (run.progress and info.is_main), dynamic_ncols=True)
    params = [p for p in run.model.parameters() if p.requires_grad]
    # losses stay on the device until they are logged (no host sync per micro-batch)
    window_loss, window_n, t_window = torch.zeros((), device=device), 0, time.perf_counter()
    window_extra: dict[str, torch.Tensor] = {}  # auxiliary losses (pointer, goal)
    epoch_loss, epoch_n = 0.0, 0
    run.model.train()
    current_lr = run.lr
    for it, batch in enumerate(bar, start=skip):
        if it % tcfg.accum_iter == 0:
            current_lr = lr_at(epoch + it / run.batches_per_epoch, run.lr, ocfg.min_lr,
                               ocfg.warmup_epochs, run.total_epochs)
            set_lr(run.optimizer, current_lr)
        batch = _to_device(batch, device)
        sync = (it + 1) % tcfg.accum_iter == 0 or it + 1 == run.batches_per_epoch
        if not info.distributed or sync:
            no_sync = contextlib.nullcontext()
        else:
            no_sync = _fsdp_no_sync(run.model) if _fsdp(run) else run.ddp.no_sync()
        with no_sync:
            with _autocast(tcfg.precision, device):
                out = run.ddp(batch)
            loss = out["loss"] / tcfg.accum_iter
            (run.scaler.scale(loss) if run.scaler is not None else loss).backward()
        window_loss += out["action_loss"].detach().float()
        for name in ("pointer_loss", "goal_loss"):
            if name in out:
                window_extra[name] = window_extra.get(name, 0.0) + out[name].detach().float()
        window_n += 1
        if not sync:
            continue
        if run.scaler is not None:
            run.scaler.unscale_(run.optimizer)
        # the norm is computed on all-reduced gradients, so every rank decides alike
        norm = torch.nn.utils.clip_grad_norm_(params, ocfg.clip_grad or math.inf)
        if hasattr(norm, "full_tensor"):  # a DTensor under FSDP
            norm = norm.full_tensor()
        if run.scaler is None and not torch.isfinite(norm):
            raise TrainingDiverged(
                f"The loss became non-finite at epoch {epoch}, step {run.step}; training stopped"
                f" without saving (last good checkpoint: "
                f"{latest_checkpoint(run.run_dir) or 'none'}). Lower --optimizer-cfg.lr or use "
                f"--trainer-cfg.precision 32-true."
            )
        if run.scaler is not None:
            run.scaler.step(run.optimizer)
            run.scaler.update()
        else:
            run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
        run.step += 1
        end_of_epoch = it + 1 == run.batches_per_epoch
        if run.step % tcfg.log_every == 0 or end_of_epoch:
            elapsed = time.perf_counter() - t_window
            mean_loss = float(dist.all_reduce_mean((window_loss / window_n).cpu()))
            samples_s = window_n * scfg.batch_size * info.world_size / max(elapsed, 1e-9)
            metrics = {"train/loss": mean_loss, "train/lr": current_lr,
                       "train/grad_norm": float(norm), "train/samples_per_s": samples_s}
            for name, total in window_extra.items():
                metrics[f"train/{name}"] = float(dist.all_reduce_mean((total / window_n).cpu()))
            run.logger.log(run.step, metrics, epoch=epoch + (it + 1) / run.batches_per_epoch)
            bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{current_lr:.2e}",
                            samples_s=f"{samples_s:.1f}")
            epoch_loss += mean_loss * window_n
            epoch_n += window_n
            window_loss, window_n, t_window = torch.zeros((), device=device), 0, time.perf_counter()
            window_extra = {}
        finished = bool(tcfg.max_steps) and run.step >= tcfg.max_steps
        if end_of_epoch or finished:
            break
        ecfg = cfg.eval_cfg
        by_steps = [n for n in (scfg.save_every_steps, ecfg.eval_every_steps) if n]
        if any(run.step % n == 0 for n in by_steps):  # mid-epoch checkpoint (and evaluation)
            evaluate = bool(ecfg.eval_every_steps) and run.step % ecfg.eval_every_steps == 0
            _checkpoint(run, epoch, run.step_dir, batches_done=it + 1,
                        evaluate=evaluate)
    bar.close()
    run.epoch_train_loss = epoch_loss / max(epoch_n, 1)
    run.batches_done = -1 if it + 1 == run.batches_per_epoch else it + 1
    return bool(tcfg.max_steps) and run.step >= tcfg.max_steps


def _end_epoch(run: _Run, epoch: int, last: bool) -> None:
    """Validation loss (best/ by it when no simulator evaluates), checkpoint, evaluation."""
    cfg = run.cfg
    scfg, ecfg = cfg.shared_cfg, cfg.eval_cfg
    summary = {"epoch/train_loss": run.epoch_train_loss}
    if run.val_loader is not None:
        summary["epoch/val_loss"] = validation_loss(run.model, run.val_loader, cfg, run.device)
    log.info("epoch %d: %s", epoch, ", ".join(f"{k} {v:.4f}" for k, v in summary.items()))
    evaluate = ecfg.eval_every > 0 and ((epoch + 1) % ecfg.eval_every == 0 or last)
    simulator = ecfg.eval_every > 0 or ecfg.eval_every_steps > 0
    better_val = (not simulator and "epoch/val_loss" in summary
                  and summary["epoch/val_loss"] < run.best_val)
    if better_val:
        run.best_val = summary["epoch/val_loss"]
    summary["epoch/val_loss_best"] = run.best_val if math.isfinite(run.best_val) else None
    run.logger.log(run.step, {k: v for k, v in summary.items() if v is not None},
                   epoch=epoch + 1)
    if (epoch + 1) % scfg.save_every == 0 or last or evaluate or better_val:
        # a run stopped by --max-steps mid-epoch records where, so a longer resume continues there
        ckpt_dir = _checkpoint(run, epoch, run.run_dir / f"checkpoint-{epoch}",
                               batches_done=run.batches_done, evaluate=evaluate)
        if better_val and run.info.is_main:
            _save_best(run, ckpt_dir, epoch, {"val_loss": run.best_val})
        dist.barrier()


def _checkpoint(run: _Run, epoch: int, ckpt_dir: Path, batches_done: int,
                evaluate: bool) -> Path:
    """Save a resumable checkpoint on rank 0 (``batches_done`` of ``epoch``; -1: all) and
    evaluate it in the simulator when asked; the other ranks wait (under FSDP they first
    gather the full weights and optimizer state with rank 0)."""
    weights = run.saved_weights = _full_state(run)
    sharded = _save_sharded(run, ckpt_dir) if _fsdp(run) else None
    rng = _rng_state()
    ranks_rng = None
    if run.info.distributed:  # each rank draws its own noise (seeded seed + rank): keep them all
        import torch.distributed as torch_dist

        ranks_rng = [None] * run.info.world_size
        torch_dist.all_gather_object(ranks_rng, rng)
    if run.info.is_main:
        state = {
            "epoch": epoch,
            "step": run.step,
            "batches_done": batches_done,
            "strategy": run.cfg.trainer_cfg.strategy,
            # under FSDP the optimizer state is in sharded/, one file per rank
            "optimizer": None if sharded else run.optimizer.state_dict(),
            "scaler": run.scaler.state_dict() if run.scaler is not None else None,
            **rng,  # rank 0's, as before; each rank's in rng_ranks when there are several
            "rng_ranks": ranks_rng,
            "best_success": run.best_success,
            "best_val": run.best_val,
        }
        save_checkpoint(ckpt_dir, run.model, run.cfg, run.train_ds.normalizer, state,
                        state=weights, extra_dirs={"sharded": sharded} if sharded else None)
        prune_checkpoints(run.run_dir, run.cfg.shared_cfg.keep_last)
        if evaluate:
            _evaluate_checkpoint(run, ckpt_dir, epoch)
    dist.barrier()
    return ckpt_dir


def _evaluate_checkpoint(run: _Run, ckpt_dir: Path, epoch: int) -> None:
    """Simulator evaluation of a fresh checkpoint; keeps RUN/best/ by mean success rate."""
    import dataclasses

    from icrt.eval.rollout import evaluate, format_table

    tag = f"epoch-{epoch}" if ckpt_dir.name.startswith(f"checkpoint-{epoch}") else \
        f"step-{run.step}"
    ecfg = dataclasses.replace(run.cfg.eval_cfg, checkpoint=str(ckpt_dir),
                               out=str(run.run_dir / "eval" / f"{tag}.json"))
    results = evaluate(ecfg, progress=run.progress)
    metrics = {"eval/mean_success": results["mean_success_rate"]}
    metrics.update({f"eval/success/{t}": r["success_rate"] for t, r in results["tasks"].items()})
    if results["mean_success_rate"] > run.best_success:
        run.best_success = results["mean_success_rate"]
        _save_best(run, ckpt_dir, epoch, {"mean_success_rate": run.best_success,
                                          "tasks": results["tasks"]})
    metrics["eval/mean_success_best"] = run.best_success
    run.logger.log(run.step, metrics, epoch=epoch + 1)
    log.info("evaluation after epoch %d, step %d:\n%s", epoch, run.step, format_table(results))


def _save_best(run: _Run, ckpt_dir: Path, epoch: int, record: dict[str, Any]) -> None:
    import json

    summary = {"epoch": epoch, "step": run.step, **record, "source": ckpt_dir.name}
    best = save_checkpoint(run.run_dir / "best", run.model, run.cfg, run.train_ds.normalizer,
                           extra_files={"eval.json": json.dumps(summary, indent=1) + "\n"},
                           state=run.saved_weights)
    what = ", ".join(f"{k} {v:.4f}" for k, v in record.items() if isinstance(v, float))
    log.info("new best checkpoint (%s) in %s", what, best)


# RNG states as tensors and numbers only (train_state.pt is loaded with weights_only=True).
def _rng_state() -> dict[str, Any]:
    """This process's random state: torch (and CUDA), numpy, Python."""
    return {
        "rng_torch": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "rng_numpy": _numpy_tensors(np.random.get_state()),
        "rng_python": _python_tensors(random.getstate()),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["rng_torch"])
    if state.get("rng_cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng_cuda"])
    if state.get("rng_numpy") is not None:
        np.random.set_state(_numpy_state(state["rng_numpy"]))
    if state.get("rng_python") is not None:
        random.setstate(_python_state(state["rng_python"]))


def _numpy_tensors(state: tuple) -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = state
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached": float(cached)}


def _numpy_state(d: dict[str, Any]) -> tuple:
    return (d["name"], d["keys"].numpy().astype(np.uint32), d["pos"], d["has_gauss"],
            d["cached"])


def _python_tensors(state: tuple) -> dict[str, Any]:
    version, internal, gauss = state
    return {"version": int(version), "internal": torch.tensor(internal, dtype=torch.int64),
            "gauss": gauss}


def _python_state(d: dict[str, Any]) -> tuple:
    return (d["version"], tuple(int(x) for x in d["internal"].tolist()), d["gauss"])


def _best_record(run_dir: Path, key: str, default: float) -> float:
    """A number recorded in RUN/best/eval.json (``default`` without one)."""
    import json

    try:
        return float(json.loads((run_dir / "best" / "eval.json").read_text())[key])
    except (OSError, ValueError, KeyError, TypeError):
        return default


def _best_success(run_dir: Path) -> float:
    return _best_record(run_dir, "mean_success_rate", -1.0)


def _best_val(run_dir: Path) -> float:
    return _best_record(run_dir, "val_loss", math.inf)


def run_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The JSON lines of a run's log.txt (for tests and plots)."""
    import json

    path = Path(run_dir) / "log.txt"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
