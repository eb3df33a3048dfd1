"""Evaluation subsets, test-time observation perturbations and their flags (no simulator)."""

import hashlib
from types import SimpleNamespace

import numpy as np
import pytest

from icrt.config import EvalConfig
from icrt.envs.base import SEED_STREAMS, episode_seed
from icrt.errors import UserError
from icrt.eval.augment import ObservationPerturber, TestAugmentation, jitter_frame, shift_frame
from icrt.eval.rollout import _test_augmentation
from icrt.eval.subsets import SUBSETS, parse_subset

MW_TASKS = ("reach-v3", "push-v3", "pick-place-v3", "door-open-v3", "drawer-close-v3")


def _one_sentence(message: str) -> None:
    assert message.endswith(".") and ". " not in message, message


def test_subset_seeds_are_fixed_documented_and_disjoint():
    minival = parse_subset("minival")
    assert minival == parse_subset("minival@v1") and minival.label == "minival@v1"
    # pinned: the same seeds on every machine and every run
    assert minival.seeds("reach-v3") == [2879704577, 2670293766, 2210883289, 3945111326,
                                         2187038042]
    assert parse_subset("val").seeds("reach-v3")[:3] == [2300678123, 3338595506, 3830570661]
    # the formula of icrt/eval/subsets.py's docstring, recomputed here
    first = hashlib.sha256(b"icrt-eval-subset:v1:reach-v3:0").digest()[:4]
    assert minival.seeds("reach-v3")[0] == 2**31 + (int.from_bytes(first, "big") & 0x7FFFFFFF)
    for task in MW_TASKS + ("Lift", "point-reach"):
        by_subset = {n: parse_subset(n).seeds(task) for n in SUBSETS["v1"]}
        assert {n: len(s) for n, s in by_subset.items()} == {"minival": 5, "val": 20, "test": 50}
        every = [s for seeds in by_subset.values() for s in seeds]
        assert len(set(every)) == len(every)  # no repeat within or across subsets
        assert all(2**31 <= s < 2**32 for s in every)
    assert parse_subset("minival").seeds("push-v3") != parse_subset("minival").seeds("reach-v3")


def test_subset_seeds_never_collide_with_collection_seeds():
    """Collected (train/prompt), default-eval, RL and DAgger seeds are all below 2**31."""
    subset = {s for t in MW_TASKS for n in SUBSETS["v1"] for s in parse_subset(n).seeds(t)}
    rng = np.random.default_rng(0)
    for base in [0, 1, 7, 2**31 - 1, *rng.integers(0, 2**62, 20).tolist()]:
        for stream in SEED_STREAMS:
            for task in MW_TASKS:
                seeds = {episode_seed(base, stream, task, i) for i in range(20)}
                assert max(seeds) < 2**31 and not seeds & subset


@pytest.mark.parametrize("kwargs,message", [
    (dict(eval_subset="minival", episodes_per_task=8),
     "--eval-subset minival@v1 fixes 5 episodes per task"),
    (dict(eval_subset="tiny"), "unknown subset 'tiny'; choose one of minival@v1"),
    (dict(eval_subset="minival@v9"), "unknown version 'v9'; known versions are v1."),
    (dict(test_augmentation=True, obs_noise_std=-1.0), "--obs-noise-std must be >= 0"),
    (dict(test_augmentation=True, obs_noise_std=float("nan")), "--obs-noise-std must be"),
    (dict(test_augmentation=True, image_brightness=2.0), "--image-brightness must be in [0, 1]"),
    (dict(test_augmentation=True, image_contrast=-0.1), "--image-contrast must be in [0, 1]"),
    (dict(test_augmentation=True, image_shift=-2), "--image-shift must be >= 0"),
    (dict(obs_noise_std=0.05), "--obs-noise-std only applies with --test-augmentation"),
    (dict(test_augmentation=True, obs_noise_std=0.0, image_brightness=0.0, image_contrast=0.0,
          image_shift=0), "perturbs nothing"),
])
def test_bad_values_are_one_sentence(kwargs, message):
    with pytest.raises(ValueError) as info:
        EvalConfig(**kwargs)
    assert message in str(info.value)
    _one_sentence(str(info.value))


def test_subset_accepts_its_own_size_and_default():
    assert EvalConfig(eval_subset="val", episodes_per_task=20).eval_subset == "val"
    assert EvalConfig(eval_subset="minival@v1").episodes_per_task is None
    assert EvalConfig(test_augmentation=True, obs_noise_std=0.0).test_augmentation


def test_shift_too_large_for_the_frames_is_refused():
    spec = SimpleNamespace(camera_keys=("image_corner",), proprio_keys=("state",),
                           image_shape=(8, 8, 3))
    with pytest.raises(UserError) as info:
        _test_augmentation(EvalConfig(test_augmentation=True, image_shift=4), spec)
    assert "below half the checkpoint's 8-pixel camera frames" in str(info.value)
    _one_sentence(str(info.value))
    aug = _test_augmentation(EvalConfig(test_augmentation=True, image_shift=3), spec)
    assert aug.camera_keys == ("image_corner",) and aug.low_dim_keys == ("state",)


def _obs(rng):
    return {"state": rng.normal(size=7).astype(np.float32),
            "image_corner": rng.integers(0, 256, (16, 16, 3), dtype=np.uint8),
            "other": np.ones(2, np.float32)}


def test_perturbations_are_reproducible_per_seed_and_leave_the_input_alone():
    aug = TestAugmentation(obs_noise_std=0.05, brightness=0.2, contrast=0.2, shift=2,
                           low_dim_keys=("state",), camera_keys=("image_corner",))
    steps = [_obs(np.random.default_rng(i)) for i in range(4)]
    originals = [{k: v.copy() for k, v in o.items()} for o in steps]
    runs = []
    for seed in (11, 11, 12):
        perturb = ObservationPerturber(aug, seed)
        runs.append([perturb(o) for o in steps])
    for a, b, c, raw in zip(*runs, originals, strict=True):
        for k in ("state", "image_corner"):
            np.testing.assert_array_equal(a[k], b[k])  # same seed: same perturbation
            assert a[k].dtype == raw[k].dtype and a[k].shape == raw[k].shape
            assert not np.array_equal(a[k], raw[k])  # the policy sees something else
            assert not np.array_equal(a[k], c[k])  # another episode: other perturbations
        np.testing.assert_array_equal(a["other"], raw["other"])  # keys the policy ignores
    for o, raw in zip(steps, originals, strict=True):  # the simulator's observation untouched
        for k in raw:
            np.testing.assert_array_equal(o[k], raw[k])
    noise = np.concatenate([a["state"] - raw["state"]
                            for a, raw in zip(runs[0], originals, strict=True)])
    assert 0.01 < noise.std() < 0.15
    light = ObservationPerturber(aug, 11).describe()["image_corner"]
    assert abs(light["brightness"]) <= 0.2 and 0.8 <= light["contrast"] <= 1.2


def test_frame_shift_and_jitter():
    frame = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    down = shift_frame(frame, 1, 0)
    np.testing.assert_array_equal(down[1:], frame[:-1])
    np.testing.assert_array_equal(down[0], frame[0])  # edge replicated
    left = shift_frame(frame, 0, -2)
    np.testing.assert_array_equal(left[:, :-2], frame[:, 2:])
    np.testing.assert_array_equal(left[:, -1], frame[:, -1])
    flat = np.full((2, 2, 3), 100, np.uint8)
    assert (jitter_frame(flat, 0.1, 1.0) == 126).all()  # 100 + 25.5, rounded
    two = np.array([[[100] * 3, [200] * 3]], np.uint8)  # mean 150
    np.testing.assert_array_equal(jitter_frame(two, 0.0, 2.0)[0, :, 0], [50, 250])
    assert (jitter_frame(flat, 1.0, 1.0) == 255).all()  # clipped, still uint8
    bad = TestAugmentation(0.0, 0.1, 0.0, 0, (), ("image_corner",))
    with pytest.raises(ValueError, match="takes uint8"):
        ObservationPerturber(bad, 0)({"image_corner": np.zeros((3, 4, 4), np.float32)})
