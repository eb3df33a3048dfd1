"""Speed benchmarks of icrt's building blocks against baselines measured in the same run.

Each function returns a list of result rows (plain dicts) so scripts can print them as a
table or dump them as JSON.

Backbone shapes are named like ``scripts/benchmark.py memory`` names them (:func:`load_shape`):
a Meta ``params.json``, a Hugging Face ``config.json`` or its directory, or a preset of
``icrt.train.memory.PRESETS`` (``llama2-7b``, ``llama2-13b``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch

if TYPE_CHECKING:
    from icrt.models.backbones.llama import LlamaConfig

Precision = Literal["32-true", "bf16-mixed"]

# ------------------------------------------------------------------------------- shapes


def load_shape(name: str, max_seq_len: int) -> LlamaConfig:
    """The backbone shape called ``name``: a preset (``llama2-7b``, ``llama2-13b``), a Hugging
    Face ``config.json`` or its directory, or a Meta ``params.json``."""
    from icrt.config import source_path
    from icrt.models.backbones.llama import LlamaConfig
    from icrt.models.backbones.pretrained import read_hf_llama_config
    from icrt.train.memory import PRESETS

    if name in PRESETS:
        return dataclasses.replace(PRESETS[name], max_seq_len=max_seq_len)
    path = source_path(name)
    path = path / "config.json" if path.is_dir() else path
    if path.name == "config.json":
        return read_hf_llama_config(path, max_seq_len)
    return LlamaConfig.from_json(path, max_seq_len)


def shape_label(name: str) -> str:
    """``tiny`` for ``config/model_config/tiny.json``; a preset's own name."""
    path = Path(name)
    return path.parent.name if path.name == "config.json" else path.name.removesuffix(".json")


def _params_json(shape: LlamaConfig) -> str:
    """``shape`` as a Meta ``params.json`` (what ``PolicyConfig.scratch_llama_config`` reads)."""
    fields = dataclasses.asdict(shape)
    return json.dumps({k: v for k, v in fields.items() if k != "max_seq_len" and v is not None})


@contextlib.contextmanager
def _built_as(device: torch.device, dtype: torch.dtype):
    """New modules' parameters are created on ``device`` in ``dtype``: a 7B model is never
    materialised on the CPU or in fp32 on its way to a GPU in bf16."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            yield
    finally:
        torch.set_default_dtype(old)


def _sync(device: torch.device) -> None:
    """Wait for queued GPU work, so the clock reads finished work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------- training


# Peak dense (no 2:4 sparsity) FLOP/s from the vendors' datasheets, by substrings of
# ``torch.cuda.get_device_name()`` (all must occur; first match wins, so the specific rows come
# first): bf16 tensor cores (fp32 accumulate), TF32 tensor cores (fp32 matmuls when torch allows
# TF32) and plain fp32 (CUDA cores: torch's default for fp32 matmuls).
PEAK_FLOPS: tuple[tuple[tuple[str, ...], dict[str, float]], ...] = (
    (("H100", "NVL"), {"bf16": 835e12, "tf32": 417.5e12, "fp32": 60e12}),
    (("H100", "PCIe"), {"bf16": 756e12, "tf32": 378e12, "fp32": 51e12}),
    (("H100",), {"bf16": 989e12, "tf32": 494.5e12, "fp32": 67e12}),  # SXM: "H100 80GB HBM3"
    (("H200", "NVL"), {"bf16": 835e12, "tf32": 417.5e12, "fp32": 60e12}),
    (("H200",), {"bf16": 989e12, "tf32": 494.5e12, "fp32": 67e12}),
    (("A100",), {"bf16": 312e12, "tf32": 156e12, "fp32": 19.5e12}),
    (("L40S",), {"bf16": 362e12, "tf32": 183e12, "fp32": 91.6e12}),
    (("RTX 4090",), {"bf16": 165e12, "tf32": 82.6e12, "fp32": 82.6e12}),
)


def peak_flops(device_name: str, number_format: Literal["bf16", "tf32", "fp32"]) -> float | None:
    """The datasheet peak of the GPU called ``device_name`` in ``number_format``; None for a
    GPU not in :data:`PEAK_FLOPS`."""
    name = device_name.lower()
    for keys, peaks in PEAK_FLOPS:
        if all(k.lower() in name for k in keys):
            return peaks[number_format]
    return None


def device_peak_flops(device: torch.device, precision: Precision,
                      peak_tflops: float | None = None) -> tuple[float | None, str | None]:
    """(peak FLOP/s, note): ``peak_tflops`` when given, else the table's number for this GPU
    and precision (fp32 counts TF32 when torch's fp32 matmul precision allows it); on the CPU
    or an unknown GPU, (None, a note saying why MFU is left empty)."""
    if peak_tflops:
        return peak_tflops * 1e12, None
    if device.type != "cuda":
        return None, (f"MFU left empty: no peak FLOP/s is known for {device.type}; pass "
                      f"--peak-tflops.")
    if precision == "bf16-mixed":
        number_format = "bf16"
    else:
        number_format = "fp32" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    name = torch.cuda.get_device_name(device)
    peak = peak_flops(name, number_format)
    note = None if peak else (f"MFU left empty: {name} is not in the peak FLOP/s table; pass "
                              f"--peak-tflops.")
    return peak, note


def train_flops_per_token(n_params: int, n_layers: int, dim: int, seq_len: int) -> int:
    """Model FLOPs of one token's forward+backward: ``6 * N + 12 * n_layers * dim * seq_len``.

    ``N`` counts the parameters that multiply every token (the backbone has no embedding
    table); forward is 2 FLOPs per parameter and backward twice that. The second term is
    attention's scores and weighted values (each ``2 * seq_len * dim`` FLOPs per token and
    layer forward, times 3 with backward) over the whole ``seq_len x seq_len`` matrix, as
    PaLM's MFU counts it, although a causal kernel can skip the masked half.
    """
    return 6 * n_params + 12 * n_layers * dim * seq_len


def benchmark_backbone_train(
    config: str,
    batch_size: int,
    seq_len: int,
    steps: int,
    warmup: int,
    device: str = "cpu",
    precision: Precision = "32-true",
    n_layers: int = 0,
    peak_tflops: float | None = None,
) -> list[dict]:
    """Time forward+backward of our LlamaBackbone against ``transformers.LlamaModel``.

    Both models get the same shape (``config``, see :func:`load_shape`; ``n_layers`` > 0
    replaces its depth), the same random ``(batch_size, seq_len, dim)`` input embeddings and
    the loss ``out.float().pow(2).mean()``. ``precision`` 32-true: fp32 weights and compute;
    bf16-mixed: bf16 weights (built in bf16 on ``device``, as FSDP's mixed-precision policy
    computes) under bf16 autocast. Timed steps alternate between the two models so that
    drifting machine load (thermal throttling, other jobs) hits both equally; on CUDA the
    clock is read after ``torch.cuda.synchronize``.

    Returns one row per model with ``ms_per_step`` (median), ``tokens_per_s``,
    ``relative_speed`` (tokens/s relative to transformers), ``flops_per_token``
    (:func:`train_flops_per_token`), ``tflops`` achieved and ``mfu`` = achieved / the peak of
    :func:`device_peak_flops` (None, with ``mfu_note``, when no peak is known).
    """
    from transformers import LlamaModel

    from icrt.models.backbones.llama import LlamaBackbone
    from icrt.models.backbones.pretrained import hf_llama_config

    if steps < 1 or warmup < 0 or batch_size < 1 or seq_len < 1 or n_layers < 0:
        raise ValueError("steps, batch_size and seq_len must be >= 1 and warmup, n_layers >= 0.")
    cfg = load_shape(config, seq_len)
    if n_layers:
        cfg = dataclasses.replace(cfg, n_layers=n_layers)
    dev = torch.device(device)
    bf16 = precision == "bf16-mixed"
    dtype = torch.bfloat16 if bf16 else torch.float32
    torch.manual_seed(0)
    with _built_as(dev, dtype):
        ours = LlamaBackbone(cfg).train()
        theirs = LlamaModel(hf_llama_config(cfg, use_cache=False)).train()
    x = torch.randn(batch_size, seq_len, cfg.dim, device=dev, dtype=dtype)

    def run_ours() -> None:
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            out = ours(x)
        out.float().pow(2).mean().backward()

    def run_theirs() -> None:
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            out = theirs(inputs_embeds=x, use_cache=False).last_hidden_state
        out.float().pow(2).mean().backward()

    def timed(model: torch.nn.Module, fn: object) -> float:
        model.zero_grad(set_to_none=True)
        _sync(dev)
        t0 = time.perf_counter()
        fn()  # type: ignore[operator]
        _sync(dev)
        return time.perf_counter() - t0

    runs = {"icrt": (ours, run_ours), "transformers": (theirs, run_theirs)}
    for _ in range(warmup):
        for model, fn in runs.values():
            timed(model, fn)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for i in range(steps):
        # Alternate which model goes first too, so neither always follows the other.
        order = list(runs) if i % 2 == 0 else list(reversed(runs))
        for name in order:
            times[name].append(timed(*runs[name]))

    peak, note = device_peak_flops(dev, precision, peak_tflops)
    tokens = batch_size * seq_len
    rows = []
    for name, (model, _) in runs.items():
        sec = statistics.median(times[name])
        # transformers' 8-row token embedding is unused (inputs_embeds) and not counted.
        params = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)
        flops = train_flops_per_token(params, cfg.n_layers, cfg.dim, seq_len)
        row = {
            "config": shape_label(config),
            "model": name,
            "params": params,
            "layers": cfg.n_layers,
            "batch_size": batch_size,
            "seq_len": seq_len,
            "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else str(dev),
            "precision": precision,
            "ms_per_step": 1000.0 * sec,
            "tokens_per_s": tokens / sec,
            "flops_per_token": flops,
            "tflops": flops * tokens / sec / 1e12,
            "peak_tflops": None if peak is None else peak / 1e12,
            "mfu": None if peak is None else flops * tokens / sec / peak,
        }
        if note:
            row["mfu_note"] = note
        rows.append(row)
    ref = rows[1]["tokens_per_s"]
    for row in rows:
        row["relative_speed"] = row["tokens_per_s"] / ref
    return rows


def benchmark_lora_vs_full(n_layers: int = 4, batch_size: int = 1, seq_len: int = 256,
                           steps: int = 4, rank: int = 16) -> list[dict]:
    """One AdamW training step (forward, backward, optimizer) of a TinyLlama-shaped backbone
    (width 2048, 32 heads, 4 KV heads, SwiGLU 5632; ``n_layers`` of its 22 layers so it fits
    this machine) fully fine-tuned vs with LoRA on every projection, alternating, same input."""
    from icrt.models.backbones.llama import LlamaBackbone, LlamaConfig
    from icrt.models.backbones.pretrained import apply_lora

    cfg = LlamaConfig(dim=2048, n_layers=n_layers, n_heads=32, n_kv_heads=4,
                      intermediate_size=5632, max_seq_len=seq_len)
    torch.manual_seed(0)
    full = LlamaBackbone(cfg).train()
    lora = LlamaBackbone(cfg).train()
    lora.load_state_dict(full.state_dict())
    apply_lora(lora, rank, alpha=2 * rank,
               targets=("wq", "wk", "wv", "wo", "w1", "w2", "w3"))
    x = torch.randn(batch_size, seq_len, cfg.dim)
    rows = []
    models = {"full fine-tune": full, f"LoRA r{rank} (all projections)": lora}
    opts = {n: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-5)
            for n, m in models.items()}
    times: dict[str, list[float]] = {n: [] for n in models}
    for i in range(steps + 1):
        for name, model in models.items():
            t0 = time.perf_counter()
            model(x).float().pow(2).mean().backward()
            opts[name].step()
            opts[name].zero_grad(set_to_none=True)
            if i:  # the first step allocates optimizer state
                times[name].append(time.perf_counter() - t0)
    for name, model in models.items():
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        rows.append({"training": name, "layers": f"{n_layers} of 22",
                     "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
                     "trainable_m": trainable / 1e6,
                     "s_per_step": statistics.median(times[name])})
    for r in rows:
        r["speedup"] = rows[0]["s_per_step"] / r["s_per_step"]
    return rows


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def benchmark_fsdp_vs_ddp(
    config: str,
    batch_size: int = 2,
    seq_len: int = 128,
    steps: int = 3,
    warmup: int = 1,
    n_layers: int = 0,
    precision: Precision = "32-true",
    ranks: int = 2,
) -> list[dict]:
    """Training step time of the backbone of ``config`` under DDP vs FSDP2, on ``ranks`` gloo
    ranks of one thread each (``torch.distributed.run`` in a subprocess running
    ``benchmarks/fsdp_worker.py``).

    Each rank feeds ``batch_size`` random ``(seq_len, dim)`` sequences (128 tokens = a 64-step
    training window) through forward, backward and AdamW; FSDP shards each block as
    ``icrt.train.loop._shard`` does. After ``warmup`` steps (optimizer state allocated),
    ``steps`` timed steps alternate between the strategies, each between barriers, so a step
    lasts as long as its slowest rank. One row per strategy: ``ms_per_step`` (median),
    ``samples_per_s`` over all ranks and ``vs_ddp`` (samples/s relative to DDP).
    """
    shape = load_shape(config, seq_len)
    if n_layers:
        shape = dataclasses.replace(shape, n_layers=n_layers)
    with tempfile.TemporaryDirectory() as tmp:
        params, out = Path(tmp) / "params.json", Path(tmp) / "result.json"
        params.write_text(_params_json(shape))
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}",
               "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
               str(Path(__file__).with_name("fsdp_worker.py")), "--shape", str(params),
               "--batch-size", str(batch_size), "--seq-len", str(seq_len), "--steps", str(steps),
               "--warmup", str(warmup), "--precision", precision, "--out", str(out)]
        result = subprocess.run(cmd, capture_output=True, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        if result.returncode:
            raise RuntimeError(f"The FSDP/DDP benchmark's ranks failed (exit "
                               f"{result.returncode}):\n{result.stderr[-3000:]}")
        seconds = json.loads(out.read_text())
    rows = [{"config": shape_label(config), "layers": shape.n_layers, "strategy": strategy,
             "ranks": ranks, "batch_per_rank": batch_size, "seq_len": seq_len,
             "precision": precision, "ms_per_step": 1000.0 * sec,
             "samples_per_s": ranks * batch_size / sec} for strategy, sec in seconds.items()]
    for r in rows:
        r["vs_ddp"] = r["samples_per_s"] / rows[0]["samples_per_s"]
    return rows


# ------------------------------------------------------------------------------- inference


def _random_policy(config: str, max_timesteps: int, proprio_dim: int, action_dim: int,
                   num_pred_steps: int, device: str = "cpu", n_layers: int = 0):
    """An InContextPolicy with random weights and identity normalisation (no files needed),
    built on ``device``; ``config`` is a shape name (:func:`load_shape`), ``n_layers`` > 0
    replaces its depth."""
    from icrt.config import ExperimentConfig, ModelConfig, PolicyConfig, source_path
    from icrt.data.transforms import Normalizer, identity_stats
    from icrt.eval.inference import InContextPolicy
    from icrt.models.policy import ICRTPolicy, PolicySpec
    from icrt.train.checkpoint import Checkpoint

    spec = PolicySpec(proprio_dim=proprio_dim, action_dim=action_dim,
                      num_pred_steps=num_pred_steps, max_timesteps=max_timesteps,
                      proprio_keys=("state",), action_keys=("action",))
    path = source_path(config)
    with tempfile.TemporaryDirectory() as tmp:
        if n_layers or not path.is_file() or path.name == "config.json":
            # a preset, a Hugging Face config or a shallower copy, as the params.json that
            # scratch_llama_config reads (only while the model is built)
            shape = load_shape(config, 2 * max_timesteps)
            shape = dataclasses.replace(shape, n_layers=n_layers or shape.n_layers)
            config = str(Path(tmp) / "params.json")
            Path(config).write_text(_params_json(shape))
        policy_cfg = PolicyConfig(scratch_llama_config=config)
        cfg = ExperimentConfig(model_cfg=ModelConfig(policy_cfg=policy_cfg))
        torch.manual_seed(0)
        with torch.device(device):  # a 7B backbone never passes through the CPU
            model = ICRTPolicy(cfg.model_cfg, spec)
    normalizer = Normalizer(
        stats={"proprio": identity_stats(proprio_dim), "action": identity_stats(action_dim)},
        modes={"proprio": "none", "action": "none"},
    )
    ckpt = Checkpoint(Path("<in memory>"), cfg, spec, normalizer)
    rng = np.random.default_rng(0)

    def make(use_cache: bool, dtype: str = "float32", compile: bool = False) -> InContextPolicy:
        return InContextPolicy(model, ckpt, device, use_cache=use_cache, deterministic=True,
                               dtype=dtype, compile=compile)

    def demo(steps: int) -> dict:
        return {"state": rng.normal(size=(steps, proprio_dim)).astype("float32"),
                "action": rng.uniform(-1, 1, size=(steps, action_dim)).astype("float32")}

    return make, demo, model, ckpt


def memory_bandwidth(gb: float = 1.0, repeats: int = 5, device: str = "cpu") -> float:
    """Read bandwidth of ``device`` in GB/s (on the CPU with the current torch threads): the
    best of ``repeats`` sums over a float32 buffer of ``gb`` GB (far larger than the caches),
    i.e. a streaming read."""
    dev = torch.device(device)
    x = torch.ones(int(gb * 1e9) // 4, device=dev)
    x.sum()
    best = float("inf")
    for _ in range(repeats):
        _sync(dev)
        t0 = time.perf_counter()
        x.sum()
        _sync(dev)
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best / 1e9


def _act_ms(policy, prompt: dict, obs: np.ndarray, steps: int) -> float:
    """Median latency of ``policy.act`` in ms after a prompt, 2 warm-up steps excluded."""
    policy.prompt([prompt])
    for t in range(2):
        policy.act({"state": obs[t]})
    policy.reset()
    times = []
    for t in range(steps):
        _sync(policy.device)
        t0 = time.perf_counter()
        policy.act({"state": obs[t]})
        _sync(policy.device)
        times.append(time.perf_counter() - t0)
    return 1000.0 * float(np.median(times))


def _training_backbone_policy(make):
    """An InContextPolicy decoding through the training backbone and its per-layer KVCache
    (how ``act`` decoded before the Decoder): the baseline row."""
    policy = make(True, "float32")
    backbone = policy.model.backbone

    class _Baseline:
        def __init__(self):
            self.cache = backbone.new_cache(1, policy.max_tokens)

        def stale(self):
            return False

        def reset(self):
            self.cache.reset()

        @property
        def length(self):
            return self.cache.length

        def __call__(self, x):
            return backbone(x, cache=self.cache)

    policy._decoder = _Baseline()
    return policy


def benchmark_inference(
    config_path: str,
    prompt_tokens: int,
    steps: int = 30,
    recompute_steps: int = 3,
    proprio_dim: int = 39,
    action_dim: int = 4,
    num_pred_steps: int = 4,
    bandwidth: float | None = None,
    threads: tuple[int, ...] = (),
    compile: bool = True,
    device: str = "cpu",
    n_layers: int = 0,
) -> list[dict]:
    """Latency of ``InContextPolicy.act`` after a ``prompt_tokens``-token prompt, one row per
    decoding path: full recompute (left out when ``recompute_steps`` is 0), the training
    backbone with its KV cache (the baseline), and the Decoder (fused projections, static
    cache) with float32, bfloat16 and int8 weights, each eager and (``compile``) with
    torch.compile'd steps (compile time excluded: the warm-up steps pay it); ``threads``: on
    the CPU, the eager Decoder rows again with these torch thread counts.

    The random policy of shape ``config_path`` (:func:`load_shape`; ``n_layers`` > 0 replaces
    its depth) is built and run on ``device``; on CUDA the clock is read after
    ``torch.cuda.synchronize``.

    ``floor_ms`` is the bytes a step must read -- the backbone's weights plus the cached keys
    and values -- divided by the read ``bandwidth`` (GB/s) of ``device`` measured in the same
    run with the same threads; ``vs_floor`` is each row's multiple of it.
    """
    from icrt.models.backbones.decode import Decoder

    prompt_steps = prompt_tokens // 2
    make, demo, model, _ = _random_policy(config_path, prompt_steps + steps + 8, proprio_dim,
                                          action_dim, num_pred_steps, device, n_layers)
    prompt = demo(prompt_steps)
    obs = demo(steps)["state"]
    own_threads = torch.get_num_threads()
    if torch.device(device).type != "cpu":
        threads = ()  # torch's threads do not drive a GPU
    base = {"config": shape_label(config_path), "device": device,
            "params_m": sum(p.numel() for p in model.backbone.parameters()) / 1e6,
            "prompt_tokens": prompt_tokens}
    context = prompt_tokens + 2  # tokens attended to by a step's queries
    fp32_bytes = sum(p.numel() * 4 for p in model.backbone.parameters())
    rows = []

    def row(name: str, ms: float, weight_bytes: int, kv_bytes: int, n_threads: int,
            bw: float) -> None:
        floor = (weight_bytes + kv_bytes) / (bw * 1e9) * 1000.0
        rows.append({**base, "path": name, "threads": n_threads, "ms": ms, "hz": 1000.0 / ms,
                     "read_mb": (weight_bytes + kv_bytes) / 1e6, "bandwidth_gbs": bw,
                     "floor_ms": floor, "vs_floor": ms / floor})

    bw = bandwidth or memory_bandwidth(device=device)
    kv32 = 2 * model.backbone.config.n_layers * model.backbone.config.kv_heads * \
        model.backbone.config.head_dim * context * 4
    if recompute_steps:
        # recompute reads the weights once but attends over the whole context for every token
        row("recompute (fp32)", _act_ms(make(False, "float32"), prompt, obs, recompute_steps),
            fp32_bytes, kv32, own_threads, bw)
    row("KV cache, training backbone (fp32)", _act_ms(_training_backbone_policy(make), prompt,
                                                      obs, steps), fp32_bytes, kv32,
        own_threads, bw)
    for n_threads in (own_threads, *threads):
        torch.set_num_threads(n_threads)
        bw_t = bw if n_threads == own_threads else memory_bandwidth()
        for dtype in ("float32", "bfloat16", "int8"):
            for compiled in (False, True) if compile and n_threads == own_threads else (False,):
                policy = make(True, dtype, compiled)
                ms = _act_ms(policy, prompt, obs, steps)
                dec: Decoder = policy._decoder
                row(f"Decoder {dtype}" + (" + compile" if compiled else ""), ms,
                    dec.weight_bytes, dec.kv_bytes(context), n_threads, bw_t)
    torch.set_num_threads(own_threads)
    return rows


def benchmark_batched_inference(
    config_path: str,
    rows: int,
    prompt_tokens: int = 512,
    steps: int = 20,
    proprio_dim: int = 39,
    action_dim: int = 4,
    num_pred_steps: int = 4,
    device: str = "cpu",
) -> dict:
    """Steps/s of ``rows`` episodes acting through one ``BatchedInContextPolicy`` vs ``rows``
    separate ``InContextPolicy`` objects stepped one after another (same process, fp32,
    prompts of different lengths around ``prompt_tokens``)."""
    from icrt.eval.inference import BatchedInContextPolicy

    prompt_steps = prompt_tokens // 2
    make, demo, model, ckpt = _random_policy(config_path, prompt_steps + steps + 16, proprio_dim,
                                             action_dim, num_pred_steps, device)
    prompts = [demo(prompt_steps - 8 * i % 64) for i in range(rows)]
    obs = demo(steps + 2)["state"]
    singles = [make(True) for _ in range(rows)]
    batch = BatchedInContextPolicy(model, ckpt, rows, device, deterministic=True)
    for i in range(rows):
        singles[i].prompt([prompts[i]])
        batch.prompt(i, [prompts[i]])
    batch.act([{"state": obs[0]}] * rows)  # warm-up (and the prefill)
    for p in singles:
        p.act({"state": obs[0]})

    dev = torch.device(device)

    def timed(fn) -> float:
        times = []
        for t in range(1, steps + 1):
            _sync(dev)
            t0 = time.perf_counter()
            fn(t)
            _sync(dev)
            times.append(time.perf_counter() - t0)
        return float(np.median(times))

    one_by_one = timed(lambda t: [p.act({"state": obs[t]}) for p in singles])
    batched = timed(lambda t: batch.act([{"state": obs[t]}] * rows))
    return {"config": config_path, "rows": rows, "device": device,
            "one_by_one_ms": 1000.0 * one_by_one, "batched_ms": 1000.0 * batched,
            "episode_steps_per_s": rows / batched, "speedup": one_by_one / batched}


# ------------------------------------------------------------------------------- data loading


def _camera_frames(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """Camera-like frames: smooth colour fields plus sensor noise (zstd cannot compress them)."""
    y, x = np.mgrid[0:size, 0:size] / size
    base = np.stack([x, y, (x + y) / 2], -1)[None]  # (1, H, W, 3)
    phase = rng.uniform(0, 1, size=(n, 1, 1, 3))
    noise = rng.normal(0, 0.03, size=(n, size, size, 3))
    return (255 * np.clip(0.5 + 0.5 * np.sin(6 * (base + phase)) + noise, 0, 1)).astype(np.uint8)


def _rendered_episodes(episodes: int, steps: int, size: int) -> list[dict[str, np.ndarray]]:
    """Simulator frames: Meta-World pick-place demonstrations by its scripted expert, rendered
    (software MuJoCo) from the corner camera and the gripper camera."""
    import os

    os.environ.setdefault("MUJOCO_GL", "egl")
    from icrt.envs.metaworld import MetaWorldEnv, make_metaworld_expert

    env = MetaWorldEnv("pick-place-v3", image_size=size, cameras=("corner", "gripperPOV"))
    expert = make_metaworld_expert("pick-place-v3")
    out = []
    for e in range(episodes):
        obs = env.reset(seed=e)
        frames: dict[str, list] = {"corner": [], "gripperPOV": []}
        for _ in range(steps):
            for c in frames:
                frames[c].append(obs[f"image_{c}"])
            obs, *_ = env.step(expert.act(env, obs))
        out.append({c: np.stack(v) for c, v in frames.items()})
    env.close()
    return out


def drop_page_cache(*paths) -> None:
    """Evict files (or every file under folders) from the OS page cache, so the next read
    comes from the disk (``posix_fadvise(DONTNEED)``; needs no root)."""
    import os
    from pathlib import Path

    for root in map(Path, paths):
        for f in [root] if root.is_file() else (f for f in root.rglob("*") if f.is_file()):
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)  # dirty pages cannot be dropped
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


class _HDF5Windows(torch.utils.data.Dataset):
    """ICRT's access pattern: each window read as one slice per trajectory per key from an
    uncompressed ICRT-layout HDF5 file, opened once per worker."""

    def __init__(self, path, windows: list, names: list[str], keys: tuple[str, ...]) -> None:
        self.path, self.windows, self.names, self.keys = path, windows, names, keys
        self.file = None

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        import h5py

        if self.file is None:
            self.file = h5py.File(self.path, "r")
        eps, ts = self.windows[i]
        change = np.flatnonzero(np.diff(eps) != 0) + 1
        parts: dict[str, list[np.ndarray]] = {k: [] for k in self.keys}
        for a, b in zip([0, *change], [*change, len(eps)], strict=True):
            g = self.file[self.names[eps[a]]]
            for k in self.keys:
                parts[k].append(np.asarray(g[k][ts[a] : ts[b - 1] + 1]))
        return {k: torch.from_numpy(np.concatenate(v)) for k, v in parts.items()}


def _loader_rate(dataset, workers: int, files: list, batch_size: int = 8,
                 collate_fn=None, repeats: int = 3) -> float:
    """Samples/s over ``dataset`` through a DataLoader: the median of ``repeats`` timed passes,
    each after the page cache was dropped (workers started and files opened in a first,
    untimed pass). The machine's speed drifts by +-25% from second to second; the median of
    several passes keeps one slow second from deciding a row."""
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, num_workers=workers, persistent_workers=workers > 0,
        prefetch_factor=4 if workers else None, collate_fn=collate_fn)
    for _ in loader:
        pass
    rates = []
    for _ in range(repeats):
        drop_page_cache(*files)
        t0 = time.perf_counter()
        n = sum(len(next(iter(b.values()))) for b in loader)
        rates.append(n / (time.perf_counter() - t0))
    return float(np.median(rates))


def benchmark_data(
    folder: str,
    episodes: int = 40,
    steps: int = 100,
    image_size: int = 84,
    seq_length: int = 64,
    samples: int = 400,
    workers: int = 2,
) -> list[dict]:
    """Out-of-core sequence loading (page cache dropped before every timed pass) vs ICRT's
    per-window slice reads of the same windows from an uncompressed ICRT-layout HDF5 file, for
    rendered simulator frames (Meta-World, reused across episodes) and camera-like frames
    (noisy, incompressible); plus the in-memory frame cache."""
    from pathlib import Path

    import h5py

    from icrt.config import DatasetConfig, SharedConfig
    from icrt.data.sequence import SequenceDataset, collate
    from icrt.data.spec import write_dataset_json
    from icrt.data.store import EpisodeStore

    def size_mb(p: Path) -> float:
        return (p.stat().st_size if p.is_file() else
                sum(f.stat().st_size for f in p.rglob("*") if f.is_file())) / 1e6

    cams = ("exterior_image_1_left", "wrist_image_left")
    h5_keys = ("observation/cartesian_position", "action/cartesian_position",
               *(f"observation/{c}" for c in cams))
    rows = []
    rendered = _rendered_episodes(min(episodes, 4), steps, image_size)
    for kind in ("simulator", "camera-like"):
        root = Path(folder) / kind
        root.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        store = EpisodeStore.create(root / "bench.zarr", overwrite=True)
        with h5py.File(root / "bench.hdf5", "w") as h5:
            for e in range(episodes):
                ep = {"proprio": rng.normal(size=(steps, 8)).astype(np.float32),
                      "action": rng.normal(size=(steps, 7)).astype(np.float32)}
                for c, sim_camera in zip(cams, ("corner", "gripperPOV"), strict=True):
                    ep[f"image_{c}"] = (rendered[e % len(rendered)][sim_camera]
                                        if kind == "simulator"
                                        else _camera_frames(rng, steps, image_size))
                store.add_episode(ep, task=f"task{e % 3}")
                g = h5.create_group(f"episode_{e}")
                g["observation/cartesian_position"] = ep["proprio"]
                g["action/cartesian_position"] = ep["action"]
                for c in cams:
                    g[f"observation/{c}"] = ep[f"image_{c}"]
        store.close()
        write_dataset_json(root / "bench.json", stores=[root / "bench.zarr"],
                           proprio_keys=["proprio"], action_keys=["action"],
                           image_keys=[f"image_{c}" for c in cams], train_split=1.0)
        shared = SharedConfig(seq_length=seq_length, num_pred_steps=4)
        cached = SequenceDataset(DatasetConfig(dataset_json=str(root / "bench.json")), shared)
        lazy = SequenceDataset(DatasetConfig(dataset_json=str(root / "bench.json"),
                                             image_cache_gb=0.0), shared)
        order = [int(i) for i in rng.permutation(len(lazy))[:samples]]
        plan = lazy._plan(0)
        windows = []
        for i in order:  # the same windows for every loader
            s = int(plan.starts[i * len(plan.starts) // len(lazy)])
            pos = np.arange(s, s + seq_length)
            occ = np.searchsorted(plan.occ_end, pos, side="right")
            windows.append((plan.occ_episode[occ], pos - plan.occ_start[occ]))
        h5 = _HDF5Windows(root / "bench.hdf5", windows,
                          [f"episode_{e.index}" for e in lazy.episodes], h5_keys)
        zarr_files, h5_files = [root / "bench.zarr"], [root / "bench.hdf5"]
        sub = torch.utils.data.Subset
        part = [
            ("icrt, frames in memory (image cache)", sub(cached, order), 0, zarr_files),
            ("icrt, out of core, 1 process", sub(lazy, order), 0, zarr_files),
            (f"icrt, out of core, {workers} DataLoader workers", sub(lazy, order), workers,
             zarr_files),
            ("HDF5 per-window slices (ICRT), 1 process", h5, 0, h5_files),
            (f"HDF5 per-window slices (ICRT), {workers} DataLoader workers", h5, workers,
             h5_files),
        ]
        for name, ds, w, files in part:
            icrt = files is zarr_files  # as training loads it (icrt.data.sequence.collate)
            rows.append({"frames": kind, "loader": name,
                         "samples_per_s": _loader_rate(ds, w, files,
                                                       collate_fn=collate if icrt else None),
                         "disk_mb": size_mb(files[0])})
        base = rows[-2]["samples_per_s"]
        for r in rows[-len(part):]:
            r["vs_hdf5_slices"] = r["samples_per_s"] / base
    return rows


def benchmark_data_memory(folder: str, gb: float = 10.0, image_size: int = 84,
                          seq_length: int = 64, samples: int = 2000, workers: int = 2) -> dict:
    """Loader memory (proportional set size of the process and its DataLoader workers,
    sampled every 0.2 s) while training windows stream from a store of ``gb`` GB on disk."""
    import shutil
    import threading
    from pathlib import Path

    import psutil

    from icrt.config import DatasetConfig, SharedConfig
    from icrt.data.sequence import SequenceDataset
    from icrt.data.spec import write_dataset_json
    from icrt.data.store import EpisodeStore

    root = Path(folder) / "big"
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    pool = _camera_frames(rng, 256, image_size)  # incompressible: disk bytes = frame bytes
    steps = 500
    per_episode = 2 * steps * pool[0].nbytes
    t0 = time.perf_counter()
    try:
        with EpisodeStore.create(root / "big.zarr") as store:
            for e in range(int(np.ceil(gb * 1e9 / per_episode))):
                store.add_episode({"proprio": rng.normal(size=(steps, 8)).astype(np.float32),
                                   "action": rng.normal(size=(steps, 7)).astype(np.float32),
                                   "image_a": pool[rng.integers(0, len(pool), steps)],
                                   "image_b": pool[rng.integers(0, len(pool), steps)]},
                                  task=f"task{e % 5}")
        write_seconds = time.perf_counter() - t0
        disk_gb = sum(f.stat().st_size for f in (root / "big.zarr").rglob("*")
                      if f.is_file()) / 1e9
        n_files = sum(1 for f in (root / "big.zarr").rglob("*") if f.is_file())
        write_dataset_json(root / "big.json", stores=[root / "big.zarr"],
                           proprio_keys=["proprio"], action_keys=["action"],
                           image_keys=["image_a", "image_b"], train_split=1.0)
        drop_page_cache(root / "big.zarr")
        ds = SequenceDataset(DatasetConfig(dataset_json=str(root / "big.json"),
                                           image_cache_gb=0.0),
                             SharedConfig(seq_length=seq_length, num_pred_steps=4))
        sampler = torch.utils.data.RandomSampler(ds, num_samples=samples,
                                                 generator=torch.Generator().manual_seed(0))
        loader = torch.utils.data.DataLoader(ds, batch_size=8, sampler=sampler,
                                             num_workers=workers, prefetch_factor=4)
        peak, done = 0.0, threading.Event()

        def watch() -> None:
            nonlocal peak
            me = psutil.Process()
            while not done.is_set():
                total = 0
                for p in [me, *me.children(recursive=True)]:
                    try:
                        total += p.memory_full_info().pss
                    except psutil.Error:
                        pass
                peak = max(peak, total / 1e9)
                time.sleep(0.2)

        thread = threading.Thread(target=watch, daemon=True)
        thread.start()
        t0 = time.perf_counter()
        n = sum(len(b["action"]) for b in loader)
        seconds = time.perf_counter() - t0
        done.set()
        thread.join()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {"store_gb": disk_gb, "files": n_files, "write_seconds": write_seconds,
            "samples": n, "samples_per_s": n / seconds, "workers": workers,
            "peak_loader_memory_gb": peak}


# ------------------------------------------------------------------------------- simulation


def _write_lerobot_v30(root, episodes: int, steps: int, frames: np.ndarray,
                       rng: np.random.Generator, fps: int = 20) -> None:
    """A LeRobot codebase-v3.0 dataset in its on-disk layout (as LeRobotDataset writes it):
    one parquet of steps, one of episodes, one of tasks, one AV1 mp4 per camera holding every
    episode one after another."""
    import json

    import av
    import pyarrow as pa
    import pyarrow.parquet as pq

    cams = ("front", "wrist")
    size = frames.shape[1]
    (root / "meta" / "episodes" / "chunk-000").mkdir(parents=True)
    (root / "data" / "chunk-000").mkdir(parents=True)
    for cam in cams:
        path = root / "videos" / f"observation.images.{cam}" / "chunk-000" / "file-000.mp4"
        path.parent.mkdir(parents=True)
        with av.open(str(path), "w") as out:
            stream = out.add_stream("libsvtav1", rate=fps)
            stream.width = stream.height = size
            stream.pix_fmt = "yuv420p"
            for _ in range(episodes):
                for frame in frames:
                    out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            out.mux(stream.encode())
    n = episodes * steps
    step = np.tile(np.arange(steps), episodes)
    pq.write_table(pa.table({
        "observation.state": list(rng.normal(size=(n, 8)).astype(np.float32)),
        "action": list(rng.normal(size=(n, 7)).astype(np.float32)),
        "timestamp": (step / fps).astype(np.float32), "frame_index": step,
        "episode_index": np.repeat(np.arange(episodes), steps), "index": np.arange(n),
        "task_index": np.zeros(n, np.int64)}), root / "data" / "chunk-000" / "file-000.parquet")
    columns = {"episode_index": np.arange(episodes), "tasks": [["pick the cube"]] * episodes,
               "length": np.full(episodes, steps), "data/chunk_index": np.zeros(episodes, int),
               "data/file_index": np.zeros(episodes, int),
               "dataset_from_index": np.arange(episodes) * steps,
               "dataset_to_index": (np.arange(episodes) + 1) * steps}
    for cam in cams:
        key = f"videos/observation.images.{cam}"
        columns.update({f"{key}/chunk_index": np.zeros(episodes, int),
                        f"{key}/file_index": np.zeros(episodes, int),
                        f"{key}/from_timestamp": np.arange(episodes) * steps / fps,
                        f"{key}/to_timestamp": (np.arange(episodes) + 1) * steps / fps})
    pq.write_table(pa.table(columns), root / "meta" / "episodes" / "chunk-000" / "file-000.parquet")
    pq.write_table(pa.table({"task_index": [0], "__index_level_0__": ["pick the cube"]}),
                   root / "meta" / "tasks.parquet")
    video = {"dtype": "video", "shape": [size, size, 3], "names": ["height", "width", "channels"],
             "info": {"video.fps": fps, "video.codec": "av1"}}
    (root / "meta" / "info.json").write_text(json.dumps({
        "codebase_version": "v3.0", "fps": fps, "total_episodes": episodes, "total_frames": n,
        "chunks_size": 1000, "splits": {"train": f"0:{episodes}"},
        "data_path": "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",
        "video_path": "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4",
        "features": {"observation.state": {"dtype": "float32", "shape": [8]},
                     "action": {"dtype": "float32", "shape": [7]},
                     **{f"observation.images.{c}": video for c in cams},
                     **{k: {"dtype": "int64", "shape": [1]} for k in
                        ("frame_index", "episode_index", "index", "task_index")},
                     "timestamp": {"dtype": "float32", "shape": [1]}}}))


def benchmark_convert(folder: str, episodes: int = 40, steps: int = 100,
                      image_size: int = 84) -> list[dict]:
    """Conversion throughput (episodes/min) of each ``scripts/convert.py`` format on files
    written in that format's layout: 2 cameras of ``image_size``, low-dim state and actions
    (LeRobot's as AV1 videos, decoded by the converter)."""
    import json
    from pathlib import Path

    import h5py

    from icrt.config import ConvertConfig
    from icrt.data.convert import convert

    root = Path(folder)
    rng = np.random.default_rng(0)
    frames = _camera_frames(rng, steps, image_size)
    with h5py.File(root / "robomimic.hdf5", "w") as f:
        data = f.create_group("data")
        data.attrs["env_args"] = json.dumps({"env_name": "Lift", "type": 1, "env_kwargs": {
            "robots": ["Panda"], "controller_configs": {"type": "OSC_POSE"}}})
        for i in range(episodes):
            g = data.create_group(f"demo_{i}")
            g.create_dataset("actions", data=rng.normal(size=(steps, 7)))
            g.create_dataset("rewards", data=np.r_[np.zeros(steps - 1), 1.0])
            o = g.create_group("obs")
            for key, dim in (("robot0_eef_pos", 3), ("robot0_eef_quat", 4),
                             ("robot0_gripper_qpos", 2), ("object", 10)):
                o.create_dataset(key, data=rng.normal(size=(steps, dim)))
            for cam in ("agentview", "robot0_eye_in_hand"):
                o.create_dataset(f"{cam}_image", data=frames)
    names = [f"trajectory_{i}" for i in range(episodes)]
    with h5py.File(root / "r2d2.hdf5", "w") as f:
        for name in names:
            g = f.create_group(name)
            g.create_dataset("observation/cartesian_position", data=rng.normal(size=(steps, 6)))
            g.create_dataset("observation/gripper_position", data=rng.uniform(size=(steps, 1)))
            g.create_dataset("action/cartesian_position", data=rng.normal(size=(steps, 6)))
            g.create_dataset("action/gripper_position", data=rng.uniform(size=(steps, 1)))
            for cam in ("exterior_image_1_left", "wrist_image_left"):
                g.create_dataset(f"observation/{cam}", data=frames)
    (root / "keys.json").write_text(json.dumps(names))
    (root / "verbs.json").write_text(json.dumps({"pick": names}))
    (root / "icrt.json").write_text(json.dumps({
        "dataset_path": ["r2d2.hdf5"], "hdf5_keys": ["keys.json"],
        "verb_to_episode": "verbs.json", "train_split": 0.95,
        "action_keys": ["action/cartesian_position", "action/gripper_position"],
        "image_keys": ["observation/exterior_image_1_left", "observation/wrist_image_left"],
        "proprio_keys": ["observation/cartesian_position", "observation/gripper_position"]}))
    _write_lerobot_v30(root / "lerobot", episodes, steps, frames, rng)
    rows = []
    for fmt, src in (("robomimic", "robomimic.hdf5"), ("icrt", "icrt.json"),
                     ("lerobot", "lerobot")):
        t0 = time.perf_counter()
        convert(ConvertConfig(format=fmt, input=str(root / src), out=str(root / f"{fmt}.zarr")),
                progress=False)
        dt = time.perf_counter() - t0
        rows.append({"format": fmt, "episodes": episodes, "steps_per_episode": steps,
                     "cameras": f"2 x {image_size}px", "seconds": dt,
                     "episodes_per_min": 60.0 * episodes / dt,
                     "steps_per_s": episodes * steps / dt})
    return rows


def benchmark_sim(checkpoint: str, prompt_dataset: str, tasks: tuple[str, ...] | None = None,
                  episodes_per_task: int = 20,
                  settings: tuple[tuple[int, int], ...] = ((1, 1), (2, 1), (1, 4)),
                  max_steps: int | None = 150) -> list[dict]:
    """Evaluation episodes/min for (worker processes, simulators per worker) settings against
    one worker with one simulator (same episodes, same seeds)."""
    from icrt.config import EvalConfig
    from icrt.eval.rollout import evaluate

    rows = []
    for workers, num_envs in settings:
        cfg = EvalConfig(checkpoint=checkpoint, prompt_dataset=prompt_dataset, tasks=tasks,
                         episodes_per_task=episodes_per_task, workers=workers,
                         num_envs=num_envs, max_steps=max_steps)
        t0 = time.perf_counter()
        results = evaluate(cfg, progress=False)
        sec = time.perf_counter() - t0  # includes starting the workers
        episodes = sum(t["episodes"] for t in results["tasks"].values())
        rows.append({"workers": workers, "num_envs": num_envs, "episodes": episodes,
                     "seconds": sec, "episodes_per_min": 60.0 * episodes / sec,
                     "mean_success": results["mean_success_rate"]})
    for r in rows:
        r["speedup"] = r["episodes_per_min"] / rows[0]["episodes_per_min"]
    return rows


# ------------------------------------------------------------------------------- image features


def benchmark_feature_training(folder: str, episodes: int = 10, image_size: int = 84,
                               encoder: str = "vit_tiny_patch16_224", encoder_size: int = 112,
                               model_config: str = "config/model_config/mini.json") -> list[dict]:
    """Training samples/s of an image policy with a frozen encoder run on every frame vs
    reading precomputed features, in the same process on the same robosuite Lift demos."""
    from pathlib import Path

    from icrt.config import CollectConfig, parse_config
    from icrt.data.collect import collect
    from icrt.models.encoders.features import precompute_features
    from icrt.train.loop import run_metrics, train

    root = Path(folder)
    store = root / "lift_img.zarr"
    collect(CollectConfig(env="robosuite", tasks=("Lift",), episodes_per_task=episodes,
                          image_size=image_size, out=str(store), workers=2, overwrite=True),
            progress=False)
    common = [
        "--dataset-cfg.dataset-json", str(store.with_suffix(".json")),
        "--model-cfg.policy-cfg.scratch-llama-config", model_config,
        "--model-cfg.vision-encoder-cfg.vision-encoder", encoder,
        "--model-cfg.vision-encoder-cfg.vision-nonpretrained",
        "--model-cfg.vision-encoder-cfg.vision-image-size", str(encoder_size),
        "--shared-cfg.seq-length", "64", "--shared-cfg.num-pred-steps", "4",
        "--shared-cfg.batch-size", "4", "--trainer-cfg.accum-iter", "1",
        "--trainer-cfg.epochs", "1", "--trainer-cfg.num-workers", "0",
        "--trainer-cfg.log-every", "2", "--dataset-cfg.non-overlapping", "16",
        "--logging-cfg.no-wandb",
    ]
    vcfg = parse_config(common).model_cfg.vision_encoder_cfg
    t0 = time.perf_counter()
    precompute_features(store, vcfg, ["image_agentview", "image_robot0_eye_in_hand"],
                        dtype="float16", progress=False, overwrite=True)
    cache_seconds = time.perf_counter() - t0
    rows = []
    for name, extra in (("frozen encoder on pixels", []),
                        ("cached features", ["--model-cfg.vision-encoder-cfg."
                                             "use-cached-features"])):
        run = root / name.replace(" ", "_")
        train(parse_config([*common, *extra, "--logging-cfg.output-dir", str(run)]),
              progress=False)
        rates = [r["train/samples_per_s"] for r in run_metrics(run) if "train/samples_per_s" in r]
        rows.append({"input": name, "samples_per_s": float(np.median(rates[1:] or rates))})
    for r in rows:
        r["speedup"] = r["samples_per_s"] / rows[0]["samples_per_s"]
    rows[1]["one_off_cache_seconds"] = cache_seconds
    return rows
