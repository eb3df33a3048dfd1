"""Vision encoder, augmentation, attention pooling, state tokens and the feature cache.

Everything runs on random weights (``vision_nonpretrained``) of tiny models at 64 px:
vit_tiny_patch16_224 gives 16 patches + 1 class token of width 192, resnet18 a 2x2 map of 512.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from icrt.config import PolicyConfig, VisionEncoderConfig
from icrt.data.store import EpisodeStore
from icrt.errors import UserError
from icrt.models.encoders.features import (
    benchmark_feature_cache,
    check_cached_features,
    precompute_features,
)
from icrt.models.encoders.vision import (
    AttentionPool,
    ObservationEncoder,
    VisionEncoder,
    augment_images,
    feature_key,
)

VIT = "vit_tiny_patch16_224"


def vit_cfg(**kw) -> VisionEncoderConfig:
    return VisionEncoderConfig(
        vision_encoder=VIT, vision_nonpretrained=True, vision_image_size=64, **kw
    )


def resnet_cfg(**kw) -> VisionEncoderConfig:
    return VisionEncoderConfig(
        vision_encoder="resnet18", vision_nonpretrained=True, vision_image_size=64, **kw
    )


def images(n: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=g)


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: one thread avoids OpenMP stalls on a busy shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def vit() -> VisionEncoder:
    torch.manual_seed(0)
    return VisionEncoder(vit_cfg())


# --------------------------------------------------------------------------- encoder


def test_vit_tokens_and_uint8_input(vit):
    assert (vit.num_tokens, vit.out_dim, vit.image_size) == (17, 192, 64)
    out = vit(images(3, size=48))  # resized 48 -> 64
    assert out.shape == (3, 17, 192) and out.dtype == torch.float32
    assert not out.requires_grad  # frozen: no graph
    with pytest.raises(ValueError, match="uint8"):
        vit(images(2).float())


def test_normalisation_uses_model_mean_std(vit):
    x = torch.full((2, 64, 64, 3), 255, dtype=torch.uint8)
    x[1] = 0
    norm = vit.normalize(vit.to_float(x))
    mean = torch.tensor(vit.model.pretrained_cfg["mean"]).view(3, 1, 1)
    std = torch.tensor(vit.model.pretrained_cfg["std"]).view(3, 1, 1)
    torch.testing.assert_close(norm[0], ((1 - mean) / std).expand(3, 64, 64))
    torch.testing.assert_close(norm[1], ((0 - mean) / std).expand(3, 64, 64))
    # forward == timm's forward_features on the normalised input: every token, class included
    imgs = images(2)
    expected = vit.model.forward_features(vit.normalize(vit.to_float(imgs)))
    torch.testing.assert_close(vit(imgs), expected)


def test_resnet_tokens_are_the_flattened_map():
    enc = VisionEncoder(resnet_cfg())
    assert (enc.num_tokens, enc.out_dim, enc.image_size) == (4, 512, 64)  # 64 / 32 = 2x2
    assert enc(images(2, size=84)).shape == (2, 4, 512)


def test_trainable_parameter_counts():
    frozen = VisionEncoder(vit_cfg())
    assert frozen.frozen and frozen.trainable_parameters() == 0
    frozen.train()
    assert not frozen.model.training  # frozen encoders stay in eval mode

    last = VisionEncoder(vit_cfg(vision_unfreeze_last_n=1))
    expected = n_params(last.model.blocks[-1]) + n_params(last.model.norm)
    assert not last.frozen and last.trainable_parameters() == expected
    last.train()
    assert last.model.blocks[-1].training and not last.model.blocks[0].training

    rank = 4
    lora = VisionEncoder(vit_cfg(vision_lora=True, vision_lora_rank=rank))
    d = 192  # vit_tiny: qkv is 192 -> 576, proj 192 -> 192, in each of 12 blocks
    expected_lora = 12 * (rank * (d + 3 * d) + rank * (d + d))
    assert lora.trainable_parameters() == expected_lora
    assert all("lora_" in n for n, p in lora.named_parameters() if p.requires_grad)

    everything = VisionEncoder(vit_cfg(vision_unfreeze_all=True))
    assert everything.trainable_parameters() == n_params(everything) > 5_000_000

    res = VisionEncoder(resnet_cfg(vision_unfreeze_last_n=1))
    assert res.trainable_parameters() == n_params(res.model.layer4)


def test_group_norm_resnet_trains_end_to_end_without_batch_statistics(tmp_path):
    enc = VisionEncoder(resnet_cfg(vision_unfreeze_all=True, vision_group_norm=True))
    norms = [m for m in enc.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert len(norms) == 20 and not any(
        isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in enc.modules())
    assert all(m.num_channels // m.num_groups == 16 for m in norms)
    x = images(4)
    enc.train()
    out = enc(x)
    out.square().mean().backward()
    assert all(p.grad is not None for p in enc.parameters())  # every weight trains
    with torch.no_grad():
        enc.eval()
        assert torch.allclose(enc(x), out.detach(), atol=1e-5)  # no running statistics
    # a GroupNorm checkpoint file loads back into a GroupNorm encoder, weight for weight
    torch.save(enc.model.state_dict(), tmp_path / "gn.pth")
    again = VisionEncoder(VisionEncoderConfig(vision_encoder=str(tmp_path / "gn.pth"),
                                              vision_arch="resnet18", vision_image_size=64,
                                              vision_group_norm=True))
    assert again.weights_fingerprint() == enc.weights_fingerprint()


@pytest.mark.parametrize(
    ("cfg", "match"),
    [
        (resnet_cfg(vision_lora=True), "attention layers"),
        (vit_cfg(vision_unfreeze_last_n=13), "only 12 blocks"),
        (vit_cfg(vision_unfreeze_all=True, vision_lora=True), "already trains"),
        (VisionEncoderConfig(vision_encoder="no_such_model_xyz", vision_nonpretrained=True),
         "Unknown timm model"),
        (vit_cfg(vision_group_norm=True), "no BatchNorm layers"),
    ],
)
def test_bad_encoder_configs(cfg, match):
    with pytest.raises(UserError, match=match):
        VisionEncoder(cfg)


def test_local_checkpoints_load_identically(vit, tmp_path):
    sd = vit.model.state_dict()
    pth = tmp_path / "enc.pth"
    # a training-script checkpoint: wrapped, with MAE decoder weights and run arguments
    mae_extra = {"decoder_embed.weight": torch.zeros(4, 192), "mask_token": torch.zeros(1, 1, 4)}
    torch.save({"model": {**sd, **mae_extra}, "epoch": 3}, pth)
    st = tmp_path / "enc.safetensors"
    save_file({f"module.{k}": v.contiguous() for k, v in sd.items()}, str(st))  # DDP prefix
    x = images(2)
    want = vit(x)
    for path in (pth, st):
        cfg = VisionEncoderConfig(vision_encoder=str(path), vision_arch=VIT, vision_image_size=64)
        torch.testing.assert_close(VisionEncoder(cfg)(x), want, rtol=0, atol=0)
    # another resolution: position embeddings are resampled from the 4x4 grid to 2x2
    cfg32 = VisionEncoderConfig(vision_encoder=str(pth), vision_arch=VIT, vision_image_size=32)
    assert VisionEncoder(cfg32)(x).shape == (2, 5, 192)


def test_checkpoint_errors(tmp_path):
    missing = VisionEncoderConfig(vision_encoder=str(tmp_path / "nope.pth"), vision_arch=VIT)
    with pytest.raises(UserError, match="does not exist"):
        VisionEncoder(missing)
    junk = tmp_path / "junk.pth"
    torch.save({"model": {"something.else": torch.zeros(3)}}, junk)
    cfg = VisionEncoderConfig(vision_encoder=str(junk), vision_arch=VIT, vision_image_size=64)
    with pytest.raises(UserError, match="no weights that fit"):
        VisionEncoder(cfg)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="Could not read"):
        VisionEncoder(dataclasses.replace(cfg, vision_encoder=str(garbage)))


def test_pretrained_name_offline_is_a_user_error(monkeypatch, tmp_path):
    import huggingface_hub.constants as hf

    # offline, with an empty cache: the test cannot hang or pick up a user's cached weights
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(UserError) as info:
        VisionEncoder(VisionEncoderConfig(vision_encoder=VIT, vision_image_size=64))
    msg = str(info.value)
    assert "Could not load pretrained weights" in msg and "vision-nonpretrained" in msg
    assert "\n" not in msg and msg.count(". ") == 0
    assert info.value.__cause__ is None and info.value.__suppress_context__


# --------------------------------------------------------------------------- augmentation


def test_augmentation_is_seeded_and_sane():
    x = images(6).permute(0, 3, 1, 2).float() / 255
    a = augment_images(x, torch.Generator().manual_seed(1))
    b = augment_images(x, torch.Generator().manual_seed(1))
    c = augment_images(x, torch.Generator().manual_seed(2))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c) and not torch.equal(a, x)
    assert a.shape == x.shape and a.min() >= 0 and a.max() <= 1
    assert (a - x).abs().mean() < 0.35  # a jitter, not a different image
    # with no photometric change, the shift is a crop of the edge-padded image
    shifted = augment_images(x, torch.Generator().manual_seed(3), brightness=0.0,
                             contrast=(1.0, 1.0), pad=4)
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4), mode="replicate")
    for i in range(len(x)):
        errors = [(shifted[i] - padded[i, :, r : r + 64, s : s + 64]).abs().max()
                  for r in range(9) for s in range(9)]
        assert min(errors) < 1e-6
    same = augment_images(x, None, brightness=0.0, contrast=(1.0, 1.0), pad=0)
    torch.testing.assert_close(same, x)


def test_attention_pool_equals_plain_attention():
    torch.manual_seed(0)
    pool = AttentionPool(32, 10, num_heads=4, mlp_ratio=2.0)
    with torch.no_grad():  # non-zero biases, so the folding of the key/value bias is tested
        pool.kv.bias.normal_()
        pool.q.bias.normal_()
    tokens, extra = torch.randn(5, 7, 32), torch.randn(5, 2, 32)
    assert pool(tokens).shape == (5, 10)
    for e in (None, extra):
        torch.testing.assert_close(pool(tokens, e), pool.forward_reference(tokens, e))
    grads = []
    for fn in (pool, pool.forward_reference):
        pool.zero_grad()
        fn(tokens, extra).square().sum().backward()
        grads.append([p.grad.clone() for p in pool.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    with pytest.raises(UserError, match="adapter-num-heads"):
        AttentionPool(30, 10, num_heads=4)


# --------------------------------------------------------------------------- state tokens


def obs_batch(cams, b=2, t=3, proprio_dim=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    obs = {"proprio": torch.randn(b, t, proprio_dim, generator=g)}
    for k in cams:
        obs[k] = torch.randint(0, 256, (b, t, 64, 64, 3), dtype=torch.uint8, generator=g)
    return obs


@pytest.mark.parametrize(
    ("cams", "policy", "d_model"),
    [
        ((), PolicyConfig(), 32),
        (("image_a",), PolicyConfig(), 32),
        (("image_a", "image_b"), PolicyConfig(separate_camera_adapter=True), 33),
        (("image_a", "image_b"), PolicyConfig(separate_camera_adapter=False,
                                               camera_pos_emb=True), 32),
        (("image_a", "image_b"), PolicyConfig(remove_proprio=True), 32),
    ],
)
def test_observation_encoder_shapes_and_grads(cams, policy, d_model):
    torch.manual_seed(0)
    enc = ObservationEncoder(vit_cfg(), policy, cams, proprio_dim=7, d_model=d_model,
                             vision_aug=True)
    obs = obs_batch(cams)
    if policy.remove_proprio:
        obs.pop("proprio")
    enc.train()
    out = enc(obs, train_aug=True, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 3, d_model)
    if d_model % 2 and len(cams) == 2 and policy.separate_camera_adapter:
        assert torch.all(out[..., -1] == 0)  # 16 + 16 features, zero-padded to 33
    out.square().mean().backward()
    if not cams:
        assert not hasattr(enc, "vision")
        assert all(p.grad is not None for p in enc.lowdim_mlp.parameters())
        return
    assert all(p.grad is not None for p in enc.pools.parameters())
    assert enc.feature_norm.weight.grad is not None
    assert (enc.proprio_mlp is None) == policy.remove_proprio
    if enc.proprio_mlp is not None:
        assert enc.proprio_mlp[0].weight.grad is not None
    if enc.camera_emb is not None:
        assert enc.camera_emb.grad is not None
    assert all(p.grad is None for p in enc.vision.parameters())


def test_lora_encoder_gets_gradients():
    enc = ObservationEncoder(vit_cfg(vision_lora=True, vision_lora_rank=2), PolicyConfig(),
                             ("image_a",), proprio_dim=7, d_model=16, vision_aug=False)
    enc(obs_batch(("image_a",), t=1)).sum().backward()
    grads = {n: p.grad for n, p in enc.vision.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for n, g in grads.items() if "lora_B" in n)


def test_state_tokens_need_some_input():
    with pytest.raises(UserError, match="camera images or low-dim"):
        ObservationEncoder(vit_cfg(), PolicyConfig(remove_proprio=True), (), 7, 16, False)
    with pytest.raises(UserError, match="frozen encoder"):
        ObservationEncoder(vit_cfg(use_cached_features=True, vision_lora=True), PolicyConfig(),
                           ("image_a",), 7, 16, False)


# --------------------------------------------------------------------------- feature cache

CAMS = ("image_agentview", "image_wrist")


@pytest.fixture
def store_path(tmp_path):
    path = tmp_path / "demo.zarr"
    store = EpisodeStore.create(path)
    rng = np.random.default_rng(0)
    for i, length in enumerate((4, 5, 6)):
        ep = {
            "state": rng.normal(size=(length, 7)).astype(np.float32),
            "action": rng.normal(size=(length, 3)).astype(np.float32),
            **{k: rng.integers(0, 256, (length, 64, 64, 3), dtype=np.uint8) for k in CAMS},
        }
        store.add_episode(ep, task=f"t{i % 2}")
    store.close()
    return path


def test_cached_features_match_pixels(store_path):
    cfg = vit_cfg(use_cached_features=True)
    torch.manual_seed(0)
    enc = ObservationEncoder(cfg, PolicyConfig(camera_pos_emb=True), CAMS, proprio_dim=7,
                             d_model=32, vision_aug=True).eval()
    written = precompute_features(store_path, cfg, CAMS, batch_size=4, dtype="float32",
                                  progress=False, encoder=enc.vision)
    assert written == [feature_key(k) for k in CAMS] == ["feature_agentview", "feature_wrist"]
    store = EpisodeStore.open(store_path)
    info = store.key_info("feature_wrist")
    assert info["shape"] == [17, 192] and info["encoder"] == VIT and info["image_size"] == 64
    check_cached_features(store, cfg, CAMS, encoder=enc.vision)
    check_cached_features(store, cfg, CAMS)  # metadata only

    ep = store.episode(2)  # 6 steps -> (B=2, T=3)
    obs_pix = {"proprio": torch.from_numpy(ep["state"]).view(2, 3, 7)}
    obs_feat = dict(obs_pix)
    for k in CAMS:
        obs_pix[k] = torch.from_numpy(ep[k]).view(2, 3, 64, 64, 3)
        obs_feat[feature_key(k)] = torch.from_numpy(ep[feature_key(k)]).view(2, 3, 17, 192)
    with torch.no_grad():
        torch.testing.assert_close(enc(obs_feat), enc(obs_pix), rtol=1e-5, atol=1e-5)

    other = dataclasses.replace(cfg, vision_encoder="resnet18")
    with pytest.raises(UserError, match="rerun scripts/cache_features.py"):
        check_cached_features(store, other, CAMS)
    # random inits are a fixed function of the config, so a rebuilt encoder matches ...
    check_cached_features(store, cfg, CAMS, encoder=VisionEncoder(vit_cfg()))
    changed = VisionEncoder(vit_cfg())  # ... and an encoder with other weights does not
    with torch.no_grad():
        next(changed.parameters()).add_(0.5)
    with pytest.raises(UserError, match="different weights"):
        check_cached_features(store, cfg, CAMS, encoder=changed)
    with pytest.raises(UserError, match="has no cached features"):
        check_cached_features(store, cfg, ("image_other",))
    with pytest.raises(UserError, match="already has"):
        precompute_features(store_path, cfg, CAMS, progress=False, encoder=enc.vision)
    with pytest.raises(UserError, match="frozen encoder"):
        precompute_features(store_path, vit_cfg(vision_lora=True), CAMS, progress=False)


def test_cache_features_script(store_path, monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("cache_features", "scripts/cache_features.py")
    script = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "cache_features", script)  # tyro reads its source
    spec.loader.exec_module(script)
    argv = ["cache_features.py", "--store", str(store_path), "--camera-keys", "image_wrist",
            "--model-cfg.vision-encoder-cfg.vision-encoder", "resnet18",
            "--model-cfg.vision-encoder-cfg.vision-nonpretrained",
            "--model-cfg.vision-encoder-cfg.vision-image-size", "64", "--batch-size", "8"]
    monkeypatch.setattr(sys, "argv", argv)
    script.main()
    assert "feature_wrist" in capsys.readouterr().out
    info = EpisodeStore.open(store_path).key_info("feature_wrist")
    assert info["shape"] == [4, 512] and info["dtype"] == "float16"
    assert info["encoder"] == "resnet18" and info["pretrained"] is False


def test_benchmark_runs():
    res = benchmark_feature_cache(vit_cfg(), batch_size=1, seq_length=2, image_size=32,
                                  steps=1, warmup=0, d_model=16)
    assert res["pixels_seq_per_s"] > 0 and res["cached_seq_per_s"] > 0
