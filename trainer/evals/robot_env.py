"""A headless 2-D pushing task for behaviour cloning from frozen features (`toto-train robot`).

A circular end effector pushes a square block across a walled table until the block's centre lies
on a goal pad. Physics is Chipmunk2D through `pymunk` (rigid-body contacts, friction against the
pusher, the block's rotation), the engine of the Push-T benchmark (Chi et al., Diffusion Policy);
frames are drawn with numpy, so nothing needs a display or OpenGL.

- State, in table units ([0, 1] on each axis, y down as in the image): pusher (x, y), block
  (x, y, angle), goal (x, y) fixed for every episode.
- Observation: the camera frame (R, R, 3) uint8 seen from above, and proprioception: the pusher's
  position and velocity, (4,) float32. The block's pose is only in the frame.
- Action: the pusher's displacement over the next control step as a fraction of its top speed,
  (2,) in the unit disc (longer vectors are scaled down to it).
- Success: the block's centre within ``success_radius`` of the goal; an episode ends there or
  after ``max_steps`` control steps.

`expert_action` is a scripted demonstrator that depends on the current state only (a vector field
around the block: round it on the side the pusher is on, to contact behind it, then push towards
the goal), so a policy that reads the block's pose from the frame can imitate it step by step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["PushConfig", "PushEnv", "expert_action", "render"]

_SCALE = 512.0  # simulation units per table unit: pymunk's default contact slop suits this size


def _pymunk():
    try:
        import pymunk
    except ImportError as e:  # pymunk is a dependency of toto: only a broken install lacks it
        raise RuntimeError("the pushing task needs pymunk (a dependency of toto): pip install 'pymunk>=7'") from e
    return pymunk


@dataclass(frozen=True)
class PushConfig:
    resolution: int = 64  # camera frame size in pixels
    pusher_radius: float = 0.04
    block_size: float = 0.12  # side of the square block
    goal: tuple[float, float] = (0.5, 0.5)
    success_radius: float = 0.05
    max_speed: float = 0.5  # table units per second
    control_hz: float = 10.0
    substeps: int = 10
    max_steps: int = 120
    start_margin: float = 0.2  # the block starts this far from the walls (room to get behind it)
    min_start_distance: float = 0.2  # ... and at least this far from the goal

    def __post_init__(self) -> None:
        if self.resolution < 8:
            raise ValueError(f"resolution={self.resolution}: use >= 8 pixels")
        if not 0 < self.success_radius < 0.5:
            raise ValueError(f"success_radius={self.success_radius}: use a value in (0, 0.5)")
        if self.max_steps < 1 or self.substeps < 1 or self.control_hz <= 0:
            raise ValueError("max_steps and substeps must be >= 1 and control_hz > 0")

    @property
    def step_length(self) -> float:
        """Table units the pusher moves in one control step at full speed."""
        return self.max_speed / self.control_hz


class PushEnv:
    """One episode of the pushing task, seeded: the same seed gives the same start and, for the
    same actions, the same trajectory (Chipmunk2D is deterministic on one machine)."""

    def __init__(self, cfg: PushConfig, seed: int) -> None:
        pm = _pymunk()
        self.cfg = cfg
        rng = np.random.default_rng(seed)
        space = pm.Space()
        space.gravity = (0.0, 0.0)
        space.damping = 0.02  # the table's drag: a pushed block keeps 2% of its speed after a second
        wall = 0.01 * _SCALE
        for a, b in (((0, 0), (1, 0)), ((1, 0), (1, 1)), ((1, 1), (0, 1)), ((0, 1), (0, 0))):
            seg = pm.Segment(space.static_body, tuple(_SCALE * v for v in a), tuple(_SCALE * v for v in b), wall)
            seg.friction = 0.5
            space.add(seg)
        s = cfg.block_size * _SCALE
        self.block = pm.Body(1.0, pm.moment_for_box(1.0, (s, s)))
        box = pm.Poly.create_box(self.block, (s, s))
        box.friction = 0.6
        self.pusher = pm.Body(body_type=pm.Body.KINEMATIC)
        tip = pm.Circle(self.pusher, cfg.pusher_radius * _SCALE)
        tip.friction = 0.6
        goal = np.asarray(cfg.goal, float)
        lo, hi = cfg.start_margin, 1 - cfg.start_margin
        while True:  # a start away from the goal
            b = rng.uniform(lo, hi, 2)
            if np.linalg.norm(b - goal) >= cfg.min_start_distance:
                break
        clear = cfg.block_size * math.sqrt(0.5) + cfg.pusher_radius + 0.02
        while True:  # a pusher start that does not overlap the block
            p = rng.uniform(cfg.pusher_radius + 0.02, 1 - cfg.pusher_radius - 0.02, 2)
            if np.linalg.norm(p - b) >= clear:
                break
        self.block.position = tuple(_SCALE * b)
        self.block.angle = float(rng.uniform(-math.pi, math.pi))
        self.pusher.position = tuple(_SCALE * p)
        space.add(self.block, box, self.pusher, tip)
        self.space = space
        self.steps = 0
        self.success = False

    # -- state -------------------------------------------------------------------------------------
    def state(self) -> dict[str, np.ndarray | float]:
        return {"pusher": np.asarray(self.pusher.position, float) / _SCALE,
                "pusher_velocity": np.asarray(self.pusher.velocity, float) / _SCALE,
                "block": np.asarray(self.block.position, float) / _SCALE,
                "angle": float(self.block.angle), "goal": np.asarray(self.cfg.goal, float)}

    def proprio(self) -> np.ndarray:
        """(4,) float32: pusher position and velocity (velocity as a fraction of the top speed)."""
        st = self.state()
        return np.concatenate([st["pusher"], st["pusher_velocity"] / self.cfg.max_speed]).astype(np.float32)

    def distance(self) -> float:
        """Block centre to goal, table units."""
        st = self.state()
        return float(np.linalg.norm(st["block"] - st["goal"]))

    def frame(self) -> np.ndarray:
        st = self.state()
        return render(self.cfg, st["pusher"], st["block"], st["angle"])

    @property
    def done(self) -> bool:
        return self.success or self.steps >= self.cfg.max_steps

    # -- dynamics ----------------------------------------------------------------------------------
    def step(self, action: np.ndarray) -> bool:
        """Apply one control step; returns whether the block reached the goal."""
        a = np.asarray(action, float).reshape(2)
        if not np.isfinite(a).all():
            raise ValueError(f"action {a} is not finite")
        n = float(np.linalg.norm(a))
        if n > 1:
            a = a / n
        # The pusher is kinematic (walls do not stop it): its move is clipped to the table instead.
        p = np.asarray(self.pusher.position, float) / _SCALE
        r = self.cfg.pusher_radius
        to = np.clip(p + a * self.cfg.step_length, r, 1 - r)
        v = (to - p) * self.cfg.control_hz * _SCALE  # simulation units per second
        self.pusher.velocity = (float(v[0]), float(v[1]))
        dt = 1.0 / self.cfg.control_hz / self.cfg.substeps
        for _ in range(self.cfg.substeps):
            self.space.step(dt)
        self.steps += 1
        self.success = self.success or self.distance() <= self.cfg.success_radius
        return self.success


def render(cfg: PushConfig, pusher: np.ndarray, block: np.ndarray, angle: float) -> np.ndarray:
    """Top view (R, R, 3) uint8: grey table, green goal pad (the block's size), blue block, red pusher.
    Each pixel is coloured by its centre (2x2 supersampled, so edges move smoothly with the state)."""
    r = cfg.resolution
    ss = 2
    c = (np.arange(r * ss) + 0.5) / (r * ss)  # sample centres, table units
    y, x = np.meshgrid(c, c, indexing="ij")  # (rS, rS)
    img = np.empty((r * ss, r * ss, 3), np.float32)
    img[:] = (176, 176, 168)
    half = cfg.block_size / 2
    gx, gy = cfg.goal
    img[(np.abs(x - gx) <= half) & (np.abs(y - gy) <= half)] = (120, 200, 120)
    ca, sa = math.cos(angle), math.sin(angle)
    dx, dy = x - block[0], y - block[1]
    u, w = ca * dx + sa * dy, -sa * dx + ca * dy  # the block's own frame
    img[(np.abs(u) <= half) & (np.abs(w) <= half)] = (40, 70, 200)
    img[(x - pusher[0]) ** 2 + (y - pusher[1]) ** 2 <= cfg.pusher_radius ** 2] = (210, 40, 40)
    img = img.reshape(r, ss, r, ss, 3).mean(axis=(1, 3))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def expert_action(cfg: PushConfig, state: dict) -> np.ndarray:
    """The scripted demonstrator: (2,) action in the unit disc from the current state alone.

    A vector field in polar coordinates around the block, the angle measured from the direction
    to the goal: the pusher is drawn round the block (on the side it is on) towards the point
    behind it, held at a clearance while it is beside or in front and brought to contact as it
    gets behind, where it pushes towards the goal, slowing near it. Continuous except straight in
    front of the block, so a policy can regress it."""
    p, b, g = (np.asarray(state[k], float) for k in ("pusher", "block", "goal"))
    to_goal = g - b
    dist = float(np.linalg.norm(to_goal))
    if dist < 1e-9:
        return np.zeros(2)
    d = to_goal / dist
    n = np.array([-d[1], d[0]])
    rel = p - b
    r = max(float(np.linalg.norm(rel)), 1e-9)
    radial = rel / r
    theta = math.atan2(float(rel @ n), float(rel @ d))  # 0: between block and goal; ±pi: behind
    behind = math.pi - abs(theta)  # 0 when exactly behind
    contact = cfg.block_size * 0.5 + cfg.pusher_radius  # centre distance touching a face
    orbit = cfg.block_size * math.sqrt(0.5) + cfg.pusher_radius + 0.04  # clear of any corner
    closeness = max(0.0, 1.0 - behind / 0.5)  # 1 behind the block, 0 beyond ~30° off
    r_want = orbit + (contact - 0.01 - orbit) * closeness
    tangent = np.array([-radial[1], radial[0]])  # +theta direction
    step = cfg.step_length
    move = radial * float(np.clip(0.6 * (r_want - r), -step, step))
    move = move + tangent * math.copysign(min(step, 0.6 * r * behind), theta)
    move = move + d * step * closeness * min(1.0, 0.3 + dist / 0.1)
    a = move / step
    m = float(np.linalg.norm(a))
    return a / m if m > 1 else a
