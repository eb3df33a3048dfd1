"""Scripted demonstrators for the robosuite adapter (:mod:`icrt.envs.robosuite`).

Each expert is a small state machine over privileged simulator state (``env.sim_state()``) that
servoes the gripper site to waypoints with OSC_POSE delta actions: approach above the object,
descend, close, lift, carry, lower, release, retreat. Grasp yaws come from the object's pose (and
its narrow side), and every phase re-reads the object pose, so an object that slips out of the
hand sends the machine back to the approach instead of failing silently.

Two details matter for reliability:

* The gripper yaw is tracked *unwrapped* and commanded through a rate-limited ramp, so large
  turns (up to ~200 degrees for the nut) go the intended way and stay inside the wrist's joint
  range instead of taking the shortest rotation into a joint limit.
* The Panda stalls about 0.8 m (horizontally) from its base with the gripper pointing down, and
  parts of the goal bins and the square peg's far side lie beyond that. Drop points are pulled
  toward the robot (still inside the goal bin), and the nut is turned so its handle faces the
  robot before it goes onto the peg.

Experts are deterministic given the env's seed: the only randomness (small per-episode offsets
that diversify demonstrations) comes from a generator seeded by ``env.seed``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy.spatial.transform import Rotation

from icrt.envs.robosuite_tasks import parse_family_task
from icrt.errors import UserError

# OSC_POSE scales actions in [-1, 1] to at most 5 cm and 0.5 rad per step.
POS_SCALE = 0.05
ROT_SCALE = 0.5
OPEN, CLOSE = -1.0, 1.0
# Panda joint 7 range; a yaw change of d rotates joint 7 by about -d.
Q7_LIMIT = 2.8973
Q7_MARGIN = 0.3
# Largest yaw change commanded per step (keeps the rotation error unambiguous, < pi).
YAW_RAMP = 0.45
# Farthest horizontal grip-site distance from the robot base used as a goal.
REACH = 0.76


# ---------------------------------------------------------------------------- geometry helpers


def wrap(a: float) -> float:
    """Angle in [-pi, pi)."""
    return (a + math.pi) % (2.0 * math.pi) - math.pi


def yaw_of(mat: np.ndarray, axis: int = 0) -> float:
    """Yaw (world xy-plane heading) of column ``axis`` of a rotation matrix."""
    return math.atan2(mat[1, axis], mat[0, axis])


def nearest_yaw(desired: float, reference: float, period: float) -> float:
    """The member of ``desired + n * period`` closest to ``reference`` (symmetric grasps)."""
    return desired + period * round((reference - desired) / period)


def down_mat(yaw: float) -> np.ndarray:
    """Grip-site rotation pointing straight down with the finger-closing axis at ``yaw``.

    The Panda grip site's x axis is the closing axis and its z axis the approach direction, so
    this is ``[x, y, z] = [(c, s, 0), (s, -c, 0), (0, 0, -1)]``.
    """
    c, s = math.cos(yaw), math.sin(yaw)
    return np.array([[c, s, 0.0], [s, -c, 0.0], [0.0, 0.0, -1.0]])


def rot_err(state: dict[str, np.ndarray], yaw: float) -> float:
    """Angle (rad) between the gripper and the downward pose at ``yaw``."""
    return float(
        np.linalg.norm(Rotation.from_matrix(down_mat(yaw) @ state["eef_mat"].T).as_rotvec())
    )


def grip_width(state: dict[str, np.ndarray]) -> float:
    """Finger separation (m): ~0.08 open, ~0.002 closed on nothing."""
    q = state["gripper_qpos"]
    return float(q[0] - q[1])


def horizontal_extent(mat: np.ndarray, half: np.ndarray) -> np.ndarray:
    """World-frame x/y half extents of a box with rotation ``mat`` and half sizes ``half``."""
    return np.abs(mat[:2, :]) @ half


def reachable_point(
    center: np.ndarray, corner: np.ndarray, base: np.ndarray, reach: float = REACH
) -> np.ndarray:
    """``center`` if within ``reach`` of ``base``, else the point toward ``corner`` that is."""
    if np.linalg.norm(center - base) <= reach:
        return center.copy()
    if np.linalg.norm(corner - base) >= reach:
        return corner.copy()
    lo, hi = 0.0, 1.0
    for _ in range(30):
        mid = 0.5 * (lo + hi)
        if np.linalg.norm(center + mid * (corner - center) - base) > reach:
            lo = mid
        else:
            hi = mid
    return center + hi * (corner - center)


# ---------------------------------------------------------------------------- base machine


class _StateMachine:
    """Phase bookkeeping shared by the experts (phase, steps spent in it, per-episode rng) and
    the servo that turns (position, yaw, gripper) goals into OSC_POSE actions."""

    #: Salt so different experts draw different offsets from the same env seed.
    salt = 0

    def __init__(self, task: str) -> None:
        self.task = task
        self.phase = "start"
        self.n = 0
        self.mem: dict[str, Any] = {}
        self.rng = np.random.default_rng(0)
        self.cur_yaw = 0.0
        self.home_yaw = 0.0

    def reset(self, env: Any) -> None:
        seed = getattr(env, "seed", None)
        self.rng = np.random.default_rng([self.salt, 0 if seed is None else int(seed)])
        self.mem = {}
        self._started = False
        self.goto("start")
        self._reset(env)

    def _reset(self, env: Any) -> None:
        """Per-task episode set-up (noise draws)."""

    def goto(self, phase: str) -> None:
        self.phase = phase
        self.n = 0
        if phase == "release":
            self.mem.pop("release_eef", None)

    def act(self, env: Any, obs: dict[str, np.ndarray]) -> np.ndarray:
        s = env.sim_state()
        measured = yaw_of(s["eef_mat"])
        if not self._started:
            self._started = True
            self.cur_yaw = self.home_yaw = measured
            self.q7_home = float(s["arm_qpos"][6])
        else:
            self.cur_yaw += wrap(measured - self.cur_yaw)
        action = self._act(s)
        self.n += 1
        return np.clip(action, -1.0, 1.0).astype(np.float32)

    def yaw_ok(self, yaw: float) -> bool:
        """Whether unwrapped gripper yaw ``yaw`` keeps joint 7 inside its range (with margin)."""
        q7 = self.q7_home - (yaw - self.home_yaw)
        return abs(q7) < Q7_LIMIT - Q7_MARGIN

    def servo(
        self,
        s: dict[str, np.ndarray],
        pos: np.ndarray,
        yaw: float,
        grip: float,
        *,
        speed: float = 1.0,
        z_speed: float | None = None,
        xy_gain: float = 1.0,
    ) -> np.ndarray:
        """Action moving the grip site toward ``pos`` with a downward gripper turning to ``yaw``
        (unwrapped; approached at most YAW_RAMP per step). The horizontal step is ``xy_gain``
        times the error capped at ``speed * 5 cm``, the vertical one capped at ``z_speed`` (so a
        long descent does not starve a small sideways correction)."""
        a = np.zeros(7)
        dp = (np.asarray(pos) - s["eef_pos"]) / POS_SCALE
        dxy = dp[:2] * xy_gain
        n = float(np.linalg.norm(dxy))
        if n > speed:
            dxy *= speed / n
        zs = speed if z_speed is None else z_speed
        a[:2] = dxy
        a[2] = np.clip(dp[2], -zs, zs)
        step_yaw = self.cur_yaw + float(np.clip(yaw - self.cur_yaw, -YAW_RAMP, YAW_RAMP))
        rv = Rotation.from_matrix(down_mat(step_yaw) @ s["eef_mat"].T).as_rotvec()
        a[3:6] = np.clip(rv / ROT_SCALE, -1.0, 1.0)
        a[6] = grip
        return a

    def _act(self, s: dict[str, np.ndarray]) -> np.ndarray:
        raise NotImplementedError


class _PickExpert(_StateMachine):
    """Pick one object from above; subclasses say where to grasp it and what to do after.

    Phases: approach (hover above the grasp point, open, turn to the grasp yaw) -> descend ->
    close -> the subclass's phases (starting with ``lift``). If the object leaves the hand the
    machine goes back to ``approach``.
    """

    hover = 0.10  # hover height above the grasp point (m)
    close_steps = 10  # steps to let the fingers close
    descend_speed = 0.5
    hold_dist = 0.06  # grip site within this of the object's reference point while holding

    def _grasp_target(self, s: dict[str, np.ndarray]) -> tuple[np.ndarray, float]:
        """(grasp point, closing-axis yaw, unwrapped) for the object to pick."""
        raise NotImplementedError

    def _obj_pos(self, s: dict[str, np.ndarray]) -> np.ndarray:
        raise NotImplementedError

    def _holding(self, s: dict[str, np.ndarray]) -> bool:
        near = np.linalg.norm(self._obj_pos(s) - s["eef_pos"]) < self.hold_dist
        return bool(near and grip_width(s) > 0.004)

    def _act(self, s: dict[str, np.ndarray]) -> np.ndarray:
        if self.phase == "start":
            self.goto("approach")
        if self.phase in ("approach", "descend", "close"):
            return self._pick(s)
        if self.phase in ("lift", "carry", "lower") and self.n > 5 and not self._holding(s):
            self.goto("approach")
            return self._pick(s)
        return self._after_grasp(s)

    def _pick(self, s: dict[str, np.ndarray]) -> np.ndarray:
        target, yaw = self._grasp_target(s)
        if self.phase == "approach":
            above = target + np.array([0.0, 0.0, self.hover])
            if np.linalg.norm((above - s["eef_pos"])[:2]) > 0.02:
                # travel high enough that the fingers do not sweep through neighbours, and
                # rise before moving sideways when low
                above[2] = max(above[2], self._travel_z(s))
                if s["eef_pos"][2] < above[2] - 0.03:
                    above[:2] = s["eef_pos"][:2]
            ok = (
                np.linalg.norm(target[:2] - s["eef_pos"][:2]) < 0.01
                and abs(s["eef_pos"][2] - above[2]) < 0.02
                and abs(yaw - self.cur_yaw) < 0.06
                and rot_err(s, yaw) < 0.08
                and grip_width(s) > 0.07
            )
            if ok or self.n > 100:
                self.goto("descend")
            return self.servo(s, above, yaw, OPEN)
        if self.phase == "descend":
            if np.linalg.norm(target - s["eef_pos"]) < 0.006 or self.n > 40:
                self.goto("close")
            return self.servo(s, target, yaw, OPEN, speed=self.descend_speed)
        # close
        if self.n >= self.close_steps:
            self.mem["grasp_eef"] = s["eef_pos"].copy()
            self.goto("lift")
        return self.servo(s, target, yaw, CLOSE, speed=0.3)

    def _travel_z(self, s: dict[str, np.ndarray]) -> float:
        """Lowest safe grip-site height for moving sideways toward the object."""
        return -math.inf

    def sync_phase(self, env: Any) -> None:
        """Bring the phase back in line with the simulator when another controller drives the
        arm (DAgger labels the policy's states with :meth:`act`). The machine advances on its
        own timers and checks, which assume its own actions were executed: a policy may go down
        to the object without first turning to the machine's grasp yaw, close on it or lift it
        earlier, drift during the descent, or leave the task undone when the machine thinks it
        is retreating. Without this the machine would label a policy already down at the object
        with "rise and re-align" and one already closing on it with "open". Call before each
        :meth:`act`; on the machine's own path it changes nothing (apart from retries after an
        object slipped out of the hand)."""
        s = env.sim_state()
        obj = self._obj_pos(s)
        if "obj_z0" not in self.mem:  # where the object rests before anything moves it
            self.mem["obj_z0"] = float(obj[2])
        if not self._started:
            return
        if self.phase in ("approach", "descend", "close"):
            closing_on_it = self._holding(s) and grip_width(s) < 0.07
            if closing_on_it and obj[2] > self.mem["obj_z0"] + 0.01:  # already picked up
                self.mem["grasp_eef"] = s["eef_pos"].copy()
                self.goto("lift")
            elif closing_on_it and self.phase != "close":  # the fingers already close on it
                self.goto("close")
            elif self.phase == "approach" and self.n > 0:  # n > 0: the grasp is planned
                target, _ = self._grasp_target(s)
                offset = np.linalg.norm((target - s["eef_pos"])[:2])
                down = s["eef_pos"][2] < target[2] + self.hover - 0.03
                if down and offset < 0.02 and grip_width(s) > 0.07:  # already at the object
                    self.goto("descend")
            elif self.phase == "descend":
                target, _ = self._grasp_target(s)
                if np.linalg.norm((target - s["eef_pos"])[:2]) > 0.03:  # drifted sideways
                    self.goto("approach")
        elif self.phase == "retreat" and self.n > 10 and not env.check_success():
            self.goto("approach")  # released somewhere the task is not done: start over

    def _after_grasp(self, s: dict[str, np.ndarray]) -> np.ndarray:
        raise NotImplementedError

    def _release_and_retreat(self, s: dict[str, np.ndarray], yaw: float) -> np.ndarray:
        if self.phase == "release":
            self.mem.setdefault("release_eef", s["eef_pos"].copy())
            if self.n >= 6:
                self.goto("retreat")
            return self.servo(s, self.mem["release_eef"], yaw, OPEN, speed=0.0)
        up = self.mem["release_eef"] + np.array([0.0, 0.0, 0.10])
        return self.servo(s, up, yaw, OPEN, speed=0.6)


def _symmetric_grasp_yaw(expert: _StateMachine, yaw: float, period: float) -> float:
    """Member of ``yaw + n * period`` nearest the current gripper yaw (object symmetry)."""
    return nearest_yaw(yaw, expert.cur_yaw, period)


# ---------------------------------------------------------------------------- Lift


class LiftExpert(_PickExpert):
    """Grasp the cube across two faces (cube yaw, 90-degree symmetric) and lift it."""

    salt = 1

    def _reset(self, env: Any) -> None:
        self.mem["lift"] = 0.10 + 0.05 * self.rng.random()

    def _obj_pos(self, s: dict[str, np.ndarray]) -> np.ndarray:
        return s["cube_pos"]

    def _grasp_target(self, s: dict[str, np.ndarray]) -> tuple[np.ndarray, float]:
        return s["cube_pos"].copy(), _symmetric_grasp_yaw(self, yaw_of(s["cube_mat"]), math.pi / 2)

    def _after_grasp(self, s: dict[str, np.ndarray]) -> np.ndarray:
        up = self.mem["grasp_eef"] + np.array([0.0, 0.0, self.mem["lift"]])
        return self.servo(s, up, self.cur_yaw, CLOSE, speed=0.6)


# ---------------------------------------------------------------------------- Stack


class StackExpert(_PickExpert):
    """Pick cube A, carry it above cube B, lower until it almost touches, release, back off."""

    salt = 2

    def _obj_pos(self, s: dict[str, np.ndarray]) -> np.ndarray:
        return s["cubeA_pos"]

    def _grasp_target(self, s: dict[str, np.ndarray]) -> tuple[np.ndarray, float]:
        yaw = _symmetric_grasp_yaw(self, yaw_of(s["cubeA_mat"]), math.pi / 2)
        return s["cubeA_pos"].copy(), yaw

    def _after_grasp(self, s: dict[str, np.ndarray]) -> np.ndarray:
        yaw = self.cur_yaw
        a_pos, b_pos = s["cubeA_pos"], s["cubeB_pos"]
        offset = s["eef_pos"] - a_pos  # cube A in the hand
        b_top = b_pos[2] + s["cubeB_half"][2]
        carry_z = b_top + s["cubeA_half"][2] + 0.06
        if self.phase == "lift":
            if a_pos[2] > carry_z - 0.01:
                self.goto("carry")
            tgt = np.array([s["eef_pos"][0], s["eef_pos"][1], carry_z + offset[2]])
            return self.servo(s, tgt, yaw, CLOSE, speed=0.8)
        if self.phase == "carry":
            err = np.linalg.norm(b_pos[:2] - a_pos[:2])
            if err < 0.004 or (err < 0.008 and self.n > 60):
                self.goto("lower")
            tgt = np.array([*(b_pos[:2] + offset[:2]), carry_z + offset[2]])
            return self.servo(s, tgt, yaw, CLOSE, speed=0.8)
        if self.phase == "lower":
            want = b_top + s["cubeA_half"][2] + 0.004
            if a_pos[2] < want + 0.003 or self.n > 40:
                self.goto("release")
            tgt = np.array([*(b_pos[:2] + offset[:2]), want + offset[2]])
            return self.servo(s, tgt, yaw, CLOSE, speed=0.3)
        return self._release_and_retreat(s, yaw)


# ---------------------------------------------------------------------------- PickPlace


class PickPlaceExpert(_PickExpert):
    """Pick a bin object from the top (across its narrow side), carry it over the walls into the
    goal bin, lower it near the floor, release and rise (robosuite counts an object as placed
    only once the gripper has moved away from it)."""

    salt = 3
    wall_top = 0.90  # bin walls and dividers reach z = 0.90
    floor_z = 0.82
    wall_half = 0.01

    finger_reach = 0.045  # fingertip centre from the grip site, gripper fully open (m)
    finger_radius = 0.012
    # Panda hand housing above the fingers: half length along the closing axis, half width
    # across it, and its underside's height above the grip site
    hand_half = (0.105, 0.038)
    hand_above = 0.02
    enough_clearance = 0.02  # beyond this, prefer the smaller wrist turn

    def __init__(self, task: str, obj: str) -> None:
        super().__init__(task)
        self.obj = obj
        self.round = obj == "Can"  # a cylinder: any grasp yaw works
        u = np.linspace(-self.hand_half[0], self.hand_half[0], 15)
        v = np.array([-self.hand_half[1], 0.0, self.hand_half[1]])
        self._hand_grid = np.stack(np.meshgrid(u, v), -1).reshape(-1, 2)  # (along, across)

    def _reset(self, env: Any) -> None:
        # where in the goal bin to drop (diversity): a small offset from the planned point
        self.mem["drop_offset"] = self.rng.uniform(-0.02, 0.02, size=2)
        self.mem["failed_yaws"] = []

    def _obj_pos(self, s: dict[str, np.ndarray]) -> np.ndarray:
        return s[f"{self.obj}_geom_pos"]

    def _object_yaw(self, s: dict[str, np.ndarray]) -> tuple[float, float]:
        """(yaw of the object's narrow horizontal axis, grasp symmetry period)."""
        half = s[f"{self.obj}_half"]
        axis = 0 if half[0] <= half[1] else 1
        if self.round:
            return self.home_yaw, math.pi / 12
        # both sides fit between the open fingers (8 cm) with room to spare: either will do
        period = math.pi / 2 if 2 * max(half[0], half[1]) < 0.06 else math.pi
        return yaw_of(s[f"{self.obj}_geom_mat"], axis), period

    def _free(self, s: dict[str, np.ndarray], pts: np.ndarray, min_top: float) -> float:
        """Smallest distance from points (N, 2) to the start bin's walls and to the footprints
        of the other objects whose tops reach above ``min_top``."""
        free = float(
            np.min(np.concatenate([pts - s["source_low"], s["source_high"] - pts], axis=1))
        )
        for other in self._others(s):
            pos, half, mat = s[f"{other}_geom_pos"], s[f"{other}_half"], s[f"{other}_geom_mat"]
            if pos[2] + np.abs(mat[2]) @ half < min_top:
                continue
            if abs(mat[2, 2]) > 0.95:  # upright: its own rectangle
                local = (pts - pos[:2]) @ mat[:2, :2]
                out = np.maximum(np.abs(local) - half[:2], 0.0)
            else:  # tipped over: the world-axis box around it
                out = np.maximum(np.abs(pts - pos[:2]) - horizontal_extent(mat, half), 0.0)
            free = min(free, float(np.min(np.linalg.norm(out, axis=1))))
        return free

    def _others(self, s: dict[str, np.ndarray]) -> list[str]:
        return [o for o in ("Milk", "Bread", "Cereal", "Can") if o != self.obj and f"{o}_half" in s]

    def _others_top(self, s: dict[str, np.ndarray]) -> float:
        """Highest point of the other objects (the bin walls at least)."""
        tops = [
            s[f"{o}_geom_pos"][2] + np.abs(s[f"{o}_geom_mat"][2]) @ s[f"{o}_half"]
            for o in self._others(s)
        ]
        return max([self.wall_top, *tops])

    def _travel_z(self, s: dict[str, np.ndarray]) -> float:
        return self._others_top(s) + 0.03

    def _clearance(self, s: dict[str, np.ndarray], pos: np.ndarray, yaw: float) -> float:
        """Free space around the open fingertips and the hand above them at grasp ``yaw``."""
        axis = np.array([math.cos(yaw), math.sin(yaw)])
        perp = np.array([-axis[1], axis[0]])
        tips = pos[:2] + np.outer([self.finger_reach, -self.finger_reach], axis)
        fingers = self._free(s, tips, -math.inf) - self.finger_radius
        grid = (
            pos[:2] + np.outer(self._hand_grid[:, 0], axis) + np.outer(self._hand_grid[:, 1], perp)
        )
        hand_bottom = pos[2] + self.hand_above
        walls = hand_bottom < self.wall_top  # the hand also has to clear the bin walls
        hand = (
            self._free(s, grid, hand_bottom) if walls else self._free_objects(s, grid, hand_bottom)
        )
        return min(fingers, hand)

    def _free_objects(self, s: dict[str, np.ndarray], pts: np.ndarray, min_top: float) -> float:
        """Like :meth:`_free` but ignoring the walls (the hand is above them)."""
        walls = {"source_low": np.full(2, -math.inf), "source_high": np.full(2, math.inf)}
        return self._free({**s, **walls}, pts, min_top)

    def _plan_yaw(self, s: dict[str, np.ndarray], pos: np.ndarray) -> float:
        """Grasp yaw among the object's symmetric choices: enough room for the open fingers
        first, then the smallest wrist turn; yaws that already failed are avoided."""
        yaw0, period = self._object_yaw(s)
        best, best_score = yaw0, -math.inf
        for k in range(-12, 13):
            yaw = nearest_yaw(yaw0, self.home_yaw, period) + k * period
            turn = abs(yaw - self.home_yaw)
            if turn > 2.0 or not self.yaw_ok(yaw):
                continue
            score = min(self._clearance(s, pos, yaw), self.enough_clearance) - 0.002 * turn
            if any(abs(wrap(2 * (yaw - f))) < 0.6 for f in self.mem["failed_yaws"]):
                score -= 0.05
            if score > best_score:
                best, best_score = yaw, score
        return best

    def _grasp_target(self, s: dict[str, np.ndarray]) -> tuple[np.ndarray, float]:
        pos = s[f"{self.obj}_geom_pos"].copy()
        # high on the object (the hand's underside ends ~2 mm above its top), which keeps the
        # hand above the bin walls and most neighbours; at the middle for short objects
        top = pos[2] + s[f"{self.obj}_half"][2]
        pos[2] = max(pos[2], top - 0.018)
        if self.phase == "approach" and self.n == 0:
            if "grasp_yaw" in self.mem:  # a retry: the last attempt's yaw failed
                self.mem["failed_yaws"].append(self.mem["grasp_yaw"])
            self.mem["grasp_yaw"] = self._plan_yaw(s, pos)
        yaw = self.mem["grasp_yaw"]
        if not self.round:  # follow the object if it turns, on the same symmetric branch
            yaw0, period = self._object_yaw(s)
            yaw = nearest_yaw(yaw0, self.mem["grasp_yaw"], period)
        return pos, yaw

    def _drop_xy(self, s: dict[str, np.ndarray]) -> np.ndarray:
        """A point inside the goal bin that the arm can reach with the object clear of walls."""
        ext = horizontal_extent(s[f"{self.obj}_geom_mat"], s[f"{self.obj}_half"])
        low = s["target_low"] + self.wall_half + ext + 0.01
        high = s["target_high"] - self.wall_half - ext - 0.01
        center = 0.5 * (low + high)
        base = s["base_pos"][:2]
        corner = np.clip(base, low, high)  # the bin point nearest the robot
        goal = reachable_point(center + self.mem["drop_offset"], corner, base)
        return np.clip(goal, low, high)

    def _after_grasp(self, s: dict[str, np.ndarray]) -> np.ndarray:
        yaw = self.cur_yaw
        obj = s[f"{self.obj}_geom_pos"]
        half_z = s[f"{self.obj}_half"][2]
        offset = s["eef_pos"] - obj
        bottom = obj[2] - half_z
        carry_bottom = max(self.wall_top + 0.05, self._others_top(s) + 0.03)
        if self.phase == "lift":
            if bottom > carry_bottom - 0.015:
                self.mem["goal_xy"] = self._drop_xy(s)
                self.goto("carry")
            tgt = np.array([s["eef_pos"][0], s["eef_pos"][1], carry_bottom + half_z + offset[2]])
            return self.servo(s, tgt, yaw, CLOSE, speed=0.8)
        goal_xy = self.mem.get("goal_xy")
        if goal_xy is None:
            goal_xy = self.mem["goal_xy"] = self._drop_xy(s)
        if self.phase == "carry":
            err = np.linalg.norm(goal_xy - obj[:2])
            if err < 0.015 or (err < 0.04 and self.n > 80):
                self.goto("lower")
            tgt = np.array([*(goal_xy + offset[:2]), carry_bottom + half_z + offset[2]])
            return self.servo(s, tgt, yaw, CLOSE, speed=0.8)
        if self.phase == "lower":
            want = self.floor_z + half_z + 0.015
            if obj[2] < want + 0.01 or self.n > 40:
                self.goto("release")
            tgt = np.array([*(goal_xy + offset[:2]), want + offset[2]])
            return self.servo(s, tgt, yaw, CLOSE, speed=0.5)
        return self._release_and_retreat(s, yaw)


# ---------------------------------------------------------------------------- NutAssembly


class NutAssemblySquareExpert(_PickExpert):
    """Grasp the square nut by its handle, lift it above the peg while turning it so the handle
    faces the robot (nut yaw pi, which also lines the square hole up with the square peg),
    centre the hole over the peg, lower the nut onto it, release and back off.

    The grasp yaw (two choices, the fingers being symmetric) is picked together with the turn so
    that both stay inside joint 7's range.
    """

    salt = 4
    hold_dist = 0.03
    carry_clear = 0.03  # nut centre above the peg top while moving

    def _reset(self, env: Any) -> None:
        self.mem["final_yaw"] = None

    def _obj_pos(self, s: dict[str, np.ndarray]) -> np.ndarray:
        return s["handle_pos"]

    def _plan(self, s: dict[str, np.ndarray]) -> None:
        """Choose the final nut yaw and the grasp yaw; sideways handles only if the wrist must."""
        theta = yaw_of(s["SquareNut_mat"])
        best: tuple[float, float, float] | None = None
        for final, penalty in ((math.pi, 0.0), (math.pi / 2, 1.0), (-math.pi / 2, 1.0)):
            turn = wrap(final - theta)
            g0 = nearest_yaw(theta + math.pi / 2, self.home_yaw, math.pi)
            for n in range(-2, 3):
                grasp = g0 + n * math.pi
                if not (self.yaw_ok(grasp) and self.yaw_ok(grasp + turn)):
                    continue
                cost = penalty + 0.2 * abs(turn) + 0.1 * abs(grasp - self.cur_yaw)
                if best is None or cost < best[0]:
                    best = (cost, grasp, turn)
        if best is None:  # cannot happen with the Panda's range; fall back to no turn
            best = (0.0, nearest_yaw(theta + math.pi / 2, self.cur_yaw, math.pi), 0.0)
        _, self.mem["grasp_yaw"], turn = best
        self.mem["nut_goal_yaw"] = theta + turn  # unwrapped relative to the nut's current yaw
        self.mem["nut_yaw"] = theta

    def _grasp_target(self, s: dict[str, np.ndarray]) -> tuple[np.ndarray, float]:
        if self.phase == "approach" and self.n == 0:
            self._plan(s)
        # the handle sticks out along the nut's x axis; close across it (the nut's y axis)
        pos = s["handle_pos"].copy()
        pos[2] = s["SquareNut_pos"][2] + 0.003
        return pos, self.mem["grasp_yaw"]

    def _after_grasp(self, s: dict[str, np.ndarray]) -> np.ndarray:
        nut, peg = s["SquareNut_pos"], s["peg_pos"]
        self.mem["nut_yaw"] += wrap(yaw_of(s["SquareNut_mat"]) - self.mem["nut_yaw"])
        yaw_err = self.mem["nut_goal_yaw"] - self.mem["nut_yaw"]
        # turn the hand by however much the nut still has to turn (closed loop on the nut)
        yaw = self.cur_yaw + yaw_err
        offset = s["eef_pos"] - nut
        carry_z = peg[2] + 0.10 + self.carry_clear
        if self.phase == "lift":
            if nut[2] > carry_z - 0.02:
                self.goto("carry")
            tgt = np.array([s["eef_pos"][0], s["eef_pos"][1], carry_z + offset[2] + 0.01])
            return self.servo(s, tgt, yaw if nut[2] > peg[2] else self.cur_yaw, CLOSE, speed=0.8)
        if self.phase == "carry":
            err = np.linalg.norm(peg[:2] - nut[:2])
            if (err < 0.003 and abs(yaw_err) < 0.04) or (err < 0.005 and self.n > 100):
                self.goto("lower")
            tgt = np.array([*(peg[:2] + offset[:2]), carry_z + offset[2]])
            return self.servo(s, tgt, yaw, CLOSE, speed=0.6, xy_gain=1.5)
        if self.phase == "lower":
            want = s["table_z"] + 0.03
            if nut[2] < want + 0.01 or self.n > 60:
                self.goto("release")
            err = np.linalg.norm(peg[:2] - nut[:2])
            # only go down while the hole is over the peg; otherwise hold height and re-centre
            z = want if err < 0.003 or nut[2] < peg[2] + 0.08 else s["eef_pos"][2] - offset[2]
            tgt = np.array([*(peg[:2] + offset[:2]), z + offset[2]])
            return self.servo(s, tgt, yaw, CLOSE, speed=0.3, xy_gain=2.0)
        return self._release_and_retreat(s, self.cur_yaw)


# ---------------------------------------------------------------------------- factory


def make_expert(task: str) -> _StateMachine:
    """The scripted expert for a robosuite adapter task name."""
    if task == "Lift":
        return LiftExpert(task)
    if task == "Stack":
        return StackExpert(task)
    if task == "PickPlaceCan":
        return PickPlaceExpert(task, "Can")
    if task == "NutAssemblySquare":
        return NutAssemblySquareExpert(task)
    family = parse_family_task(task)
    if family is not None:
        return PickPlaceExpert(task, family[0])
    raise UserError(f"No robosuite expert for task '{task}'.")
