"""Training memory per device, planned from the backbone's shape (no weights needed).

    plan = plan_memory(LlamaConfig(dim=4096, n_layers=32, n_heads=32), strategy="fsdp", gpus=8,
                       batch_size=1, tokens=1024, lora_rank=None)
    plan.total_gb, plan.fits(80)

The backbone is built on the meta device (so a 13B shape costs nothing) to count parameters,
with peft's LoRA adapters when ``lora_rank`` is set. Per device:

* parameters: fp32 master weights; FSDP keeps 1/N of them plus the gathered weights of the
  block in compute (and the next one, prefetched) in the compute dtype;
* gradients: of the trainable parameters, fp32; DDP also holds its gradient buckets (a second
  copy); FSDP keeps 1/N after the reduce-scatter;
* optimizer state: AdamW's two moments per trainable parameter, fp32 (1/N under FSDP);
* activations: what autograd saves for the backward pass, per token and block, counted from
  this backbone's operations (RMSNorm, Q/K/V, rotary, attention, SwiGLU); with activation
  checkpointing only each block's input is kept, plus one block's worth while it is recomputed.
  The policy's own token, encoder and head modules are small beside a Llama and not counted.

:func:`measure_memory` counts the same four quantities on a real backbone on the CPU (the
tensors autograd saves, through saved-tensor hooks), which the tests compare with the plan.
:func:`measure_peak_memory` measures what those counts leave out: the peak resident memory a
fresh process grows by over real training steps (allocator overhead, temporaries, everything).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field

import torch

from icrt.models.backbones.llama import PROJECTIONS, LlamaBackbone, LlamaConfig

GB = 1024**3
# Backbone shapes of ICRT's pretrained models (Meta's params.json values).
PRESETS = {
    "llama2-7b": LlamaConfig(dim=4096, n_layers=32, n_heads=32, multiple_of=256),
    "llama2-13b": LlamaConfig(dim=5120, n_layers=40, n_heads=40, multiple_of=256),
}


@dataclass
class MemoryPlan:
    strategy: str
    gpus: int
    params_total: int
    params_trainable: int
    bytes: dict[str, float] = field(default_factory=dict)  # per device

    @property
    def total_bytes(self) -> float:
        return sum(self.bytes.values())

    @property
    def total_gb(self) -> float:
        return self.total_bytes / GB

    def fits(self, gpu_memory_gb: float, headroom: float = 0.9) -> bool:
        """Whether the plan fits a device, keeping 10% for the CUDA context and
        fragmentation."""
        return self.total_gb <= gpu_memory_gb * headroom


def _backbone(cfg: LlamaConfig, lora_rank: int | None, lora_targets: tuple[str, ...],
              device: str | torch.device = "meta", checkpointing: bool = False) -> LlamaBackbone:
    from icrt.models.backbones.pretrained import apply_lora

    with torch.device(device):
        model = LlamaBackbone(cfg, gradient_checkpointing=checkpointing)
    if lora_rank:
        apply_lora(model, lora_rank, targets=lora_targets)
    return model


def activation_elements(cfg: LlamaConfig, frozen: bool = False,
                        lora_targets: tuple[str, ...] = ()) -> tuple[int, int]:
    """Elements autograd saves per token and block, (fp32, compute dtype): counted from the
    block's operations. A frozen (LoRA) base does not keep the inputs of projections that
    carry no adapter, since no weight gradient needs them."""
    from icrt.models.backbones.pretrained import _HF_PROJ

    d, h, kv = cfg.dim, cfg.ffn_hidden_dim, cfg.kv_heads * cfg.head_dim
    targets = {_HF_PROJ.get(t, t) for t in lora_targets}
    keeps = (lambda *names: True) if not frozen else (lambda *names: bool(targets & set(names)))
    # two RMSNorms: input, 1/rms, normalised; attention's log-sum-exp per head
    fp32 = 2 * (2 * d + 1) + cfg.n_heads
    compute = (
        d + 2 * kv  # q, k, v as attention saves them
        + d  # attention output (= input of wo)
        + 3 * h  # w1 and w3 outputs, silu(w1)
        + (d if keeps("wq", "wk", "wv") else 0)  # normed input of wq/wk/wv
        + (d if keeps("w1", "w3") else 0)  # normed input of w1/w3
        + (h if keeps("w2") else 0)  # silu(w1) * w3, the input of w2
    )  # (an adapter's rank-sized hidden output is negligible and not counted)
    return fp32, compute


def plan_memory(
    cfg: LlamaConfig,
    strategy: str = "ddp",
    gpus: int = 1,
    batch_size: int = 1,
    tokens: int = 1024,
    precision: str = "bf16-mixed",
    lora_rank: int | None = None,
    lora_targets: tuple[str, ...] = PROJECTIONS,
    activation_checkpointing: bool = False,
) -> MemoryPlan:
    """Bytes per device of training ``cfg``'s backbone with AdamW (see the module docstring).
    ``tokens`` counts backbone tokens per sequence (two per step: state and action)."""
    if strategy not in ("ddp", "fsdp"):
        raise ValueError(f"strategy must be ddp or fsdp, not {strategy!r}")
    model = _backbone(cfg, lora_rank, lora_targets)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    shard = gpus if strategy == "fsdp" else 1
    compute_bytes = 2 if precision in ("bf16-mixed", "16-mixed") else 4
    plan = MemoryPlan(strategy, gpus, total, trainable)
    plan.bytes["parameters"] = 4 * total / shard
    if strategy == "fsdp":  # the gathered block in compute, and the next one prefetched
        block = sum(p.numel() for p in model.layers[0].parameters())
        plan.bytes["parameters"] += 2 * block * compute_bytes
    plan.bytes["gradients"] = 4 * trainable / shard * (2 if strategy == "ddp" and gpus > 1 else 1)
    plan.bytes["optimizer"] = 8 * trainable / shard
    fp32, compute = activation_elements(cfg, frozen=bool(lora_rank), lora_targets=lora_targets)
    per_block = batch_size * tokens * (4 * fp32 + compute_bytes * compute)
    # the final RMSNorm's input and normalised output, and the rotary table (kept once)
    final_norm = batch_size * tokens * (2 * cfg.dim + 1) * 4 + cfg.max_seq_len * cfg.head_dim * 4
    if activation_checkpointing:  # block inputs kept; one block recomputed at a time
        plan.bytes["activations"] = (batch_size * tokens * cfg.dim * 4 * cfg.n_layers
                                     + final_norm)
        plan.bytes["recompute"] = per_block
    else:
        plan.bytes["activations"] = per_block * cfg.n_layers + final_norm
    return plan


def measure_memory(cfg: LlamaConfig, batch_size: int, tokens: int,
                   lora_rank: int | None = None, activation_checkpointing: bool = False,
                   lora_targets: tuple[str, ...] = PROJECTIONS) -> dict[str, int]:
    """The same quantities counted on a real fp32 backbone on the CPU: parameter, gradient and
    AdamW-state bytes after one step, and the bytes of the tensors autograd saved during the
    forward pass (distinct storages, parameters excluded)."""
    torch.manual_seed(0)
    model = _backbone(cfg, lora_rank, lora_targets, device="cpu",
                      checkpointing=activation_checkpointing).train()
    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in param_ptrs:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    x = torch.randn(batch_size, tokens, cfg.dim)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(x).sum()  # saves nothing itself
    loss.backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable)
    opt.step()
    state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                if torch.is_tensor(t) and t.dim() > 0)
    return {
        "parameters": sum(p.numel() * p.element_size() for p in model.parameters()),
        "gradients": sum(p.grad.numel() * p.grad.element_size() for p in trainable),
        "optimizer": state,
        "activations": sum(saved.values()),
    }


def measure_peak_memory(cfg: LlamaConfig, batch_size: int, tokens: int,
                        lora_rank: int | None = None, activation_checkpointing: bool = False,
                        lora_targets: tuple[str, ...] = PROJECTIONS) -> int:
    """Bytes by which a fresh process's peak resident memory grows over two fp32 training
    steps (forward, backward, AdamW step, ``zero_grad``) of ``cfg``'s backbone on the CPU,
    the figure :func:`plan_memory` (precision ``32-true``, one device) plans.

    Two steps, because from the second one on AdamW's moments exist during the forward and
    backward pass, as in every later step. Measured in a subprocess, so nothing this process
    allocated before hides the peak: its resident memory is read just before the backbone is
    built (after a warm-up step of a one-block, 64-wide backbone of the same kind has loaded
    the kernels and started the threads), and subtracted from the high-water mark the
    process reports (``VmHWM``) after the steps. The growth covers everything the steps
    allocate: parameters, gradients, optimizer state, the tensors autograd saves, but also
    temporaries (gradients flowing back, attention workspaces) and what the allocator keeps
    (glibc holds freed blocks below its adaptive mmap threshold resident), which the plan
    leaves out; and
    the plan adds activations and gradients although the backward pass frees the first as it
    allocates the second. Linux only (reads ``/proc/self/statm`` and ``/proc/self/status``)."""
    if not sys.platform.startswith("linux"):
        raise RuntimeError("measure_peak_memory reads /proc/self/statm and runs on Linux only.")
    args = {"cfg": dataclasses.asdict(cfg), "batch_size": batch_size, "tokens": tokens,
            "lora_rank": lora_rank, "activation_checkpointing": activation_checkpointing,
            "lora_targets": list(lora_targets)}
    code = ("import json, sys; from icrt.train.memory import _peak_growth; "
            "print(json.dumps(_peak_growth(**json.loads(sys.argv[1]))))")
    out = subprocess.run([sys.executable, "-c", code, json.dumps(args)], capture_output=True,
                         text=True)
    if out.returncode != 0:
        raise RuntimeError(f"measuring peak memory failed:\n{out.stderr[-2000:]}")
    return int(json.loads(out.stdout.strip().splitlines()[-1]))


def _train_steps(cfg: LlamaConfig, batch_size: int, tokens: int, lora_rank: int | None,
                 lora_targets: tuple[str, ...], checkpointing: bool, steps: int = 2) -> None:
    model = _backbone(cfg, lora_rank, lora_targets, device="cpu",
                      checkpointing=checkpointing).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    x = torch.randn(batch_size, tokens, cfg.dim)  # (B, T, D)
    for _ in range(steps):
        model(x).sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    """This process's resident-memory high-water mark (``VmHWM``). Unlike ``getrusage``'s
    ``ru_maxrss``, which a child inherits from a larger parent across fork and exec, it
    starts afresh with the process's own address space."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    raise RuntimeError("/proc/self/status has no VmHWM line.")


def _peak_growth(cfg: dict, batch_size: int, tokens: int, lora_rank: int | None,
                 activation_checkpointing: bool, lora_targets: list[str]) -> int:
    """The body of :func:`measure_peak_memory`, run in its fresh process."""
    import gc

    shape = LlamaConfig(**{**cfg, "bias_projections": tuple(cfg["bias_projections"])})
    torch.manual_seed(0)
    warm = dataclasses.replace(shape, dim=64, n_layers=1, n_heads=4, n_kv_heads=None,
                               intermediate_size=None, multiple_of=32)
    _train_steps(warm, batch_size, 8, lora_rank, tuple(lora_targets), activation_checkpointing)
    gc.collect()
    before = _rss_bytes()
    high_before = _peak_rss_bytes()
    _train_steps(shape, batch_size, tokens, lora_rank, tuple(lora_targets),
                 activation_checkpointing)
    high = _peak_rss_bytes()
    if high <= high_before:
        raise RuntimeError(f"the steps did not raise the process's peak memory ({high} bytes "
                           f"before and after); the shape is too small to measure.")
    return high - before
