"""Decoder: the inference layout of the backbone equals the training backbone (float32), its
static cache equals recomputation for every dtype, and it follows weight changes."""

import numpy as np
import pytest
import torch
from test_inference import _rollout, runs  # noqa: F401  (module-scoped fixture)

from icrt.data.store import EpisodeStore
from icrt.errors import UserError
from icrt.eval.inference import InContextPolicy
from icrt.models.backbones.decode import Decoder, weight_dtype_name
from icrt.models.backbones.llama import LlamaBackbone, LlamaConfig
from icrt.models.backbones.pretrained import apply_lora

# cached vs recomputed actions (normalised units of about +-1): float32 is exact up to
# summation order; bf16 and int8 round activations to 8 mantissa bits, and a step decoded
# alone rounds differently from the same step inside a whole-context forward
ACTION_TOL = {"float32": 1e-4, "bfloat16": 1e-2, "int8": 1e-2}


def _backbone(n_kv_heads=None, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=n_kv_heads, multiple_of=32,
                      max_seq_len=64)
    return LlamaBackbone(cfg).eval()


@pytest.mark.parametrize("n_kv_heads", [None, 2])
def test_float32_decoder_equals_training_backbone(n_kv_heads):
    backbone = _backbone(n_kv_heads)
    x = torch.randn(1, 40, 64)
    with torch.no_grad():
        want = backbone(x)
    dec = Decoder(backbone, max_len=48)
    torch.testing.assert_close(dec(x), want, atol=1e-5, rtol=1e-5)
    dec.reset()  # prefill, then a 2-token step (the act pattern), a 1-token step, the rest
    got = torch.cat([dec(x[:, :30]), dec(x[:, 30:32]), dec(x[:, 32:33]), dec(x[:, 33:])], 1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert dec.length == 40
    with pytest.raises(ValueError, match="overflow"):
        dec(x[:, :9])  # 49 > 48 tokens
    assert dec.length == 40  # a refused call writes nothing


@pytest.mark.parametrize("bias", [False, True])
def test_lora_adapters_are_merged(bias):
    backbone = _backbone(n_kv_heads=2)
    apply_lora(backbone, rank=4, bias=bias)
    for name, p in backbone.named_parameters():
        if "lora_B" in name or name.endswith(".bias"):
            torch.nn.init.normal_(p, std=0.1)  # B = 0 at injection would hide a missing merge
    x = torch.randn(1, 20, 64)
    with torch.no_grad():
        want = backbone(x)
    dec = Decoder(backbone, 32)
    torch.testing.assert_close(dec(x), want, atol=1e-5, rtol=1e-5)
    assert (dec.blocks[0].qkv.b is not None) == bias  # wq's bias, zeros for wk and wv
    for dtype in ("bfloat16", "int8"):
        got = Decoder(backbone, 32, dtype=dtype)(x)
        assert (got - want).norm() / want.norm() < 0.05, dtype


def test_biases_of_a_plain_backbone_are_decoded():
    """A merged LoRA export's backbone: biases on plain nn.Linear projections."""
    backbone = _backbone()
    backbone.add_biases(("wq", "wo", "w1", "w2", "w3"))
    for name, p in backbone.named_parameters():
        if name.endswith(".bias"):
            torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(1, 20, 64)
    with torch.no_grad():
        want = backbone(x)
    dec = Decoder(backbone, 32)
    got = torch.cat([dec(x[:, :12]), dec(x[:, 12:14]), dec(x[:, 14:])], 1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
def test_low_precision_decoders_stay_close_to_float32(dtype):
    backbone = _backbone()
    x = torch.randn(1, 30, 64)
    with torch.no_grad():
        want = backbone(x)
    dec = Decoder(backbone, 32, dtype=dtype)
    got = dec(x)
    rel = (got - want).norm() / want.norm()
    assert rel < 0.05, rel
    assert dec.k.dtype == torch.bfloat16
    assert dec.weight_bytes < Decoder(backbone, 32).weight_bytes / (3.5 if dtype == "int8" else 1.9)


def test_stale_after_weights_change_and_policy_rebuilds(runs):  # noqa: F811
    root, paths = runs
    store = EpisodeStore.open(root / "reach.zarr")
    policy = InContextPolicy.from_checkpoint(paths["mlp"], seed=0)
    policy.prompt([store.episode(0)])
    query = store.episode(3)
    before = _rollout(policy, query, episodes=1)
    dec = policy._decoder
    assert not dec.stale()
    with torch.no_grad():  # what a PPO worker does when new weights arrive
        state = {k: v + 0.05 * torch.randn_like(v) for k, v in policy.model.state_dict().items()}
    policy.model.load_state_dict(state)
    assert dec.stale()
    policy.prompt([store.episode(0)])  # prompt tokens come from the encoders: re-prompt
    after = _rollout(policy, query, episodes=1)
    assert policy._decoder is not dec and not np.allclose(before, after, atol=1e-3)
    fresh = InContextPolicy.from_checkpoint(paths["mlp"], seed=0)
    fresh.model.load_state_dict(state)
    fresh.prompt([store.episode(0)])
    np.testing.assert_allclose(after, _rollout(fresh, query, episodes=1), atol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
def test_cached_equals_recompute_for_every_dtype(runs, dtype):  # noqa: F811
    """Two prompts and two episodes overflow the 96-token context, so both paths slide."""
    root, paths = runs
    store = EpisodeStore.open(root / "reach.zarr")
    demos, query = [store.episode(0), store.episode(1)], store.episode(7)
    cached = InContextPolicy.from_checkpoint(paths["mlp"], seed=1, dtype=dtype)
    full = InContextPolicy.from_checkpoint(paths["mlp"], seed=1, dtype=dtype, use_cache=False)
    for p in (cached, full):
        p.prompt(demos)
    a, b = _rollout(cached, query), _rollout(full, query)
    assert cached._offset > 0  # the context slid
    np.testing.assert_allclose(a, b, atol=ACTION_TOL[dtype])
    assert cached._decoder.weight_dtype == dtype


def test_dtype_names():
    assert weight_dtype_name(torch.bfloat16) == "bfloat16"
    assert weight_dtype_name("fp32") == "float32"
    with pytest.raises(UserError, match="Unknown backbone dtype 'int4'"):
        weight_dtype_name("int4")


@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_compiled_steps_agree_with_eager(dtype):
    backbone = _backbone(n_kv_heads=2)
    x = torch.randn(1, 36, 64)
    eager, compiled = Decoder(backbone, 48, dtype=dtype), Decoder(backbone, 48, dtype=dtype,
                                                                    compile=True)
    outs = []
    for dec in (eager, compiled):
        # prefill (eager in both), then 2-token and 1-token steps (compiled in the second)
        outs.append(torch.cat([dec(x[:, :30]), dec(x[:, 30:32]), dec(x[:, 32:34]),
                               dec(x[:, 34:35]), dec(x[:, 35:36])], 1))
    tol = 1e-4 if dtype == "float32" else 2e-2
    torch.testing.assert_close(outs[1], outs[0], atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_prompt_longer_than_the_context_slides_with_the_static_cache(runs, dtype):  # noqa: F811
    root, paths = runs
    store = EpisodeStore.open(root / "reach.zarr")
    demos, query = [store.episode(i) for i in range(5)], store.episode(7)
    cached = InContextPolicy.from_checkpoint(paths["mlp"], seed=2, dtype=dtype)
    full = InContextPolicy.from_checkpoint(paths["mlp"], seed=2, dtype=dtype, use_cache=False)
    for p in (cached, full):
        p.prompt(demos)
    assert len(cached._prompt_tokens) > cached.max_tokens  # the prompt alone overflows
    assert cached._offset > 0 and cached._decoder.length <= cached.max_tokens
    np.testing.assert_allclose(_rollout(cached, query), _rollout(full, query),
                               atol=ACTION_TOL[dtype])
