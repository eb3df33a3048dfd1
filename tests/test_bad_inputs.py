"""Every bad input a new user was seen to try: exit status 2, one sentence, no traceback.

Each row builds its bad input in a fresh folder and runs a script's ``main`` in this process
exactly as the command line would. ``python tests/test_bad_inputs.py`` prints the table of
docs/reliability.md from the same rows.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import runpy
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import zarr

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import make_reach_dataset  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "config/model_config/tiny.json")


def train_args(dataset: Path, out: Path, *extra: str) -> list[str]:
    return ["train.py", "--dataset-cfg.dataset-json", str(dataset),
            "--model-cfg.policy-cfg.scratch-llama-config", TINY,
            "--shared-cfg.seq-length", "32", "--shared-cfg.num-pred-steps", "2",
            "--shared-cfg.batch-size", "4", "--trainer-cfg.accum-iter", "1",
            "--trainer-cfg.epochs", "1", "--trainer-cfg.num-workers", "0",
            "--optimizer-cfg.warmup-epochs", "0", "--logging-cfg.output-dir", str(out),
            "--logging-cfg.no-wandb", *extra]


def run_script(argv: list[str]) -> tuple[int, str]:
    """Run scripts/<argv[0]> as ``python scripts/...`` would; returns (exit status, output)."""
    out = io.StringIO()
    old = sys.argv
    sys.argv = [str(ROOT / "scripts" / argv[0]), *argv[1:]]
    code = 0
    try:
        with contextlib.redirect_stderr(out), contextlib.redirect_stdout(out):
            runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        sys.argv = old
    return code, out.getvalue()


# ----------------------------------------------------------------------------- bad inputs


def _dataset(tmp: Path) -> Path:
    return make_reach_dataset(tmp, episodes_per_task=4, train_split=0.75)


def _json_field(tmp: Path, field: str, value) -> list[str]:
    ds = _dataset(tmp)
    body = json.loads(ds.read_text())
    body[field] = value
    ds.write_text(json.dumps(body))
    return train_args(ds, tmp / "run")


def _damaged_store(tmp: Path, damage: Callable[[Path], None]) -> list[str]:
    ds = _dataset(tmp)
    damage(tmp / "reach.zarr")
    return train_args(ds, tmp / "run")


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _nan_action(store: Path) -> None:  # written around the store's own checks
    arr = zarr.open_group(str(store), mode="r+")["data"]["action"]
    arr[30] = np.nan


def _trained(tmp: Path) -> Path:
    ds = _dataset(tmp / "data")
    code, out = run_script(train_args(ds, tmp / "runs", "--logging-cfg.log-name", "r"))
    assert code == 0, out
    return tmp / "runs" / "r"


def _model_json(tmp: Path, **change) -> list[str]:
    body = json.loads(Path(TINY).read_text())
    body.update(change)
    (tmp / "model.json").write_text(json.dumps(body))
    args = train_args(_dataset(tmp), tmp / "run")
    args[args.index(TINY)] = str(tmp / "model.json")
    return args


def _corrupt_split(tmp: Path) -> list[str]:
    (tmp / "run").mkdir()
    (tmp / "run" / "split.json").write_text('{"train": [["x", 0]')
    return train_args(_dataset(tmp), tmp / "run")


def _all_checkpoints_bad(tmp: Path) -> list[str]:
    run = _trained(tmp)
    for ckpt in run.glob("checkpoint-*"):
        _truncate(ckpt / "model.safetensors")
    return train_args(tmp / "data" / "reach.json", tmp / "runs", "--logging-cfg.log-name", "r",
                      "--shared-cfg.resume", str(run))


def _eval_args(tmp: Path, *extra: str) -> list[str]:
    run = _trained(tmp)
    return ["eval.py", "--checkpoint", str(run), "--no-prompt", "--episodes-per-task", "1",
            *extra]


def _file(tmp: Path) -> Path:
    (tmp / "afile").write_text("not a folder")
    return tmp / "afile"


@dataclass(frozen=True)
class BadInput:
    name: str
    build: Callable[[Path], list[str]]  # makes the bad input in a folder, returns argv
    message: str  # regular expression the one sentence must match
    sim: bool = False


ROWS = [
    BadInput("dataset JSON with \"stores\": 5",
             lambda t: _json_field(t, "stores", 5), r"'stores' must be a list of strings"),
    BadInput("dataset JSON with a string where a list belongs",
             lambda t: _json_field(t, "proprio_keys", "state"),
             r"'proprio_keys' must be a list of strings, got \"state\""),
    BadInput("dataset JSON with train_split true",
             lambda t: _json_field(t, "train_split", True), r"train_split must be in"),
    BadInput("dataset JSON that is not JSON",
             lambda t: (_dataset(t).write_text("{oops"), train_args(t / "reach.json", t))[1],
             r"reach.json' is not valid JSON"),
    BadInput("corrupted data/<key>/zarr.json",
             lambda t: _damaged_store(t, lambda s: (s / "data/action/zarr.json").write_text("{")),
             r"damaged: the metadata of 'data/action' is unreadable"),
    BadInput("corrupted store zarr.json",
             lambda t: _damaged_store(t, lambda s: (s / "zarr.json").write_text("[]")),
             r"reach.zarr' is not a readable zarr episode store"),
    BadInput("one chunk file of data/action deleted",
             lambda t: _damaged_store(t, lambda s: os.remove(s / "data/action/c/0/0")),
             r"damaged: chunk file 'data/action/c/0/0' of key 'action' \(episodes 0-7\) is "
             r"missing"),
    BadInput("truncated chunk file",
             lambda t: _damaged_store(t, lambda s: _truncate(s / "data/state/c/0/0")),
             r"damaged: 'data/state' does not decode"),
    BadInput("deleted array",
             lambda t: _damaged_store(t, lambda s: shutil.rmtree(s / "data/state")),
             r"damaged: the array 'data/state' is missing"),
    BadInput("NaN in a store's actions",
             lambda t: _damaged_store(t, _nan_action),
             r"non-finite value \(NaN or inf\) in 'action', episode 1"),
    BadInput("corrupted split.json", _corrupt_split, r"Split file .* is unreadable"),
    BadInput("output dir that is a file",
             lambda t: train_args(_dataset(t), _file(t)), r"afile' is a file"),
    BadInput("output dir under a file",
             lambda t: train_args(_dataset(t), _file(t) / "runs"), r"afile' is a file"),
    BadInput("bad --device string",
             lambda t: [*train_args(_dataset(t), t / "run"), "--device", "gpu0"],
             r"--device 'gpu0' is not a device"),
    BadInput("--optimizer-cfg.lr nan",
             lambda t: [*train_args(_dataset(t), t / "run"), "--optimizer-cfg.lr", "nan"],
             r"lr must be a finite number"),
    BadInput("--trainer-cfg.epochs 0",
             lambda t: [*train_args(_dataset(t), t / "run"), "--trainer-cfg.epochs", "0"],
             r"epochs must be > 0"),
    BadInput("model JSON with negative ffn_dim_multiplier",
             lambda t: _model_json(t, ffn_dim_multiplier=-1.3),
             r"ffn_dim_multiplier must be a finite number > 0"),
    BadInput("model JSON with negative rope_theta",
             lambda t: _model_json(t, rope_theta=-10000.0), r"rope_theta must be a finite"),
    BadInput("misspelt --dataset-cfg.task-names",
             lambda t: [*train_args(_dataset(t), t / "run"), "--dataset-cfg.task-names", "lefft"],
             r"lefft are not in .*did you mean 'left'"),
    BadInput("--load-config of a corrupted file",
             lambda t: ((t / "c.json").write_text("{"), ["train.py", "--load-config",
                                                        str(t / "c.json")])[1],
             r"Config file .* is not a valid ExperimentConfig"),
    BadInput("resume of a run whose every checkpoint is truncated", _all_checkpoints_bad,
             r"Every checkpoint of .* is damaged"),
    BadInput("resume from a folder that does not exist",
             lambda t: [*train_args(_dataset(t), t / "run"), "--shared-cfg.resume",
                        str(t / "nope")], r"is not a checkpoint directory"),
    BadInput("eval --out under a file",
             lambda t: _eval_args(t, "--out", str(_file(t) / "r.json")),
             r"--out .* cannot be written: .*afile' is a file"),
    BadInput("eval --video-dir under a file",
             lambda t: _eval_args(t, "--video-dir", str(_file(t) / "v")),
             r"--video-dir .*afile' is a file"),
    BadInput("eval --baseline that does not exist",
             lambda t: _eval_args(t, "--baseline", str(t / "none.json")),
             r"Baseline results .* do not exist"),
    BadInput("eval --baseline that is not a results JSON",
             lambda t: ((t / "b.json").write_text("[1]"),
                        _eval_args(t, "--baseline", str(t / "b.json")))[1],
             r"is not a results JSON"),
    BadInput("eval --device gpu0",
             lambda t: _eval_args(t, "--device", "gpu0"), r"--device 'gpu0' is not a device"),
    BadInput("eval of a checkpoint with truncated weights",
             lambda t: (_truncate(next(_trained(t).glob("checkpoint-*")) / "model.safetensors"),
                        ["eval.py", "--checkpoint", str(t / "runs" / "r"), "--no-prompt"])[1],
             r"is damaged \(model.safetensors has \d+ bytes"),
    BadInput("eval of a checkpoint with corrupted config.json",
             lambda t: ((next(_trained(t).glob("checkpoint-*")) / "config.json").write_text("{"),
                        ["eval.py", "--checkpoint", str(t / "runs" / "r"), "--no-prompt"])[1],
             r"is incomplete or from another version"),
    BadInput("cache_features of a store that does not exist",
             lambda t: ["cache_features.py", "--store", str(t / "none.zarr")],
             r"none.zarr' does not exist"),
    BadInput("collect with a misspelt task",
             lambda t: ["collect.py", "--tasks", "reach-v33", "--out", str(t / "x.zarr")],
             r"Unknown metaworld task 'reach-v33'; did you mean 'reach-v3'", sim=True),
    BadInput("collect --out under a file",
             lambda t: ["collect.py", "--tasks", "reach-v3", "--out", str(_file(t) / "x.zarr")],
             r"afile' is a file", sim=True),
    BadInput("collect over an existing store without --resume or --overwrite",
             lambda t: (_dataset(t), ["collect.py", "--tasks", "reach-v3", "--out",
                                      str(t / "reach.zarr")])[1],
             r"already exists; pass --resume to continue it or --overwrite", sim=True),
    BadInput("collect --resume --overwrite",
             lambda t: ["collect.py", "--resume", "--overwrite", "--out", str(t / "x.zarr")],
             r"--overwrite and --resume exclude each other"),
]


def check(row: BadInput, folder: Path) -> tuple[int, str]:
    argv = row.build(folder)
    code, out = run_script(argv)
    return code, out


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_bad_input_is_one_sentence(row, tmp_path, monkeypatch):
    if row.sim:
        pytest.importorskip("metaworld")
    monkeypatch.chdir(tmp_path)
    code, out = check(row, tmp_path)
    assert "Traceback" not in out, out
    assert code == 2, out
    assert re.search(row.message, " ".join(out.split())), out


def markdown_table() -> str:
    """The bad-input table of docs/reliability.md, measured by running every row."""
    lines = ["| input | script | exit | message |", "| --- | --- | ---: | --- |"]
    for row in ROWS:
        with tempfile.TemporaryDirectory() as tmp:
            cwd = os.getcwd()
            os.chdir(tmp)
            try:
                argv = row.build(Path(tmp))
                code, out = run_script(argv)
            finally:
                os.chdir(cwd)
        text = " ".join(out.replace("│", " ").split())
        sentence = next((line for line in out.splitlines() if line.startswith("error:")), None)
        if sentence is None:  # tyro's box around a flag's validation error
            m = re.search(r"Error parsing [\w-]+: (.*?) ?-{10}", text)
            sentence = "(flag parser) " + (m.group(1) if m else text)
        sentence = sentence.replace(tmp, "…").replace("|", "\\|")
        if "Traceback" in out:
            sentence = "TRACEBACK " + sentence
        lines.append(f"| {row.name} | {argv[0]} | {code} | {sentence} |")
    return "\n".join(lines)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("MUJOCO_GL", "egl")
    import logging

    logging.disable(logging.WARNING)
    print(markdown_table())
