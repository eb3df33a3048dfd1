"""Every configuration dataclass of icrt, parsed from the command line with tyro.

Field names follow ICRT's ``args.py`` so its documented command lines run unchanged
(``--dataset-cfg.dataset-json``, ``--model-cfg.policy-cfg.scratch-llama-config``, ...).
The comment above each field is its ``-h`` help text. ``__post_init__`` only validates and
names the offending flag; derived values are properties.

    cfg = parse_config(sys.argv[1:])   # honours --load-config FILE, then the flags
    save_config(cfg, run_dir / "config.json")
    cfg2 = load_config(run_dir / "config.json")  # == cfg
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Union

import tyro

from icrt.errors import UserError
from icrt.fsutil import atomic_write_text
from icrt.presets import PRESETS, preset_flags, presets_help

Norm = Literal["mean_std", "min_max", "q01_q99", "none"]
PresetName = Literal[tuple(PRESETS)]  # type: ignore[valid-type]


def _positive(value: float, flag: str, allow_zero: bool = False) -> None:
    if not math.isfinite(value):  # NaN passes every comparison below
        raise ValueError(f"{flag} must be a finite number (got {value}).")
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{flag} must be {bound} (got {value}).")


LoraTarget = Literal["wq", "wk", "wv", "wo", "w1", "w2", "w3", "q_proj", "k_proj", "v_proj",
                     "o_proj", "gate_proj", "down_proj", "up_proj"]


@dataclasses.dataclass(frozen=True)
class DatasetConfig:
    # Dataset JSON listing the episode stores, observation/action keys and train split.
    dataset_json: str = "data/mw5.json"
    # Store keys that feed the policy, low-dim keys and cameras: `state`, `proprio image_corner`.
    # Default: the dataset JSON's proprio_keys and image_keys (without an image_keys field,
    # the stores' camera keys).
    input_sensors: tuple[str, ...] | None = None
    # Group episodes by task so that prompt and query trajectories share a task.
    sort_by_lang: bool = True
    # Keep every training sequence inside one task (no window spans two tasks).
    task_barrier: bool = True
    # Standard deviation of Gaussian noise added to low-dim observations (raw units).
    proprio_noise: float = 0.005
    # Standard deviation of Gaussian noise added to input actions (raw units).
    action_noise: float = 0.0
    # Train on these tasks only (names as stored in the episode stores).
    task_names: tuple[str, ...] | None = None
    # Brightness/contrast augmentation of camera images during training.
    vision_aug: bool = True
    # Resample every task to the median number of episodes per task, each epoch.
    rebalance_tasks: bool = True
    # Stride between sequence start points: an int k uses every k-th start, True uses
    # seq-length (each step appears once per epoch), False uses every start.
    non_overlapping: bool | int = False
    # Each trajectory is repeated 1..N times in a row (teaches copying from the prompt).
    num_repeat_traj: int = 1
    # Swap neighbouring trajectories with probability 0.5 after repeating.
    shuffle_repeat_traj: bool = True
    # Fraction of training windows that show no prompt: the window is moved back to the start
    # of its first trajectory, and every step is a query step (supervised also under
    # --model-cfg.policy-cfg.no-prompt-loss), so the policy also learns to act without one.
    prompt_dropout: float = 0.0
    # First N steps of each query trajectory get --model-cfg.policy-cfg.step-weight
    # (N < 1 is a fraction of the trajectory).
    num_weighted_steps: float = 30
    # Use this fraction of each task's episodes (ablations).
    dataset_fraction: float = 1.0
    # Label every trajectory with the object it moves, for the object pointer's loss
    # (--model-cfg.policy-cfg.pointer-loss-weight): the last low-dim key split into this many
    # equal slots (as --model-cfg.policy-cfg.object-slots); the label is the slot whose
    # position travels furthest from where it started. 0: no labels.
    moved_object_slots: int = 0
    # Which values of a slot are its position (robosuite's object key: 7 8 9); empty: all.
    object_pos_dims: tuple[int, ...] = ()
    # Goal labels for --model-cfg.policy-cfg.goal-loss-weight: these values of the low-dim
    # vector (the low-dim keys concatenated; robosuite's proprio key first: 0 1 2, the
    # gripper's position) at a trajectory's last step are every step's goal.
    goal_dims: tuple[int, ...] = ()
    # Leave out episodes shorter / longer than this many steps (ICRT used 30 and 450 for its
    # 15 Hz robot data; 0 / None: no filter).
    min_episode_length: int = 0
    max_episode_length: int | None = None
    # Leave out tasks with fewer training episodes than this (ICRT: 4).
    min_demos: int = 1
    # Hold camera frames (or cached features) in memory when they take at most this many GB;
    # larger datasets are read from the stores window by window.
    image_cache_gb: float = 4.0
    # Threads per loader process that read and decode the frames of a batch's windows at once
    # when frames are read from the stores (1: one after another; 0: 2 in the training
    # process, 1 in each DataLoader worker, which already run side by side).
    read_threads: int = 0
    # Normalisation of low-dim observations with the store's statistics.
    proprio_norm: Norm = "mean_std"
    # Floor on the spread (std, or half-range for min_max/q01_q99) that normalises each low-dim
    # observation dimension: a dimension that barely varies in the demonstrations (a resting
    # object's tilt) is otherwise magnified into a huge input once it moves when acting.
    # Dimensions constant in the data are only centred.
    proprio_min_spread: float = 0.01
    # Normalisation of actions with the store's statistics (min_max maps to [-1, 1]).
    action_norm: Norm = "min_max"

    def __post_init__(self) -> None:
        p = "--dataset-cfg."
        if not isinstance(self.non_overlapping, bool):
            _positive(self.non_overlapping, p + "non-overlapping", allow_zero=True)
        if self.num_repeat_traj < 1:
            raise ValueError(f"{p}num-repeat-traj must be >= 1 (got {self.num_repeat_traj}).")
        if not 0.0 < self.dataset_fraction <= 1.0:
            raise ValueError(
                f"{p}dataset-fraction must be in (0, 1] (got {self.dataset_fraction})."
            )
        _positive(self.proprio_noise, p + "proprio-noise", allow_zero=True)
        _positive(self.action_noise, p + "action-noise", allow_zero=True)
        _positive(self.num_weighted_steps, p + "num-weighted-steps", allow_zero=True)
        _positive(self.moved_object_slots, p + "moved-object-slots", allow_zero=True)
        _positive(self.image_cache_gb, p + "image-cache-gb", allow_zero=True)
        _positive(self.read_threads, p + "read-threads", allow_zero=True)
        _positive(self.min_episode_length, p + "min-episode-length", allow_zero=True)
        _positive(self.min_demos, p + "min-demos")
        _positive(self.proprio_min_spread, p + "proprio-min-spread", allow_zero=True)
        if not 0 <= self.prompt_dropout <= 1:
            raise ValueError(f"{p}prompt-dropout must be in [0, 1] (got {self.prompt_dropout}).")
        if self.max_episode_length is not None:
            _positive(self.max_episode_length, p + "max-episode-length")
            if self.max_episode_length < self.min_episode_length:
                raise ValueError(f"{p}max-episode-length ({self.max_episode_length}) is below "
                                 f"{p}min-episode-length ({self.min_episode_length}).")
        if self.task_names is not None and len(self.task_names) == 0:
            raise ValueError(f"{p}task-names needs at least one task name.")
        if self.input_sensors is not None:
            if not self.input_sensors:
                raise ValueError(f"{p}input-sensors needs at least one low-dim key or camera.")
            twice = sorted({k for k in self.input_sensors if self.input_sensors.count(k) > 1})
            if twice:
                raise ValueError(f"{p}input-sensors names {', '.join(twice)} more than once.")


@dataclasses.dataclass(frozen=True)
class VisionEncoderConfig:
    # timm model name (e.g. vit_base_patch16_224.mae) or a local checkpoint file.
    vision_encoder: str = "vit_base_patch16_224.mae"
    # Start from random weights instead of pretrained ones (no download, no file needed).
    vision_nonpretrained: bool = False
    # Train every encoder weight.
    vision_unfreeze_all: bool = False
    # Train LoRA adapters (peft) inside the encoder's attention layers.
    vision_lora: bool = False
    # Rank of the encoder's LoRA adapters.
    vision_lora_rank: int = 8
    # Train the last N transformer blocks of the encoder.
    vision_unfreeze_last_n: int = 0
    # Replace the encoder's BatchNorm layers by GroupNorm (16 channels per group), as
    # diffusion_policy does for a CNN trained end to end with small batches of sequences.
    vision_group_norm: bool = False
    # Resize camera images to this side length before the encoder (default: the encoder's).
    vision_image_size: int | None = None
    # timm architecture of a local checkpoint file given as the vision encoder.
    vision_arch: str = "vit_base_patch16_224"
    # Read precomputed encoder features (feature_<camera> keys of the stores) instead of
    # running the frozen encoder on pixels; see scripts/cache_features.py.
    use_cached_features: bool = False

    def __post_init__(self) -> None:
        p = "--model-cfg.vision-encoder-cfg."
        _positive(self.vision_lora_rank, p + "vision-lora-rank")
        _positive(self.vision_unfreeze_last_n, p + "vision-unfreeze-last-n", allow_zero=True)
        if self.vision_image_size is not None:
            _positive(self.vision_image_size, p + "vision-image-size")


@dataclasses.dataclass(frozen=True)
class PolicyConfig:
    # Backbone shape as a Llama params.json file (dim, n_layers, n_heads, ...), trained from
    # scratch; takes precedence over --model-cfg.policy-cfg.llama-ckpt-dir. With neither:
    # config/model_config/small.json (ICRT's 768x12). Relative paths that do not exist in the
    # working directory are looked up in the icrt source tree.
    scratch_llama_config: str | None = None
    # Directory of a pretrained Llama checkpoint, Meta's layout (params.json +
    # consolidated.00.pth) or Hugging Face's (config.json + model*.safetensors, e.g.
    # Llama-2-7b-hf, TinyLlama, SmolLM); used when no scratch config is given.
    llama_ckpt_dir: str | None = None
    # What of the backbone trains (the policy's own tokenisers and head always do). pretrain:
    # all of a scratch backbone, none of a pretrained Llama (llama-ckpt-dir), as ICRT;
    # finetune: LoRA adapters, ICRT's biases (--model-cfg.policy-cfg.lora-bias) and the norms;
    # full: every weight, also of a pretrained Llama (full fine-tuning; not in ICRT).
    phase: Literal["pretrain", "finetune", "full"] = "pretrain"
    # Checkpoint (directory or model.safetensors) whose weights initialise the policy.
    pretrained_path: str | None = None
    # Rank of the backbone's LoRA adapters (finetune phase).
    lora_rank: int = 4
    # Backbone layers that get LoRA adapters (default: all).
    lora_layer_idxs: tuple[int, ...] | None = None
    # ICRT: load llama-ckpt-dir's weights (--model-cfg.policy-cfg.no-load-llama: its shape
    # with random weights).
    load_llama: bool = True
    # ICRT: separate key/value projections in attention pooling (not implemented).
    multikv_attn_pool: bool = False
    # ICRT: predict actions only (True; predicting proprioception too is not implemented).
    pred_action_only: bool = True
    # ICRT: KL-divergence loss (not implemented).
    kl_div_loss: bool = False
    # LoRA scaling: the adapters' update is multiplied by lora_alpha / lora_rank (default:
    # alpha = rank, scale 1, ICRT's).
    lora_alpha: float | None = None
    # Dropout on the input of the LoRA branch.
    lora_dropout: float = 0.0
    # Projections that get adapters, by Meta's or Hugging Face's names: attention (wq wk wv wo
    # = q_proj k_proj v_proj o_proj) and MLP (w1 w2 w3 = gate_proj down_proj up_proj); default
    # all seven, ICRT's.
    lora_targets: tuple[LoraTarget, ...] = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
    # ICRT's bias tuning in the finetune phase: trainable zero-initialised biases on wq, wo,
    # w1, w2 and w3 of every layer (wk and wv stay bias-free).
    lora_bias: bool = True
    # Attention heads of the per-camera attention-pooling adapter.
    adapter_num_heads: int = 8
    # MLP ratio of the attention-pooling adapter.
    adapter_mlp_ratio: float = 4.0
    # One attention-pooling adapter per camera (else one shared adapter).
    separate_camera_adapter: bool = True
    # Add a learned embedding per camera to the vision features.
    camera_pos_emb: bool = False
    # Add learned state/action modality embeddings to the tokens.
    modality_pos_emb: bool = False
    # Add a learned embedding to the tokens of prompt steps (marks the demonstrations).
    prompt_pos_emb: bool = False
    # Build state tokens from images only (ignore low-dim observations).
    remove_proprio: bool = False
    # Put no loss on prompt steps (only the query trajectory is supervised).
    no_prompt_loss: bool = False
    # Object pointer (0: off): split the last low-dim key (robosuite's object) into this many
    # equal per-object slots; the feature at each state token attends over that step's
    # objects before the head (icrt/models/pointer.py; 4 for the (object, bin) family).
    object_slots: int = 0
    # Weight of the object pointer's loss: a cross-entropy that teaches it to look, at every
    # query step, at the object its trajectory moves (labels from
    # --dataset-cfg.moved-object-slots); 0: the pointer learns from the action loss alone.
    pointer_loss_weight: float = 0.0
    # Weight of the goal loss: an L1 regression, from the backbone's feature at every
    # supervised query step, of where the trajectory ends (--dataset-cfg.goal-dims), which at
    # the first query steps only the prompt shows; 0: off.
    goal_loss_weight: float = 0.0
    # Goal-conditioned head (needs the goal loss): the head also reads the step from the
    # current position to where the trajectory ends; in training the recorded end, when
    # acting the goal head's prediction, which only the prompt can inform.
    goal_conditioned: bool = False
    # Factored head (needs the object pointer): the head reads only the object the pointer
    # fetched (with the robot's own state) and, with goal-conditioned, the step to the goal,
    # not the backbone's feature itself, so the prompt reaches the actions only as which
    # object and where to, and a task memorised in the feature cannot override it.
    factored_head: bool = False
    # Weight of the action loss.
    loss_w_action: float = 1.0
    # Multiplier of the total loss.
    scale_loss: float = 1.0
    # Loss weight of the first --dataset-cfg.num-weighted-steps steps of each trajectory.
    step_weight: float = 1.0
    # Action head, a name in icrt.models.heads.HEADS: mlp (L1/L2 regression), gmm (Gaussian
    # mixture), diffusion (DDPM/DDIM), flow (flow matching), cvae (ACT's conditional VAE).
    decoder_pred_head: str = "mlp"
    # Hidden width of the action head.
    head_hidden_dim: int = 256
    # Hidden layers of the action head.
    head_num_layers: int = 2
    # Regression loss of the mlp head.
    mlp_loss: Literal["l1", "l2"] = "l1"
    # Latent size of the cvae head (ACT's conditional VAE; 32 in ACT).
    cvae_latent_dim: int = 32
    # Weight of the cvae head's KL term (ACT: 10; 0 trains a plain L1 chunk regression).
    cvae_kl_weight: float = 10.0
    # Mixture components of the gmm head.
    gmm_num_components: int = 5
    # Diffusion steps used in training (the noise schedule's length).
    num_train_diffusion_steps: int = 100
    # Denoising steps used when sampling (<= train steps).
    num_inference_diffusion_steps: int = 10
    # Noise schedule of the diffusion head.
    diffusion_beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = (
        "squaredcos_cap_v2"
    )
    # Denoised action chunks are clipped to +-this value at every sampling step.
    diffusion_clip_sample: float = 3.0
    # What the diffusion network predicts.
    diffusion_prediction_type: Literal["epsilon", "v_prediction", "sample"] = "epsilon"
    # Sampler of the diffusion head.
    diffusion_sampler: Literal["ddpm", "ddim"] = "ddim"
    # DDIM's eta (0: deterministic given the start noise; 1: DDPM-like noise at every step).
    diffusion_eta: float = 0.0
    # Probability path of the flow head (condot: straight lines, rectified flow).
    flow_scheduler: Literal["condot", "cosine", "vp", "linear_vp"] = "condot"
    # ODE solver of the flow head (dopri5 is adaptive).
    flow_solver: Literal["euler", "midpoint", "rk4", "dopri5"] = "midpoint"
    # Integration steps of the flow head's fixed-step solvers.
    flow_num_steps: int = 10
    # Absolute and relative tolerance of the adaptive dopri5 solver.
    flow_tolerance: float = 1e-4
    # Recompute backbone activations in the backward pass (less memory, ~30% slower).
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        p = "--model-cfg.policy-cfg."
        for name in ("lora_rank", "adapter_num_heads", "head_hidden_dim", "gmm_num_components",
                     "num_train_diffusion_steps", "num_inference_diffusion_steps",
                     "flow_num_steps", "cvae_latent_dim"):
            _positive(getattr(self, name), p + name.replace("_", "-"))
        _positive(self.head_num_layers, p + "head-num-layers", allow_zero=True)
        _positive(self.object_slots, p + "object-slots", allow_zero=True)
        _positive(self.pointer_loss_weight, p + "pointer-loss-weight", allow_zero=True)
        _positive(self.goal_loss_weight, p + "goal-loss-weight", allow_zero=True)
        if self.pointer_loss_weight and not self.object_slots:
            raise ValueError(f"{p}pointer-loss-weight needs {p}object-slots.")
        if self.factored_head and not self.object_slots:
            raise ValueError(f"{p}factored-head needs {p}object-slots (the object it reads).")
        if self.goal_conditioned and not self.goal_loss_weight:
            raise ValueError(f"{p}goal-conditioned needs {p}goal-loss-weight (the goal head it "
                             "reads when acting).")
        _positive(self.flow_tolerance, p + "flow-tolerance")
        _positive(self.cvae_kl_weight, p + "cvae-kl-weight", allow_zero=True)
        if self.lora_alpha is not None:
            _positive(self.lora_alpha, p + "lora-alpha")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"{p}lora-dropout must be in [0, 1) (got {self.lora_dropout}).")
        if not self.lora_targets:
            raise ValueError(f"{p}lora-targets needs at least one projection.")
        if self.multikv_attn_pool:
            raise ValueError(f"{p}multikv-attn-pool is not implemented: each camera's "
                             f"attention-pooling adapter has one key/value projection.")
        if not self.pred_action_only:
            raise ValueError(f"{p}no-pred-action-only: the policy predicts actions only "
                             f"(ICRT's proprio prediction is not implemented).")
        if self.kl_div_loss:
            raise ValueError(f"{p}kl-div-loss is not implemented; the gmm head's likelihood "
                             f"({p}decoder-pred-head gmm) is the probabilistic loss.")
        _positive(self.diffusion_clip_sample, p + "diffusion-clip-sample")
        if self.num_inference_diffusion_steps > self.num_train_diffusion_steps:
            raise ValueError(
                f"{p}num-inference-diffusion-steps ({self.num_inference_diffusion_steps}) must "
                f"not exceed {p}num-train-diffusion-steps ({self.num_train_diffusion_steps})."
            )


    @property
    def scratch_config(self) -> Path | None:
        """The params file of a from-scratch backbone, or None for a pretrained Llama."""
        if self.scratch_llama_config is None and self.llama_ckpt_dir is not None:
            return None
        return source_path(self.scratch_llama_config or DEFAULT_BACKBONE)


DEFAULT_BACKBONE = "config/model_config/small.json"


def source_path(path: str) -> Path:
    """``path`` as given, or, if it is relative and missing here, inside the icrt source tree
    (so ``config/model_config/tiny.json`` works from any directory)."""
    p = Path(path)
    if p.exists() or p.is_absolute():
        return p
    candidate = Path(__file__).resolve().parents[1] / p
    return candidate if candidate.exists() else p


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    # Policy: backbone, tokenisers and action head.
    policy_cfg: PolicyConfig = PolicyConfig()
    # Camera encoder (used when the dataset has image keys).
    vision_encoder_cfg: VisionEncoderConfig = VisionEncoderConfig()


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    # AdamW weight decay (norms, biases and embeddings get none).
    weight_decay: float = 0.01
    # Absolute learning rate; pass None to use --optimizer-cfg.blr instead.
    lr: float | None = 5e-4
    # Base learning rate: lr = blr * effective batch size / 256 (when lr is None).
    blr: float = 1e-3
    # Floor of the cosine schedule.
    min_lr: float = 0.0
    # Linear warm-up length in (fractional) epochs.
    warmup_epochs: float = 40
    # AdamW betas.
    betas: tuple[float, float] = (0.9, 0.95)
    # Clip the global gradient norm to this value (None: no clipping).
    clip_grad: float | None = 1.0

    def __post_init__(self) -> None:
        p = "--optimizer-cfg."
        if self.lr is not None:
            _positive(self.lr, p + "lr")
        _positive(self.blr, p + "blr")
        _positive(self.min_lr, p + "min-lr", allow_zero=True)
        _positive(self.warmup_epochs, p + "warmup-epochs", allow_zero=True)
        _positive(self.weight_decay, p + "weight-decay", allow_zero=True)
        if self.clip_grad is not None:
            _positive(self.clip_grad, p + "clip-grad")


@dataclasses.dataclass(frozen=True)
class TrainerConfig:
    # Number of training epochs.
    epochs: int = 400
    # Accumulate gradients over this many batches per optimizer step.
    accum_iter: int = 8
    # Pin host memory in the data loader (CUDA only).
    pin_memory: bool = True
    # Data-loader worker processes per rank.
    num_workers: int = 2
    # Numeric precision: full fp32, fp16 autocast with loss scaling, or bf16 autocast.
    precision: Literal["32-true", "16-mixed", "bf16-mixed"] = "32-true"
    # Compile the backbone with torch.compile (in place; checkpoints are unchanged).
    compile: bool = False
    # Data parallelism under torchrun: ddp (every rank holds the whole model) or fsdp (FSDP2
    # fully_shard: parameters, gradients and optimizer state sharded per backbone block).
    strategy: Literal["ddp", "fsdp"] = "ddp"
    # Log training metrics every N optimizer steps.
    log_every: int = 10
    # Stop after this many optimizer steps (0: run --trainer-cfg.epochs); the schedule's length.
    max_steps: int = 0
    # Minutes ranks wait for each other (rank 0 alone evaluates in the simulator meanwhile).
    dist_timeout_minutes: float = 60.0

    def __post_init__(self) -> None:
        p = "--trainer-cfg."
        _positive(self.epochs, p + "epochs")
        _positive(self.accum_iter, p + "accum-iter")
        _positive(self.num_workers, p + "num-workers", allow_zero=True)
        _positive(self.log_every, p + "log-every")
        _positive(self.max_steps, p + "max-steps", allow_zero=True)
        _positive(self.dist_timeout_minutes, p + "dist-timeout-minutes")


@dataclasses.dataclass(frozen=True)
class SharedConfig:
    # Sequences per rank per step (effective batch = batch-size * accum-iter * ranks).
    batch_size: int = 1
    # Represent rotations of keys that declare one as 6D (two rotation-matrix rows).
    rot_6d: bool = True
    # Timesteps per training sequence (prompt + query); tokens = 2 * seq-length.
    seq_length: int = 512
    # Base random seed (each rank adds its rank).
    seed: int = 0
    # Save a checkpoint every N epochs (and always after the last).
    save_every: int = 5
    # Also save a checkpoint every N optimizer steps, mid-epoch too (0: off), so a kill loses at
    # most N steps; such checkpoints are named checkpoint-step-<step>.
    save_every_steps: int = 0
    # Resume from this checkpoint directory, or from a run directory's newest intact checkpoint
    # (damaged ones are skipped, with a warning).
    resume: str | None = None
    # Keep only the newest N checkpoint-<epoch> directories (0: keep all); best/ is kept.
    keep_last: int = 3
    # Actions predicted per state token (the action chunk length).
    num_pred_steps: int = 16
    # Sliding window: each query step sees the prompt and only the query's last N steps (in
    # training and when acting; the prompt stays in context). Default: the whole query.
    sliding_window: int | None = None
    # Train with prompts (in-context). --shared-cfg.no-prompt: behaviour cloning, every
    # trajectory in a context of its own (as ACT and diffusion policy train); evaluation then
    # acts without prompts.
    prompt: bool = True
    # Predict actions relative to the current pose, as ICRT does (translation in the end-effector
    # frame, relative rotation, gripper absolute; see docs/data.md). Default: follow the data,
    # on when the action key holds absolute pose targets and declares the pose they refer to
    # (delta_reference, e.g. converted ICRT/DROID data), off otherwise (simulators whose actions
    # are already deltas); the run log says which. ICRT's flag forms work too:
    # --shared-cfg.use-delta-action forces it on, --shared-cfg.no-use-delta-action off.
    use_delta_action: bool | None = None
    # ICRT: number of cameras. icrt feeds the dataset JSON's image_keys; given, it is checked
    # against them.
    num_cameras: int | None = None
    # ICRT: first epoch. A new run starts at 0 and --shared-cfg.resume continues at its
    # checkpoint's epoch, so other values are refused.
    start_epoch: int = 0
    # ICRT: progressive training in stages (only 1: not implemented).
    num_stages: int = 1
    # ICRT: split each epoch into k shorter ones (only 1; --trainer-cfg.max-steps and
    # --shared-cfg.save-every-steps give finer schedules).
    split_epoch: int = 1
    # ICRT: scale actions with a JSON of action statistics. icrt normalises with the stores'
    # own statistics (--dataset-cfg.action-norm), so this is refused.
    scale_action: str | None = None

    def __post_init__(self) -> None:
        p = "--shared-cfg."
        if self.start_epoch != 0:
            raise ValueError(f"{p}start-epoch {self.start_epoch}: a new run starts at epoch 0 "
                             f"and {p}resume RUN continues at its checkpoint's epoch.")
        if self.num_stages != 1:
            raise ValueError(f"{p}num-stages {self.num_stages}: progressive training stages "
                             f"are not implemented (only 1).")
        if self.split_epoch != 1:
            raise ValueError(f"{p}split-epoch {self.split_epoch} is not implemented; use "
                             f"--trainer-cfg.max-steps and {p}save-every-steps for finer "
                             f"schedules.")
        if self.scale_action is not None:
            raise ValueError(f"{p}scale-action is not needed: actions are normalised with the "
                             f"stores' statistics (--dataset-cfg.action-norm).")
        if self.num_cameras is not None:
            _positive(self.num_cameras, p + "num-cameras", allow_zero=True)
        _positive(self.batch_size, p + "batch-size")
        _positive(self.seq_length, p + "seq-length")
        _positive(self.save_every, p + "save-every")
        _positive(self.num_pred_steps, p + "num-pred-steps")
        _positive(self.keep_last, p + "keep-last", allow_zero=True)
        _positive(self.save_every_steps, p + "save-every-steps", allow_zero=True)
        if self.sliding_window is not None:
            _positive(self.sliding_window, p + "sliding-window")


@dataclasses.dataclass(frozen=True)
class LoggingConfig:
    # Directory for runs; a run lives in OUTPUT_DIR/LOG_NAME (or OUTPUT_DIR without a name).
    output_dir: str = "./output"
    # TensorBoard directory (default: the run directory's tensorboard/).
    log_dir: str | None = None
    # Run name: the run directory's name and the wandb run name.
    log_name: str | None = None
    # Log to Weights & Biases when a log name is given and wandb is installed.
    wandb: bool = True
    # wandb project.
    wandb_project: str = "icrt"

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.log_name if self.log_name else Path(self.output_dir)


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Prompted rollouts of a checkpoint in a simulator (scripts/eval.py, or during training)."""

    # Checkpoint directory, or a run directory (its latest checkpoint). Set by training itself.
    checkpoint: str = ""
    # During training: evaluate every N epochs (0: never) and keep RUN/best/ by mean success.
    eval_every: int = 0
    # During training: also evaluate (and checkpoint) every N optimizer steps (0: never).
    eval_every_steps: int = 0
    # Simulator (default: the one the training data was collected in).
    env: str | None = None
    # Tasks to evaluate (default: the checkpoint's training tasks).
    tasks: tuple[str, ...] | None = None
    # Dataset JSON of held-out demonstrations to prompt with (e.g. data/NAME_prompts.json).
    prompt_dataset: str | None = None
    # Demonstrations of the same task shown before each episode.
    num_prompts: int = 1
    # Baseline: act without any prompt.
    no_prompt: bool = False
    # Mismatched prompts: prompt the i-th evaluated task with demonstrations of the i-th task
    # named here. The results then also report how often the *prompted* task was done (prompt
    # following; needs an adapter that can judge another task, e.g. the robosuite family).
    prompt_tasks: tuple[str, ...] | None = None
    # Episodes per task (default: 20, or the size of --eval-subset, which fixes it).
    episodes_per_task: int | None = None
    # Named evaluation subset: fixed simulator seeds per task, the same on every machine:
    # minival (5 per task), val (20) or test (50), optionally versioned (minival@v1; default:
    # the latest version). Its seeds never repeat a collected demonstration's; see
    # docs/eval.md. Default: seeds derived from --seed.
    eval_subset: str | None = None
    # Perturb the observations the policy sees (not the simulator): noise on low-dimensional
    # keys, lighting jitter and shifts on camera frames; reproducible per episode seed.
    test_augmentation: bool = False
    # With --test-augmentation: std of Gaussian noise on low-dimensional observations, in
    # their raw units (e.g. metres), drawn every step.
    obs_noise_std: float = 0.01
    # With --test-augmentation: brightness offset B, as a fraction of 255; drawn per episode
    # and camera from -B to B.
    image_brightness: float = 0.1
    # With --test-augmentation: contrast factor drawn per episode and camera from [1-C, 1+C].
    image_contrast: float = 0.1
    # With --test-augmentation: camera frames shifted by up to this many pixels each step,
    # the edges replicated.
    image_shift: int = 4
    # Evaluate the tasks in a random order drawn from --seed (recorded as task_order; the
    # results are still reported per task, in the given order).
    shuffle: bool = False
    # Episode length limit (default: the environment's).
    max_steps: int | None = None
    # Parallel worker processes (each runs its own simulator and policy copy).
    workers: int = 2
    # Torch threads per worker.
    threads_per_worker: int = 1
    # Simulators each worker steps together, with one batched policy forward per step (for
    # GPUs; 1 = one episode at a time). Results are the same either way.
    num_envs: int = 1
    # Base seed: episode seeds, prompt choice and action sampling derive from it.
    seed: int = 0
    # Chunk execution: ensemble (temporal ensembling) or open_loop.
    execution: Literal["ensemble", "open_loop"] = "ensemble"
    # Actions executed per chunk in open_loop mode (default: the whole chunk).
    open_loop_steps: int | None = None
    # Temporal-ensembling decay m in exp(-m * i), i = 0 for the oldest prediction.
    ensemble_decay: float = 0.01
    # Point estimates instead of samples from stochastic heads.
    deterministic: bool = False
    # Backbone weights while acting: float32, bfloat16, or int8 (weight-only, per output
    # channel; bf16 activations). Faster decoding on memory-bound CPUs; see docs/eval.md.
    dtype: Literal["float32", "bfloat16", "int8"] = "float32"
    # Device the policy runs on in each worker: auto (cuda, else mps, else cpu), cpu, cuda,
    # cuda:N or mps.
    device: str = "auto"
    # Write the results JSON here.
    out: str | None = None
    # Save rollout videos (mp4) here.
    video_dir: str | None = None
    # Videos saved per task (the first episodes).
    videos_per_task: int = 1

    def __post_init__(self) -> None:
        for name in ("num_prompts", "workers", "threads_per_worker", "num_envs"):
            _positive(getattr(self, name), "--" + name.replace("_", "-"))
        if self.episodes_per_task is not None:
            _positive(self.episodes_per_task, "--episodes-per-task")
        if self.eval_subset is not None:
            from icrt.eval.subsets import parse_subset

            subset = parse_subset(self.eval_subset)
            n = subset.episodes_per_task
            if self.episodes_per_task not in (None, n):
                raise ValueError(
                    f"--eval-subset {subset.label} fixes {n} episodes per task, so "
                    f"--episodes-per-task {self.episodes_per_task} conflicts with it; drop "
                    f"--episodes-per-task.")
        _positive(self.obs_noise_std, "--obs-noise-std", allow_zero=True)
        for flag, value in (("--image-brightness", self.image_brightness),
                            ("--image-contrast", self.image_contrast)):
            if not 0.0 <= value <= 1.0:  # NaN fails too
                raise ValueError(f"{flag} must be in [0, 1] (got {value}).")
        _positive(self.image_shift, "--image-shift", allow_zero=True)
        knobs = {"obs_noise_std": 0.01, "image_brightness": 0.1, "image_contrast": 0.1,
                 "image_shift": 4}
        changed = [k for k, v in knobs.items() if getattr(self, k) != v]
        if changed and not self.test_augmentation:
            raise ValueError(f"--{changed[0].replace('_', '-')} only applies with "
                             f"--test-augmentation; add it or drop the setting.")
        if self.test_augmentation and not any(getattr(self, k) for k in knobs):
            raise ValueError("--test-augmentation with every strength at 0 perturbs nothing; "
                             "raise one of --obs-noise-std, --image-brightness, "
                             "--image-contrast, --image-shift.")
        _positive(self.eval_every, "--eval-every", allow_zero=True)
        _positive(self.eval_every_steps, "--eval-every-steps", allow_zero=True)
        _positive(self.videos_per_task, "--videos-per-task", allow_zero=True)
        _positive(self.ensemble_decay, "--ensemble-decay", allow_zero=True)
        if self.max_steps is not None:
            _positive(self.max_steps, "--max-steps")
        if self.tasks is not None and not self.tasks:
            raise ValueError("--tasks needs at least one task name.")
        if self.prompt_tasks is not None and self.no_prompt:
            raise ValueError("--prompt-tasks and --no-prompt exclude each other.")
        if self.dtype == "int8" and self.num_envs > 1:
            raise ValueError("--dtype int8 decodes one episode per process; use --num-envs 1 "
                             "or --dtype bfloat16.")


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    # Dataset configuration.
    dataset_cfg: DatasetConfig = DatasetConfig()
    # Model configuration.
    model_cfg: ModelConfig = ModelConfig()
    # Optimizer configuration.
    optimizer_cfg: OptimizerConfig = OptimizerConfig()
    # Shared configuration (sequence shape, batch, seed, checkpoints).
    shared_cfg: SharedConfig = SharedConfig()
    # Logging configuration.
    logging_cfg: LoggingConfig = LoggingConfig()
    # Trainer configuration.
    trainer_cfg: TrainerConfig = TrainerConfig()
    # Simulator evaluation during training (off unless --eval-cfg.eval-every N).
    eval_cfg: EvalConfig = EvalConfig()
    # Device: auto (this rank's CUDA GPU if available, else Apple's MPS, else the CPU), cpu,
    # cuda, cuda:N or mps; anything else is refused.
    device: str = "auto"
    # Start from this saved config file (JSON); flags given as well override it.
    load_config: str | None = None
    # Model preset: backbone size, action head and encoder as named flags (listed above and
    # in docs/training.md); applied after --load-config, and flags given as well override it.
    preset: PresetName | None = None
    # ICRT: train (default) or evaluate; evaluation is scripts/eval.py, so --no-train is refused.
    train: bool = True
    # Legacy launcher flags (python -m torch.distributed.launch): accepted; the process group is
    # set up from the environment the launcher exports (WORLD_SIZE, RANK, LOCAL_RANK), which
    # --world-size, when given, must match.
    world_size: int | None = None
    local_rank: int | None = None
    # ICRT: OpenMPI/ITP launch (not supported: use torchrun).
    dist_on_itp: bool = False
    # Process group rendezvous (only env://, what torchrun and torch.distributed.launch use).
    dist_url: str = "env://"

    def __post_init__(self) -> None:
        if not self.train:
            raise ValueError("--no-train: evaluation is scripts/eval.py --checkpoint RUN.")
        if self.dist_on_itp:
            raise ValueError("--dist-on-itp (OpenMPI launch) is not supported; launch with "
                             "torchrun.")
        if self.dist_url != "env://":
            raise ValueError(f"--dist-url {self.dist_url}: only env:// is supported (torchrun "
                             f"sets it up; see docs/training.md for several nodes).")
        slots = self.model_cfg.policy_cfg.object_slots
        if (self.model_cfg.policy_cfg.pointer_loss_weight
                and self.dataset_cfg.moved_object_slots != slots):
            raise ValueError(f"--model-cfg.policy-cfg.pointer-loss-weight needs labels of the "
                             f"same {slots} objects: add --dataset-cfg.moved-object-slots "
                             f"{slots}.")
        if self.model_cfg.policy_cfg.goal_loss_weight and not self.dataset_cfg.goal_dims:
            raise ValueError("--model-cfg.policy-cfg.goal-loss-weight needs goal labels: add "
                             "--dataset-cfg.goal-dims (e.g. 0 1 2).")


# --------------------------------------------------------------------------- serialisation


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config dataclass (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def _convert(tp: Any, value: Any, where: str) -> Any:
    """Turn a JSON value back into the Python type ``tp`` of a config field."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return config_from_dict(tp, value, where)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            if arg is bool and not isinstance(value, bool):
                continue
            if arg in (int, float) and isinstance(value, bool):
                continue
            try:
                return _convert(arg, value, where)
            except (TypeError, ValueError):
                continue
        raise ValueError(f"{where}: {value!r} does not fit {tp}.")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list, got {value!r}.")
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, where) for v in value)
        return tuple(_convert(a, v, where) for a, v in zip(args, value, strict=True))
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ValueError(f"{where}: {value!r} is not one of {typing.get_args(tp)}.")
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and not isinstance(value, tp):
        raise ValueError(f"{where}: expected {tp.__name__}, got {value!r}.")
    return value


def config_from_dict(cls: type, data: dict[str, Any], where: str = "config") -> Any:
    """Rebuild a (nested) config dataclass from :func:`config_to_dict` output."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected an object, got {data!r}.")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {', '.join(unknown)}.")
    kwargs = {k: _convert(hints[k], v, f"{where}.{k}") for k, v in data.items()}
    return cls(**kwargs)


def save_config(cfg: Any, path: str | os.PathLike) -> None:
    """Write a config as indented JSON, atomically."""
    path = Path(path)
    atomic_write_text(path, json.dumps(config_to_dict(cfg), indent=2) + "\n")


def load_config(path: str | os.PathLike, cls: type = ExperimentConfig) -> Any:
    """Read a config written by :func:`save_config` (a run's ``config.json``)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"Config file '{path}' does not exist.")
    try:
        data = json.loads(path.read_text())
        return config_from_dict(cls, data)
    except (json.JSONDecodeError, ValueError, TypeError) as e:
        raise UserError(f"Config file '{path}' is not a valid {cls.__name__}: {e}") from None


def _find_flag(args: Sequence[str], flag: str) -> str | None:
    """The value of ``flag`` (``--flag V`` or ``--flag=V``; the last one wins), or None."""
    value = None
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            value = args[i + 1]
        elif a.startswith(flag + "="):
            value = a.split("=", 1)[1]
    return value


# Options whose default is "decide from the data" but which users pass as ICRT's on/off flags.
_TRISTATE = ("--shared-cfg.use-delta-action",)


def _tristate_flags(argv: Sequence[str]) -> list[str]:
    """``--x`` -> ``--x True`` and ``--no-x`` -> ``--x False`` for the ``bool | None`` options
    (tyro takes an explicit value for them); ``--local_rank`` as ``--local-rank``."""
    out: list[str] = []
    for i, tok in enumerate(argv):
        if tok.startswith("--local_rank"):  # torch.distributed.launch's spelling
            tok = tok.replace("--local_rank", "--local-rank", 1)
        flag = tok.replace("_", "-")
        for name in _TRISTATE:
            no = name.replace("--shared-cfg.", "--shared-cfg.no-")
            if flag == no:
                out += [name, "False"]
                break
            if flag == name and (i + 1 == len(argv) or argv[i + 1] not in ("True", "False",
                                                                             "None")):
                out += [name, "True"]
                break
        else:
            out.append(tok)
    return out


def parse_config(
    args: Sequence[str] | None = None, cls: type = ExperimentConfig, description: str | None = None
) -> Any:
    """Parse flags into ``cls``; ``--load-config FILE`` supplies the defaults flags override."""
    args = list(args) if args is not None else None
    import sys

    argv = _tristate_flags(args if args is not None else sys.argv[1:])
    default = None
    path = _find_flag(argv, "--load-config")
    if path is not None and path != "None":
        default = dataclasses.replace(load_config(path, cls), load_config=path)
    preset = _find_flag(argv, "--preset") if cls is ExperimentConfig else None
    if cls is ExperimentConfig:
        description = (description or "") + "\n\nPresets (--preset NAME):\n" + presets_help()
    if preset is not None and preset != "None":
        # the preset's flags over the defaults, then the command line's over both
        default = tyro.cli(cls, args=list(preset_flags(preset)), default=default)
    return tyro.cli(cls, args=argv, default=default, description=description)


@dataclasses.dataclass(frozen=True)
class CollectConfig:
    """Roll scripted experts in a simulator and write an episode store plus its dataset JSON."""

    # Simulator: metaworld or robosuite.
    env: str = "metaworld"
    # Tasks to collect (names as the simulator has them, e.g. reach-v3 or Lift).
    tasks: tuple[str, ...] = (
        "reach-v3",
        "push-v3",
        "pick-place-v3",
        "drawer-open-v3",
        "button-press-topdown-v3",
    )
    # Training episodes per task (successful ones, unless --keep-failures).
    episodes_per_task: int = 20
    # Extra held-out episodes per task written to NAME_prompts.zarr for prompting at evaluation.
    prompt_episodes_per_task: int = 0
    # Output store; the dataset JSON is written next to it as NAME.json.
    out: str = "data/demos.zarr"
    # Also keep failed episodes (flagged unsuccessful); without it failures are retried.
    keep_failures: bool = False
    # Render camera images of this side length (0: no images).
    image_size: int = 0
    # Cameras to render (default: the simulator's standard ones when --image-size is set).
    cameras: tuple[str, ...] = ()
    # Low-dim keys the dataset JSON feeds to the state token (default: the full `state`, which
    # includes object poses, without cameras; the robot-only `proprio` with cameras, so that an
    # image policy has to see the objects). Both keys are always stored.
    proprio_keys: tuple[Literal["state", "proprio"], ...] | None = None
    # Episode length limit (default: the simulator's).
    max_steps: int | None = None
    # Parallel simulator worker processes.
    workers: int = 2
    # Base seed; episode seeds derive from it, the task name and the episode index.
    seed: int = 0
    # Give up on a task after this many attempts per wanted episode.
    max_attempts_per_episode: int = 3
    # Fraction of each task's episodes the dataset JSON puts in the training split.
    train_split: float = 0.9
    # Replace existing output stores (the new ones are built aside and swapped in only when
    # the whole collection succeeded).
    overwrite: bool = False
    # Continue an interrupted collection: keep the stores' episodes and collect the rest with
    # the same seeds (the result equals an uninterrupted run).
    resume: bool = False

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ValueError("--tasks needs at least one task name.")
        _positive(self.episodes_per_task, "--episodes-per-task")
        _positive(self.prompt_episodes_per_task, "--prompt-episodes-per-task", allow_zero=True)
        _positive(self.image_size, "--image-size", allow_zero=True)
        _positive(self.workers, "--workers")
        _positive(self.max_attempts_per_episode, "--max-attempts-per-episode")
        if self.max_steps is not None:
            _positive(self.max_steps, "--max-steps")
        if not self.out.endswith(".zarr"):
            raise ValueError(f"--out must end in .zarr (got {self.out}).")
        if not 0.0 < self.train_split <= 1.0:
            raise ValueError(f"--train-split must be in (0, 1] (got {self.train_split}).")
        if self.overwrite and self.resume:
            raise ValueError("--overwrite and --resume exclude each other: replace the stores "
                             "or continue them.")


@dataclasses.dataclass(frozen=True)
class ConvertConfig:
    """Convert another tool's dataset into an icrt episode store plus its dataset JSON."""

    # Input format: robomimic (an HDF5 file with data/demo_N groups), icrt (ICRT's dataset
    # JSON naming DROID-style HDF5 files) or lerobot (a local LeRobot dataset directory,
    # codebase v3.0 or v2.x; needs the [convert] extra).
    format: Literal["robomimic", "icrt", "lerobot"] = "robomimic"
    # The dataset to convert: the robomimic HDF5 file, the ICRT dataset JSON, or the LeRobot
    # dataset directory.
    input: str = ""
    # Output store; the dataset JSON is written next to it as NAME.json.
    out: str = "data/converted.zarr"
    # Convert only the first N episodes (in the source's order).
    max_episodes: int | None = None
    # Resize camera frames to this side length (uint8 kept; default: as stored).
    image_size: int | None = None
    # Low-dim observation keys to keep, as the source names them (default: all).
    keys: tuple[str, ...] | None = None
    # Cameras to keep, as the source names them (default: all stored ones).
    cameras: tuple[str, ...] | None = None
    # robomimic: render these cameras from the recorded simulator states (needs --image-size;
    # as robomimic's dataset_states_to_obs does).
    render_cameras: tuple[str, ...] = ()
    # Replace an existing output store (built aside and swapped in when complete).
    overwrite: bool = False
    # Continue an interrupted conversion after its last committed episode.
    resume: bool = False

    def __post_init__(self) -> None:
        if not self.input:
            raise ValueError("--input needs the dataset to convert.")
        if not self.out.endswith(".zarr"):
            raise ValueError(f"--out must end in .zarr (got {self.out}).")
        if self.max_episodes is not None:
            _positive(self.max_episodes, "--max-episodes")
        if self.image_size is not None:
            _positive(self.image_size, "--image-size")
        if self.render_cameras and not self.image_size:
            raise ValueError("--render-cameras needs --image-size N (the side of the frames).")
        if self.overwrite and self.resume:
            raise ValueError("--overwrite and --resume exclude each other: replace the store "
                             "or continue it.")
