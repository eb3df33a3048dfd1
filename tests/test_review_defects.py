"""Defects found by reading the code: each test failed before its fix."""

import json
import os

import numpy as np
import pytest
from helpers import make_reach_dataset
from test_train import tiny_args

from icrt.config import parse_config
from icrt.train.loop import train


@pytest.fixture(scope="module")
def reach_json(tmp_path_factory):
    return make_reach_dataset(tmp_path_factory.mktemp("data"), episodes_per_task=6)


def _scripted_evaluation(monkeypatch, rates):
    """Evaluation during training returns the next of ``rates`` (no simulator needed)."""
    import icrt.eval.rollout as rollout

    calls = []

    def evaluate(cfg, progress=True):
        rate = rates[len(calls)]
        calls.append(cfg.checkpoint)
        return {"env": "synthetic", "num_prompts": 1, "episodes_per_task": 1,
                "tasks": {"left": {"success_rate": rate, "episodes": 1, "mean_return": 0.0,
                                   "mean_length": 1.0}},
                "mean_success_rate": rate}

    monkeypatch.setattr(rollout, "evaluate", evaluate)
    return calls


def test_resume_with_evaluation_keeps_the_better_best(reach_json, tmp_path, monkeypatch):
    run = tmp_path / "run"
    common = ("--eval-cfg.eval-every", "1", "--shared-cfg.save-every", "1")
    _scripted_evaluation(monkeypatch, [0.9])
    train(parse_config(tiny_args(reach_json, run, "--trainer-cfg.epochs", "1", *common)),
          progress=False)
    assert json.loads((run / "best" / "eval.json").read_text())["source"] == "checkpoint-0"
    # checkpoint-0's train state was written before its own evaluation found 0.9
    _scripted_evaluation(monkeypatch, [0.5])
    train(parse_config(tiny_args(reach_json, run, "--trainer-cfg.epochs", "2", *common,
                                 "--shared-cfg.resume", run / "checkpoint-0")), progress=False)
    best = json.loads((run / "best" / "eval.json").read_text())
    assert best["source"] == "checkpoint-0" and best["mean_success_rate"] == 0.9


def test_training_split_is_excluded_from_prompts_from_any_directory(tmp_path, monkeypatch):
    from icrt.config import EvalConfig
    from icrt.eval.rollout import _prompt_pool, _training_episodes

    data = tmp_path / "data"
    data.mkdir()
    dataset = make_reach_dataset(data, episodes_per_task=8, train_split=0.5)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # train with relative paths from one directory ...
    rel = os.path.relpath(dataset, work)
    run = train(parse_config(tiny_args(rel, "runs", "--trainer-cfg.epochs", "1",
                                       "--shared-cfg.batch-size", "1")), progress=False)
    run = run.resolve()
    other = tmp_path / "elsewhere" / "deeper"  # where '../data' is another folder
    other.mkdir(parents=True)
    monkeypatch.chdir(other)  # ... and evaluate from another
    excluded = _training_episodes(run / "checkpoint-0")
    assert len(excluded) == 8  # half of the 16 episodes trained
    pool = _prompt_pool(EvalConfig(prompt_dataset=str(dataset), num_prompts=1),
                        ["left", "right"], ["state", "action"], excluded)
    split = json.loads((run / "split.json").read_text())
    assert sum(len(v) for v in pool.values()) == 8
    trained = {i for _, i in split["train"]}
    assert not trained & {i for eps in pool.values() for _, i in eps}


def test_misspelt_env_keyword_fails(monkeypatch):
    pytest.importorskip("metaworld")
    from icrt.envs.base import make_env
    from icrt.errors import UserError

    with pytest.raises(UserError, match=r"does not take .*imgae_size"):
        make_env("metaworld", "reach-v3", imgae_size=32)


def test_broken_flash_attn_is_reported(monkeypatch, caplog):
    import builtins
    import importlib

    import icrt.models.backbones.llama as llama

    real_import = builtins.__import__

    def broken(name, *a, **k):
        if name == "flash_attn":
            raise OSError("libcudart.so.12: cannot open shared object file")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", broken)
    with caplog.at_level("WARNING"):
        found = llama._import_flash_attn()
    assert found is None
    assert "flash-attn is installed but failed to import" in caplog.text
    monkeypatch.setattr(builtins, "__import__", real_import)
    importlib.reload(llama)


def test_store_open_reports_the_real_cause(tmp_path):
    from icrt.data.store import EpisodeStore
    from icrt.errors import UserError

    path = tmp_path / "s.zarr"
    store = EpisodeStore.create(path)
    store.add_episode({"state": np.zeros((3, 2), np.float32)}, task="t")
    (path / "zarr.json").write_text("{broken")
    with pytest.raises(UserError, match="zarr.json is invalid .*JSONDecodeError"):
        EpisodeStore.open(path)
