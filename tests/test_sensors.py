"""Choosing the policy's inputs: --dataset-cfg.input-sensors, and cameras found in the stores."""

import importlib.util
import json
import sys

import numpy as np
import pytest
from helpers import dot_image, make_reach_dataset, reach_episode
from test_train import tiny_args

from icrt.config import CollectConfig, DatasetConfig, EvalConfig, SharedConfig, parse_config
from icrt.data.collect import collect
from icrt.data.sequence import SequenceDataset
from icrt.data.spec import DatasetSpec, select_sensors, write_dataset_json
from icrt.data.store import EpisodeStore
from icrt.errors import UserError
from icrt.eval.inference import InContextPolicy
from icrt.eval.rollout import evaluate
from icrt.train.checkpoint import load_policy
from icrt.train.loop import train

QUICK = ("--trainer-cfg.epochs", "1", "--shared-cfg.seq-length", "32")
VISION = ("--model-cfg.vision-encoder-cfg.vision-encoder", "vit_tiny_patch16_224",
          "--model-cfg.vision-encoder-cfg.vision-nonpretrained",
          "--model-cfg.vision-encoder-cfg.vision-image-size", "32",
          "--shared-cfg.seq-length", "32", "--shared-cfg.batch-size", "2",
          "--dataset-cfg.non-overlapping", "8", "--trainer-cfg.epochs", "1")


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """Toy point-reach demonstrations (keys state (4,), proprio (2,), action, reward) and
    held-out prompts; the dataset JSON lists proprio_keys ["state"]."""
    root = tmp_path_factory.mktemp("toy")
    collect(CollectConfig(env="toy", tasks=("point-reach",), episodes_per_task=8,
                          prompt_episodes_per_task=3, out=str(root / "toy.zarr"), workers=1),
            progress=False)
    return root


@pytest.fixture(scope="module")
def camera_store(tmp_path_factory):
    return _camera_store(tmp_path_factory.mktemp("cam"))


def _camera_store(root):
    """``root/img.zarr``: a low-dim key and one camera (no dataset JSON yet); returns root."""
    rng = np.random.default_rng(0)
    store = EpisodeStore.create(root / "img.zarr", env={"name": "synthetic"}, fps=10)
    for goal in ((-1.0, 0.2), (1.0, -0.2)):
        for _ in range(3):
            ep = reach_episode(goal, rng, max_len=30)
            ep["image_cam"] = np.stack([dot_image(s, 32) for s in ep["state"]])
            store.add_episode(ep, task=f"goal{goal[0]:+.0f}")
    store.close()
    return root


def _json(root, name, **fields):
    path = root / f"{name}.json"
    write_dataset_json(path, stores=[root / "img.zarr"], action_keys=["action"],
                       train_split=1.0, **fields)
    return path


def _copy_store(src, dst, keys, extra=None):
    """``src`` with only ``keys`` (plus ``extra(episode) -> {key: rows}``) in a new store."""
    source = EpisodeStore.open(src)
    out = EpisodeStore.create(dst, env=source.env, fps=source.fps)
    for i in range(source.num_episodes):
        ep = source.episode(i, keys=keys)
        ep.update(extra(ep) if extra else {})
        out.add_episode(ep, task=source.episode_task_names[i], seed=int(source.episode_seed[i]))
    out.close()


def test_input_sensors_choose_the_policy_inputs_and_the_checkpoint_keeps_them(toy, tmp_path):
    runs = {}
    for sensors in ("state", "proprio"):
        runs[sensors] = train(parse_config(tiny_args(
            toy / "toy.json", tmp_path / sensors, *QUICK,
            "--dataset-cfg.input-sensors", sensors)), progress=False)
    dims = {"state": 4, "proprio": 2}
    for sensors, run in runs.items():
        model, ckpt = load_policy(run)
        assert ckpt.spec.proprio_keys == (sensors,) and ckpt.spec.camera_keys == ()
        assert ckpt.spec.proprio_dim == dims[sensors]
        assert ckpt.config.dataset_cfg.input_sensors == (sensors,)  # config.json records it
        stats = json.loads((run / "checkpoint-0" / "stats.json").read_text())
        assert stats["spec"]["proprio_keys"] == [sensors]
        policy = InContextPolicy.from_checkpoint(run)
        assert policy.spec.proprio_keys == (sensors,)
    # the policy reads only its own keys: an observation without 'state' is enough for the
    # proprio policy and one sentence for the state policy
    obs = {"proprio": np.zeros(2, np.float32)}
    InContextPolicy.from_checkpoint(runs["proprio"]).act(obs)
    with pytest.raises(UserError, match="lacks key.*state"):
        InContextPolicy.from_checkpoint(runs["state"]).act(obs)
    # evaluation: prompts must hold the chosen keys; a prompt store without 'state' prompts
    # the proprio policy and is refused for the state policy
    _copy_store(toy / "toy_prompts.zarr", tmp_path / "p.zarr", ["proprio", "action"])
    write_dataset_json(tmp_path / "p.json", stores=[tmp_path / "p.zarr"],
                       proprio_keys=["proprio"], action_keys=["action"], train_split=1.0)
    ecfg = dict(prompt_dataset=str(tmp_path / "p.json"), episodes_per_task=1, max_steps=4,
                workers=1)
    results = evaluate(EvalConfig(checkpoint=str(runs["proprio"]), **ecfg), progress=False)
    assert results["tasks"]["point-reach"]["episodes"] == 1
    with pytest.raises(UserError, match=r"has no key 'state'"):
        evaluate(EvalConfig(checkpoint=str(runs["state"]), **ecfg), progress=False)


def test_a_sensor_the_simulator_lacks_is_one_sentence_at_evaluation(toy, tmp_path):
    def velocity(ep):
        return {"velocity": np.diff(ep["proprio"], axis=0, prepend=ep["proprio"][:1])}

    _copy_store(toy / "toy.zarr", tmp_path / "v.zarr", ["state", "proprio", "action"], velocity)
    write_dataset_json(tmp_path / "v.json", stores=[tmp_path / "v.zarr"],
                       proprio_keys=["state"], action_keys=["action"], image_keys=[],
                       train_split=1.0)
    run = train(parse_config(tiny_args(tmp_path / "v.json", tmp_path / "run", *QUICK,
                                       "--dataset-cfg.input-sensors", "proprio", "velocity")),
                progress=False)
    _, ckpt = load_policy(run)
    assert ckpt.spec.proprio_keys == ("proprio", "velocity") and ckpt.spec.proprio_dim == 4
    with pytest.raises(UserError, match=r"observation key\(s\) velocity, which toy does not "
                                        r"provide"):
        evaluate(EvalConfig(checkpoint=str(run), no_prompt=True, episodes_per_task=1,
                            max_steps=4, workers=1), progress=False)


def test_cameras_are_found_when_the_json_names_none(camera_store, caplog):
    root = camera_store
    absent = _json(root, "absent", proprio_keys=["state"])  # no image_keys field
    assert "image_keys" not in json.loads(absent.read_text())
    with caplog.at_level("INFO", logger="icrt.data.spec"):
        spec = DatasetSpec.for_run(DatasetConfig(dataset_json=str(absent)))
    assert spec.proprio_keys == ("state",) and spec.image_keys == ("image_cam",)
    found = [r.getMessage() for r in caplog.records if "image_cam" in r.getMessage()]
    assert len(found) == 1 and "no image_keys field" in found[0]
    # the training windows carry the frames
    ds = SequenceDataset(DatasetConfig(dataset_json=str(absent)),
                         SharedConfig(seq_length=16, num_pred_steps=2))
    assert ds.spec.image_keys == ("image_cam",)
    assert tuple(ds[0]["image_cam"].shape[-3:]) == (32, 32, 3)
    # an explicit empty list means no cameras, and the flag overrides either way
    none = _json(root, "none", proprio_keys=["state"], image_keys=[])
    assert DatasetSpec.for_run(DatasetConfig(dataset_json=str(none))).image_keys == ()
    only = select_sensors(DatasetSpec.load(absent), ["state"])
    assert only.proprio_keys == ("state",) and only.image_keys == ()
    cam = select_sensors(DatasetSpec.load(none), ["image_cam"])
    assert cam.proprio_keys == () and cam.image_keys == ("image_cam",)
    # a JSON without inputs of its own takes the cameras as its only input
    bare = _json(root, "bare")
    assert DatasetSpec.for_run(DatasetConfig(dataset_json=str(bare))).image_keys == ("image_cam",)


def test_low_dim_datasets_are_unchanged_by_camera_detection(tmp_path, caplog):
    path = make_reach_dataset(tmp_path)  # its JSON has no image_keys field, its store no camera
    assert "image_keys" not in json.loads(path.read_text())
    with caplog.at_level("INFO", logger="icrt.data.spec"):
        spec = DatasetSpec.for_run(DatasetConfig(dataset_json=str(path)))
    assert spec.proprio_keys == ("state",) and spec.image_keys == ()
    assert not caplog.records


def test_auto_detected_and_chosen_cameras_reach_the_checkpoint(camera_store, tmp_path):
    absent = _json(camera_store, "absent2", proprio_keys=["state"])
    run = train(parse_config(tiny_args(absent, tmp_path / "auto", *VISION)), progress=False)
    _, ckpt = load_policy(run)
    assert ckpt.spec.camera_keys == ("image_cam",) and ckpt.spec.proprio_keys == ("state",)
    assert ckpt.spec.image_shape == (32, 32, 3)
    # a camera as the only input, from a JSON that lists a low-dim key and no camera
    none = _json(camera_store, "none2", proprio_keys=["state"], image_keys=[])
    run = train(parse_config(tiny_args(none, tmp_path / "cam", *VISION,
                                       "--dataset-cfg.input-sensors", "image_cam")),
                progress=False)
    policy = InContextPolicy.from_checkpoint(run)
    assert policy.spec.camera_keys == ("image_cam",) and policy.spec.proprio_keys == ()
    assert policy.spec.proprio_dim == 0
    frame = dot_image(np.zeros(2), 32)
    assert np.isfinite(policy.act({"image_cam": frame})).all()


def test_bad_input_sensors_are_one_sentence(camera_store, tmp_path):
    spec = DatasetSpec.load(_json(camera_store, "bad", proprio_keys=["state"], image_keys=[]))
    with pytest.raises(UserError, match=r"Input sensor 'stat' \(--dataset-cfg.input-sensors\) "
                                        r"is not a key of store .*img.zarr' \(did you mean "
                                        r"'state'\?\); it has state, action, image_cam\."):
        select_sensors(spec, ["stat"])
    with pytest.raises(UserError, match=r"did you mean 'image_cam'"):
        select_sensors(spec, ["state", "cam"])
    with pytest.raises(UserError, match=r"'action' is an action key of .*, not a sensor"):
        select_sensors(spec, ["state", "action"])
    with pytest.raises(ValueError, match="input-sensors needs at least one"):
        DatasetConfig(input_sensors=())
    with pytest.raises(ValueError, match="input-sensors names state more than once"):
        DatasetConfig(input_sensors=("state", "image_cam", "state"))
    # through the command line, before any training
    with pytest.raises(UserError, match=r"'action' is an action key"):
        train(parse_config(tiny_args(spec.path, tmp_path / "run",
                                     "--dataset-cfg.input-sensors", "action")), progress=False)
    # cached features are named by their camera
    path = make_reach_dataset(tmp_path)
    store = EpisodeStore.open(tmp_path / "reach.zarr", mode="a")
    store.write_key("feature_cam", np.zeros((store.num_steps, 4), np.float32))
    store.close()
    with pytest.raises(UserError, match=r"name the camera 'image_cam'"):
        select_sensors(DatasetSpec.load(path), ["feature_cam"])
    # a JSON without inputs and a store without cameras gives the policy nothing to see
    bare = tmp_path / "bare.json"
    write_dataset_json(bare, stores=[tmp_path / "reach.zarr"], action_keys=["action"])
    with pytest.raises(UserError, match="gives the policy no input"):
        DatasetSpec.for_run(DatasetConfig(dataset_json=str(bare)))


def test_cache_features_encodes_the_detected_cameras(tmp_path, monkeypatch, capsys):
    root = _camera_store(tmp_path)
    absent = _json(root, "absent", proprio_keys=["state"])
    spec = importlib.util.spec_from_file_location("cache_features", "scripts/cache_features.py")
    script = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "cache_features", script)  # tyro reads its source
    spec.loader.exec_module(script)
    monkeypatch.setattr(sys, "argv", [
        "cache_features.py", "--dataset-json", str(absent),
        "--model-cfg.vision-encoder-cfg.vision-encoder", "resnet18",
        "--model-cfg.vision-encoder-cfg.vision-nonpretrained",
        "--model-cfg.vision-encoder-cfg.vision-image-size", "32", "--batch-size", "16"])
    script.main()
    assert "feature_cam" in capsys.readouterr().out
    assert EpisodeStore.open(root / "img.zarr").key_info("feature_cam")["encoder"] == "resnet18"
