"""Speed benchmarks, each a ratio against a baseline measured in the same run.

    python scripts/benchmark.py train        # backbone fwd+bwd tokens/s vs transformers.LlamaModel
    python scripts/benchmark.py inference    # act() latency: KV cache vs full recompute
    python scripts/benchmark.py fsdp         # training step, FSDP2 vs DDP on 2 gloo ranks
    python scripts/benchmark.py data         # out-of-core loading vs ICRT HDF5 slices, memory
    python scripts/benchmark.py features     # image training: pixels through encoder vs cached
    python scripts/benchmark.py sim          # evaluation episodes/min, N workers vs 1
    python scripts/benchmark.py memory --gpus 8 --gpu-memory-gb 80   # training memory planner
    python scripts/benchmark.py all

    # on a GPU: tokens/s and MFU of a 7B-shaped random backbone (4 of its 32 layers) in bf16,
    # and act() Hz of a 7B-shaped policy
    python scripts/benchmark.py train --device cuda --precision bf16-mixed \
        --configs llama2-7b --layers 4
    python scripts/benchmark.py inference --device cuda --configs llama2-7b

train: MFU = model FLOPs per token (6 * params + 12 * layers * dim * seq_len, forward+backward)
times tokens/s over the device's peak dense FLOP/s, from a table of GPUs by name (bf16, or
fp32/TF32 as torch's matmul precision allows) or --peak-tflops; empty where neither knows it
(always on the CPU without --peak-tflops).

fsdp: 2 gloo ranks on the CPU (whatever --device says), one thread each, launched with
torch.distributed.run; each times AdamW steps of every --configs backbone (batch 2 x 128 tokens,
a 64-step window, per rank) wrapped in DDP and sharded per block as training's FSDP2 does,
after a warm-up step, and prints samples/s of each and their ratio.

Backbone shapes (--configs, --llama-config): params.json files, Hugging Face config.json files
or their directories, or the presets llama2-7b and llama2-13b.
Tables are printed as markdown; --json FILE also writes the raw rows.
"""

from __future__ import annotations

import json
import platform
import tempfile
from dataclasses import dataclass
from typing import Literal

import torch
import tyro

from icrt.cli import run
from icrt.errors import UserError


@dataclass(frozen=True)
class BenchmarkConfig:
    # Which benchmark to run.
    what: tyro.conf.Positional[
        Literal["train", "inference", "fsdp", "data", "features", "sim", "memory", "all"]
    ] = "all"
    # Backbone shapes for the train, inference and fsdp benchmarks: params.json files, Hugging
    # Face config.json files or their directories, or the presets llama2-7b and llama2-13b.
    configs: tuple[str, ...] = ("config/model_config/tiny.json", "config/model_config/small.json")
    # train, inference: where to build and run the models.
    device: Literal["cpu", "cuda"] = "cpu"
    # train, fsdp, inference: use this many of each shape's layers (0: the config's own).
    layers: int = 0
    # train: peak dense FLOP/s of the device in TFLOP/s for MFU (default: the table's number
    # for a known GPU; MFU is left empty otherwise).
    peak_tflops: float | None = None
    # Prompt lengths in tokens for the inference benchmark.
    prompt_tokens: tuple[int, ...] = (256, 1024, 2048)
    # Torch threads (default: torch's choice, i.e. all cores).
    threads: int | None = None
    # inference: also time the Decoder rows with these thread counts (1024-token prompts).
    inference_threads: tuple[int, ...] = (1,)
    # Checkpoint and held-out prompts for the sim benchmark (default: what `make demo` writes).
    checkpoint: str = "runs/mw5"
    prompt_dataset: str = "data/mw5_prompts.json"
    # data: also stream from a store of this many GB (written, then removed; 0 skips it) and
    # report the loader's memory.
    big_store_gb: float = 10.0
    # data: folder for that store (default: the system's temporary folder).
    scratch: str | None = None
    # memory: backbone shapes to plan (params.json files, Hugging Face config.json files or
    # their directories, or the presets llama2-7b and llama2-13b).
    llama_config: tuple[str, ...] = ("llama2-7b", "llama2-13b")
    # memory: strategies to plan.
    strategy: tuple[Literal["ddp", "fsdp"], ...] = ("ddp", "fsdp")
    # memory: devices (data-parallel ranks) and the memory of each, in GB.
    gpus: int = 8
    gpu_memory_gb: float = 80.0
    # memory: sequences per device and steps per sequence (two backbone tokens per step).
    batch_size: int = 1
    seq_length: int = 512
    # train, fsdp, memory: training precision (default: 32-true, i.e. fp32, for train and fsdp;
    # bf16-mixed for memory).
    precision: Literal["32-true", "bf16-mixed"] | None = None
    # memory: also plan LoRA fine-tuning with this rank (0: full fine-tuning only); train: the
    # rank of its LoRA-vs-full table (0: no such table).
    lora_rank: int = 16
    # memory: activation checkpointing.
    activation_checkpointing: bool = False
    # Also write every measured row as JSON here.
    json: str | None = None


def _benchmarks():
    """The benchmark suite in ``benchmarks/`` beside ``scripts/``: deliberately not part of the
    installed library, so it is loaded from this checkout by path."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "speed.py"
    spec = importlib.util.spec_from_file_location("icrt_benchmarks_speed", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def table(rows: list[dict], columns: list[str]) -> str:
    def fmt(v: object) -> str:
        return f"{v:,.2f}" if isinstance(v, float) else "—" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def memory_tables(cfg: BenchmarkConfig, speed) -> list[dict]:
    """Per-device training memory of each shape x strategy (x LoRA), and the planner checked
    against memory counted on real tiny/small backbones on this CPU."""
    from pathlib import Path

    from icrt.models.backbones.llama import LlamaConfig
    from icrt.train.memory import GB, PRESETS, measure_memory, measure_peak_memory, plan_memory

    tokens = 2 * cfg.seq_length
    precision = cfg.precision or "bf16-mixed"
    rows = []
    for name in cfg.llama_config:
        shape = PRESETS[name] if name in PRESETS else speed.load_shape(name, tokens)
        for strategy in cfg.strategy:
            for lora in [None, cfg.lora_rank] if cfg.lora_rank else [None]:
                plan = plan_memory(shape, strategy, cfg.gpus, cfg.batch_size, tokens,
                                   precision, lora,
                                   activation_checkpointing=cfg.activation_checkpointing)
                row = {"config": Path(name).name if name not in PRESETS else name,
                       "params_b": plan.params_total / 1e9, "strategy": strategy,
                       "training": f"LoRA r{lora}" if lora else "full",
                       "trainable_m": plan.params_trainable / 1e6}
                row.update({f"{k}_gb": v / GB for k, v in plan.bytes.items()})
                row["total_gb"] = plan.total_gb
                row["fits"] = "yes" if plan.fits(cfg.gpu_memory_gb) else "no"
                rows.append(row)
    print(f"## Training memory per device ({cfg.gpus} devices of {cfg.gpu_memory_gb:g} GB, batch "
          f"{cfg.batch_size} x {tokens} tokens, {precision}, AdamW"
          f"{', activation checkpointing' if cfg.activation_checkpointing else ''}; fits = "
          f"within 90%)\n")
    print(table(rows, ["config", "params_b", "strategy", "training", "trainable_m",
                       "parameters_gb", "gradients_gb", "optimizer_gb", "activations_gb",
                       *(["recompute_gb"] if cfg.activation_checkpointing else []),
                       "total_gb", "fits"]) + "\n")
    checks = []
    for name in ("tiny", "small"):
        shape = LlamaConfig.from_json(f"config/model_config/{name}.json", 512)
        for ckpt in (False, True):
            measured = measure_memory(shape, 2, 256, activation_checkpointing=ckpt)
            plan = plan_memory(shape, "ddp", 1, 2, 256, "32-true",
                               activation_checkpointing=ckpt)
            total = sum(measured.values())
            # the peak resident-memory growth of two real training steps (small only: tiny's
            # few MB drown in kernel workspaces and what the allocator keeps)
            peak = measure_peak_memory(shape, 2, 256, activation_checkpointing=ckpt) \
                if name == "small" else None
            checks.append({"config": name, "checkpointing": ckpt,
                           "measured_mb": total / 2**20,
                           "planned_mb": sum(plan.bytes[k] for k in measured) / 2**20,
                           "activations_planned_vs_measured":
                               plan.bytes["activations"] / measured["activations"],
                           "peak_rss_mb": None if peak is None else peak / 2**20,
                           "planned_vs_peak": None if peak is None else plan.total_bytes / peak})
    for c in checks:
        c["planned_vs_measured"] = c["planned_mb"] / c["measured_mb"]
    print("## Planner vs memory counted on the CPU (fp32, batch 2 x 256 tokens; parameters, "
          "gradients, AdamW state and the tensors autograd saves; peak_rss_mb: how much a "
          "fresh process's peak resident memory grows over two training steps)\n")
    print(table(checks, ["config", "checkpointing", "measured_mb", "planned_mb",
                         "planned_vs_measured", "activations_planned_vs_measured",
                         "peak_rss_mb", "planned_vs_peak"]) + "\n")
    return rows + checks


def _large(speed, name: str) -> bool:
    """Whether ``name`` is TinyLlama's width (2048) or wider: such shapes train on one
    2048-token sequence per step for few steps, and get no batched-inference rows."""
    return speed.load_shape(name, 2048).dim >= 2048


def main(cfg: BenchmarkConfig) -> None:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device cuda was asked for, but torch {torch.__version__} finds no "
                        f"CUDA device here; use --device cpu.")
    if cfg.peak_tflops is not None and not cfg.peak_tflops > 0:
        raise UserError(f"--peak-tflops must be a number of TFLOP/s above 0 (got "
                        f"{cfg.peak_tflops}).")
    if cfg.layers < 0:
        raise UserError(f"--layers must be 0 (each config's own) or more (got {cfg.layers}).")
    speed = _benchmarks()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} "
          f"torch threads, torch {torch.__version__}, cuda {torch.cuda.is_available()}"
          f"{f' ({torch.cuda.get_device_name()})' if cfg.device == 'cuda' else ''}\n")
    precision = cfg.precision or "32-true"
    out: dict[str, list[dict]] = {}
    todo = (["train", "inference", "fsdp", "data", "features", "sim"] if cfg.what == "all"
            else [cfg.what])
    if "memory" in todo:
        out["memory"] = memory_tables(cfg, speed)
    if "train" in todo:
        rows = []
        for name in cfg.configs:
            small = "small" in name
            batch_size, seq_len, steps, warmup = ((1, 2048, 10, 2) if _large(speed, name) else
                                                  (2, 512, 3, 1) if small else (8, 256, 20, 1))
            rows += speed.benchmark_backbone_train(
                name, batch_size, seq_len, steps, warmup, device=cfg.device, precision=precision,
                n_layers=cfg.layers, peak_tflops=cfg.peak_tflops)
        out["train"] = rows
        peak = rows[0]["peak_tflops"]
        print(f"## Backbone forward+backward ({precision}, {rows[0]['device']}"
              f"{f'; MFU against a peak of {peak:g} TFLOP/s' if peak else ''})\n")
        shown = [{**r, "mfu": "" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"}
                 for r in rows]
        print(table(shown, ["config", "model", "params", "layers", "batch_size", "seq_len",
                            "ms_per_step", "tokens_per_s", "relative_speed", "tflops", "mfu"])
              + "\n")
        for note in dict.fromkeys(r["mfu_note"] for r in rows if "mfu_note" in r):
            print(note + "\n")
        if cfg.lora_rank:
            rows = speed.benchmark_lora_vs_full(rank=cfg.lora_rank)
            out["lora"] = rows
            print("## LoRA vs full fine-tuning, one AdamW step (TinyLlama-shaped layers, batch 1 "
                  "x 256 tokens, fp32, CPU)\n")
            print(table(rows, ["training", "layers", "params_m", "trainable_m", "s_per_step",
                               "speedup"]) + "\n")
    if "inference" in todo:
        rows = []
        bandwidth = speed.memory_bandwidth(device=cfg.device)
        print(f"memory read bandwidth, {cfg.device}"
              f"{f', {torch.get_num_threads()} threads' if cfg.device == 'cpu' else ''}: "
              f"{bandwidth:.1f} GB/s\n")
        for name in cfg.configs:
            small, large = "small" in name, _large(speed, name)
            for n in cfg.prompt_tokens:
                # a large model's full recompute is a long wait on a CPU: left out there
                recompute = (2 if cfg.device == "cuda" else 0) if large else 2 if small else 5
                rows += speed.benchmark_inference(
                    name, n, steps=20 if small or large else 50, recompute_steps=recompute,
                    bandwidth=bandwidth, threads=cfg.inference_threads if n == 1024 else (),
                    compile=n == 1024, device=cfg.device, n_layers=cfg.layers)
        out["inference"] = rows
        print(f"## InContextPolicy.act latency by decoding path, {cfg.device} (floor: weights + "
              f"KV bytes read per step / read bandwidth)\n")
        print(table(rows, ["config", "prompt_tokens", "path", "threads", "ms", "hz", "read_mb",
                           "floor_ms", "vs_floor"]) + "\n")
        # one policy per episode holds a copy of the weights per episode: small shapes only
        names = [name for name in cfg.configs if not _large(speed, name)]
        rows = [speed.benchmark_batched_inference(name, n, device=cfg.device)
                for name in names for n in (4, 16)]
        out["batched_inference"] = rows
        if rows:
            print("## Several episodes per process: one batched forward vs one policy per "
                  "episode\n")
            print(table(rows, ["config", "device", "rows", "one_by_one_ms", "batched_ms",
                               "episode_steps_per_s", "speedup"]) + "\n")
    if "fsdp" in todo:
        rows = []
        for name in cfg.configs:
            rows += speed.benchmark_fsdp_vs_ddp(name, n_layers=cfg.layers, precision=precision)
        out["fsdp"] = rows
        print(f"## Training step, FSDP2 (sharded per block) vs DDP: 2 gloo ranks on the CPU, 1 "
              f"thread each, batch 2 x 128 tokens per rank, AdamW, {precision}\n")
        print(table(rows, ["config", "layers", "strategy", "ms_per_step", "samples_per_s",
                           "vs_ddp"]) + "\n")
        for r in rows[1::2]:
            print(f"{r['config']}: FSDP/DDP samples/s = {r['vs_ddp']:.2f}")
        print()
    if "data" in todo:
        with tempfile.TemporaryDirectory() as tmp:
            rows = speed.benchmark_data(tmp)
        out["data"] = rows
        print("## Sequence loading (64-step windows, 2 cameras 84x84, page cache dropped before "
              "each timed pass)\n")
        print(table(rows, ["frames", "loader", "samples_per_s", "vs_hdf5_slices", "disk_mb"])
              + "\n")
        if cfg.big_store_gb:
            with tempfile.TemporaryDirectory(dir=cfg.scratch) as tmp:
                row = speed.benchmark_data_memory(tmp, gb=cfg.big_store_gb)
            out["data_memory"] = [row]
            print("## Out-of-core loading from a store larger than the image cache\n")
            print(table([row], ["store_gb", "files", "write_seconds", "workers", "samples",
                                "samples_per_s", "peak_loader_memory_gb"]) + "\n")
        with tempfile.TemporaryDirectory() as tmp:
            rows = speed.benchmark_convert(tmp)
        out["convert"] = rows
        print("## Dataset conversion (scripts/convert.py)\n")
        print(table(rows, ["format", "episodes", "steps_per_episode", "cameras", "seconds",
                           "episodes_per_min", "steps_per_s"]) + "\n")
    if "features" in todo:
        with tempfile.TemporaryDirectory() as tmp:
            rows = speed.benchmark_feature_training(tmp)
        out["features"] = rows
        print("## Image-policy training: frozen encoder on pixels vs cached features (Lift, 2 "
              "cameras)\n")
        print(table(rows, ["input", "samples_per_s", "speedup", "one_off_cache_seconds"]) + "\n")
    if "sim" in todo:
        rows = speed.benchmark_sim(cfg.checkpoint, cfg.prompt_dataset)
        out["sim"] = rows
        print("## Evaluation throughput\n")
        print(table(rows, ["workers", "num_envs", "episodes", "seconds", "episodes_per_min",
                           "speedup"]))
    if cfg.json:
        with open(cfg.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    run(lambda: main(tyro.cli(BenchmarkConfig, description=__doc__)))
