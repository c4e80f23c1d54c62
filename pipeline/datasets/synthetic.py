"""Procedural videos of moving textured shapes: a dataset that needs no download.

Why: the embedded default run, the tests and the temporal-corr probe need videos with exact
object masks, deterministic from a seed and fast to make. Each video is planned once from
``(seed, video)`` (shapes, textures, trajectories); any frame is then rendered on its own
from that plan, so records stay lazy and frame t never depends on frames before it.

Objects move smoothly (constant speed along a lane, bouncing at its ends; a gentle sway
across it; slow rotation) and never overlap: each object has its own lane across the frame,
so every object is fully visible in every frame and its mask centroid equals its centre
(the keypoint). Coordinates are pixels with pixel (row i, column j) at x = j, y = i.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from kvpipe.errors import UsageError
from kvpipe.pipeline.datasets.base import DATASETS, Annotation, DatasetAdapter, ImageRecord

SHAPES = ("circle", "rectangle", "triangle")
MIN_SIDE = 32  # below this the shapes would be a few pixels wide


@dataclass(frozen=True, eq=False)
class Shape:
    """One object's look and path.

    Along its lane it moves at a constant ``step`` pixels per frame, bouncing between two
    ends exactly ``legs`` steps apart, so consecutive frames always differ by ``step``;
    across the lane it sways sinusoidally.
    """

    kind: str
    radius: float  # bounding-circle radius in pixels
    aspect: float  # rectangles: half-width = radius*cos(aspect), half-height = radius*sin(aspect)
    colour: np.ndarray  # RGB in 0..255
    texture: str  # "stripes" or "checker"
    period: float  # texture period in pixels
    horizontal: bool  # lane runs along x (True) or y
    start: float  # along-lane position of the first end
    step: float
    legs: int
    offset: int  # frame 0 is at step ``offset`` of the 2*legs-step round trip
    across: tuple[float, float, float, float]  # (mid, amplitude, omega, phase)
    angle0: float
    spin: float  # radians per frame

    def centre(self, t: int) -> np.ndarray:
        n = (self.offset + t) % (2 * self.legs)
        along = self.start + self.step * (n if n <= self.legs else 2 * self.legs - n)
        mid, amp, omega, phase = self.across
        across = mid + amp * np.sin(omega * t + phase)
        return np.array([along, across] if self.horizontal else [across, along])

    def angle(self, t: int) -> float:
        return self.angle0 + self.spin * t


@dataclass(frozen=True, eq=False)
class VideoPlan:
    """Everything needed to render any frame of one video."""

    background: np.ndarray  # HxWx3 float32, static
    shapes: tuple[Shape, ...]
    noise_seed: tuple[int, int]


def _random_colour(rng: np.random.Generator, saturation: tuple[float, float], value: tuple[float, float]) -> np.ndarray:
    rgb = colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(*saturation), rng.uniform(*value))
    return np.array(rgb, dtype=np.float32) * 255.0


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A muted colour modulated by a few oriented waves: texture for features to latch on to."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    base = _random_colour(rng, (0.1, 0.35), (0.35, 0.6))
    light = np.zeros((height, width), np.float32)
    for _ in range(3):
        theta, period = rng.uniform(0, np.pi), rng.uniform(8.0, 40.0)
        proj = xs * np.cos(theta) + ys * np.sin(theta)
        light += np.sin(2 * np.pi * proj / period + rng.uniform(0, 2 * np.pi)).astype(np.float32)
    tint = _random_colour(rng, (0.2, 0.5), (0.5, 0.8))
    mix = (light / 6.0 + 0.5)[..., None]  # about 0..1
    return base * (1 - mix) + tint * mix


def _plan_shape(rng: np.random.Generator, lane: tuple[float, float], along_len: float, horizontal: bool,
                side: float) -> Shape:
    """A shape confined to ``lane`` (its across-axis interval) so it never meets another."""
    lo, hi = lane
    half = (hi - lo) / 2
    radius = float(min(0.2 * side, half - 2) * rng.uniform(0.7, 1.0))
    margin = radius + 1.5  # keeps the whole shape inside the frame
    span = max(along_len - 2 * margin, 0.0) * rng.uniform(0.6, 1.0)
    # pixels per frame: visible motion, yet small enough for mask propagation
    step = min(rng.uniform(0.015, 0.04) * along_len, span) or 1.0
    legs = max(int(span // step), 1)
    start = margin + (along_len - 2 * margin - legs * step) * rng.uniform(0, 1)
    across_room = max(half - radius - 1.5, 0.0)
    amp = across_room * rng.uniform(0.3, 1.0)
    omega = min(rng.uniform(0.1, 0.3), 0.02 * along_len / max(amp, 1e-6))
    return Shape(
        kind=SHAPES[int(rng.integers(len(SHAPES)))], radius=radius, aspect=float(rng.uniform(0.5, 1.07)),
        colour=_random_colour(rng, (0.6, 1.0), (0.7, 1.0)), texture=("stripes", "checker")[int(rng.integers(2))],
        period=float(rng.uniform(5.0, 12.0)), horizontal=horizontal, start=float(start), step=float(step),
        legs=legs, offset=int(rng.integers(2 * legs)),
        across=((lo + hi) / 2, float(amp), float(omega), float(rng.uniform(0, 2 * np.pi))),
        angle0=float(rng.uniform(0, 2 * np.pi)), spin=float(rng.uniform(-0.08, 0.08)),
    )


def plan_video(seed: int, video: int, width: int, height: int) -> VideoPlan:
    """Draw one video's background and 2-3 shapes from ``(seed, video)`` alone."""
    rng = np.random.default_rng([seed, video])
    background = _background(rng, width, height)
    n_objects = int(rng.integers(2, 4))
    horizontal = bool(rng.integers(2))  # lanes run left-right (True) or top-bottom
    along_len, across_len = (width, height) if horizontal else (height, width)
    edges = np.linspace(0, across_len, n_objects + 1)
    lanes = [(float(edges[i]), float(edges[i + 1])) for i in rng.permutation(n_objects)]
    shapes = tuple(_plan_shape(rng, lane, along_len, horizontal, min(width, height)) for lane in lanes)
    return VideoPlan(background, shapes, (seed, video))


def _inside(shape: Shape, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Which pixels (in the shape's rotated local coordinates u, v) the shape covers."""
    r = shape.radius
    if shape.kind == "circle":
        return u * u + v * v <= r * r
    if shape.kind == "rectangle":
        return (np.abs(u) <= r * np.cos(shape.aspect)) & (np.abs(v) <= r * np.sin(shape.aspect))
    # Equilateral triangle with circumradius r centred on its centroid: inside all three edges.
    inside = np.ones(u.shape, bool)
    for k in range(3):
        a = np.pi / 2 + 2 * np.pi * k / 3  # direction of vertex k; the opposite edge is at -r/2
        inside &= -(u * np.cos(a) + v * np.sin(a)) <= r / 2
    return inside


def _texture(shape: Shape, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Brightness pattern fixed to the object, so it moves and turns with it."""
    w = 2 * np.pi / shape.period
    pattern = np.sin(w * u) if shape.texture == "stripes" else np.sin(w * u) * np.sin(w * v)
    return 0.7 + 0.3 * pattern


def render_frame(plan: VideoPlan, t: int) -> tuple[np.ndarray, np.ndarray, dict[str, list[float]]]:
    """RGB uint8 HxWx3, label mask uint8 HxW and object centres {id: [x, y]} of frame t."""
    height, width = plan.background.shape[:2]
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    img = plan.background.copy()
    mask = np.zeros((height, width), np.uint8)
    keypoints: dict[str, list[float]] = {}
    for obj_id, shape in enumerate(plan.shapes, 1):
        cx, cy = shape.centre(t)
        a = shape.angle(t)
        u = (xs - cx) * np.cos(a) + (ys - cy) * np.sin(a)
        v = -(xs - cx) * np.sin(a) + (ys - cy) * np.cos(a)
        inside = _inside(shape, u, v)
        img[inside] = shape.colour * _texture(shape, u[inside], v[inside])[:, None]
        mask[inside] = obj_id
        keypoints[str(obj_id)] = [round(float(cx), 2), round(float(cy), 2)]
    noise = np.random.default_rng([*plan.noise_seed, t]).normal(0.0, 2.0, img.shape)
    return np.clip(img + noise, 0, 255).astype(np.uint8), mask, keypoints


def _check_positive(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise UsageError(f"synthetic dataset option {name}={value!r} must be an integer >= {minimum}")
    return int(value)


@DATASETS.register("synthetic")
class SyntheticDataset(DatasetAdapter):
    """Moving textured shapes; default 4 videos x 6 frames of 224x168 (deliberately not square)."""

    name = "synthetic"
    tasks = ("temporal-corr", "input-agnostic")
    needs_root = False

    def __init__(self, root: str | None = None, split: str | None = None, limit: int | None = None, *,
                 n_videos: int = 4, n_frames: int = 6, width: int = 224, height: int = 168, seed: int = 0):
        if split not in (None, "default"):
            raise UsageError(f"dataset 'synthetic' has one split, 'default'; got --split {split}")
        super().__init__(None, "default", limit)
        self.n_videos = _check_positive("n_videos", n_videos)
        self.n_frames = _check_positive("n_frames", n_frames)
        self.width = _check_positive("width", width, MIN_SIDE)
        self.height = _check_positive("height", height, MIN_SIDE)
        self.seed = _check_positive("seed", seed, 0)
        self._plans: dict[int, VideoPlan] = {}

    def plan(self, video: int) -> VideoPlan:
        """The video's plan, made on first use (records() stays instant)."""
        if video not in self._plans:
            self._plans[video] = plan_video(self.seed, video, self.width, self.height)
        return self._plans[video]

    def _image(self, video: int, t: int) -> Image.Image:
        return Image.fromarray(render_frame(self.plan(video), t)[0], "RGB")

    def _annotation(self, video: int, t: int) -> Annotation:
        _, mask, keypoints = render_frame(self.plan(video), t)
        return Annotation(mask, {"keypoints": keypoints, "objects": [s.kind for s in self.plan(video).shapes]})

    def records(self) -> list[ImageRecord]:
        out = []
        for v in range(self.n_videos):
            for t in range(self.n_frames):
                if self.limit is not None and len(out) >= self.limit:
                    return out
                image_id = f"video{v:02d}/{t:05d}"
                out.append(ImageRecord(
                    image_id=image_id, source=f"synthetic:{image_id}",
                    load_image=lambda v=v, t=t: self._image(v, t),
                    load_annotation=lambda v=v, t=t: self._annotation(v, t),
                    group=f"video{v:02d}", frame=t,
                ))
        return out

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "n_videos": self.n_videos, "n_frames": self.n_frames,
                "width": self.width, "height": self.height, "seed": self.seed}
