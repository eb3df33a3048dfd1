"""Training the goal-mask model: a DiT learns where the selected object should go, by flow
matching or diffusion (see ``icrt.generative.paths``), single process or under torchrun.

Reuses icrt's training pieces -- device and process-group set-up (``icrt.train.dist``), the
learning-rate schedule (``icrt.train.optim``), atomic writes (``icrt.fsutil``) -- and writes:

    OUTPUT_DIR/RUN_NAME/
      config.json
      checkpoints/last/                       model.safetensors, train_state.pt, config.json
      checkpoints/epochXXX-val_lossX.XXXX/     the save_top_k best by validation loss
      tensorboard/                            train_loss, val_loss, val_loss_best, lr,
                                              Validation_Samples (context | sample | truth)
      log.txt                                 one JSON line per epoch

Every epoch's data order and noise come from (seed, epoch, rank), and a checkpoint holds the
model, the optimiser and the best list, so ``--ckpt-path RUN/checkpoints/last`` continues
exactly where the run stopped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from icrt.errors import UserError
from icrt.fsutil import atomic_write_text, fsync_path, replace_dir
from icrt.generative.data import GoalMaskDataset, network_input, scene_files, split_files
from icrt.generative.dit import DiT, DiTConfig
from icrt.generative.paths import Objective, PathConfig, SamplerConfig, build_path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataConfig:
    # Folder of .npz scene files (scripts/make_namo_masks.py writes one).
    data_dir: str = "data/namo"
    # Share of the files held out for validation (a fixed split drawn from --seed).
    val_fraction: float = 0.1


@dataclass(frozen=True)
class GoalModelConfig:
    # flow_matching (Facebook's flow_matching library) or diffusion (diffusers DDPM/DDIM).
    objective: Objective = "flow_matching"
    # The DiT's shape.
    network: DiTConfig = DiTConfig()
    # Probability path (flow matching) or noise schedule (diffusion).
    path: PathConfig = PathConfig()
    # How goals are sampled.
    sampler: SamplerConfig = SamplerConfig()
    # Weight of the auxiliary loss: MSE of the clean goal mask the prediction implies
    # (clipped to [-1, 1]) against the true one.
    aux_loss_weight: float = 0.001


@dataclass(frozen=True)
class GenerativeTrainerConfig:
    # 32-true, bf16-mixed or 16-mixed (CUDA only); auto: 16-mixed on CUDA, else 32-true.
    precision: Literal["auto", "32-true", "bf16-mixed", "16-mixed"] = "auto"
    # Gradient-norm clipping (0: off).
    gradient_clip_val: float = 1.0
    # Device: auto (cuda, else mps, else cpu), cpu, cuda, cuda:N or mps.
    device: str = "auto"
    # Best checkpoints kept by validation loss.
    save_top_k: int = 3
    # Validate every N epochs; write sample images every M validations.
    val_every: int = 1
    images_every: int = 10
    # Validation scenes drawn in the sample images.
    num_val_images: int = 4
    # Linear learning-rate warm-up, in epochs, before the cosine decay.
    warmup_epochs: float = 1.0


@dataclass(frozen=True)
class GenerativeConfig:
    """Train a goal-mask generator (scripts/train_generative.py)."""

    # Seed of the weights, the train/validation split, the data order and the noise.
    seed: int = 42
    # Scenes per batch per process (the effective batch is this times the processes).
    batch_size: int = 64
    # Epochs to train (the cosine learning-rate schedule spans them).
    max_epochs: int = 1000
    # AdamW learning rate (scale it with the number of processes yourself).
    base_lr: float = 1e-4
    # Masks are resized to image_size x image_size.
    image_size: int = 64
    # Sampling steps for validation images (flow: ODE steps; diffusion: inference steps;
    # default 20 and 50).
    sampling_steps: int | None = None
    # The scene files.
    data: DataConfig = DataConfig()
    # Network, probability path and sampler.
    model: GoalModelConfig = GoalModelConfig()
    # Precision, clipping, checkpoints, validation.
    trainer: GenerativeTrainerConfig = GenerativeTrainerConfig()
    # Runs are written to OUTPUT_DIR/RUN_NAME.
    output_dir: str = "outputs"
    # Name of this run's folder.
    run_name: str = "goal_dit"
    # Resume from a checkpoint directory (e.g. outputs/goal_dit/checkpoints/last).
    ckpt_path: str | None = None

    def __post_init__(self) -> None:
        for name in ("batch_size", "max_epochs", "image_size"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1.")
        if not self.base_lr > 0:
            raise UserError("--base-lr must be positive.")
        if not 0 < self.data.val_fraction < 1:
            raise UserError("--data.val-fraction must be between 0 and 1.")
        if self.sampling_steps is not None and self.sampling_steps < 1:
            raise UserError("--sampling-steps must be at least 1.")
        if self.image_size % self.model.network.patch_size:
            raise UserError(f"--image-size {self.image_size} must be a multiple of the patch "
                            f"size {self.model.network.patch_size}.")

    @property
    def steps(self) -> int:
        if self.sampling_steps is not None:
            return self.sampling_steps
        return 20 if self.model.objective == "flow_matching" else 50


def config_dict(cfg: GenerativeConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def config_from_dict(d: dict[str, Any]) -> GenerativeConfig:
    m = d["model"]
    model = GoalModelConfig(objective=m["objective"], network=DiTConfig(**m["network"]),
                            path=PathConfig(**m["path"]), sampler=SamplerConfig(**m["sampler"]),
                            aux_loss_weight=m["aux_loss_weight"])
    rest = {k: v for k, v in d.items() if k not in ("data", "model", "trainer")}
    known = {f.name for f in dataclasses.fields(GenerativeTrainerConfig)}
    trainer = GenerativeTrainerConfig(**{k: v for k, v in d["trainer"].items() if k in known})
    return GenerativeConfig(**rest, data=DataConfig(**d["data"]), model=model, trainer=trainer)


class GoalModel(nn.Module):
    """The DiT and its path: ``loss`` for training, ``sample`` for goal masks in [0, 1]."""

    def __init__(self, cfg: GoalModelConfig, image_size: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.image_size = image_size
        self.net = DiT(cfg.network, image_size)
        self.path = build_path(cfg.objective, cfg.path)

    def forward(self, context: Tensor, goal: Tensor, generator: torch.Generator | None = None
                ) -> dict[str, Tensor]:
        """Loss of a batch: context (B, 5, S, S), goal (B, 1, S, S) in [0, 1]."""
        x1 = goal * 2 - 1
        x_t, t, target = self.path.training_pair(x1, generator)
        out = self.net(network_input(context, x_t), t)
        mse = F.mse_loss(out.float(), target)
        # clipped to the mask range: the implied clean sample is unbounded where the signal is
        # almost all noise (diffusion's last timesteps)
        x1_hat = self.path.clean_estimate(out.float(), x_t, t).clamp(-1, 1)
        aux = F.mse_loss(x1_hat, x1)
        return {"loss": mse + self.cfg.aux_loss_weight * aux, "mse": mse.detach(),
                "aux": aux.detach()}

    @torch.no_grad()
    def sample(self, context: Tensor, steps: int, sampler: SamplerConfig | None = None,
               generator: torch.Generator | None = None) -> Tensor:
        """Goal masks (B, 1, S, S) in [0, 1] for context (B, 5, S, S)."""
        B, _, S, _ = context.shape
        x = self.path.sample(lambda x_t, t: self.net(network_input(context, x_t), t),
                             (B, 1, S, S), steps, sampler or self.cfg.sampler, generator,
                             context.device)
        return ((x.float() + 1) / 2).clamp(0, 1)


# ------------------------------------------------------------------------------ checkpoints


def save_goal_checkpoint(path: Path, model: GoalModel, cfg: GenerativeConfig,
                         train_state: dict[str, Any], val_loss: float | None = None) -> None:
    """Write a checkpoint directory atomically (a temporary sibling renamed into place); with
    ``val_loss``, also ``metrics.json`` holding it exactly (the folder names round it)."""
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                  str(tmp / "model.safetensors"))
        torch.save(train_state, tmp / "train_state.pt")
        (tmp / "config.json").write_text(json.dumps(config_dict(cfg), indent=1) + "\n")
        if val_loss is not None:
            (tmp / "metrics.json").write_text(json.dumps(
                {"epoch": train_state["epoch"], "step": train_state["step"],
                 "val_loss": val_loss}))
        for f in tmp.iterdir():
            fsync_path(f)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"Saving checkpoint '{path}' failed ({e.strerror or e}); the previous "
                        f"checkpoints are intact.") from None
    replace_dir(tmp, path)


def load_goal_model(path: str | Path, device: str | torch.device = "cpu"
                    ) -> tuple[GoalModel, GenerativeConfig]:
    """A trained goal model from a checkpoint directory (or a run directory: its best
    checkpoint by validation loss, else last)."""
    from safetensors.torch import load_file

    path = Path(path)
    if (path / "checkpoints").is_dir():
        best = sorted((path / "checkpoints").glob("epoch*-val_loss*"), key=_val_loss)
        path = best[0] if best else path / "checkpoints" / "last"
    if not (path / "model.safetensors").is_file():
        raise UserError(f"'{path}' is not a goal-model checkpoint (no model.safetensors).")
    cfg = config_from_dict(json.loads((path / "config.json").read_text()))
    model = GoalModel(cfg.model, cfg.image_size)
    model.load_state_dict(load_file(str(path / "model.safetensors")))
    return model.to(device).eval(), cfg


def _val_loss(p: Path) -> tuple[float, int]:
    """Sort key of a best checkpoint: its exact validation loss (``metrics.json``; else the
    name's, rounded), later epochs first among equals."""
    epoch = int(p.name[len("epoch"):].split("-")[0])
    try:
        return float(json.loads((p / "metrics.json").read_text())["val_loss"]), -epoch
    except (OSError, ValueError, KeyError):
        return float(p.name.split("val_loss")[-1]), -epoch


# --------------------------------------------------------------------------------- training


def _autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    if precision == "32-true":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16-mixed" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _precision(cfg: GenerativeConfig, device: torch.device) -> str:
    p = cfg.trainer.precision
    if p == "auto":
        return "16-mixed" if device.type == "cuda" else "32-true"
    if p == "16-mixed" and device.type != "cuda":
        raise UserError("--trainer.precision 16-mixed needs a CUDA device; use bf16-mixed or "
                        "32-true here.")
    return p


def _epoch_generator(seed: int, epoch: int, rank: int, device: torch.device) -> torch.Generator:
    """Noise of (seed, epoch, rank); epochs -1 and -2 are validation's loss and samples."""
    g = torch.Generator(device=device)
    g.manual_seed(int(np.random.SeedSequence([seed, epoch + 2, rank]).generate_state(1)[0]))
    return g


def _batches(n: int, batch_size: int, seed: int, epoch: int, rank: int, world: int
             ) -> list[np.ndarray]:
    """This rank's batches of an epoch: a permutation from (seed, epoch), split over ranks
    (the remainder of an uneven split is left out, so every rank takes as many steps)."""
    order = np.random.default_rng([seed, epoch]).permutation(n)
    mine = order[: n // world * world][rank::world]
    return [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]


def _sample_panel(context: Tensor, sample: Tensor, goal: Tensor) -> np.ndarray:
    """(3, H, W) image rows: per scene the context as colours, the sample, the truth."""
    rows = []
    for c, s, g in zip(context.cpu(), sample.cpu(), goal.cpu(), strict=True):
        scene = torch.stack([c[3] * 0.5 + c[2] * 0.5, c[4], c[0] + c[1]]).clamp(0, 1)
        rows.append(torch.cat([scene, s.expand(3, -1, -1), g.expand(3, -1, -1)], dim=2))
    return torch.cat(rows, dim=1).numpy()


def validate(model: GoalModel, data: GoalMaskDataset, cfg: GenerativeConfig,
             device: torch.device) -> float:
    """Mean loss over the validation scenes with fixed noise (comparable across epochs)."""
    model.eval()
    g = _epoch_generator(cfg.seed, -1, 0, device)
    total, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(data), cfg.batch_size):
            ctx = data.context[i:i + cfg.batch_size].to(device)
            goal = data.goal[i:i + cfg.batch_size].to(device)
            total += float(model(ctx, goal, g)["loss"]) * len(ctx)
            n += len(ctx)
    model.train()
    return total / n


def train_generative(cfg: GenerativeConfig, progress: bool = True) -> Path:
    """Train; returns the run directory."""
    from safetensors.torch import load_file
    from torch.nn.parallel import DistributedDataParallel as DDP
    from torch.utils.tensorboard import SummaryWriter
    from tqdm import tqdm

    from icrt.train.dist import all_reduce_mean, barrier, cleanup, init_distributed
    from icrt.train.optim import lr_at, set_lr

    dist = init_distributed(cfg.trainer.device)
    device = dist.device
    precision = _precision(cfg, device)
    run_dir = Path(cfg.output_dir) / cfg.run_name
    ckpt_dir = run_dir / "checkpoints"
    resume = Path(cfg.ckpt_path) if cfg.ckpt_path else None
    if resume is not None and not (resume / "train_state.pt").is_file():
        raise UserError(f"--ckpt-path '{resume}' is not a checkpoint directory (no "
                        f"train_state.pt); use RUN/checkpoints/last.")
    if resume is None and (ckpt_dir / "last").exists():
        raise UserError(f"'{run_dir}' already holds a run; resume it with --ckpt-path "
                        f"{ckpt_dir / 'last'} or choose another --run-name.")
    files = scene_files(cfg.data.data_dir)
    train_files, val_files = split_files(files, cfg.data.val_fraction, cfg.seed)
    train_data = GoalMaskDataset(train_files, cfg.image_size)
    val_data = GoalMaskDataset(val_files, cfg.image_size)

    torch.manual_seed(cfg.seed)
    model = GoalModel(cfg.model, cfg.image_size).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.base_lr, weight_decay=0.0)
    scaler = torch.amp.GradScaler("cuda") if precision == "16-mixed" else None
    start_epoch, step, best = 0, 0, []
    if resume is not None:
        model.load_state_dict(load_file(str(resume / "model.safetensors")))
        state = torch.load(resume / "train_state.pt", map_location=device, weights_only=False)
        opt.load_state_dict(state["optimizer"])
        start_epoch, step, best = state["epoch"] + 1, state["step"], state["best"]
    net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if dist.distributed else model
    writer = None
    if dist.is_main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.json", json.dumps(config_dict(cfg), indent=1) + "\n")
        writer = SummaryWriter(str(run_dir / "tensorboard"))
        text_log = open(run_dir / "log.txt", "a", buffering=1)
        log.info("%d training / %d validation scenes, %s, %.1fM parameters, %s", len(train_data),
                 len(val_data), cfg.model.objective,
                 sum(p.numel() for p in model.parameters()) / 1e6, precision)
    steps_per_epoch = len(_batches(len(train_data), cfg.batch_size, cfg.seed, 0, dist.rank,
                                   dist.world_size))
    bar = tqdm(total=cfg.max_epochs, initial=start_epoch, desc="train", unit="epoch",
               disable=not (progress and dist.is_main))
    model.train()
    try:
        for epoch in range(start_epoch, cfg.max_epochs):
            t0 = time.perf_counter()
            g = _epoch_generator(cfg.seed, epoch, dist.rank, device)
            losses = []
            batches = _batches(len(train_data), cfg.batch_size, cfg.seed, epoch, dist.rank,
                               dist.world_size)
            for i, idx in enumerate(batches):
                lr = lr_at(epoch + i / steps_per_epoch, cfg.base_lr, 0.0,
                           cfg.trainer.warmup_epochs, cfg.max_epochs)
                set_lr(opt, lr)
                ctx = train_data.context[idx].to(device)
                goal = train_data.goal[idx].to(device)
                with _autocast(precision, device):
                    out = net(ctx, goal, g)
                loss = out["loss"]
                if not torch.isfinite(loss):
                    raise UserError(f"The loss became {float(loss)} at epoch {epoch}; lower "
                                    f"--base-lr or check the data files.")
                opt.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.unscale_(opt)
                else:
                    loss.backward()
                if cfg.trainer.gradient_clip_val > 0:
                    nn.utils.clip_grad_norm_(model.parameters(), cfg.trainer.gradient_clip_val)
                if scaler is not None:
                    scaler.step(opt)
                    scaler.update()
                else:
                    opt.step()
                step += 1
                mean = float(all_reduce_mean(loss.detach().float()))
                losses.append(mean)
                if writer is not None:
                    writer.add_scalar("train_loss", mean, step)
                    writer.add_scalar("lr", lr, step)
            record: dict[str, Any] = {"epoch": epoch, "step": step,
                                      "train_loss": float(np.mean(losses)),
                                      "epoch_seconds": time.perf_counter() - t0}
            if dist.is_main and ((epoch + 1) % cfg.trainer.val_every == 0
                                 or epoch + 1 == cfg.max_epochs):
                val = validate(model, val_data, cfg, device)
                best = sorted([*best, (val, epoch)])[: cfg.trainer.save_top_k]
                record.update(val_loss=val, val_loss_best=best[0][0])
                writer.add_scalar("val_loss", val, step)
                writer.add_scalar("val_loss_best", best[0][0], step)
                validations = (epoch + 1) // cfg.trainer.val_every
                if validations % cfg.trainer.images_every == 1 or cfg.trainer.images_every == 1 \
                        or epoch + 1 == cfg.max_epochs:
                    k = min(cfg.trainer.num_val_images, len(val_data))
                    ctx = val_data.context[:k].to(device)
                    sample = model.sample(ctx, cfg.steps, generator=_epoch_generator(
                        cfg.seed, -2, 0, device))
                    model.train()
                    writer.add_image("Validation_Samples", _sample_panel(
                        ctx, sample, val_data.goal[:k]), step)
                state = {"optimizer": opt.state_dict(), "epoch": epoch, "step": step,
                         "best": best}
                save_goal_checkpoint(ckpt_dir / "last", model, cfg, state, val)
                name = f"epoch{epoch:03d}-val_loss{val:.4f}"
                if (val, epoch) in best:
                    save_goal_checkpoint(ckpt_dir / name, model, cfg, state, val)
                keep = {f"epoch{e:03d}-val_loss{v:.4f}" for v, e in best}
                for old in ckpt_dir.glob("epoch*-val_loss*"):
                    if old.name not in keep:
                        shutil.rmtree(old, ignore_errors=True)
                text_log.write(json.dumps(record) + "\n")
                bar.set_postfix(train=f"{record['train_loss']:.4f}", val=f"{val:.4f}")
            barrier()
            bar.update(1)
    finally:
        bar.close()
        if writer is not None:
            writer.close()
            text_log.close()
        cleanup()
    return run_dir
