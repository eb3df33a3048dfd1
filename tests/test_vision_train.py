"""Image policies end to end: train on camera frames, or on cached encoder features."""

import numpy as np
import pytest
import torch
from helpers import make_image_dataset
from test_train import tiny_args

from icrt.config import parse_config
from icrt.data.store import EpisodeStore
from icrt.errors import UserError
from icrt.eval.inference import InContextPolicy
from icrt.models.encoders.features import precompute_features
from icrt.train.loop import train

VISION = ["--model-cfg.vision-encoder-cfg.vision-encoder", "vit_tiny_patch16_224",
          "--model-cfg.vision-encoder-cfg.vision-nonpretrained",
          "--model-cfg.vision-encoder-cfg.vision-image-size", "32",
          "--shared-cfg.seq-length", "32", "--shared-cfg.batch-size", "2",
          "--dataset-cfg.non-overlapping", "8", "--trainer-cfg.epochs", "1"]


@pytest.fixture(scope="module")
def image_json(tmp_path_factory):
    return make_image_dataset(tmp_path_factory.mktemp("img"))


def test_train_on_pixels_and_act_on_camera_frames(image_json, tmp_path):
    run = train(parse_config(tiny_args(image_json, tmp_path / "px", *VISION)), progress=False)
    policy = InContextPolicy.from_checkpoint(run)
    assert policy.spec.camera_keys == ("image_cam",)
    store = EpisodeStore.open(image_json.parent / "img.zarr")
    policy.prompt([store.episode(0)])
    ep = store.episode(5)
    action = policy.act({"state": ep["state"][0], "image_cam": ep["image_cam"][0]})
    assert action.shape == (2,) and np.isfinite(action).all()


def test_train_on_cached_features(image_json, tmp_path):
    vcfg = parse_config(tiny_args(image_json, tmp_path, *VISION)).model_cfg.vision_encoder_cfg
    with pytest.raises(UserError, match="no cached features 'feature_cam'"):
        train(parse_config(tiny_args(image_json, tmp_path / "x", *VISION,
                                     "--model-cfg.vision-encoder-cfg.use-cached-features")),
              progress=False)
    precompute_features(image_json.parent / "img.zarr", vcfg, ["image_cam"], dtype="float32",
                        progress=False)
    run = train(parse_config(tiny_args(image_json, tmp_path / "feat", *VISION,
                                       "--model-cfg.vision-encoder-cfg.use-cached-features")),
                progress=False)
    store = EpisodeStore.open(image_json.parent / "img.zarr")
    ep = store.episode(6)
    acts = {}
    for source in ("feature_cam", "image_cam"):  # cached features, or live camera frames
        policy = InContextPolicy.from_checkpoint(run, deterministic=True)
        policy.prompt([store.episode(1)])
        acts[source] = np.stack([policy.act({"state": ep["state"][t], source: ep[source][t]})
                                 for t in range(5)])
    np.testing.assert_allclose(acts["feature_cam"], acts["image_cam"], atol=1e-4)
    # a different encoder than the one the features came from is refused
    with pytest.raises(UserError, match="come from encoder"):
        train(parse_config(tiny_args(image_json, tmp_path / "y", *VISION,
                                     "--model-cfg.vision-encoder-cfg.use-cached-features",
                                     "--model-cfg.vision-encoder-cfg.vision-image-size", "48")),
              progress=False)
    assert torch.is_grad_enabled()


def test_groupnorm_resnet_trains_end_to_end_and_reloads(image_json, tmp_path):
    from icrt.models.encoders.vision import VisionEncoder

    args = ["--model-cfg.vision-encoder-cfg.vision-encoder", "resnet18",
            "--model-cfg.vision-encoder-cfg.vision-nonpretrained",
            "--model-cfg.vision-encoder-cfg.vision-unfreeze-all",
            "--model-cfg.vision-encoder-cfg.vision-group-norm",
            "--model-cfg.vision-encoder-cfg.vision-image-size", "32",
            *VISION[5:]]
    cfg = parse_config(tiny_args(image_json, tmp_path / "gn", *args))
    run = train(cfg, progress=False)
    policy = InContextPolicy.from_checkpoint(run)
    enc = policy.model.state_encoder.vision
    assert any(isinstance(m, torch.nn.GroupNorm) for m in enc.modules())
    start = VisionEncoder(cfg.model_cfg.vision_encoder_cfg)  # the same seeded random init
    assert enc.weights_fingerprint() != start.weights_fingerprint()  # the encoder trained
    store = EpisodeStore.open(image_json.parent / "img.zarr")
    policy.prompt([store.episode(0)])
    ep = store.episode(5)
    action = policy.act({"state": ep["state"][0], "image_cam": ep["image_cam"][0]})
    assert action.shape == (2,) and np.isfinite(action).all()
