"""Llama backbone: shapes, causality, KV cache, params.json, pretrained loading, LoRA."""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from icrt.config import ModelConfig, PolicyConfig
from icrt.errors import UserError
from icrt.models.backbones import build_backbone, llama
from icrt.models.backbones.llama import KVCache, LlamaBackbone, LlamaConfig
from icrt.models.backbones.pretrained import (
    apply_lora,
    hf_llama_config,
    load_pretrained_llama,
    merge_lora,
)
from icrt.models.policy import ICRTPolicy, PolicySpec

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "config/model_config/tiny.json"
SMALL = ROOT / "config/model_config/small.json"


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny shapes: OpenMP synchronisation on a busy 2-core machine costs more than it saves."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make(n_kv_heads: int | None = None, max_seq_len: int = 64, seed: int = 0) -> LlamaBackbone:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        dim=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=n_kv_heads,
        multiple_of=16,
        max_seq_len=max_seq_len,
    )
    return LlamaBackbone(cfg).eval()


def decode_in_chunks(model: LlamaBackbone, x: torch.Tensor, splits: list[int]) -> torch.Tensor:
    """Feed x (B, T, D) through a fresh cache in chunks of the given sizes, then 1 by 1."""
    cache = model.new_cache(x.shape[0], x.shape[1])
    outs, pos = [], 0
    for n in splits:
        outs.append(model(x[:, pos : pos + n], cache))
        pos += n
    while pos < x.shape[1]:
        outs.append(model(x[:, pos : pos + 1], cache))
        pos += 1
    assert cache.length == x.shape[1]
    return torch.cat(outs, dim=1)


# ------------------------------------------------------------------------------ forward


def test_shapes_and_d_model() -> None:
    model = make()
    assert model.d_model == 32
    y = model(torch.randn(3, 7, 32))
    assert y.shape == (3, 7, 32)
    assert torch.isfinite(y).all()


def test_causality() -> None:
    model = make()
    x = torch.randn(2, 12, 32)
    x2 = x.clone()
    x2[:, 8:] = torch.randn(2, 4, 32)
    with torch.no_grad():
        y, y2 = model(x), model(x2)
    torch.testing.assert_close(y[:, :8], y2[:, :8])
    assert not torch.allclose(y[:, 8:], y2[:, 8:])


def test_parameter_names_mirror_meta() -> None:
    names = set(make(n_kv_heads=2).state_dict())
    for suffix in (
        "attention.wq",
        "attention.wk",
        "attention.wv",
        "attention.wo",
        "feed_forward.w1",
        "feed_forward.w2",
        "feed_forward.w3",
        "attention_norm",
        "ffn_norm",
    ):
        assert f"layers.1.{suffix}.weight" in names
    assert "norm.weight" in names
    assert not any("freq" in n or "rope" in n for n in names)


def test_too_long_sequence_raises() -> None:
    model = make(max_seq_len=8)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.randn(1, 9, 32))


# ----------------------------------------------------------------------------- KV cache


@pytest.mark.parametrize("n_kv_heads", [None, 2, 1])
@pytest.mark.parametrize("splits", [[1], [5], [3, 4], [2, 3, 6], [16]])
def test_cache_matches_full_forward(n_kv_heads: int | None, splits: list[int]) -> None:
    model = make(n_kv_heads=n_kv_heads)
    x = torch.randn(3, 16, 32)
    with torch.no_grad():
        full = model(x)
        inc = decode_in_chunks(model, x, splits)
    torch.testing.assert_close(inc, full, atol=1e-5, rtol=1e-5)


def test_cache_truncate_and_reset() -> None:
    model = make()
    a, b = torch.randn(2, 12, 32), torch.randn(2, 6, 32)
    with torch.no_grad():
        cache = model.new_cache(2, 20)
        model(a, cache)
        cache.truncate(7)  # roll back the last 5 tokens
        assert cache.length == 7
        tail = torch.cat(
            [model(b[:, :2], cache)] + [model(b[:, i : i + 1], cache) for i in range(2, 6)], dim=1
        )
        full = model(torch.cat([a[:, :7], b], dim=1))
        torch.testing.assert_close(tail, full[:, 7:], atol=1e-5, rtol=1e-5)

        cache.reset()
        assert cache.length == 0
        torch.testing.assert_close(model(a, cache), model(a), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError):
        cache.truncate(13)


def test_cache_overflow_and_batch_mismatch() -> None:
    model = make()
    cache = model.new_cache(2, 4)
    assert isinstance(cache, KVCache) and cache.max_len == 4 and cache.batch_size == 2
    with torch.no_grad():
        with pytest.raises(ValueError, match="overflow"):
            model(torch.randn(2, 5, 32), cache)
        with pytest.raises(ValueError, match="Batch size"):
            model(torch.randn(3, 1, 32), cache)
    with pytest.raises(ValueError):
        model.new_cache(1, 65)  # beyond max_seq_len: no rotary table for those positions


def test_gqa_shapes() -> None:
    model = make(n_kv_heads=2)
    attn = model.layers[0].attention
    assert attn.wq.weight.shape == (32, 32)
    assert attn.wk.weight.shape == (16, 32) and attn.wv.weight.shape == (16, 32)
    cache = model.new_cache(1, 8)
    assert cache.k[0].shape == (1, 2, 8, 8)


def test_gradient_checkpointing_same_gradients() -> None:
    x = torch.randn(2, 10, 32)
    grads = []
    for ckpt in (False, True):
        model = make().train()
        model.gradient_checkpointing = ckpt
        model(x).pow(2).mean().backward()
        grads.append(model.layers[0].attention.wq.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_bf16_cast_keeps_rope_precision() -> None:
    model = make().to(torch.bfloat16)
    assert model._rope_table.dtype == torch.float32
    y = model(torch.randn(2, 6, 32, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()


def test_rope_real_formula_matches_complex(monkeypatch: pytest.MonkeyPatch) -> None:
    """The real-valued formula used under torch.compile equals the eager complex one."""
    cfg = LlamaConfig(dim=32, n_layers=1, n_heads=4, max_seq_len=16)
    rope = llama.precompute_rope(cfg)[5:12]  # positions 5..11
    x = torch.randn(2, 7, 4, 8)
    eager = llama.apply_rope(x, rope)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    torch.testing.assert_close(llama.apply_rope(x, rope), eager)
    # Meta's reference: complex multiply by polar(1, angle).
    angles = torch.atan2(rope[..., 1], rope[..., 0])
    ref = (
        torch.view_as_complex(x.unflatten(-1, (-1, 2)))
        * torch.polar(torch.ones_like(angles), angles)[:, None]
    )
    torch.testing.assert_close(eager, torch.view_as_real(ref).flatten(-2))


def test_matches_transformers_llama() -> None:
    """Same function as HF's LlamaModel once wq/wk are permuted to HF's rotate-half layout."""
    transformers = pytest.importorskip("transformers")
    model = make(n_kv_heads=2)
    cfg = model.config
    hf = transformers.LlamaModel(hf_llama_config(cfg)).eval()

    def permute(w: torch.Tensor, heads: int) -> torch.Tensor:
        out, inp = w.shape
        return w.view(heads, out // heads // 2, 2, inp).transpose(1, 2).reshape(out, inp)

    renames = {
        "attention.wq": "self_attn.q_proj",
        "attention.wk": "self_attn.k_proj",
        "attention.wv": "self_attn.v_proj",
        "attention.wo": "self_attn.o_proj",
        "feed_forward.w1": "mlp.gate_proj",
        "feed_forward.w2": "mlp.down_proj",
        "feed_forward.w3": "mlp.up_proj",
        "attention_norm": "input_layernorm",
        "ffn_norm": "post_attention_layernorm",
    }
    sd = {}
    for k, v in model.state_dict().items():
        for a, b in renames.items():
            k = k.replace(a, b)
        if "q_proj" in k:
            v = permute(v, cfg.n_heads)
        elif "k_proj" in k:
            v = permute(v, cfg.kv_heads)
        sd[k] = v
    result = hf.load_state_dict(sd, strict=False)
    assert result.missing_keys == ["embed_tokens.weight"] and not result.unexpected_keys
    x = torch.randn(2, 20, cfg.dim)
    with torch.no_grad():
        torch.testing.assert_close(
            model(x), hf(inputs_embeds=x).last_hidden_state, atol=1e-5, rtol=1e-5
        )


# ----------------------------------------------------------------------- attention kernels


def test_sdpa_used_without_flash_attn(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(llama, "_flash_attn_func", None)
    calls = []
    real = F.scaled_dot_product_attention

    def spy(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    model = make()
    model(torch.randn(1, 5, 32))
    assert len(calls) == model.config.n_layers
    assert all(c.get("is_causal") for c in calls)


def test_flash_attn_import_never_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # makes `import flash_attn` fail
    assert llama._import_flash_attn() is None


def test_flash_attn_only_for_cuda_half(monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_flash(*args: Any, **kwargs: Any) -> torch.Tensor:
        raise AssertionError("flash-attn must not run on CPU/fp32")

    monkeypatch.setattr(llama, "_flash_attn_func", fake_flash)
    assert llama.attention_backend(torch.zeros(1, dtype=torch.bfloat16)) == "sdpa"
    make()(torch.randn(1, 4, 32))  # CPU fp32 -> SDPA, fake never called


@pytest.mark.gpu
def test_flash_attn_matches_sdpa_on_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    if not torch.cuda.is_available() or llama._flash_attn_func is None:
        pytest.skip("needs CUDA and flash-attn")
    torch.manual_seed(0)
    cfg = LlamaConfig(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128)
    model = LlamaBackbone(cfg).cuda().to(torch.bfloat16).eval()
    x = torch.randn(2, 100, 256, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        assert llama.attention_backend(x) == "flash_attn"
        flash_full = model(x).float()
        flash_inc = decode_in_chunks(model, x, [40, 30]).float()
        monkeypatch.setattr(llama, "_flash_attn_func", None)
        sdpa_full = model(x).float()
    torch.testing.assert_close(flash_full, sdpa_full, atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(flash_inc, sdpa_full, atol=3e-2, rtol=3e-2)


# ------------------------------------------------------------------------------ params.json


def test_shipped_configs() -> None:
    tiny = LlamaConfig.from_json(TINY, max_seq_len=128)
    assert (tiny.dim, tiny.n_layers, tiny.n_heads, tiny.max_seq_len) == (64, 2, 4, 128)
    small = LlamaConfig.from_json(SMALL, max_seq_len=1024)
    assert (small.dim, small.n_layers, small.n_heads, small.ffn_hidden_dim) == (768, 12, 12, 2048)


def test_ffn_hidden_dim_matches_meta() -> None:
    assert LlamaConfig(dim=4096, n_layers=1, n_heads=32).ffn_hidden_dim == 11008  # Llama-2 7B
    llama3_8b = LlamaConfig(
        dim=4096, n_layers=1, n_heads=32, n_kv_heads=8, multiple_of=1024, ffn_dim_multiplier=1.3
    )
    assert llama3_8b.ffn_hidden_dim == 14336


def test_llama3_params_json(tmp_path: Path) -> None:
    """A Llama-3.1 8B params.json (GQA, ffn multiplier, rope theta and scaling) parses."""
    params = {
        "dim": 4096,
        "ffn_dim_multiplier": 1.3,
        "multiple_of": 1024,
        "n_heads": 32,
        "n_kv_heads": 8,
        "n_layers": 32,
        "norm_eps": 1e-05,
        "rope_theta": 500000.0,
        "use_scaled_rope": True,
        "vocab_size": 128256,
    }
    (tmp_path / "params.json").write_text(json.dumps(params))
    cfg = LlamaConfig.from_json(tmp_path / "params.json", max_seq_len=64)
    assert (cfg.kv_heads, cfg.ffn_hidden_dim, cfg.rope_theta) == (8, 14336, 500000.0)
    assert cfg.use_scaled_rope
    plain = llama.precompute_rope(dataclasses.replace(cfg, use_scaled_rope=False))
    scaled = llama.precompute_rope(cfg)
    torch.testing.assert_close(scaled[:, :8], plain[:, :8])  # high frequencies untouched
    assert not torch.allclose(scaled[:, -8:], plain[:, -8:])  # low frequencies slowed


def test_params_json_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nope.json"
    with pytest.raises(UserError, match="nope.json"):
        LlamaConfig.from_json(missing, max_seq_len=16)
    bad = tmp_path / "params.json"
    bad.write_text(json.dumps({"dim": 32, "n_layers": 1, "n_heads": 4, "n_embd": 3}))
    with pytest.raises(UserError, match=r"params\.json.*n_embd"):
        LlamaConfig.from_json(bad, max_seq_len=16)
    bad.write_text(json.dumps({"dim": 30, "n_layers": 1, "n_heads": 4}))
    with pytest.raises(UserError, match="divisible"):
        LlamaConfig.from_json(bad, max_seq_len=16)
    bad.write_text(json.dumps({"dim": "32", "n_layers": 1, "n_heads": 4}))
    with pytest.raises(UserError, match="dim"):
        LlamaConfig.from_json(bad, max_seq_len=16)
    bad.write_text(json.dumps({"dim": 32, "n_layers": 1, "n_heads": 4,
                               "bias_projections": ["wq", "wz"]}))
    with pytest.raises(UserError, match="bias_projections names 'wz'"):
        LlamaConfig.from_json(bad, max_seq_len=16)


def test_biased_projections_round_trip_through_params_json(tmp_path: Path) -> None:
    """A backbone with ICRT's tuning biases is rebuilt from its config (a merged export's
    backbone_params.json); a params file without the key has none."""
    shape = {"dim": 32, "n_layers": 1, "n_heads": 4}
    (tmp_path / "plain.json").write_text(json.dumps(shape))
    assert LlamaConfig.from_json(tmp_path / "plain.json", 16).bias_projections == ()
    (tmp_path / "biased.json").write_text(json.dumps({**shape,
                                                      "bias_projections": ["wq", "w2"]}))
    cfg = LlamaConfig.from_json(tmp_path / "biased.json", 16)
    assert cfg.bias_projections == ("wq", "w2")
    biases = {n for n, _ in LlamaBackbone(cfg).named_parameters() if n.endswith(".bias")}
    assert biases == {"layers.0.attention.wq.bias", "layers.0.feed_forward.w2.bias"}


# ------------------------------------------------------------------------------ pretrained


def write_fake_checkpoint(
    ckpt_dir: Path, params: dict, seed: int = 0, dtype: torch.dtype = torch.bfloat16
) -> LlamaBackbone:
    """A Meta-layout checkpoint dir (params.json + consolidated.00.pth with the extra
    tok_embeddings/output/rope.freqs entries); returns a model holding the same weights."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    (ckpt_dir / "params.json").write_text(json.dumps(params))
    cfg = LlamaConfig.from_json(ckpt_dir / "params.json", max_seq_len=32)
    torch.manual_seed(seed)
    ref = LlamaBackbone(cfg)
    sd = {k: v.to(dtype) for k, v in ref.state_dict().items()}
    vocab = params.get("vocab_size", 11)
    sd["tok_embeddings.weight"] = torch.randn(vocab, cfg.dim, dtype=dtype)
    sd["output.weight"] = torch.randn(vocab, cfg.dim, dtype=dtype)
    sd["rope.freqs"] = torch.randn(cfg.head_dim // 2, dtype=dtype)
    torch.save(sd, ckpt_dir / "consolidated.00.pth")
    ref.load_state_dict({k: v.float() for k, v in sd.items() if k in ref.state_dict()})
    return ref.eval()


PARAMS = {
    "dim": 32,
    "n_layers": 3,
    "n_heads": 4,
    "n_kv_heads": 2,
    "multiple_of": 16,
    "norm_eps": 1e-5,
    "vocab_size": 11,
}


def lora_count(dim: int, kv_dim: int, hidden: int, rank: int, layers: int) -> int:
    attention = (dim + dim) + (dim + kv_dim) * 2 + (dim + dim)  # wq, wk, wv, wo: in + out
    mlp = 3 * (dim + hidden)  # w1, w2, w3
    return rank * (attention + mlp) * layers


def bias_count(dim: int, hidden: int, layers: int) -> int:
    return (dim + dim + hidden + dim + hidden) * layers  # wq, wo, w1, w2, w3


@pytest.mark.parametrize("layer_idxs", [None, (0, 2)])
def test_pretrained_finetune_lora(tmp_path: Path, layer_idxs: tuple[int, ...] | None) -> None:
    """ICRT's finetune phase: LoRA on all seven projections (scale 1) and zero biases on wq,
    wo, w1, w2, w3 of every layer, which with the norms are all that trains."""
    ref = write_fake_checkpoint(tmp_path / "ckpt", PARAMS)
    model = load_pretrained_llama(
        tmp_path / "ckpt", 32, lora_rank=4, lora_layer_idxs=layer_idxs, phase="finetune"
    )
    assert isinstance(model, LlamaBackbone)
    x = torch.randn(2, 9, 32)
    with torch.no_grad():  # LoRA's B and the biases start at zero: the checkpoint's function
        assert torch.equal(model.eval()(x), ref(x))
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    n_layers = 3 if layer_idxs is None else len(layer_idxs)
    norms = (2 * 3 + 1) * 32
    hidden = model.config.ffn_hidden_dim
    assert sum(trainable.values()) == (lora_count(32, 16, hidden, 4, n_layers)
                                       + bias_count(32, hidden, 3) + norms)
    assert all("lora_" in n or "norm" in n or n.endswith(".bias") for n in trainable)
    biases = {n.split(".")[3] for n in trainable if n.endswith(".bias")}
    assert biases == {"wq", "wo", "w1", "w2", "w3"}
    assert all(torch.all(p == 0) for n, p in model.named_parameters() if n.endswith(".bias"))
    assert model.config.bias_projections == ("wq", "wo", "w1", "w2", "w3")
    for module in model.modules():  # ICRT's scale: alpha = rank
        assert getattr(module, "scaling", {"default": 1.0})["default"] == 1.0
    if layer_idxs is not None:
        assert not any(n.startswith("layers.1.") and "lora_" in n for n in trainable)
    with torch.no_grad():  # the cache still works through the adapters and biases
        for n, p in model.named_parameters():
            if "lora_B" in n or n.endswith(".bias"):
                p.normal_(std=0.1)
        torch.testing.assert_close(decode_in_chunks(model, x, [4]), model(x), atol=1e-5, rtol=1e-5)


def test_lora_alpha_and_bias_can_be_set(tmp_path: Path) -> None:
    write_fake_checkpoint(tmp_path / "ckpt", PARAMS)
    model = load_pretrained_llama(tmp_path / "ckpt", 32, lora_rank=4, lora_alpha=16,
                                  lora_targets=("q_proj", "wv"), lora_bias=False)
    scales = {m.scaling["default"] for m in model.modules() if hasattr(m, "scaling")}
    assert scales == {4.0}
    assert not any(n.endswith(".bias") for n, _ in model.named_parameters())
    assert model.config.bias_projections == ()


@pytest.mark.parametrize("phase, trains", [("pretrain", False), ("full", True)])
def test_pretrained_pretrain_phase_freezes_and_full_trains_everything(
        tmp_path: Path, phase: str, trains: bool) -> None:
    ref = write_fake_checkpoint(tmp_path / "ckpt", PARAMS, dtype=torch.float32)
    model = load_pretrained_llama(tmp_path / "ckpt", 32, 4, None, phase)
    assert all(p.requires_grad == trains for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in ref.parameters())
    x = torch.randn(1, 5, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x))


SPEC = PolicySpec(proprio_dim=3, action_dim=2, num_pred_steps=2, max_timesteps=8)


def _trainable_backbone(policy: ICRTPolicy) -> set[str]:
    return {n for n, p in policy.backbone.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("source", ["scratch", "pretrained"])
@pytest.mark.parametrize("phase", ["pretrain", "finetune", "full"])
def test_what_trains_in_each_phase(tmp_path: Path, source: str, phase: str) -> None:
    """ICRT's phases: pretrain trains a scratch backbone whole and freezes a pretrained one;
    finetune trains LoRA on all seven projections, the five biases per layer and the norms;
    full trains everything. The policy's own modules train in every phase."""
    write_fake_checkpoint(tmp_path / "ckpt", PARAMS)
    where = ({"scratch_llama_config": str(TINY)} if source == "scratch"
             else {"llama_ckpt_dir": str(tmp_path / "ckpt")})
    policy = ICRTPolicy(ModelConfig(policy_cfg=PolicyConfig(phase=phase, lora_rank=2, **where)),
                        SPEC)
    names = {n for n, _ in policy.backbone.named_parameters()}
    trainable = _trainable_backbone(policy)
    if phase == "full" or (phase == "pretrain" and source == "scratch"):
        assert trainable == names
    elif phase == "pretrain":
        assert not trainable
    else:
        n_layers = policy.backbone.config.n_layers
        lora = {n for n in trainable if "lora_" in n}
        assert {(n.split(".")[1], n.split(".")[3]) for n in lora} == {
            (str(i), w) for i in range(n_layers) for w in llama.PROJECTIONS}
        biases = {n for n in trainable if n.endswith(".bias")}
        assert len(biases) == 5 * n_layers
        norms = {n for n in trainable if "norm" in n}
        assert len(norms) == 2 * n_layers + 1
        assert trainable == lora | biases | norms
    others = [p for n, p in policy.named_parameters() if not n.startswith("backbone.")]
    assert others and all(p.requires_grad for p in others)


def test_merged_lora_with_biases_is_a_plain_backbone_of_its_config() -> None:
    """merge_lora folds the adapters in and keeps the biases; a backbone rebuilt from the
    merged config loads the weights and computes the same (non-zero biases and adapters)."""
    model = make(n_kv_heads=2)
    apply_lora(model, rank=2)
    x = torch.randn(1, 7, 32)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n or n.endswith(".bias"):
                p.normal_(std=0.1)
        want = model(x)
    assert merge_lora(model) == 2 * 7
    rebuilt = LlamaBackbone(model.config).eval()
    rebuilt.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), want, atol=1e-5, rtol=1e-5)
    with pytest.raises(UserError, match="no biases on single projections"):
        hf_llama_config(model.config)


def test_pretrained_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        load_pretrained_llama(tmp_path / "missing", 32, 4, None, "finetune")
    (tmp_path / "some").mkdir()
    with pytest.raises(UserError, match="Unknown phase 'midtrain'; use pretrain, finetune, full"):
        load_pretrained_llama(tmp_path / "some", 32, 4, None, "midtrain")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="params.json"):
        load_pretrained_llama(tmp_path / "empty", 32, 4, None, "finetune")
    ckpt = tmp_path / "ckpt"
    write_fake_checkpoint(ckpt, PARAMS)
    with pytest.raises(UserError, match="LoRA layer"):
        load_pretrained_llama(ckpt, 32, 4, (0, 3), "finetune")
    (ckpt / "consolidated.01.pth").write_bytes((ckpt / "consolidated.00.pth").read_bytes())
    with pytest.raises(UserError, match="model-parallel"):
        load_pretrained_llama(ckpt, 32, 4, None, "finetune")
    other = tmp_path / "other"
    write_fake_checkpoint(other, PARAMS)
    (other / "params.json").write_text(json.dumps({**PARAMS, "n_layers": 2}))
    with pytest.raises(UserError, match="does not match"):
        load_pretrained_llama(other, 32, 4, None, "finetune")


def test_build_backbone(tmp_path: Path) -> None:
    cfg = PolicyConfig(scratch_llama_config=str(TINY))
    scratch = build_backbone(cfg, max_seq_len=48)
    assert scratch.d_model == 64 and scratch.config.max_seq_len == 48
    write_fake_checkpoint(tmp_path / "ckpt", PARAMS)
    cfg = dataclasses.replace(
        cfg,
        scratch_llama_config=None,
        llama_ckpt_dir=str(tmp_path / "ckpt"),
        phase="finetune",
        lora_rank=2,
    )
    pre = build_backbone(cfg, max_seq_len=32)
    assert pre.d_model == 32
    assert any("lora_" in n for n, _ in pre.named_parameters())


def test_ragged_rows_equal_each_row_alone():
    """Left-padded rows of different lengths (``valid``) and later steps with an idle row give
    each row's own features: padding takes no position and is never attended to."""
    torch.manual_seed(0)
    cfg = LlamaConfig.from_json(TINY, max_seq_len=64)
    bb = LlamaBackbone(cfg).eval()
    lens = [5, 9, 0]
    seqs = [torch.randn(n + 4, cfg.dim) for n in lens]
    with torch.no_grad():
        alone = [bb(s[None])[0] for s in seqs]
        cache = bb.new_cache(3, 64)
        L = max(lens)
        x, valid = torch.zeros(3, L, cfg.dim), torch.zeros(3, L, dtype=torch.bool)
        for i, n in enumerate(lens):
            x[i, L - n:], valid[i, L - n:] = seqs[i][:n], True
        out = bb(x, cache, valid)
        assert cache.ragged and cache.row_length.tolist() == lens
        for i, n in enumerate(lens):
            if n:
                torch.testing.assert_close(out[i, -1], alone[i][n - 1], atol=1e-5, rtol=0)
        done = list(lens)
        for step in range(4):
            active = torch.tensor([True, step != 1, True])  # row 1 idles at step 1
            x = torch.stack([seqs[i][min(done[i], len(seqs[i]) - 1)] for i in range(3)])[:, None]
            out = bb(x, cache, active[:, None])
            for i in range(3):
                if active[i]:
                    torch.testing.assert_close(out[i, 0], alone[i][done[i]], atol=1e-5, rtol=0)
                    done[i] += 1
        assert cache.row_length.tolist() == done


# ------------------------------------------------------------- Hugging Face Llama directories


def _hf_llama_dir(tmp_path: Path, sharded: bool, **extra: Any) -> tuple[Path, Any]:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=11, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
        max_position_embeddings=64, **extra)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    folder = tmp_path / "hf"
    hf.save_pretrained(folder, max_shard_size="30KB" if sharded else "5GB",
                       safe_serialization=True)
    return folder, hf


@pytest.mark.parametrize("sharded", [False, True])
def test_hf_llama_dir_gives_transformers_hidden_states(tmp_path: Path, sharded: bool) -> None:
    folder, hf = _hf_llama_dir(tmp_path, sharded)
    assert (folder / "model.safetensors.index.json").is_file() == sharded
    model = load_pretrained_llama(folder, 32, phase="pretrain").eval()
    assert model.config.ffn_hidden_dim == 48 and model.config.kv_heads == 2
    x = torch.randn(2, 9, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf.model(inputs_embeds=x).last_hidden_state,
                                   atol=1e-5, rtol=1e-5)
        # the KV cache decodes the same function
        torch.testing.assert_close(decode_in_chunks(model, x, [4]), model(x), atol=1e-5,
                                   rtol=1e-5)
    lora = load_pretrained_llama(folder, 32, lora_rank=2, phase="finetune").eval()
    with torch.no_grad():  # adapters start at zero
        torch.testing.assert_close(lora(x), model(x))


def test_hf_dirs_that_are_not_plain_llama_fail_in_one_sentence(tmp_path: Path) -> None:
    folder, _ = _hf_llama_dir(tmp_path, sharded=False)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "gpt2",
                                                    "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(UserError, match=r"holds a gpt2 model \(GPT2LMHeadModel\), not a "
                                        r"Llama-family one"):
        load_pretrained_llama(folder, 32, phase="pretrain")
    (folder / "config.json").write_text(json.dumps({**config, "attention_bias": True}))
    with pytest.raises(UserError, match="uses attention_bias"):
        load_pretrained_llama(folder, 32, phase="pretrain")
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(UserError, match="no model.safetensors.*pytorch_model.bin"):
        load_pretrained_llama(folder, 32, phase="pretrain")
    (folder / "pytorch_model.bin").write_bytes(b"\0" * 10)
    (folder / "model.safetensors").write_bytes(b"\0" * 10)
    with pytest.raises(UserError, match="Could not read Llama weights"):
        load_pretrained_llama(folder, 32, phase="pretrain")


def test_hf_llama31_rope_scaling_and_theta_are_read(tmp_path: Path) -> None:
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
               "rope_theta": 500000.0}
    folder, hf = _hf_llama_dir(tmp_path, sharded=False, rope_parameters=scaling)
    model = load_pretrained_llama(folder, 32, phase="pretrain").eval()
    assert model.config.use_scaled_rope and model.config.rope_theta == 500000.0
    x = torch.randn(1, 20, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf.model(inputs_embeds=x).last_hidden_state,
                                   atol=1e-5, rtol=1e-5)


def test_no_load_llama_keeps_the_shape_with_random_weights(tmp_path: Path) -> None:
    ref = write_fake_checkpoint(tmp_path / "ckpt", PARAMS, dtype=torch.float32)
    cfg = PolicyConfig(llama_ckpt_dir=str(tmp_path / "ckpt"), phase="pretrain", load_llama=False)
    model = build_backbone(cfg, max_seq_len=32)
    assert model.config.n_layers == 3 and model.config.kv_heads == 2
    ref_sd = ref.state_dict()
    assert all(v.shape == ref_sd[k].shape for k, v in model.state_dict().items())
    assert not torch.equal(model.state_dict()["layers.0.attention.wq.weight"],
                           ref_sd["layers.0.attention.wq.weight"])


def test_hf_dir_with_a_missing_shard_fails_in_one_sentence(tmp_path: Path) -> None:
    folder, _ = _hf_llama_dir(tmp_path, sharded=True)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    (folder / shard).unlink()
    with pytest.raises(UserError, match=rf"Shard '.*{shard}' named by '.*index.json' does not "
                                        rf"exist"):
        load_pretrained_llama(folder, 32, phase="pretrain")
