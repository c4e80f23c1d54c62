"""Procedural videos of moving textured shapes: a dataset that needs no download.

Why: the embedded default run, the tests and the temporal-corr probe need videos with exact
object masks, deterministic from a seed and fast to make. Each video is planned once from
``(seed, video)`` (shapes, textures, trajectories); any frame is then rendered on its own
from that plan, so records stay lazy and frame t never depends on frames before it.

Objects move smoothly (constant speed along a lane, bouncing at its ends; a gentle sway
across it; slow rotation) and never overlap: each object has its own lane across the frame,
so every object is fully visible in every frame and its mask centroid equals its centre
(the keypoint). Coordinates are pixels with pixel (row i, column j) at x = j, y = i.

Annotations for every probe (the contract of ``base.Annotation`` / ``structure``):

* masks: object ids 1..K per video (kept as ids, which temporal-corr propagates); meta
  "labels" maps each id to its shape's class (classes = background, circle, rectangle,
  triangle), so semantic-seg, fg-seg and co-segmentation read classes from the same masks;
* text queries: the three class names (``class_queries``), then one referring expression per
  object, "the <colour> <shape>", the colour being the nearest by hue of a fixed list of names
  (object colours are saturated and bright, so hue decides the name); when two objects of a
  video share shape and colour name, their fixed lane order adds "on the left" / "at the top"
  etc. (lanes never cross, so the phrase holds in every frame); meta "refs" points each object
  at its expression;
* pairs (semantic-corr): frame 0 -> every later frame of the same video for each object, with
  its centre and four (circle, rectangle) or three (triangle) points fixed to the object at 0.7
  of the way from the centre to its local axes' ends / corners / vertices: the same physical
  points in both frames, and inside the object (the nearest pixel of each is in its mask;
  points that fail this at small sizes are dropped). Across videos (consecutive videos holding
  the class, frame 0 to frame 0, every object pairing of that class) only the centres: the
  shapes are symmetric, so "which corner" has no answer across two instances;
* episodes (fg-seg): every image containing a class is a query, with 5 support images
  containing it drawn (seeded) from other videos, topped up from the same video if needed;
* image_sets (co-segmentation): per class, the first frame of each video holding it;
* texts (per-image prefixes): "class", the kind of the video's largest object, and "caption",
  a generated sentence naming every object by colour and shape (``video_texts``).

With the defaults (seed 0) every class is in at least two videos, so every structure is
non-empty; other seeds or sizes may leave a class in one video (fewer cross-video pairs,
same-video supports, no image set for it).
"""

from __future__ import annotations

import colorsys
import threading
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
from PIL import Image

from kvpipe.errors import UsageError
from kvpipe.pipeline.datasets.base import DATASETS, Annotation, DatasetAdapter, ImageRecord

SHAPES = ("circle", "rectangle", "triangle")
CLASSES = ("background",) + SHAPES  # class id = index; SHAPES[k] is class k + 1
MIN_SIDE = 32  # below this the shapes would be a few pixels wide
# Reference colours for naming an object's colour: the nearest hue wins.
COLOUR_NAMES = (("red", (255, 0, 0)), ("orange", (255, 140, 0)), ("yellow", (255, 230, 0)),
                ("green", (0, 200, 0)), ("cyan", (0, 220, 220)), ("blue", (0, 70, 255)),
                ("purple", (150, 0, 255)), ("pink", (255, 0, 170)))
INNER = 0.7  # shape keypoints sit this fraction of the way from the centre to corners / vertices
N_SUPPORT = 5


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
class Backdrop:
    """The drawn parameters of a video's static background (the pixels are made on demand)."""

    width: int
    height: int
    base: np.ndarray  # RGB 0..255
    waves: tuple[tuple[float, float, float], ...]  # (direction, period, phase)
    tint: np.ndarray


@dataclass(frozen=True, eq=False)
class VideoPlan:
    """Everything needed to render any frame of one video.

    The background's pixels are computed on first use, so reading a plan's shapes (for
    expressions and dataset-level annotations) costs no image-sized work.
    """

    backdrop: Backdrop
    shapes: tuple[Shape, ...]
    noise_seed: tuple[int, int]

    @cached_property
    def background(self) -> np.ndarray:
        """HxWx3 float32, static."""
        return _background_pixels(self.backdrop)


def _random_colour(rng: np.random.Generator, saturation: tuple[float, float], value: tuple[float, float]) -> np.ndarray:
    rgb = colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(*saturation), rng.uniform(*value))
    return np.array(rgb, dtype=np.float32) * 255.0


def _draw_backdrop(rng: np.random.Generator, width: int, height: int) -> Backdrop:
    """A muted colour modulated by a few oriented waves: texture for features to latch on to."""
    base = _random_colour(rng, (0.1, 0.35), (0.35, 0.6))
    waves = []
    for _ in range(3):
        theta, period = rng.uniform(0, np.pi), rng.uniform(8.0, 40.0)
        waves.append((float(theta), float(period), float(rng.uniform(0, 2 * np.pi))))
    tint = _random_colour(rng, (0.2, 0.5), (0.5, 0.8))
    return Backdrop(width, height, base, tuple(waves), tint)


def _background_pixels(b: Backdrop) -> np.ndarray:
    ys, xs = np.mgrid[0:b.height, 0:b.width].astype(np.float32)
    light = np.zeros((b.height, b.width), np.float32)
    for theta, period, phase in b.waves:
        proj = xs * np.cos(theta) + ys * np.sin(theta)
        light += np.sin(2 * np.pi * proj / period + phase).astype(np.float32)
    mix = (light / 6.0 + 0.5)[..., None]  # about 0..1
    return b.base * (1 - mix) + b.tint * mix


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
    backdrop = _draw_backdrop(rng, width, height)
    n_objects = int(rng.integers(2, 4))
    horizontal = bool(rng.integers(2))  # lanes run left-right (True) or top-bottom
    along_len, across_len = (width, height) if horizontal else (height, width)
    edges = np.linspace(0, across_len, n_objects + 1)
    lanes = [(float(edges[i]), float(edges[i + 1])) for i in rng.permutation(n_objects)]
    shapes = tuple(_plan_shape(rng, lane, along_len, horizontal, min(width, height)) for lane in lanes)
    return VideoPlan(backdrop, shapes, (seed, video))


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


def _local(shape: Shape, t: int, xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates (xs, ys) in the shape's rotated local frame (u, v) at frame t."""
    cx, cy = shape.centre(t)
    a = shape.angle(t)
    u = (xs - cx) * np.cos(a) + (ys - cy) * np.sin(a)
    v = -(xs - cx) * np.sin(a) + (ys - cy) * np.cos(a)
    return u, v


def render_frame(plan: VideoPlan, t: int) -> tuple[np.ndarray, np.ndarray, dict[str, list[float]]]:
    """RGB uint8 HxWx3, label mask uint8 HxW and object centres {id: [x, y]} of frame t."""
    height, width = plan.background.shape[:2]
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    img = plan.background.copy()
    mask = np.zeros((height, width), np.uint8)
    keypoints: dict[str, list[float]] = {}
    for obj_id, shape in enumerate(plan.shapes, 1):
        cx, cy = shape.centre(t)
        u, v = _local(shape, t, xs, ys)
        inside = _inside(shape, u, v)
        img[inside] = shape.colour * _texture(shape, u[inside], v[inside])[:, None]
        mask[inside] = obj_id
        keypoints[str(obj_id)] = [round(float(cx), 2), round(float(cy), 2)]
    noise = np.random.default_rng([*plan.noise_seed, t]).normal(0.0, 2.0, img.shape)
    return np.clip(img + noise, 0, 255).astype(np.uint8), mask, keypoints


def object_masks(plan: VideoPlan, t: int) -> np.ndarray:
    """The label mask of frame t alone (same geometry as render_frame, no pixels drawn)."""
    height, width = plan.backdrop.height, plan.backdrop.width
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    mask = np.zeros((height, width), np.uint8)
    for obj_id, shape in enumerate(plan.shapes, 1):
        mask[_inside(shape, *_local(shape, t, xs, ys))] = obj_id
    return mask


def class_id(shape: Shape) -> int:
    return SHAPES.index(shape.kind) + 1


def _hue(rgb: Any) -> float:
    r, g, b = (float(c) / 255.0 for c in rgb)
    return colorsys.rgb_to_hsv(r, g, b)[0] * 360.0


def colour_name(rgb: Any) -> str:
    """The name in COLOUR_NAMES whose hue is nearest (on the hue circle) to ``rgb``'s."""
    hue = _hue(rgb)
    return min(COLOUR_NAMES, key=lambda nc: min(abs(hue - _hue(nc[1])), 360 - abs(hue - _hue(nc[1]))))[0]


_ORDER_WORDS = {True: ("at the top", "in the middle", "at the bottom"),  # lanes run left-right
                False: ("on the left", "in the middle", "on the right")}


def expressions(plan: VideoPlan) -> list[str]:
    """One referring expression per object of the video (index = object id - 1)."""
    base = [f"the {colour_name(s.colour)} {s.kind}" for s in plan.shapes]
    out = list(base)
    for phrase in dict.fromkeys(base):
        same = [i for i, b in enumerate(base) if b == phrase]
        if len(same) < 2:
            continue
        same.sort(key=lambda i: plan.shapes[i].across[0])  # lane centre across the motion
        words = _ORDER_WORDS[plan.shapes[same[0]].horizontal]
        words = (words[0], words[2]) if len(same) == 2 else words
        for i, word in zip(same, words):
            out[i] = f"{base[i]} {word}"
    return out


def video_texts(plan: VideoPlan) -> dict[str, str]:
    """Per-image texts of a video's frames: "class", the kind of its largest object (bounding
    radius), and "caption", its objects named by colour, e.g. "A red circle and an orange
    triangle on a textured background." """
    largest = max(plan.shapes, key=lambda s: s.radius)
    names = [f"{'an' if colour_name(s.colour)[0] in 'aeiou' else 'a'} {colour_name(s.colour)} {s.kind}"
             for s in plan.shapes]
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return {"class": largest.kind, "caption": f"{listed[0].upper()}{listed[1:]} on a textured background."}


def shape_points(shape: Shape) -> list[tuple[float, float]]:
    """Local (u, v) of the centre and the shape's corner-like points, scaled by INNER."""
    r = shape.radius
    if shape.kind == "circle":
        pts = [(r, 0.0), (0.0, r), (-r, 0.0), (0.0, -r)]
    elif shape.kind == "rectangle":
        hw, hh = r * np.cos(shape.aspect), r * np.sin(shape.aspect)
        pts = [(-hw, -hh), (hw, -hh), (hw, hh), (-hw, hh)]
    else:
        angles = [np.pi / 2 + 2 * np.pi * k / 3 for k in range(3)]
        pts = [(r * np.cos(a), r * np.sin(a)) for a in angles]
    return [(0.0, 0.0)] + [(INNER * float(u), INNER * float(v)) for u, v in pts]


def image_point(shape: Shape, t: int, uv: tuple[float, float]) -> list[float]:
    """Local (u, v) -> image [x, y] at frame t (inverse of the rotation in ``_local``)."""
    cx, cy = shape.centre(t)
    a = shape.angle(t)
    u, v = uv
    return [round(float(cx + u * np.cos(a) - v * np.sin(a)), 2), round(float(cy + u * np.sin(a) + v * np.cos(a)), 2)]


def nearest_pixel(point: list[float]) -> tuple[int, int]:
    """(row, column) of the pixel nearest to [x, y] (pixel (i, j) sits at x = j, y = i)."""
    return int(np.floor(point[1] + 0.5)), int(np.floor(point[0] + 0.5))


def on_object(mask: np.ndarray, point: list[float], obj_id: int) -> bool:
    i, j = nearest_pixel(point)
    return 0 <= i < mask.shape[0] and 0 <= j < mask.shape[1] and int(mask[i, j]) == obj_id


def mask_bbox(mask: np.ndarray, obj_id: int) -> list[float]:
    """[x0, y0, x1, y1] of the object's pixels (inclusive, like SPair / VOC boxes)."""
    ys, xs = np.nonzero(mask == obj_id)
    return [float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max())]


def _check_positive(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise UsageError(f"synthetic dataset option {name}={value!r} must be an integer >= {minimum}")
    return int(value)


@DATASETS.register
class SyntheticDataset(DatasetAdapter):
    """Moving textured shapes; default 4 videos x 6 frames of 224x168 (deliberately not square)."""

    tasks = ("temporal-corr", "input-agnostic", "fg-seg", "cosegmentation", "semantic-seg", "refexp-seg",
             "semantic-corr")
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
        self._renders: dict[tuple[int, int], tuple] = {}
        self._render_lock = threading.Lock()
        self._queries: tuple[list[str], dict[tuple[int, int], int]] | None = None

    def plan(self, video: int) -> VideoPlan:
        """The video's plan, made on first use (records() stays instant)."""
        if video not in self._plans:
            self._plans[video] = plan_video(self.seed, video, self.width, self.height)
        return self._plans[video]

    def _selected(self) -> list[tuple[int, int]]:
        """(video, frame) of every record, in record order (``limit`` cuts the list)."""
        out = [(v, t) for v in range(self.n_videos) for t in range(self.n_frames)]
        return out if self.limit is None else out[: max(self.limit, 0)]

    def _videos(self) -> list[int]:
        return list(dict.fromkeys(v for v, _ in self._selected()))

    @staticmethod
    def image_id(video: int, t: int) -> str:
        return f"video{video:02d}/{t:05d}"

    def _render(self, video: int, t: int) -> tuple[np.ndarray, np.ndarray, dict[str, list[float]]]:
        """One render serves both the image and its annotation (the extractor asks for both)."""
        key = (video, t)
        with self._render_lock:
            hit = self._renders.get(key)
        if hit is None:
            hit = render_frame(self.plan(video), t)
            with self._render_lock:
                self._renders[key] = hit
                while len(self._renders) > 32:
                    self._renders.pop(next(iter(self._renders)))
        return hit

    def _image(self, video: int, t: int) -> Image.Image:
        return Image.fromarray(self._render(video, t)[0], "RGB")

    def _query_index(self) -> tuple[list[str], dict[tuple[int, int], int]]:
        """Queries (class names, then deduplicated expressions) and (video, object id) -> index."""
        if self._queries is None:
            queries = {name: k for k, name in enumerate(SHAPES)}
            where = {}
            for v in self._videos():
                for obj_id, text in enumerate(expressions(self.plan(v)), 1):
                    where[(v, obj_id)] = queries.setdefault(text, len(queries))
            self._queries = (list(queries), where)
        return self._queries

    def _annotation(self, video: int, t: int) -> Annotation:
        _, mask, keypoints = self._render(video, t)
        shapes = self.plan(video).shapes
        where = self._query_index()[1]
        return Annotation(mask, {
            "keypoints": keypoints, "objects": [s.kind for s in shapes],
            "labels": {str(i): class_id(s) for i, s in enumerate(shapes, 1)},
            "refs": [{"label": i, "queries": [where[(video, i)]]} for i in range(1, len(shapes) + 1)],
        })

    def records(self) -> list[ImageRecord]:
        texts = {v: video_texts(self.plan(v)) for v in self._videos()}
        return [
            ImageRecord(image_id=self.image_id(v, t), source=f"synthetic:{self.image_id(v, t)}",
                        load_image=lambda v=v, t=t: self._image(v, t),
                        load_annotation=lambda v=v, t=t: self._annotation(v, t),
                        group=f"video{v:02d}", frame=t, texts=dict(texts[v]))
            for v, t in self._selected()
        ]

    def text_queries(self) -> list[str]:
        return list(self._query_index()[0])

    # --- dataset-level annotations -------------------------------------------------------------

    def _class_videos(self) -> dict[int, list[int]]:
        """Class id -> the selected videos holding at least one object of it, in order."""
        out: dict[int, list[int]] = {c: [] for c in range(1, len(CLASSES))}
        for v in self._videos():
            for c in sorted({class_id(s) for s in self.plan(v).shapes}):
                out[c].append(v)
        return out

    def _pairs(self) -> list[dict[str, Any]]:
        frames: dict[int, list[int]] = {}
        for v, t in self._selected():
            frames.setdefault(v, []).append(t)
        masks: dict[tuple[int, int], np.ndarray] = {}

        def mask(v: int, t: int) -> np.ndarray:
            if (v, t) not in masks:
                masks[(v, t)] = object_masks(self.plan(v), t)
            return masks[(v, t)]

        def pair(v0: int, t0: int, o0: int, v1: int, t1: int, o1: int, local: list) -> dict[str, Any] | None:
            s0, s1 = self.plan(v0).shapes[o0 - 1], self.plan(v1).shapes[o1 - 1]
            src = [image_point(s0, t0, uv) for uv in local]
            trg = [image_point(s1, t1, uv) for uv in (local if v0 == v1 else [(0.0, 0.0)] * len(local))]
            keep = [k for k in range(len(local))
                    if on_object(mask(v0, t0), src[k], o0) and on_object(mask(v1, t1), trg[k], o1)]
            if not keep:
                return None
            return {"source": self.image_id(v0, t0), "target": self.image_id(v1, t1),
                    "source_kps": [src[k] for k in keep], "target_kps": [trg[k] for k in keep],
                    "target_bbox": mask_bbox(mask(v1, t1), o1), "category": s1.kind,
                    "source_label": o0, "target_label": o1}

        out = []
        for v, ts in frames.items():  # the same object, frame 0 -> each later frame
            for o, shape in enumerate(self.plan(v).shapes, 1):
                out += [pair(v, ts[0], o, v, t, o, shape_points(shape)) for t in ts[1:]]
        for c, videos in self._class_videos().items():  # same class, consecutive videos
            for a, b in zip(videos, videos[1:]):
                for oa, sa in enumerate(self.plan(a).shapes, 1):
                    for ob, sb in enumerate(self.plan(b).shapes, 1):
                        if class_id(sa) == class_id(sb) == c:
                            out.append(pair(a, frames[a][0], oa, b, frames[b][0], ob, [(0.0, 0.0)]))
        return [p for p in out if p is not None]

    def _episodes(self) -> list[dict[str, Any]]:
        out = []
        for c, videos in self._class_videos().items():
            holding = [(v, t) for v, t in self._selected() if v in videos]
            for v, t in holding:
                others = [x for x in holding if x[0] != v]
                same = [x for x in holding if x[0] == v and x != (v, t)]
                rng = np.random.default_rng([self.seed, c, v, t])
                pick = [others[i] for i in rng.permutation(len(others))[:N_SUPPORT]]
                pick += [same[i] for i in rng.permutation(len(same))[:N_SUPPORT - len(pick)]]
                if pick:
                    out.append({"query": self.image_id(v, t), "support": sorted(self.image_id(*x) for x in pick),
                                "class": c})
        return out

    def _image_sets(self) -> dict[str, dict[str, Any]]:
        first = {}
        for v, t in self._selected():
            first.setdefault(v, t)
        return {CLASSES[c]: {"images": [self.image_id(v, first[v]) for v in videos], "class": c}
                for c, videos in self._class_videos().items() if len(videos) >= 2}

    def structure(self) -> dict[str, Any]:
        return {"classes": list(CLASSES), "class_queries": {str(c): c - 1 for c in range(1, len(CLASSES))},
                "pairs": self._pairs(), "episodes": self._episodes(), "image_sets": self._image_sets()}

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "n_videos": self.n_videos, "n_frames": self.n_frames,
                "width": self.width, "height": self.height, "seed": self.seed}
