"""Format stability: today's code reads the committed v1 store and checkpoint and acts as the
code that wrote them did (LeRobot keeps the same kind of backward-compatibility fixtures).

A change that breaks this needs a format version bump and a migration, not new fixtures.
"""

import json
import shutil
from pathlib import Path

import numpy as np

from icrt.data.store import VERSION, EpisodeStore
from icrt.eval.inference import InContextPolicy
from icrt.train.checkpoint import verify_checkpoint

V1 = Path(__file__).resolve().parent / "fixtures" / "v1"


def test_v1_store_reads_unchanged(tmp_path):
    expected = json.loads((V1 / "expected.json").read_text())
    store = EpisodeStore.open(V1 / "episodes.zarr")
    assert VERSION == 1
    assert store.num_episodes == expected["num_episodes"]
    assert store.tasks == expected["tasks"]
    assert store.episode_lengths.tolist() == expected["episode_lengths"]
    assert store.load("state").astype(np.float64).sum() == expected["state_sum"]
    assert store.load("action").astype(np.float64).sum() == expected["action_sum"]
    assert store.verify() == []
    # and it still appends (in a copy: the fixture stays as committed)
    copy = tmp_path / "episodes.zarr"
    shutil.copytree(V1 / "episodes.zarr", copy)
    with EpisodeStore.open(copy, mode="a") as s:
        s.add_episode(store.episode(0), task="left")
    assert EpisodeStore.open(copy).num_episodes == expected["num_episodes"] + 1


def test_v1_checkpoint_acts_as_recorded():
    expected = json.loads((V1 / "expected.json").read_text())
    assert verify_checkpoint(V1 / "checkpoint") is None
    store = EpisodeStore.open(V1 / "episodes.zarr")
    policy = InContextPolicy.from_checkpoint(V1 / "checkpoint", deterministic=True)
    policy.prompt([store.episode(expected["prompt_episode"])])
    query = store.episode(expected["query_episode"])
    got = [policy.act({"state": s}) for s in query["state"][: len(expected["actions"])]]
    np.testing.assert_allclose(np.stack(got), np.asarray(expected["actions"]), atol=1e-5)
