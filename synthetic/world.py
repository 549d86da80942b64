"""A seeded, deterministic synthetic video world with questions whose answers are checkable.

A stream is a sequence of *scenes* separated by hard cuts. Each scene shows ONE big, high-contrast
object (a shape in a colour) on a plain dark background, drifting slightly from frame to frame.
Consecutive scenes always differ in shape, colour and background, so every cut is visible.

By default (`WorldConfig.fixed_colors=True`) each stream draws a random one-to-one mapping
shape -> colour, so "what color was the star?" and "which shape was yellow?" have one answer
anywhere in the stream, however long it is; the model still has to look at the frames because the
mapping changes from seed to seed. With `fixed_colors=False` each scene draws its colour freely and
the question generator keeps only questions the checker proves unambiguous.

Questions (`questions(stream, n, seed)`) are asked at a frame index `ask_at` and see frames
[0, ask_at). `check_answerable` recomputes every answer from the scene records alone. The same
logic runs on a *view* (any time-ordered subset of frames, e.g. a training clip or the frames a
retrieval method kept): `view_questions` / `answer_on_view`.

Kinds: attribute ("what color was the star?"), reverse ("which shape was yellow?"), order
("what came right after the green circle?" -> a shape), count ("how many times did a red object
appear?" -> a number; an appearance is a maximal run of frames showing that colour, i.e. a scene
on a full stream), now ("what is on screen now?" -> the shape in the last frame seen).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw

SYSTEM_PROMPT = "You are a helpful assistant."

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (235, 25, 25),
    "green": (20, 210, 40),
    "blue": (40, 90, 255),
    "yellow": (250, 235, 20),
    "purple": (170, 50, 230),
    "orange": (255, 135, 0),
    "cyan": (0, 225, 235),
    "white": (255, 255, 255),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "diamond", "ring", "moon")
BACKGROUNDS: tuple[tuple[int, int, int], ...] = ((0, 0, 0), (45, 45, 45), (80, 80, 80), (30, 30, 70))
KINDS: tuple[str, ...] = ("attribute", "reverse", "order", "count", "now")
MAX_COUNT = 20

TEMPLATES = {
    "attribute": "what color was the {shape} ?",
    "reverse": "which shape was {color} ?",
    "order": "what came right after the {color} {shape} ?",
    "count": "how many times did a {color} object appear ?",
    "now": "what is on screen now ?",
}


@dataclass(frozen=True)
class WorldConfig:
    frame_size: int = 64  # square frames, even (H264 needs even sizes)
    shapes: tuple[str, ...] = SHAPES
    colors: tuple[str, ...] = tuple(COLORS)
    backgrounds: tuple[tuple[int, int, int], ...] = BACKGROUNDS
    scene_min: int = 3  # frames per scene, inclusive range
    scene_max: int = 12
    fps: float = 0.5
    fixed_colors: bool = True  # one colour per shape per stream (a random bijection per seed)
    size_range: tuple[float, float] = (0.55, 0.75)  # object extent / frame size
    jitter: float = 0.08  # max offset of the object centre from the frame centre / frame size
    motion: float = 0.012  # per-frame drift / frame size
    noise: float = 0.0  # std of additive pixel noise (0..255)


@dataclass(frozen=True)
class Scene:
    index: int
    start: int  # first frame (inclusive)
    end: int  # last frame + 1
    shape: str
    color: str
    background: tuple[int, int, int]
    center: tuple[float, float]  # initial centre, fraction of frame size
    size: float  # fraction of frame size
    velocity: tuple[float, float]  # fraction of frame size per frame


@dataclass
class Stream:
    frames: np.ndarray  # [T, H, W, 3] uint8
    times: np.ndarray  # [T] seconds
    scenes: list[Scene]
    cuts: list[int]  # frame indices where a new scene starts (excluding 0)
    config: WorldConfig
    seed: int

    def scene_of(self, frame: int) -> Scene:
        lo, hi = 0, len(self.scenes) - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.scenes[mid].start <= frame:
                lo = mid
            else:
                hi = mid - 1
        return self.scenes[lo]


@dataclass(frozen=True)
class Question:
    text: str
    answer: str
    kind: str
    ask_at: int  # the question sees frames [0, ask_at)
    evidence: tuple[tuple[int, int], ...]  # frame ranges [start, end) that determine the answer
    params: tuple[tuple[str, str], ...] = field(default_factory=tuple)

    @property
    def evidence_times(self) -> tuple[tuple[float, float], ...]:
        return tuple((s, e) for s, e in self.evidence)


# ----------------------------------------------------------------------------- rendering


def _shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    if shape == "square":
        s = r * 0.85
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r * 0.8, cy), (cx, cy + r), (cx - r * 0.8, cy)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)]
    if shape == "star":
        pts = []
        for i in range(10):
            a = -math.pi / 2 + i * math.pi / 5
            rr = r if i % 2 == 0 else r * 0.42
            pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
        return pts
    if shape == "cross":
        t = r * 0.36
        return [
            (cx - t, cy - r), (cx + t, cy - r), (cx + t, cy - t), (cx + r, cy - t),
            (cx + r, cy + t), (cx + t, cy + t), (cx + t, cy + r), (cx - t, cy + r),
            (cx - t, cy + t), (cx - r, cy + t), (cx - r, cy - t), (cx - t, cy - t),
        ]  # fmt: skip
    return None


def render_frame(
    size: int, shape: str, color: tuple[int, int, int], background: tuple[int, int, int],
    center: tuple[float, float], extent: float,
) -> np.ndarray:  # fmt: skip
    """One frame, drawn at 4x and box-downsampled (anti-aliased)."""
    s = 4
    big = size * s
    img = Image.new("RGB", (big, big), background)
    d = ImageDraw.Draw(img)
    cx, cy, r = center[0] * big, center[1] * big, extent * big / 2
    poly = _shape_polygon(shape, cx, cy, r)
    if poly is not None:
        d.polygon(poly, fill=color)
    elif shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
    elif shape == "ring":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
        ri = r * 0.55
        d.ellipse([cx - ri, cy - ri, cx + ri, cy + ri], fill=background)
    elif shape == "moon":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
        o = r * 0.55
        d.ellipse([cx - r + o, cy - r - o * 0.3, cx + r + o, cy + r - o * 0.3], fill=background)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return np.asarray(img.resize((size, size), Image.BOX), dtype=np.uint8)


def _scene_frame(scene: Scene, frame: int, config: WorldConfig) -> np.ndarray:
    k = frame - scene.start
    cx = scene.center[0] + scene.velocity[0] * k
    cy = scene.center[1] + scene.velocity[1] * k
    return render_frame(config.frame_size, scene.shape, COLORS[scene.color], scene.background, (cx, cy), scene.size)


# ----------------------------------------------------------------------------- generation


def generate_scenes(n_frames: int, seed: int, config: WorldConfig = WorldConfig()) -> list[Scene]:
    rng = np.random.default_rng([seed, 7919])
    shapes, colors = list(config.shapes), list(config.colors)
    mapping = None
    if config.fixed_colors:
        if len(colors) < len(shapes):
            raise ValueError("fixed_colors needs at least as many colours as shapes")
        perm = rng.permutation(len(colors))[: len(shapes)]
        mapping = {sh: colors[i] for sh, i in zip(shapes, perm)}
    scenes: list[Scene] = []
    start = 0
    prev: Scene | None = None
    while start < n_frames:
        length = int(rng.integers(config.scene_min, config.scene_max + 1))
        shape = shapes[int(rng.integers(len(shapes)))]
        while prev is not None and shape == prev.shape:
            shape = shapes[int(rng.integers(len(shapes)))]
        if mapping is not None:
            color = mapping[shape]
        else:
            color = colors[int(rng.integers(len(colors)))]
            while prev is not None and color == prev.color:
                color = colors[int(rng.integers(len(colors)))]
        bg_i = int(rng.integers(len(config.backgrounds)))
        while prev is not None and len(config.backgrounds) > 1 and config.backgrounds[bg_i] == prev.background:
            bg_i = int(rng.integers(len(config.backgrounds)))
        extent = float(rng.uniform(*config.size_range))
        center = tuple(float(0.5 + rng.uniform(-config.jitter, config.jitter)) for _ in range(2))
        angle = float(rng.uniform(0, 2 * math.pi))
        velocity = (config.motion * math.cos(angle), config.motion * math.sin(angle))
        end = min(start + length, n_frames)
        scene = Scene(len(scenes), start, end, shape, color, config.backgrounds[bg_i], center, extent, velocity)
        scenes.append(scene)
        prev = scene
        start = end
    return scenes


def render_frames(scenes: list[Scene], frame_indices, config: WorldConfig, seed: int = 0) -> np.ndarray:
    """Render only the given frame indices (used for cheap training clips)."""
    frame_indices = list(frame_indices)
    out = np.empty((len(frame_indices), config.frame_size, config.frame_size, 3), np.uint8)
    starts = [s.start for s in scenes]
    for i, f in enumerate(frame_indices):
        scene = scenes[int(np.searchsorted(starts, f, side="right")) - 1]
        out[i] = _scene_frame(scene, f, config)
    if config.noise > 0:
        for i, f in enumerate(frame_indices):
            rng = np.random.default_rng([seed, 104729, f])
            noisy = out[i].astype(np.float32) + rng.normal(0, config.noise, out[i].shape)
            out[i] = np.clip(noisy, 0, 255).astype(np.uint8)
    return out


def generate_stream(n_frames: int, seed: int, config: WorldConfig = WorldConfig()) -> Stream:
    if config.frame_size % 2:
        raise ValueError("frame_size must be even")
    scenes = generate_scenes(n_frames, seed, config)
    frames = render_frames(scenes, range(n_frames), config, seed)
    times = np.arange(n_frames, dtype=np.float64) / config.fps
    return Stream(frames, times, scenes, [s.start for s in scenes[1:]], config, seed)


# ----------------------------------------------------------------------------- questions on a view

# A view is a time-ordered list of (frame index, scene) pairs: what the model is shown.
# Segments: maximal runs of consecutive view entries showing the same object (shape, colour).


def _segments(view: list[tuple[int, Scene]]) -> list[tuple[str, str, list[int]]]:
    segs: list[tuple[str, str, list[int]]] = []
    for f, sc in view:
        if segs and (sc.shape, sc.color) == (segs[-1][0], segs[-1][1]):
            segs[-1][2].append(f)
        else:
            segs.append((sc.shape, sc.color, [f]))
    return segs


def _ranges(frames: list[int]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for f in sorted(frames):
        if out and out[-1][1] == f:
            out[-1] = (out[-1][0], f + 1)
        else:
            out.append((f, f + 1))
    return out


def answer_on_view(view: list[tuple[int, Scene]], kind: str, params: dict) -> tuple[str | None, list[int]]:
    """The unique answer to a question given only the view, and its evidence frames; (None, []) if
    the view does not determine a unique answer."""
    segs = _segments(view)
    if not segs:
        return None, []
    if kind == "attribute":
        hits = [s for s in segs if s[0] == params["shape"]]
        answers = {s[1] for s in hits}
    elif kind == "reverse":
        hits = [s for s in segs if s[1] == params["color"]]
        answers = {s[0] for s in hits}
    elif kind == "order":
        idx = [i for i, s in enumerate(segs) if (s[0], s[1]) == (params["shape"], params["color"])]
        if not idx or idx[-1] == len(segs) - 1:
            return None, []  # never seen, or its successor has not been seen yet
        hits = [segs[i] for i in idx] + [segs[i + 1] for i in idx]
        answers = {segs[i + 1][0] for i in idx}
    elif kind == "count":
        hits = [s for s in segs if s[1] == params["color"]]
        n = len(hits)
        if n == 0 or n > MAX_COUNT:
            return None, []
        return str(n), [f for s in hits for f in s[2]]
    elif kind == "now":
        hits = [segs[-1]]
        answers = {segs[-1][0]}
    else:
        raise ValueError(kind)
    if len(answers) != 1:
        return None, []
    return next(iter(answers)), [f for s in hits for f in s[2]]


def question_text(kind: str, params: dict) -> str:
    return TEMPLATES[kind].format(**params)


def _candidate_params(kind: str, config: WorldConfig, rng: np.random.Generator, view) -> dict:
    """Draw parameters, preferring things that were actually shown."""
    if kind == "now":
        return {}
    f, sc = view[int(rng.integers(len(view)))]
    if kind == "attribute":
        return {"shape": sc.shape}
    if kind in ("reverse", "count"):
        return {"color": sc.color}
    return {"shape": sc.shape, "color": sc.color}


class ClipQuestion(NamedTuple):
    kind: str
    text: str
    answer: str
    evidence: tuple[int, ...]  # the view's frame numbers that determine the answer


def view_questions(
    view: list[tuple[int, Scene]], config: WorldConfig, rng: np.random.Generator, kinds=KINDS, n: int = 8,
    tries: int = 40,
) -> list[ClipQuestion]:  # fmt: skip
    """Up to n distinct questions answerable on the view (training clips)."""
    out, seen = [], set()
    for _ in range(tries):
        if len(out) >= n:
            break
        kind = kinds[int(rng.integers(len(kinds)))]
        params = _candidate_params(kind, config, rng, view)
        text = question_text(kind, params)
        if text in seen:
            continue
        ans, evidence = answer_on_view(view, kind, params)
        if ans is None:
            continue
        seen.add(text)
        out.append(ClipQuestion(kind, text, ans, tuple(evidence)))
    return out


def _stream_view(stream: Stream, ask_at: int) -> list[tuple[int, Scene]]:
    return [(f, stream.scene_of(f)) for f in range(ask_at)]


def check_answerable(stream: Stream, question: Question) -> bool:
    """Recompute the answer from the scene records before ask_at only: True iff the question is
    well formed, uniquely determined, and its stored answer and evidence are the recomputed ones."""
    if question.kind not in KINDS or not 0 < question.ask_at <= len(stream.frames):
        return False
    params = dict(question.params)
    try:
        if question.text != question_text(question.kind, params):
            return False
    except KeyError:
        return False
    # scene-level recomputation (equivalent to the frame-level view, but cheap)
    scenes = [s for s in stream.scenes if s.start < question.ask_at]
    view_scenes = [(s, (s.start, min(s.end, question.ask_at))) for s in scenes]
    view = [(r[0], s) for s, r in view_scenes]  # one representative frame per scene
    ans, _ = answer_on_view(view, question.kind, params)
    if ans is None or ans != question.answer:
        return False
    return tuple(question.evidence) == tuple(_evidence(view_scenes, question.kind, params))


def _evidence(view_scenes, kind: str, params: dict) -> list[tuple[int, int]]:
    if kind == "now":
        return [view_scenes[-1][1]]
    if kind == "attribute":
        return [r for s, r in view_scenes if s.shape == params["shape"]]
    if kind in ("reverse", "count"):
        return [r for s, r in view_scenes if s.color == params["color"]]
    ev = []
    for i, (s, r) in enumerate(view_scenes[:-1]):
        if (s.shape, s.color) == (params["shape"], params["color"]):
            ev += [r, view_scenes[i + 1][1]]
    return ev


def make_question(stream: Stream, kind: str, params: dict, ask_at: int) -> Question | None:
    """A Question for the stream if it is answerable at ask_at, else None."""
    scenes = [s for s in stream.scenes if s.start < ask_at]
    view_scenes = [(s, (s.start, min(s.end, ask_at))) for s in scenes]
    ans, _ = answer_on_view([(r[0], s) for s, r in view_scenes], kind, params)
    if ans is None:
        return None
    q = Question(
        question_text(kind, params), ans, kind, ask_at, tuple(_evidence(view_scenes, kind, params)),
        tuple(sorted(params.items())),
    )  # fmt: skip
    return q


def questions(
    stream: Stream, n: int, seed: int, kinds: tuple[str, ...] = KINDS, min_ask_at: int = 1,
) -> list[Question]:  # fmt: skip
    """n questions (fewer if not enough are answerable) spread over the stream, each passing
    `check_answerable`. Kinds are drawn round-robin; ask_at uniformly in [min_ask_at, T]."""
    rng = np.random.default_rng([seed, 31337])
    T = len(stream.frames)
    out: list[Question] = []
    seen = set()
    attempts = 0
    while len(out) < n and attempts < 50 * n + 100:
        attempts += 1
        kind = kinds[len(out) % len(kinds)] if attempts % 5 else kinds[int(rng.integers(len(kinds)))]
        ask_at = int(rng.integers(max(1, min_ask_at), T + 1))
        scenes = [s for s in stream.scenes if s.start < ask_at]
        sc = scenes[int(rng.integers(len(scenes)))]
        params = _candidate_params(kind, stream.config, rng, [(sc.start, sc)])
        q = make_question(stream, kind, params, ask_at)
        if q is None or (q.text, q.ask_at) in seen or not check_answerable(stream, q):
            continue
        seen.add((q.text, q.ask_at))
        out.append(q)
    out.sort(key=lambda q: q.ask_at)
    return out


RARE_SHAPES = ("moon", "ring")


def needle_stream(n_frames: int, seed: int, appearances: int = 2) -> Stream:
    """The world with two rare shapes: common scenes show the other six shapes; each rare shape
    appears in `appearances` scenes only, in a colour no common shape has, so questions about it
    can be answered only from those few frames."""
    config = WorldConfig(shapes=tuple(s for s in SHAPES if s not in RARE_SHAPES))
    scenes = generate_scenes(n_frames, seed, config)
    rng = np.random.default_rng([seed, 4242])
    spare = [c for c in COLORS if c not in {s.color for s in scenes}]
    slots = rng.choice(np.arange(1, len(scenes) - 1), size=len(RARE_SHAPES) * appearances, replace=False)
    for k, slot in enumerate(sorted(slots, key=lambda _: rng.random())):
        shape = RARE_SHAPES[k % len(RARE_SHAPES)]
        scenes[slot] = replace(scenes[slot], shape=shape, color=spare[k % len(RARE_SHAPES)])
    world = WorldConfig()
    frames = render_frames(scenes, range(n_frames), world, seed)
    return Stream(frames, np.arange(n_frames) / world.fps, scenes, [s.start for s in scenes[1:]], world, seed)


def needle_questions(stream: Stream, n: int, seed: int) -> list[Question]:
    """Questions about the rare shapes and their colours, asked after they first appeared."""
    rng = np.random.default_rng([seed, 777])
    rare = [s for s in stream.scenes if s.shape in RARE_SHAPES]
    out = []
    for _ in range(20 * n):
        if len(out) == n:
            break
        scene = rare[int(rng.integers(len(rare)))]
        kind, params = (("attribute", {"shape": scene.shape}) if rng.random() < 0.5
                        else ("reverse", {"color": scene.color}))
        question = make_question(stream, kind, params, int(rng.integers(scene.end, len(stream.frames) + 1)))
        if question is not None and check_answerable(stream, question):
            out.append(question)
    return sorted(out, key=lambda q: q.ask_at)


def vocabulary(config: WorldConfig = WorldConfig()) -> tuple[str, ...]:
    """Every word used by prompts, questions and answers (for CheckpointSpec.words)."""
    words: list[str] = []
    text = " ".join(TEMPLATES.values()) + " " + SYSTEM_PROMPT.lower()
    for w in text.replace("{shape}", " ").replace("{color}", " ").replace(".", " . ").split():
        words.append(w)
    words += list(SHAPES) + list(COLORS) + list(config.shapes) + list(config.colors)
    words += [str(i) for i in range(MAX_COUNT + 1)]
    return tuple(dict.fromkeys(words))


# ----------------------------------------------------------------------------- mp4


def write_mp4(stream: Stream, path: str | Path, fps: float | None = None, crf: int = 12) -> Path:
    """Write the frames as H.264 (yuv420p) mp4 (pipeline.video_io). fps defaults to the stream's."""
    from pipeline.video_io import write_video

    write_video(path, stream.frames, stream.config.fps if fps is None else fps, crf=crf)
    return Path(path)


def read_mp4(path: str | Path) -> np.ndarray:
    """Every frame of a video file, decoded by pipeline.decode: [T, H, W, 3] uint8."""
    from pipeline.decode import open_source

    with open_source(Path(path)) as frames:
        return np.stack([frame.image for frame in frames])
