"""The ICG benchmark's split (Makefile `icg`): held-out pairs never enter a training store."""

import re
from pathlib import Path

import pytest

from icrt.envs.robosuite_tasks import BASE_TASKS, parse_family_task, robosuite_tasks

MAKEFILE = Path(__file__).resolve().parents[1] / "Makefile"


def _make_list(name: str) -> list[str]:
    text = MAKEFILE.read_text().replace("\\\n", " ")
    m = re.search(rf"^{name} := (.*)$", text, re.M)
    assert m, name
    return m.group(1).split()


def test_icg_split_holds_out_one_pair_per_object_and_bin():
    held, train, mismatch = (_make_list(n) for n in ("ICG_HELDOUT", "ICG_TRAIN", "ICG_MISMATCH"))
    family = [t for t in robosuite_tasks() if t not in BASE_TASKS]
    assert len(held) == 4 and len(train) == 12
    assert not set(held) & set(train)  # never trained on
    assert sorted(held + train) == sorted(family)
    pairs = [parse_family_task(t) for t in held]
    assert len({o for o, _ in pairs}) == 4 and len({k for _, k in pairs}) == 4
    # every held-out object and bin is seen in training, only not together
    trained = [parse_family_task(t) for t in train]
    assert {o for o, _ in pairs} <= {o for o, _ in trained}
    assert {k for _, k in pairs} <= {k for _, k in trained}
    # mismatched prompts: another held-out pair for every evaluated one
    assert sorted(mismatch) == sorted(held)
    assert all(a != b for a, b in zip(held, mismatch, strict=True))


def test_icg_training_store_is_collected_from_the_training_pairs_only():
    text = MAKEFILE.read_text().replace("\\\n", " ")
    train_collect = next(line for line in text.splitlines() if "--out data/icg.zarr" in line)
    held_collect = next(line for line in text.splitlines() if "--out data/icg_heldout.zarr" in line)
    assert "$(ICG_TRAIN)" in train_collect and "$(ICG_HELDOUT)" not in train_collect
    assert "$(ICG_HELDOUT)" in held_collect and "--train-split 1.0" in held_collect
    train_line = next(line for line in text.splitlines() if "scripts/train.py" in line
                      and "icg.json" in line)
    assert "icg_heldout" not in train_line


def test_icg_training_flags_parse_into_the_documented_recipe():
    from icrt.config import parse_config

    text = MAKEFILE.read_text().replace("\\\n", " ")
    line = next(line for line in text.splitlines() if "scripts/train.py" in line
                and "icg.json" in line)
    cfg = parse_config(line.split("scripts/train.py", 1)[1].split())
    assert cfg.dataset_cfg.input_sensors == ("proprio", "object")
    assert cfg.model_cfg.policy_cfg.object_slots == cfg.dataset_cfg.moved_object_slots == 4
    assert cfg.model_cfg.policy_cfg.pointer_loss_weight > 0
    assert cfg.model_cfg.policy_cfg.goal_loss_weight > 0 and cfg.dataset_cfg.goal_dims


def test_mwh_split_keeps_heldout_and_published_test_tasks_out_of_training():
    env_dict = pytest.importorskip("metaworld.env_dict")
    held, train = _make_list("MWH_HELDOUT"), _make_list("MWH_TRAIN")
    published_test = {f"{n}" for n in env_dict.ML10_V3["test"]} | set(env_dict.ML45_V3["test"])
    assert len(held) == 5 and len(train) == 35 and len(set(train)) == 35
    assert set(held) | set(train) <= set(env_dict.ALL_V3_ENVIRONMENTS)
    assert not set(held) & set(train)
    assert not (set(held) | set(train)) & published_test  # the independent check stays unseen
    text = MAKEFILE.read_text().replace("\\\n", " ")
    lines = text.splitlines()
    train_collect = next(line for line in lines if "--out data/mwh.zarr" in line)
    held_collect = next(line for line in lines if "--out data/mwh_heldout.zarr" in line)
    assert "$(MWH_TRAIN)" in train_collect and "$(MWH_HELDOUT)" not in train_collect
    assert "$(MWH_HELDOUT)" in held_collect and "--train-split 1.0" in held_collect
    train_line = next(line for line in lines if "scripts/train.py" in line and "mwh.json" in line)
    assert "mwh_heldout" not in train_line
    heldout_prompted = next(line for line in lines if "$(MWH_RUN)/heldout_1prompt.json" in line)
    assert "--prompt-dataset data/mwh_heldout.json" in heldout_prompted
