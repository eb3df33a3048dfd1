"""The prompt-reading probe: teacher forcing equals acting step by step with the recorded
actions, a trained policy's mismatched-prompt error exceeds its matched one, bad input is one
sentence."""

import json
import subprocess
import sys

import numpy as np
import pytest
from helpers import make_reach_dataset
from test_train import tiny_args

from icrt.config import parse_config
from icrt.data.store import EpisodeStore
from icrt.errors import UserError
from icrt.eval.inference import InContextPolicy
from icrt.eval.probe import prompt_reading
from icrt.train.loop import train


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe")
    data = make_reach_dataset(root, episodes_per_task=8)
    make_reach_dataset(root, episodes_per_task=6, seed=1, name="unseen")  # probed
    out = {}
    for name, extra in (("plain", ("--trainer-cfg.epochs", "4")),
                        ("window", ("--trainer-cfg.epochs", "1", "--shared-cfg.sliding-window",
                                    "3"))):
        out[name] = train(parse_config(tiny_args(data, root / name, *extra)), progress=False)
    return root, data, out


@pytest.mark.parametrize("name", ["plain", "window"])
def test_teacher_forcing_equals_acting_with_the_recorded_actions(runs, name):
    root, _, paths = runs
    store = EpisodeStore.open(root / "reach.zarr")
    prompt, query = store.episode(0), store.episode(9)
    policy = InContextPolicy.from_checkpoint(paths[name], execution="open_loop",
                                             open_loop_steps=1, deterministic=True)
    n = 12
    pred, target = policy.teacher_forced([prompt], query, n)
    assert pred.shape == target.shape == (n, policy.spec.action_dim)
    policy.prompt([prompt])
    codec = policy.codec
    for t in range(n):
        action = policy.act({k: v[t] for k, v in query.items()})
        expected = codec.native_action(codec.decode_chunk(pred[t][None],
                                                          policy._current_proprio)[0])
        np.testing.assert_allclose(action, expected, atol=1e-4)
        policy.executed(query["action"][t])
    np.testing.assert_allclose(target, codec.encode_actions(query["action"][:n]), atol=1e-6)


def test_a_trained_policy_reads_its_prompt(runs):
    root, _, paths = runs
    policy = InContextPolicy.from_checkpoint(paths["plain"])
    res = prompt_reading(policy, root / "unseen.zarr", steps=10, queries_per_task=4)
    assert set(res["tasks"]) == {"left", "right"}
    # the goal is not observed: only the prompt says where to go
    assert res["ratio"] > 2.0, res
    assert all(r["queries"] == 4 for r in res["tasks"].values())


def test_probe_bad_input(runs, tmp_path):
    root, _, paths = runs
    policy = InContextPolicy.from_checkpoint(paths["plain"])
    one = make_reach_dataset(tmp_path, episodes_per_task=3, tasks=("left",), name="one")
    with pytest.raises(UserError, match="at least two tasks"):
        prompt_reading(policy, one)
    with pytest.raises(UserError, match="does not exist"):
        prompt_reading(policy, tmp_path / "nope.json")
    with pytest.raises(UserError, match="no successful episode of up"):
        prompt_reading(policy, root / "unseen.zarr", tasks=("left", "up"))
    # every episode of the training store is in the checkpoint's training split
    with pytest.raises(UserError, match="16 episode\\(s\\) the checkpoint trained on"):
        prompt_reading(policy, root / "reach.zarr")


def test_probe_script_writes_json(runs, tmp_path):
    root, data, paths = runs
    out = tmp_path / "probe.json"
    r = subprocess.run([sys.executable, "scripts/probe_prompt.py", "--checkpoint",
                        str(paths["plain"]), "--dataset", str(root / "unseen.json"), "--steps", "5",
                        "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "| **mean** |" in r.stdout
    assert json.loads(out.read_text())["steps"] == 5
    r = subprocess.run([sys.executable, "scripts/probe_prompt.py", "--checkpoint",
                        str(paths["plain"]), "--dataset", str(data), "--steps", "0"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip() == "error: --steps must be at least 1."
