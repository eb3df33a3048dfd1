"""scripts/benchmark.py train / inference / fsdp: the MFU arithmetic, the peak FLOP/s table, the
device check, and each benchmark run small on the CPU (timings themselves are not checked)."""

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
import tyro

from icrt.errors import UserError
from icrt.models.backbones.llama import LlamaBackbone

ROOT = Path(__file__).resolve().parents[1]
TINY = "config/model_config/tiny.json"


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the script loads
    spec.loader.exec_module(module)
    return module


bench = _load(ROOT / "scripts/benchmark.py", "benchmark_script")
speed = bench._benchmarks()


def test_flops_per_token_matches_a_hand_count():
    # tiny: dim 64, 2 layers, SwiGLU width 192 (2/3 of 256 rounded up to a multiple of 32)
    per_layer = 4 * 64 * 64 + 3 * 64 * 192 + 2 * 64  # wq wk wv wo, w1 w2 w3, two norms
    params = 2 * per_layer + 64  # + the final norm
    assert params == 106_816
    assert sum(p.numel() for p in LlamaBackbone(speed.load_shape(TINY, 256)).parameters()) \
        == params
    # 6 N + 12 L d T: 6 * 106816 + 12 * 2 * 64 * 256
    assert speed.train_flops_per_token(params, 2, 64, 256) == 640_896 + 393_216
    # Llama-2-7B without its vocabulary: one of its 32 layers counted on the meta device (a 7B
    # model is never built on the CPU)
    shape = speed.load_shape("llama2-7b", 2048)
    with speed._built_as(torch.device("meta"), torch.bfloat16):
        one = LlamaBackbone(dataclasses.replace(shape, n_layers=1))
    assert torch.get_default_dtype() == torch.float32  # restored
    assert {p.dtype for p in one.parameters()} == {torch.bfloat16}
    per_layer = sum(p.numel() for p in one.layers.parameters())
    assert per_layer == 4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096
    n = 32 * per_layer + 4096
    assert n == 6_476_271_616
    flops = speed.train_flops_per_token(n, 32, 4096, 2048)
    assert flops == 6 * 6_476_271_616 + 12 * 32 * 4096 * 2048 == 42_078_855_168
    # 3,000 tokens/s of it on an H100 SXM in bf16 is 12.8% MFU
    peak, _ = speed.device_peak_flops(torch.device("cpu"), "bf16-mixed", peak_tflops=989)
    assert flops * 3000 / peak == pytest.approx(0.12764, abs=1e-5)


@pytest.mark.parametrize("name, fmt, peak", [
    ("NVIDIA H100 80GB HBM3", "bf16", 989e12),
    ("NVIDIA H100 PCIe", "bf16", 756e12),
    ("NVIDIA H200", "bf16", 989e12),
    ("NVIDIA A100-SXM4-80GB", "bf16", 312e12),
    ("NVIDIA A100 80GB PCIe", "tf32", 156e12),
    ("NVIDIA A100-SXM4-40GB", "fp32", 19.5e12),
    ("NVIDIA L40S", "bf16", 362e12),
    ("NVIDIA GeForce RTX 4090", "bf16", 165e12),
    ("Tesla T4", "bf16", None),
])
def test_peak_table(name, fmt, peak):
    assert speed.peak_flops(name, fmt) == peak


def test_peak_by_device_and_the_override(monkeypatch):
    cpu = torch.device("cpu")
    peak, note = speed.device_peak_flops(cpu, "32-true")
    assert peak is None and "--peak-tflops" in note
    assert speed.device_peak_flops(cpu, "32-true", peak_tflops=2.5) == (2.5e12, None)
    # a GPU by name (no CUDA needed: only its name is read)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-PCIE")
    cuda = torch.device("cuda")
    assert speed.device_peak_flops(cuda, "bf16-mixed") == (312e12, None)
    assert speed.device_peak_flops(cuda, "bf16-mixed", peak_tflops=100) == (100e12, None)
    old = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert speed.device_peak_flops(cuda, "32-true")[0] == 19.5e12
        torch.set_float32_matmul_precision("high")  # TF32 matmuls
        assert speed.device_peak_flops(cuda, "32-true")[0] == 156e12
    finally:
        torch.set_float32_matmul_precision(old)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    peak, note = speed.device_peak_flops(cuda, "bf16-mixed")
    assert peak is None and "Tesla T4" in note and "--peak-tflops" in note


def test_flags_parse():
    cfg = tyro.cli(bench.BenchmarkConfig, args=[
        "train", "--device", "cuda", "--precision", "bf16-mixed", "--configs", "llama2-7b",
        "--layers", "4", "--peak-tflops", "989"])
    assert (cfg.what, cfg.device, cfg.precision, cfg.configs, cfg.layers, cfg.peak_tflops) == \
        ("train", "cuda", "bf16-mixed", ("llama2-7b",), 4, 989.0)
    default = tyro.cli(bench.BenchmarkConfig, args=["train"])
    assert (default.device, default.precision, default.layers, default.peak_tflops) == \
        ("cpu", None, 0, None)


def test_device_cuda_without_cuda_is_one_sentence(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match=r"^--device cuda was asked for, but .* no CUDA device "
                                        r"here; use --device cpu\.$") as e:
        bench.main(bench.BenchmarkConfig(what="train", device="cuda"))
    assert ". " not in str(e.value)
    with pytest.raises(UserError, match="--peak-tflops must be"):
        bench.main(bench.BenchmarkConfig(what="train", peak_tflops=-1.0))


def test_train_benchmark_on_one_tiny_layer_writes_mfu(tmp_path, capsys):
    out = tmp_path / "rows.json"
    threads = torch.get_num_threads()
    try:  # one thread: two on a busy 2-core machine wait on each other for seconds per step
        bench.main(bench.BenchmarkConfig(what="train", configs=(TINY,), layers=1, lora_rank=0,
                                         threads=1, json=str(out)))
    finally:
        torch.set_num_threads(threads)
    rows = json.loads(out.read_text())["train"]
    assert [r["model"] for r in rows] == ["icrt", "transformers"]
    for r in rows:
        assert r["layers"] == 1 and r["device"] == "cpu" and r["precision"] == "32-true"
        assert r["flops_per_token"] == 6 * r["params"] + 12 * 1 * 64 * r["seq_len"]
        assert r["mfu"] is None and r["peak_tflops"] is None and "--peak-tflops" in r["mfu_note"]
    printed = capsys.readouterr().out
    assert "| tflops | mfu |" in printed and "MFU left empty" in printed
    # with a peak (and bf16 weights built as such): MFU = model FLOP/s / peak
    rows = speed.benchmark_backbone_train(TINY, 1, 16, steps=1, warmup=0,
                                          precision="bf16-mixed", n_layers=1, peak_tflops=1.0)
    for r in rows:
        assert r["mfu"] == pytest.approx(r["flops_per_token"] * r["tokens_per_s"] / 1e12)
        assert r["peak_tflops"] == 1.0 and "mfu_note" not in r


def test_inference_builds_a_named_shape_on_the_target_device():
    """``inference --configs llama2-7b``: the preset is built where it runs (meta here, so
    nothing is allocated), ``n_layers`` cutting its depth."""
    _, _, model, _ = speed._random_policy("llama2-7b", 64, 5, 3, 2, device="meta", n_layers=2)
    shape = model.backbone.config
    assert (shape.dim, shape.n_layers, shape.n_heads) == (4096, 2, 32)
    assert {p.device.type for p in model.parameters()} == {"meta"}


@pytest.mark.slow
def test_fsdp_benchmark_on_tiny():
    rows = speed.benchmark_fsdp_vs_ddp(TINY, steps=1, warmup=1)
    assert [r["strategy"] for r in rows] == ["ddp", "fsdp"]
    for r in rows:
        assert r["config"] == "tiny" and r["layers"] == 2 and r["ranks"] == 2
        assert r["samples_per_s"] == pytest.approx(2 * 2 * 1000 / r["ms_per_step"])
    assert rows[0]["vs_ddp"] == 1.0
    assert rows[1]["vs_ddp"] == pytest.approx(rows[1]["samples_per_s"] / rows[0]["samples_per_s"])
