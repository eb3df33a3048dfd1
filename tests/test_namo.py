"""NAMO scenes: the generator is seeded and always blocked-then-solvable, the masks carry the
scene, and the goal checker accepts the ground truth and rejects the obvious wrong answers."""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from icrt.errors import UserError
from icrt.generative.namo import (
    MASK_KEYS,
    Box,
    Scene,
    check_goal,
    generate_scene,
    goal_iou,
    goal_verdict,
    path_exists,
    placement_from_mask,
    render_masks,
    valid_placements,
    write_scene_npz,
)

ROOT = Path(__file__).resolve().parents[1]
SEEDS = range(20)


@pytest.fixture(scope="module")
def scenes() -> list[Scene]:
    return [generate_scene(s) for s in SEEDS]


def box_mask(scene: Scene, box: Box, size: int) -> np.ndarray:
    """A goal mask for ``box``, drawn the way render_masks draws the ground truth."""
    return render_masks(Scene(scene.grid, scene.walls, scene.boxes, scene.target, scene.robot,
                              scene.goal, box), size)["target_goal"]


def is_horizontal(scene: Scene) -> bool:
    """Whether the divider is a row: one the target spans is wall except under the target."""
    t = scene.boxes[scene.target]
    inner = scene.grid - 2
    return any(scene.walls[r, 1:-1].sum() == inner - t.width
               for r in range(t.row, t.row + t.height))


def test_generate_scene_is_deterministic_per_seed_and_varies_across_seeds(scenes):
    assert generate_scene(7) == scenes[7]
    assert generate_scene(7).to_json() == scenes[7].to_json()
    assert len({s.to_json() for s in scenes}) == len(scenes)
    assert scenes[0] != scenes[1]
    orientations = {is_horizontal(s) for s in scenes}
    assert orientations == {True, False}  # both divider orientations occur
    assert len({len(s.boxes) for s in scenes}) > 1
    assert all(3 <= len(s.boxes) <= 6 for s in scenes)  # the target plus 2-5 others


def test_generate_scene_is_fast():
    start = time.perf_counter()
    for s in range(100, 120):
        generate_scene(s)
    assert (time.perf_counter() - start) / 20 < 0.05 * 4  # 50 ms, with room for a busy machine


def test_target_blocks_the_path_and_target_goal_clears_it(scenes):
    for scene in scenes:
        target = scene.boxes[scene.target]
        assert scene.walls[0].all() and scene.walls[-1].all()
        assert scene.walls[:, 0].all() and scene.walls[:, -1].all()
        assert not path_exists(scene, None)
        assert not path_exists(scene, target)
        assert path_exists(scene, scene.target_goal)
        assert (scene.target_goal.height, scene.target_goal.width) == (target.height,
                                                                      target.width)
        assert scene.robot not in scene.target_goal.cells()
        assert scene.goal not in scene.target_goal.cells()
        assert not any(scene.walls[c] for c in scene.target_goal.cells())


def test_target_goal_is_the_nearest_valid_placement(scenes):
    for scene in scenes[:4]:
        t = scene.boxes[scene.target]
        valid = valid_placements(scene)
        assert scene.target_goal in valid and t not in valid
        nearest = min(valid, key=lambda b: (abs(b.row - t.row) + abs(b.col - t.col), b.row, b.col))
        assert nearest == scene.target_goal
        others = set().union(*(b.cells() for i, b in enumerate(scene.boxes) if i != scene.target))
        for b in valid[::25]:  # the fast search agrees with the definition
            assert path_exists(scene, b) and not (b.cells() & others)


def test_render_masks_shapes_and_contents(scenes):
    scene = scenes[0]
    for size in (224, 64, 50):
        masks = render_masks(scene, size)
        assert tuple(masks) == MASK_KEYS
        for key, m in masks.items():
            assert m.shape == (size, size) and m.dtype == np.uint8, key
            assert set(np.unique(m)) <= {0, 1}, key
            assert m.any(), key
        assert (masks["target_object"] <= masks["movable_objects_image"]).all()
        assert not (masks["target_goal"] & masks["static_objects_image"]).any()
        assert not (masks["robot_image"] & masks["goal_image"]).any()
    masks = render_masks(scene, 224)  # 8 pixels per cell
    assert masks["robot_image"].sum() == 64
    r, c = scene.robot
    assert masks["robot_image"][8 * r:8 * r + 8, 8 * c:8 * c + 8].all()
    t = scene.target_goal
    assert masks["target_goal"].sum() == 64 * t.height * t.width
    assert (masks["static_objects_image"][::8, ::8] == scene.walls).all()


def test_check_goal_accepts_the_ground_truth_and_rejects_wrong_goals(scenes):
    for scene in scenes[:5]:
        masks = render_masks(scene, 64)
        assert check_goal(scene, masks["target_goal"])
        assert check_goal(scene, masks["target_goal"].astype(bool))
        assert check_goal(scene, masks["target_goal"] * 0.9)
        assert not check_goal(scene, masks["target_object"])  # not moved: still blocking
        assert not check_goal(scene, np.zeros((64, 64)))
        assert not check_goal(scene, np.ones((64, 64)))  # far more than the target's area
        t = scene.boxes[scene.target]
        on_wall = box_mask(scene, t.moved(0, 0), 64)  # the corner of the border wall
        assert not check_goal(scene, on_wall)
        assert placement_from_mask(scene, on_wall) == t.moved(0, 0)


def test_goal_verdict_names_why_a_goal_is_rejected(scenes):
    for scene in scenes[:5]:
        masks = render_masks(scene, 64)
        t = scene.boxes[scene.target]
        assert goal_verdict(scene, masks["target_goal"]) == "valid"
        assert goal_verdict(scene, masks["target_object"]) == "blocks_path"  # still in the door
        assert goal_verdict(scene, np.zeros((64, 64))) == "unreadable"
        assert goal_verdict(scene, np.ones((64, 64))) == "unreadable"
        assert goal_verdict(scene, box_mask(scene, t.moved(0, 0), 64)) == "overlaps"
        for box in valid_placements(scene)[:3]:
            assert goal_verdict(scene, box_mask(scene, box, 64)) == "valid"


def test_placement_from_mask_recovers_target_goal(scenes):
    for scene in scenes[:5]:
        for size in (64, 224):
            mask = render_masks(scene, size)["target_goal"]
            assert placement_from_mask(scene, mask) == scene.target_goal
        # a non-square mask of another size, and a slightly shifted blob, round to the same box
        t = scene.target_goal
        cells = np.zeros((scene.grid, scene.grid))
        cells[t.row:t.row + t.height, t.col:t.col + t.width] = 1.0
        assert placement_from_mask(scene, np.kron(cells, np.ones((5, 3)))) == t


def test_goal_iou():
    a = np.zeros((8, 8))
    b = np.zeros((8, 8))
    assert goal_iou(a, b) == 1.0
    a[:4] = 1.0
    assert goal_iou(a, a) == 1.0
    assert goal_iou(a, b) == 0.0
    b[2:6] = 0.8
    assert goal_iou(a, b) == pytest.approx(2 / 6)
    assert goal_iou(a, b, threshold=0.9) == 0.0


def test_write_scene_npz_round_trips(scenes, tmp_path):
    scene = scenes[3]
    path = tmp_path / "scene_000003.npz"
    write_scene_npz(path, scene, size=64)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left
    with np.load(path) as data:
        assert set(data.files) == {*MASK_KEYS, "scene"}
        back = Scene.from_json(str(data["scene"]))
        masks = {k: data[k] for k in MASK_KEYS}
    assert back == scene
    assert back.grid == scene.grid and back.boxes == scene.boxes
    assert back.target == scene.target and back.target_goal == scene.target_goal
    assert back.robot == scene.robot and back.goal == scene.goal
    assert np.array_equal(back.walls, scene.walls)
    for k, m in render_masks(scene, 64).items():
        assert np.array_equal(masks[k], m), k


@pytest.fixture
def script(monkeypatch):
    spec = importlib.util.spec_from_file_location("make_namo_masks",
                                                  ROOT / "scripts/make_namo_masks.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "make_namo_masks", module)
    spec.loader.exec_module(module)
    return module


def test_script_refuses_a_non_empty_out_dir_without_overwrite(script, tmp_path, capsys):
    out = tmp_path / "namo"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    cfg = script.MakeNamoConfig(out=str(out), num_scenes=3, image_size=32)
    with pytest.raises(UserError, match="--overwrite"):
        script.main(cfg)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]

    script.main(script.MakeNamoConfig(out=str(out), num_scenes=3, image_size=32,
                                      overwrite=True))
    names = sorted(p.name for p in out.iterdir())
    assert names == ["notes.txt", "scene_000000.npz", "scene_000001.npz", "scene_000002.npz"]
    assert "wrote 3 scenes" in capsys.readouterr().out
    with np.load(out / "scene_000001.npz") as data:
        assert Scene.from_json(str(data["scene"])) == generate_scene(1)
        assert data["target_goal"].shape == (32, 32)
