"""NAMO (navigation among movable obstacles) grid scenes: a seeded generator and a goal checker.

A scene is a square grid of cells. Static walls (the border, a few interior segments and one
divider line across the grid) and rectangular movable boxes are obstacles; the robot is a
single cell that walks 4-connected from its start to its goal on the other side of the
divider. The divider has one gap (the door), and one box -- the target -- sits in it, so the
robot can only get through once the target is moved. A goal is a new position for the target
(a translation of its box); it is valid when it overlaps nothing and the robot's path is clear.

    scene = generate_scene(seed=0)
    masks = render_masks(scene, size=224)       # the model's context images, uint8 in {0, 1}
    check_goal(scene, masks["target_goal"])     # True: the ground-truth goal clears the path
    write_scene_npz("scene_000000.npz", scene)  # the masks plus the scene as JSON

Everything is numpy and the standard library; generation is deterministic for a seed.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

MASK_KEYS = (
    "robot_image",
    "goal_image",
    "movable_objects_image",
    "static_objects_image",
    "target_object",
    "target_goal",
)
MIN_GRID = 12  # smaller grids leave no room for a divider, a door and boxes on both sides
MAX_DRAWS = 1000  # draws per seed before giving up (a scene is usually found in one or two)

Cell = tuple[int, int]


# ----------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Box:
    """An axis-aligned rectangle of grid cells: top-left ``(row, col)`` and its size."""

    row: int
    col: int
    height: int
    width: int

    def cells(self) -> set[Cell]:
        """Every ``(row, col)`` cell the box covers."""
        return {
            (r, c)
            for r in range(self.row, self.row + self.height)
            for c in range(self.col, self.col + self.width)
        }

    def moved(self, row: int, col: int) -> Box:
        """The same box with its top-left corner at ``(row, col)``."""
        return Box(int(row), int(col), self.height, self.width)

    def _slice(self) -> tuple[slice, slice]:
        return slice(self.row, self.row + self.height), slice(self.col, self.col + self.width)

    def _inside(self, grid: int) -> bool:
        return (
            0 <= self.row <= grid - self.height
            and 0 <= self.col <= grid - self.width
        )


@dataclass(frozen=True, eq=False)
class Scene:
    """One NAMO problem. ``walls`` is read-only; scenes compare equal field by field (the
    wall arrays by value) and are not hashable."""

    grid: int  # cells per side
    walls: np.ndarray  # (grid, grid) bool: static obstacles, the border included
    boxes: tuple[Box, ...]  # movable objects, the target among them
    target: int  # index into boxes of the object to move
    robot: Cell  # robot start cell
    goal: Cell  # robot goal cell
    target_goal: Box  # where the target should go (ground truth: the smallest clearing move)

    def __post_init__(self) -> None:
        walls = np.array(self.walls, dtype=bool)  # a copy, so the caller's array stays theirs
        if walls.shape != (self.grid, self.grid):
            raise ValueError(f"walls has shape {walls.shape}, expected ({self.grid}, {self.grid})")
        walls.flags.writeable = False
        object.__setattr__(self, "walls", walls)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Scene):
            return NotImplemented
        return (
            self.grid == other.grid
            and np.array_equal(self.walls, other.walls)
            and self.boxes == other.boxes
            and self.target == other.target
            and tuple(self.robot) == tuple(other.robot)
            and tuple(self.goal) == tuple(other.goal)
            and self.target_goal == other.target_goal
        )

    def to_json(self) -> str:
        """The scene as JSON; walls are rows of ``#`` (wall) and ``.`` (free)."""
        return json.dumps(
            {
                "grid": self.grid,
                "walls": ["".join("#" if w else "." for w in row) for row in self.walls],
                "boxes": [_box_list(b) for b in self.boxes],
                "target": self.target,
                "robot": [int(v) for v in self.robot],
                "goal": [int(v) for v in self.goal],
                "target_goal": _box_list(self.target_goal),
            }
        )

    @classmethod
    def from_json(cls, text: str) -> Scene:
        """The scene :meth:`to_json` wrote."""
        d = json.loads(text)
        return cls(
            grid=int(d["grid"]),
            walls=np.array([[ch == "#" for ch in row] for row in d["walls"]], dtype=bool),
            boxes=tuple(Box(*map(int, b)) for b in d["boxes"]),
            target=int(d["target"]),
            robot=(int(d["robot"][0]), int(d["robot"][1])),
            goal=(int(d["goal"][0]), int(d["goal"][1])),
            target_goal=Box(*map(int, d["target_goal"])),
        )


def _box_list(b: Box) -> list[int]:
    return [b.row, b.col, b.height, b.width]


# ----------------------------------------------------------------------------- paths


def _bfs_path(blocked: np.ndarray, start: Cell, goal: Cell) -> list[Cell] | None:
    """A shortest 4-connected path of free cells from ``start`` to ``goal`` (both included),
    or None when there is none (or either end is blocked)."""
    grid = blocked.shape[0]
    if blocked[start] or blocked[goal]:
        return None
    free = (~blocked).ravel().tolist()
    s, g = start[0] * grid + start[1], goal[0] * grid + goal[1]
    parent = {s: s}
    queue = deque([s])
    while queue:
        i = queue.popleft()
        if i == g:
            path = [i]
            while i != s:
                i = parent[i]
                path.append(i)
            return [divmod(j, grid) for j in reversed(path)]
        r, c = divmod(i, grid)
        for j, ok in ((i - grid, r > 0), (i + grid, r < grid - 1),
                      (i - 1, c > 0), (i + 1, c < grid - 1)):
            if ok and free[j] and j not in parent:
                parent[j] = i
                queue.append(j)
    return None


def _others_blocked(scene: Scene) -> np.ndarray:
    """Walls plus every movable box except the target."""
    blocked = scene.walls.copy()
    for i, b in enumerate(scene.boxes):
        if i != scene.target:
            blocked[b._slice()] = True
    return blocked


def _forbidden(scene: Scene) -> np.ndarray:
    """Cells a target placement must not cover: walls, other boxes, the robot's start and goal."""
    forbidden = _others_blocked(scene)
    forbidden[scene.robot] = forbidden[scene.goal] = True
    return forbidden


def path_exists(scene: Scene, target_at: Box | None) -> bool:
    """Whether the robot (one cell, 4-connected) can walk from its start to its goal with the
    target box at ``target_at`` (None: where it is now) and every other box in place."""
    box = scene.boxes[scene.target] if target_at is None else target_at
    blocked = _others_blocked(scene)
    if box._inside(scene.grid):
        blocked[box._slice()] = True
    else:  # only the part inside the grid can block anything
        for r, c in box.cells():
            if 0 <= r < scene.grid and 0 <= c < scene.grid:
                blocked[r, c] = True
    return _bfs_path(blocked, scene.robot, scene.goal) is not None


def _translations(scene: Scene) -> list[Box]:
    """Every position of the target box inside the grid, in (row, col) order."""
    t = scene.boxes[scene.target]
    return [
        t.moved(r, c)
        for r in range(scene.grid - t.height + 1)
        for c in range(scene.grid - t.width + 1)
    ]


def _iter_valid(scene: Scene, candidates: Iterable[Box]) -> Iterator[Box]:
    """The candidates (target placements) that overlap no wall, no other box and neither robot
    cell, and leave the robot a path; in the candidates' order.

    Same answer as testing each with :func:`path_exists`, but faster: every path found is
    kept, and a placement that misses one of them needs no new search."""
    blocked = _others_blocked(scene)
    forbidden = _forbidden(scene)
    path = _bfs_path(blocked, scene.robot, scene.goal)  # the target gone altogether
    if path is None:
        return
    known: list[np.ndarray] = []

    def remember(path: list[Cell]) -> None:
        mask = np.zeros_like(blocked)
        mask[tuple(np.array(path).T)] = True
        known.append(mask)

    remember(path)
    for box in candidates:
        where = box._slice()
        if not box._inside(scene.grid) or forbidden[where].any():
            continue
        if any(not mask[where].any() for mask in known):
            yield box
            continue
        with_box = blocked.copy()
        with_box[where] = True
        path = _bfs_path(with_box, scene.robot, scene.goal)
        if path is not None:
            remember(path)
            yield box


def valid_placements(scene: Scene) -> list[Box]:
    """Every translation of the target box that overlaps no wall, no other box and neither the
    robot's start nor its goal cell, and with which :func:`path_exists` is True; in (row, col)
    order."""
    return list(_iter_valid(scene, _translations(scene)))


def _is_valid(scene: Scene, box: Box) -> bool:
    """Whether ``box`` (compared by row and col) is one of :func:`valid_placements`."""
    t = scene.boxes[scene.target]
    return any(True for _ in _iter_valid(scene, [t.moved(box.row, box.col)]))


def _nearest_valid(scene: Scene) -> Box | None:
    """The valid placement nearest the target (Manhattan distance of the top-left corner;
    ties by (row, col)): the smallest move that clears the path."""
    t = scene.boxes[scene.target]
    moves = sorted(
        _translations(scene),
        key=lambda b: (abs(b.row - t.row) + abs(b.col - t.col), b.row, b.col),
    )
    return next(_iter_valid(scene, moves), None)


# ----------------------------------------------------------------------------- generation


def _random_cell(rng: np.random.Generator, allowed: np.ndarray) -> Cell | None:
    cells = np.argwhere(allowed)
    if len(cells) == 0:
        return None
    r, c = cells[rng.integers(len(cells))]
    return int(r), int(c)


def _draw_scene(rng: np.random.Generator, grid: int) -> Scene | None:
    """One random draw; None when it does not make a solvable, blocked scene."""
    walls = np.zeros((grid, grid), dtype=bool)
    walls[0, :] = walls[-1, :] = walls[:, 0] = walls[:, -1] = True

    # The divider, drawn as a row; transposed below for a vertical one. The door is exactly
    # as wide as the target, which fills it and sticks out on one side or both.
    height, width = (int(v) for v in rng.integers(2, 4, size=2))
    line = int(rng.integers(grid // 3, grid - grid // 3))
    door = int(rng.integers(2, grid - 1 - width))
    walls[line, :] = True
    walls[line, door:door + width] = False
    target = Box(int(rng.integers(line - height + 1, line + 1)), door, height, width)
    side = np.zeros((grid, grid), dtype=np.int8)  # -1 / +1: the two sides; 0: the divider
    side[:line] = -1
    side[line + 1:] = 1
    if rng.random() < 0.5:
        walls, side = walls.T.copy(), side.T.copy()
        target = Box(target.col, target.row, target.width, target.height)

    # Keep the door's surroundings clear, so the target has somewhere to go.
    keep_out = np.zeros((grid, grid), dtype=bool)
    keep_out[max(target.row - 2, 0):target.row + target.height + 2,
             max(target.col - 2, 0):target.col + target.width + 2] = True

    # A few interior wall segments.
    for _ in range(int(rng.integers(1, 5))):
        length = int(rng.integers(3, max(grid // 3, 4)))
        if rng.random() < 0.5:
            r, c = int(rng.integers(1, grid - 1)), int(rng.integers(1, grid - length))
            seg = (slice(r, r + 1), slice(c, c + length))
        else:
            r, c = int(rng.integers(1, grid - length)), int(rng.integers(1, grid - 1))
            seg = (slice(r, r + length), slice(c, c + 1))
        if not keep_out[seg].any():
            walls[seg] = True

    # Robot start and goal on opposite sides of the divider.
    occupied = walls.copy()
    occupied[target._slice()] = True
    ends = [_random_cell(rng, (side == s) & ~occupied) for s in (-1, 1)]
    if ends[0] is None or ends[1] is None:
        return None
    if rng.random() < 0.5:
        ends.reverse()
    robot, goal = ends

    # Other movable boxes, away from the door and the robot's cells.
    occupied |= keep_out
    occupied[robot] = occupied[goal] = True
    boxes: list[Box] = []
    for _ in range(int(rng.integers(2, 6))):
        h, w = int(rng.integers(2, 4)), int(rng.integers(2, 5))
        if rng.random() < 0.5:
            h, w = w, h
        for _ in range(20):
            b = Box(int(rng.integers(1, grid - h)), int(rng.integers(1, grid - w)), h, w)
            if not occupied[b._slice()].any():
                occupied[b._slice()] = True
                boxes.append(b)
                break
    index = int(rng.integers(len(boxes) + 1))
    boxes.insert(index, target)

    scene = Scene(grid, walls, tuple(boxes), index, robot, goal, target)
    if path_exists(scene, None):
        return None
    target_goal = _nearest_valid(scene)
    if target_goal is None:
        return None
    return Scene(grid, walls, tuple(boxes), index, robot, goal, target_goal)


def generate_scene(seed: int, grid: int = 28) -> Scene:
    """A random NAMO scene, the same for the same seed: the target blocks the only door in a
    divider between the robot and its goal; ``target_goal`` is the smallest move that clears
    the way. The divider's orientation and position vary with the seed."""
    if grid < MIN_GRID:
        raise ValueError(f"grid must be at least {MIN_GRID} cells, got {grid}")
    rng = np.random.default_rng(seed)
    for _ in range(MAX_DRAWS):
        scene = _draw_scene(rng, grid)
        if scene is not None:
            return scene
    raise RuntimeError(f"no valid scene in {MAX_DRAWS} draws for seed {seed}, grid {grid}")


# ----------------------------------------------------------------------------- masks


def _pixel_to_cell(pixels: int, grid: int) -> np.ndarray:
    """The cell each of ``pixels`` pixels along one side falls in (nearest neighbour: the cell
    under the pixel's centre), so any image size maps onto the whole grid."""
    return ((2 * np.arange(pixels) + 1) * grid) // (2 * pixels)


def _cells_image(cells: np.ndarray, size: int) -> np.ndarray:
    idx = _pixel_to_cell(size, cells.shape[0])
    return cells[np.ix_(idx, idx)].astype(np.uint8)


def render_masks(scene: Scene, size: int = 224) -> dict[str, np.ndarray]:
    """The scene as (size, size) uint8 masks in {0, 1}, one per key of ``MASK_KEYS``: the
    robot's cell, its goal cell, every movable box (the target included), the walls, the target
    and the target's goal. Cells become pixels by nearest neighbour; ``size`` need not be a
    multiple of the grid, but must be at least the grid so that every cell shows."""
    if size < scene.grid:
        raise ValueError(f"size must be at least the grid ({scene.grid}), got {size}")

    def cells(*boxes: Box) -> np.ndarray:
        out = np.zeros((scene.grid, scene.grid), dtype=bool)
        for b in boxes:
            out[b._slice()] = True
        return out

    robot = np.zeros((scene.grid, scene.grid), dtype=bool)
    goal = robot.copy()
    robot[scene.robot] = True
    goal[scene.goal] = True
    grids = {
        "robot_image": robot,
        "goal_image": goal,
        "movable_objects_image": cells(*scene.boxes),
        "static_objects_image": np.asarray(scene.walls, dtype=bool),
        "target_object": cells(scene.boxes[scene.target]),
        "target_goal": cells(scene.target_goal),
    }
    return {k: _cells_image(grids[k], size) for k in MASK_KEYS}


def _mask_cells(mask: np.ndarray, grid: int, threshold: float) -> np.ndarray:
    """(grid, grid) bool: cells with more than half of their pixels above ``threshold``."""
    on = np.asarray(mask) > threshold
    if on.ndim != 2:
        raise ValueError(f"a goal mask has shape (H, W), got {on.shape}")
    for axis in (0, 1):  # images smaller than the grid: repeat pixels so every cell gets some
        if on.shape[axis] < grid:
            on = np.repeat(on, math.ceil(grid / on.shape[axis]), axis=axis)
    rows, cols = _pixel_to_cell(on.shape[0], grid), _pixel_to_cell(on.shape[1], grid)
    cell = (rows[:, None] * grid + cols[None, :]).ravel()
    count = np.bincount(cell, minlength=grid * grid)
    lit = np.bincount(cell, weights=on.ravel(), minlength=grid * grid)
    return (lit > 0.5 * count).reshape(grid, grid)


def placement_from_mask(scene: Scene, mask: np.ndarray, threshold: float = 0.5) -> Box | None:
    """Read a target placement off a goal mask of any size (values in [0, 1], or bool).

    The mask is downsampled to the grid (a cell is on when more than half of its pixels are
    above ``threshold``). None when no cell is on or the on-area is outside [0.5, 2] times the
    target's area; otherwise the target box moved so its centre is nearest the on-cells'
    centroid (rounded to the nearest cell, clipped to the grid)."""
    on = _mask_cells(mask, scene.grid, threshold)
    t = scene.boxes[scene.target]
    area = t.height * t.width
    n = int(on.sum())
    if n == 0 or not 0.5 * area <= n <= 2.0 * area:
        return None
    rows, cols = np.nonzero(on)
    row = math.floor(rows.mean() - (t.height - 1) / 2 + 0.5)
    col = math.floor(cols.mean() - (t.width - 1) / 2 + 0.5)
    return t.moved(min(max(row, 0), scene.grid - t.height), min(max(col, 0), scene.grid - t.width))


def check_goal(scene: Scene, mask: np.ndarray, threshold: float = 0.5) -> bool:
    """Whether a goal mask names a valid placement of the target (see :func:`valid_placements`
    and :func:`placement_from_mask`)."""
    return goal_verdict(scene, mask, threshold) == "valid"


VERDICTS = ("valid", "unreadable", "overlaps", "blocks_path")


def goal_verdict(scene: Scene, mask: np.ndarray, threshold: float = 0.5) -> str:
    """Why :func:`check_goal` accepts or rejects a goal mask, one of :data:`VERDICTS`:
    ``valid``; ``unreadable`` (no cell on, or an on-area outside 0.5-2x the target's);
    ``overlaps`` (the placement covers a wall, another box, or the robot's start or goal);
    ``blocks_path`` (it overlaps nothing but leaves the robot no way to its goal)."""
    box = placement_from_mask(scene, mask, threshold)
    if box is None:
        return "unreadable"
    if _forbidden(scene)[box._slice()].any():
        return "overlaps"
    return "valid" if _is_valid(scene, box) else "blocks_path"


def goal_iou(a: np.ndarray, b: np.ndarray, threshold: float = 0.5) -> float:
    """Intersection over union of ``a > threshold`` and ``b > threshold``; 1.0 if both are
    empty."""
    a, b = np.asarray(a) > threshold, np.asarray(b) > threshold
    union = int(np.logical_or(a, b).sum())
    return 1.0 if union == 0 else int(np.logical_and(a, b).sum()) / union


def write_scene_npz(path: str | os.PathLike, scene: Scene, size: int = 224) -> None:
    """Save the scene's masks (``MASK_KEYS``) and its JSON (key ``scene``) to a compressed
    ``.npz``, written to a temporary file in the same folder and renamed into place, so a
    reader never sees half a file."""
    path = os.fspath(path)
    arrays = render_masks(scene, size)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".namo-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:  # a file object: savez adds no ".npz" to the name
            np.savez_compressed(f, scene=np.array(scene.to_json()), **arrays)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
