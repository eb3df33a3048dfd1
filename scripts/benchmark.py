"""Speed benchmarks, each a ratio against a baseline measured in the same run.

    python scripts/benchmark.py train        # backbone fwd+bwd tokens/s vs transformers.LlamaModel
    python scripts/benchmark.py inference    # act() latency: KV cache vs full recompute
    python scripts/benchmark.py data         # out-of-core loading vs ICRT HDF5 slices, memory
    python scripts/benchmark.py features     # image training: pixels through encoder vs cached
    python scripts/benchmark.py sim          # evaluation episodes/min, N workers vs 1
    python scripts/benchmark.py memory --gpus 8 --gpu-memory-gb 80   # training memory planner
    python scripts/benchmark.py all

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


@dataclass(frozen=True)
class BenchmarkConfig:
    # Which benchmark to run.
    what: tyro.conf.Positional[
        Literal["train", "inference", "data", "features", "sim", "memory", "all"]
    ] = "all"
    # Model configs (params.json files) for the train and inference benchmarks.
    configs: tuple[str, ...] = ("config/model_config/tiny.json", "config/model_config/small.json")
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
    # memory: training precision.
    precision: Literal["32-true", "bf16-mixed"] = "bf16-mixed"
    # memory: also plan LoRA fine-tuning with this rank (0: full fine-tuning only).
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
        return f"{v:,.2f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def memory_tables(cfg: BenchmarkConfig) -> list[dict]:
    """Per-device training memory of each shape x strategy (x LoRA), and the planner checked
    against memory counted on real tiny/small backbones on this CPU."""
    from pathlib import Path

    from icrt.models.backbones.llama import LlamaConfig
    from icrt.models.backbones.pretrained import read_hf_llama_config
    from icrt.train.memory import GB, PRESETS, measure_memory, plan_memory

    tokens = 2 * cfg.seq_length
    rows = []
    for name in cfg.llama_config:
        if name in PRESETS:
            shape = PRESETS[name]
        else:
            path = Path(name)
            path = path / "config.json" if path.is_dir() else path
            shape = (read_hf_llama_config(path, tokens) if path.name == "config.json"
                     else LlamaConfig.from_json(path, tokens))
        for strategy in cfg.strategy:
            for lora in [None, cfg.lora_rank] if cfg.lora_rank else [None]:
                plan = plan_memory(shape, strategy, cfg.gpus, cfg.batch_size, tokens,
                                   cfg.precision, lora,
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
          f"{cfg.batch_size} x {tokens} tokens, {cfg.precision}, AdamW"
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
            checks.append({"config": name, "checkpointing": ckpt,
                           "measured_mb": total / 2**20,
                           "planned_mb": sum(plan.bytes[k] for k in measured) / 2**20,
                           "activations_planned_vs_measured":
                               plan.bytes["activations"] / measured["activations"]})
    for c in checks:
        c["planned_vs_measured"] = c["planned_mb"] / c["measured_mb"]
    print("## Planner vs memory counted on the CPU (fp32, batch 2 x 256 tokens; parameters, "
          "gradients, AdamW state and the tensors autograd saves)\n")
    print(table(checks, ["config", "checkpointing", "measured_mb", "planned_mb",
                         "planned_vs_measured", "activations_planned_vs_measured"]) + "\n")
    return rows + checks


def main(cfg: BenchmarkConfig) -> None:
    speed = _benchmarks()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} "
          f"torch threads, torch {torch.__version__}, cuda {torch.cuda.is_available()}\n")
    out: dict[str, list[dict]] = {}
    todo = ["train", "inference", "data", "features", "sim"] if cfg.what == "all" else [cfg.what]
    if "memory" in todo:
        out["memory"] = memory_tables(cfg)
    if "train" in todo:
        rows = []
        for path in cfg.configs:
            small = "small" in path
            rows += speed.benchmark_backbone_train(path, batch_size=2 if small else 8,
                                                   seq_len=512 if small else 256,
                                                   steps=3 if small else 20, warmup=1)
        for r in rows:
            r["config"] = r.get("config", "")
        out["train"] = rows
        print("## Backbone forward+backward (fp32)\n")
        print(table(rows, ["model", "params", "batch_size", "seq_len", "ms_per_step",
                           "tokens_per_s", "relative_speed"]) + "\n")
        rows = speed.benchmark_lora_vs_full()
        out["lora"] = rows
        print("## LoRA vs full fine-tuning, one AdamW step (TinyLlama-shaped layers, batch 1 x "
              "256 tokens, fp32)\n")
        print(table(rows, ["training", "layers", "params_m", "trainable_m", "s_per_step",
                           "speedup"]) + "\n")
    if "inference" in todo:
        rows = []
        bandwidth = speed.memory_bandwidth()
        print(f"memory read bandwidth, {torch.get_num_threads()} threads: {bandwidth:.1f} GB/s\n")
        for path in cfg.configs:
            small = "small" in path
            for n in cfg.prompt_tokens:
                rows += speed.benchmark_inference(
                    path, n, steps=20 if small else 50, recompute_steps=2 if small else 5,
                    bandwidth=bandwidth, threads=cfg.inference_threads if n == 1024 else (),
                    compile=n == 1024)
        out["inference"] = rows
        print("## InContextPolicy.act latency by decoding path (floor: weights + KV bytes read "
              "per step / read bandwidth)\n")
        print(table(rows, ["config", "prompt_tokens", "path", "threads", "ms", "hz", "read_mb",
                           "floor_ms", "vs_floor"]) + "\n")
        rows = [speed.benchmark_batched_inference(path, n, device=device)
                for path in cfg.configs for n in (4, 16)]
        out["batched_inference"] = rows
        print("## Several episodes per process: one batched forward vs one policy per episode\n")
        print(table(rows, ["config", "device", "rows", "one_by_one_ms", "batched_ms",
                           "episode_steps_per_s", "speedup"]) + "\n")
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
