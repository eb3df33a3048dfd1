"""Step-based schedules: --max-steps, checkpoints and evaluation every N steps, exact resume in
the middle of an epoch, and best/ by validation loss when no simulator evaluates."""

import json
import shutil

import pytest
import torch
from helpers import make_reach_dataset
from safetensors.torch import load_file
from test_review_defects import _scripted_evaluation
from test_train import tiny_args

from icrt.config import parse_config
from icrt.train.checkpoint import checkpoints, latest_checkpoint
from icrt.train.loop import run_metrics, train


@pytest.fixture(scope="module")
def reach_json(tmp_path_factory):
    return make_reach_dataset(tmp_path_factory.mktemp("data"), episodes_per_task=8,
                              train_split=0.75)


def _steps_per_epoch(run) -> int:
    return max(r["step"] for r in run_metrics(run) if r.get("epoch") == 1.0)


def test_max_steps_stops_mid_epoch_and_saves(reach_json, tmp_path):
    full = train(parse_config(tiny_args(reach_json, tmp_path / "a", "--trainer-cfg.epochs", "1")),
                 progress=False)
    per_epoch = _steps_per_epoch(full)
    assert per_epoch >= 4
    n = per_epoch + 2  # two steps into the second epoch
    run = train(parse_config(tiny_args(reach_json, tmp_path / "b", "--trainer-cfg.max-steps",
                                       str(n))), progress=False)
    assert max(r["step"] for r in run_metrics(run)) == n
    last = latest_checkpoint(run)
    assert last.name == "checkpoint-1"
    assert json.loads((last / "manifest.json").read_text())["step"] == n
    # stopped two steps into epoch 1: a longer resume continues there, not at epoch 2
    state = torch.load(last / "train_state.pt", weights_only=True)
    assert state["epoch"] == 1 and state["batches_done"] == 2


def test_mid_epoch_checkpoint_resumes_exactly(reach_json, tmp_path):
    common = ("--trainer-cfg.epochs", "2", "--shared-cfg.save-every-steps", "3",
              "--shared-cfg.keep-last", "0")
    full = train(parse_config(tiny_args(reach_json, tmp_path / "full", *common)), progress=False)
    per_epoch = _steps_per_epoch(full)
    names = [p.name for p in checkpoints(full)]
    assert names[0] == "checkpoint-1" and "checkpoint-0" in names
    mid = [p for p in checkpoints(full) if p.name.startswith("checkpoint-step-")
           and per_epoch < int(p.name.rsplit("-", 1)[1]) < 2 * per_epoch]
    assert mid, names  # a checkpoint in the middle of the second epoch
    run = tmp_path / "resumed"
    shutil.copytree(full, run)
    for p in checkpoints(run):
        if p.name != mid[-1].name and p.name != "checkpoint-0":
            shutil.rmtree(p)
    assert latest_checkpoint(run).name == mid[-1].name
    train(parse_config(tiny_args(reach_json, run, *common, "--shared-cfg.resume", run)),
          progress=False)
    wa = load_file(str(full / "checkpoint-1" / "model.safetensors"))
    wb = load_file(str(run / "checkpoint-1" / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_best_by_validation_loss_without_a_simulator(reach_json, tmp_path):
    run = train(parse_config(tiny_args(reach_json, tmp_path / "run", "--trainer-cfg.epochs", "3")),
                progress=False)
    logged = [r for r in run_metrics(run) if "epoch/val_loss" in r]
    assert len(logged) == 3
    best = json.loads((run / "best" / "eval.json").read_text())
    assert best["val_loss"] == min(r["epoch/val_loss"] for r in logged)
    assert logged[-1]["epoch/val_loss_best"] == best["val_loss"]
    assert best["source"] == f"checkpoint-{best['epoch']}"


def test_evaluation_every_n_steps(reach_json, tmp_path, monkeypatch):
    calls = _scripted_evaluation(monkeypatch, [0.2, 0.6, 0.4, 0.1, 0.3, 0.5, 0.7, 0.8])
    run = train(parse_config(tiny_args(reach_json, tmp_path / "run", "--trainer-cfg.epochs", "1",
                                       "--eval-cfg.eval-every-steps", "2")), progress=False)
    per_epoch = _steps_per_epoch(run)
    assert [c.rsplit("/", 1)[1] for c in calls] == [
        f"checkpoint-step-{s}" for s in range(2, per_epoch, 2)]
    logged = [r for r in run_metrics(run) if "eval/mean_success" in r]
    assert [r["step"] for r in logged] == list(range(2, per_epoch, 2))
    best = json.loads((run / "best" / "eval.json").read_text())
    assert best["mean_success_rate"] == max(r["eval/mean_success"] for r in logged)
    assert logged[-1]["eval/mean_success_best"] == best["mean_success_rate"]
    assert not (run / "best" / "eval.json").read_text().count("val_loss")
