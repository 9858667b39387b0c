"""The toy world: procedurally generated H.264 clips of coloured shapes with known ground truth.

    engine synth --out toy/ --split test --n 1000 --seed 0

Each clip is drawn from its own RNG stream (seed, split, index), so the same
arguments give byte-identical shards. Clips come with their scene graph
(`data_specs.ToyClip`), a ground-truth caption (`gt.txt`), a web-like alt-text
(`txt`) and instruction pairs (`qa.json`). About half of the clips also get a
time-reversed twin: the very same frames backwards, with the reversed caption,
so a model that ignores frame order provably cannot tell the two apart.
The `pretrain` split holds single PNG frames with a static caption, plus an
`lm.txt` sentence of the world's language for text-only pre-training.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import av
import numpy as np
from PIL import Image

from data_specs.toyworld import (
    AXIS, BACKGROUND, COLOURS, HELD_OUT, INVERSE, ROTATION_SAFE_SHAPES, SHAPES, SPLIT_IDS, SPLITS, VERBS,
    ObjectState, ToyClip, ToyEvent, ToyObject,
)

SUPERSAMPLE = 2  # shapes are drawn at 2x and averaged down: smooth edges encode cleanly in H.264


@dataclass(frozen=True)
class SynthConfig:
    """Arguments of `engine synth`; all of them (but `out`) go into the shards' config hash."""

    split: str
    n: int
    seed: int = 0
    frames: int = 16
    size: int = 112  # a multiple of 28: Qwen2-VL's 14-px patches merged 2x2
    fps: float = 8.0
    shard_size: int = 256
    reverse_frac: float = 0.5  # share of clips that also get their time-reversed twin
    crf: int = 18
    events: int = 0  # events per video clip: 0 draws one or two; 1 or 2 fixes it (e.g. extra two-event data)

    def __post_init__(self) -> None:
        problems = []
        if self.split not in SPLITS:
            problems.append(f"--split must be one of {', '.join(SPLITS)}, got {self.split!r}")
        if self.n < 1:
            problems.append(f"--n must be >= 1, got {self.n}")
        if self.frames < 4 and self.split != "pretrain":
            problems.append(f"--frames must be >= 4 for video splits, got {self.frames}")
        if self.size < 56 or self.size % 2:
            problems.append(f"--size must be even and >= 56, got {self.size}")
        if self.fps <= 0:
            problems.append(f"--fps must be > 0, got {self.fps}")
        if self.shard_size < 1:
            problems.append(f"--shard-size must be >= 1, got {self.shard_size}")
        if self.events not in (0, 1, 2):
            problems.append(f"--events must be 0 (one or two), 1 or 2, got {self.events}")
        elif self.events and self.split == "pretrain":
            problems.append("--events applies to video splits; pretrain frames have no events")
        if not 0 <= self.reverse_frac <= 1:
            problems.append(f"--reverse-frac must be within [0, 1], got {self.reverse_frac}")
        if problems:
            raise ValueError("; ".join(problems))

    def config_hash(self) -> str:
        fields = asdict(self)
        if not self.events:
            del fields["events"]  # the default draws as before the option existed: earlier shards stay valid
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- scene sampling

def _compositional(colours: set[str], shape: str, action: str) -> bool:
    """An event is compositional if any colour it shows, with its shape and axis, is held out."""
    return any((c, shape, AXIS[action]) in HELD_OUT for c in colours)


def _pick_event(rng: np.random.Generator, split: str, used: set[str]) -> tuple[str, str, str, str | None]:
    """(colour, shape, action, to_colour) obeying the split's compositional rule."""
    for _ in range(1000):
        if split == "compositional":
            colour, shape, axis = HELD_OUT[rng.integers(len(HELD_OUT))]
            action = str(rng.choice([a for a, ax in AXIS.items() if ax == axis]))
        else:
            colour = str(rng.choice(list(COLOURS)))
            shape = str(rng.choice(SHAPES))
            action = str(rng.choice(list(AXIS)))
        if colour in used or (action == "rotate" and shape not in ROTATION_SAFE_SHAPES):
            continue
        to_colour = None
        if action == "recolour":
            free = [c for c in COLOURS if c not in used and c != colour]
            if not free:
                continue
            to_colour = str(rng.choice(free))
        shown = {colour} | ({to_colour} if to_colour else set())
        if _compositional(shown, shape, action) == (split == "compositional"):
            return colour, shape, action, to_colour
    raise RuntimeError(f"no event fits split {split!r} with colours {sorted(used)} taken")


def _progress(f: int, start: int, end: int) -> float:
    return min(1.0, max(0.0, (f - start) / max(1, end - start)))


def _state_at(obj: ToyObject, event: ToyEvent | None, f: int) -> ObjectState:
    s = obj.initial.model_copy()
    if event is None:
        return s
    p = _progress(f, event.start, event.end)
    mid = (event.start + event.end) / 2  # start + end is odd: no frame sits exactly on the switch
    a = event.action
    if a.startswith("move_"):
        dx, dy = {"move_left": (-1, 0), "move_right": (1, 0), "move_up": (0, -1), "move_down": (0, 1)}[a]
        s.x += dx * event.amount * p
        s.y += dy * event.amount * p
    elif a in ("grow", "shrink"):
        s.size = obj.initial.size * (1 + (event.amount - 1) * p)
    elif a == "rotate":
        s.angle = obj.initial.angle + event.amount * p
    elif a == "appear":
        s.visible = f > mid
    elif a == "disappear":
        s.visible = f < mid
    elif a == "recolour":
        s.colour = event.to_colour if f > mid else event.colour
    return s


def _radius(size: float) -> float:
    return 0.72 * size  # bounds every shape's circumradius (a square's half-diagonal is 0.707)


def _fits(tracks: dict[str, list[ObjectState]], size: int) -> bool:
    states = list(tracks.values())
    for f in range(len(states[0])):
        for i, a in enumerate(states):
            r = _radius(a[f].size)
            if not (r + 1 <= a[f].x <= size - r - 1 and r + 1 <= a[f].y <= size - r - 1):
                return False
            for b in states[i + 1:]:
                if math.hypot(a[f].x - b[f].x, a[f].y - b[f].y) < r + _radius(b[f].size) + 2:
                    return False
    return True


def sample_clip(cfg: SynthConfig, index: int) -> ToyClip:
    """The scene graph of clip ``index`` of the split (no pixels yet)."""
    rng = np.random.default_rng([cfg.seed, SPLIT_IDS[cfg.split], index])
    F, S = (1 if cfg.split == "pretrain" else cfg.frames), cfg.size
    tries = 2000 if cfg.events else 200  # a fixed count of two events fits less often than one or two
    for _ in range(tries):
        n_events = 0 if cfg.split == "pretrain" else (cfg.events or int(rng.integers(1, 3)))
        n_objects = int(rng.integers(max(1, n_events), 4))
        used: set[str] = set()
        picks = []
        for _e in range(n_events):
            colour, shape, action, to_colour = _pick_event(rng, cfg.split, used)
            used |= {colour} | ({to_colour} if to_colour else set())
            picks.append((colour, shape, action, to_colour))
        for _o in range(min(n_objects - n_events, len(COLOURS) - len(used))):
            colour = str(rng.choice([c for c in COLOURS if c not in used]))
            used.add(colour)
            picks.append((colour, str(rng.choice(SHAPES)), None, None))
        objects, events = [], []
        for i, (colour, shape, action, to_colour) in enumerate(picks):
            base = S * float(rng.uniform(0.22, 0.30))
            if action == "grow":
                base *= 0.7
            init = ObjectState(x=float(rng.uniform(0, S)), y=float(rng.uniform(0, S)), size=base,
                               angle=float(rng.choice([0.0, 0.0, 15.0])) if shape != "circle" else 0.0,
                               colour=colour, visible=action != "appear")
            objects.append(ToyObject(id=i, shape=shape, initial=init))
            if action is None:
                continue
            if n_events == 1:
                start, end = int(rng.integers(0, F // 6 + 1)), F - 1 - int(rng.integers(0, F // 6 + 1))
            else:
                half = F // 2
                start, end = (0, half - 1) if i == 0 else (half, F - 1)
            if (start + end) % 2 == 0:
                end -= 1
            amount = {"grow": float(rng.uniform(1.5, 1.8)), "shrink": float(rng.uniform(0.45, 0.6)),
                      "rotate": 45.0 if shape == "square" else 60.0}.get(
                action, float(rng.uniform(0.22, 0.32)) * S)
            events.append(ToyEvent(object_id=i, action=action, start=start, end=end, colour=colour,
                                   to_colour=to_colour, amount=amount))
        by_obj = {e.object_id: e for e in events}
        tracks = {str(o.id): [_state_at(o, by_obj.get(o.id), f) for f in range(F)] for o in objects}
        if _fits(tracks, S):
            clip = ToyClip(split=cfg.split, seed=cfg.seed, index=index, fps=cfg.fps, frames=F, width=S, height=S,
                           objects=objects, events=events, tracks=tracks, caption="")
            clip.caption = static_caption(clip) if cfg.split == "pretrain" else caption(clip)
            return clip
    raise RuntimeError(f"could not place the objects of clip {index} of split {cfg.split!r} after {tries} tries")


def reverse_clip(clip: ToyClip) -> ToyClip:
    """The same frames played backwards: every action inverted, their order swapped."""
    F = clip.frames
    tracks = {k: list(reversed(v)) for k, v in clip.tracks.items()}
    shapes = {o.id: o.shape for o in clip.objects}
    events = []
    for e in reversed(clip.events):
        start, end = F - 1 - e.end, F - 1 - e.start
        events.append(ToyEvent(object_id=e.object_id, action=INVERSE[e.action], start=start, end=end,
                               colour=e.to_colour or e.colour, to_colour=e.colour if e.to_colour else None,
                               amount={"grow": 1 / e.amount, "shrink": 1 / e.amount,
                                       "rotate": -e.amount}.get(e.action, e.amount)))
    objects = [ToyObject(id=o, shape=shapes[o], initial=tracks[str(o)][0]) for o in sorted(shapes)]
    out = clip.model_copy(update=dict(reversed=True, objects=objects, events=events, tracks=tracks))
    out.caption = caption(out)
    return out


# --------------------------------------------------------------------------- language

def _name(clip: ToyClip, object_id: int, colour: str) -> str:
    shape = next(o.shape for o in clip.objects if o.id == object_id)
    return f"the {colour} {shape}"


def _phrase(clip: ToyClip, e: ToyEvent) -> str:
    return f"{_name(clip, e.object_id, e.colour)} {VERBS[e.action].format(to_colour=e.to_colour)}"


def caption(clip: ToyClip) -> str:
    """'the red circle moves left, then the blue square appears.'"""
    return ", then ".join(_phrase(clip, e) for e in sorted(clip.events, key=lambda e: e.start)) + "."


def static_caption(clip: ToyClip) -> str:
    """What one frame shows: 'a red circle left of a blue square.'"""
    states = [(o, clip.tracks[str(o.id)][0]) for o in clip.objects]
    states = [(o, s) for o, s in states if s.visible]
    names = [f"a {s.colour} {o.shape}" for o, s in states]
    if len(names) == 1:
        return names[0] + "."
    (_, a), (_, b) = states[0], states[1]
    dx, dy = b.x - a.x, b.y - a.y
    rel = ("left of" if dx > 0 else "right of") if abs(dx) >= abs(dy) else ("above" if dy > 0 else "below")
    text = f"{names[0]} {rel} {names[1]}"
    return text + (f" and {names[2]}." if len(names) > 2 else ".")


_ALT_TEMPLATES = (
    "{obj} animation", "{obj} on grey background", "stock footage {obj} {hd}", "{obj} and {obj2} video",
    "shapes video {hd}", "free {obj} clip download", "#{shape} #animation #{colour}", "{colour} {shape}",
    "geometric shapes motion graphics {hd}", "simple {shape} loop", "{obj2} {obj}",
)
_VAGUE_VERBS = {"move_left": "moving", "move_right": "moving", "move_up": "moving", "move_down": "moving",
                "grow": "growing", "shrink": "scaling", "rotate": "spinning", "appear": "pop up",
                "disappear": "fade", "recolour": "colour change"}


def alt_text(clip: ToyClip, rng: np.random.Generator) -> str:
    """A web-like alt-text: partial, noisy, usually silent about what happens."""
    objs = list(clip.objects)
    rng.shuffle(objs)
    o, o2 = objs[0], objs[-1]
    drop = rng.random() < 0.3  # alt-text often misses the colour
    obj = f"{'' if drop else o.initial.colour + ' '}{o.shape}"
    text = str(rng.choice(_ALT_TEMPLATES)).format(
        obj=obj, obj2=f"{o2.initial.colour} {o2.shape}", shape=o.shape, colour=o.initial.colour,
        hd=str(rng.choice(["HD", "4K", "1080p", "", "loop"])))
    if clip.events and rng.random() < 0.25:
        text += " " + _VAGUE_VERBS[clip.events[int(rng.integers(len(clip.events)))].action]
    if rng.random() < 0.3:
        text = text.title() if rng.random() < 0.5 else text.upper()
    return " ".join(text.split())


def instructions(clip: ToyClip) -> list[dict[str, str]]:
    """Temporal, causal and descriptive question-answer pairs about the clip."""
    qa = [{"type": "caption", "question": "Describe what happens in the video.", "answer": clip.caption}]
    ordered = sorted(clip.events, key=lambda e: e.start)
    for e in ordered:
        who = _name(clip, e.object_id, e.colour)
        did = VERBS[e.action].format(to_colour=e.to_colour)
        qa.append({"type": "descriptive", "question": f"What does {who} do?", "answer": f"it {did}."})
        axis = AXIS[e.action]
        if axis in ("horizontal", "vertical"):
            qa.append({"type": "temporal", "question": f"Which way does {who} move?",
                       "answer": e.action.split("_")[1] + "."})
            qa.append({"type": "causal", "question": f"Why is {who} further {e.action.split('_')[1]} at the end "
                       "than at the start?", "answer": f"because it {did}."})
        elif axis == "size":
            qa.append({"type": "temporal", "question": f"Does {who} grow or shrink?", "answer": f"it {did}."})
            qa.append({"type": "causal", "question": f"Why is {who} {'bigger' if e.action == 'grow' else 'smaller'} "
                       "at the end?", "answer": f"because it {did}."})
        elif axis == "visibility":
            qa.append({"type": "temporal", "question": f"Does {who} appear or disappear?", "answer": f"it {did}."})
            qa.append({"type": "causal", "question": f"Why {'can' if e.action == 'appear' else 'can not'} "
                       f"{who} be seen at the end?", "answer": f"because it {did}."})
        elif axis == "colour":
            qa.append({"type": "temporal", "question": f"What colour does {who} turn?", "answer": f"{e.to_colour}."})
    if len(ordered) == 2:
        a, b = (_phrase(clip, e) for e in ordered)
        qa.append({"type": "temporal", "question": f"What happens after {a}?", "answer": f"{b}."})
        qa.append({"type": "temporal", "question": f"What happens before {b}?", "answer": f"{a}."})
    qa.append({"type": "descriptive", "question": "How many things happen in the video?",
               "answer": "one thing." if len(ordered) == 1 else "two things."})
    return qa


# --------------------------------------------------------------------------- pixels

def _mask(shape: str, s: ObjectState, X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    dx, dy = X - s.x, Y - s.y
    half = s.size / 2
    if shape == "circle":
        return dx * dx + dy * dy <= half * half
    a = math.radians(s.angle)
    u = dx * math.cos(a) + dy * math.sin(a)  # coordinates in the shape's own (rotated) frame
    v = -dx * math.sin(a) + dy * math.cos(a)
    if shape == "square":
        return (np.abs(u) <= half) & (np.abs(v) <= half)
    # equilateral triangle pointing up, centroid at the centre
    r = s.size / math.sqrt(3)  # circumradius
    inside = np.ones_like(u, dtype=bool)
    for k in range(3):  # inside each edge's half-plane; outward normals at -30, 90, 210 deg (opposite the vertices)
        t = math.radians(-30 + 120 * k)
        inside &= u * math.cos(t) + v * math.sin(t) <= r / 2
    return inside


def render(clip: ToyClip) -> np.ndarray:
    """uint8 RGB frames [F, H, W, 3] of the clip's tracks."""
    H, W, k = clip.height, clip.width, SUPERSAMPLE
    ys, xs = (np.arange(H * k) + 0.5) / k, (np.arange(W * k) + 0.5) / k
    shapes = {str(o.id): o.shape for o in clip.objects}
    out = np.empty((clip.frames, H, W, 3), np.uint8)
    canvas = np.empty((H * k, W * k, 3), np.uint8)
    for f in range(clip.frames):
        canvas[:] = BACKGROUND
        for oid, track in clip.tracks.items():
            s = track[f]
            if not s.visible:
                continue
            r = _radius(s.size) + 1
            y0, y1 = max(0, int((s.y - r) * k)), min(H * k, int(math.ceil((s.y + r) * k)))
            x0, x1 = max(0, int((s.x - r) * k)), min(W * k, int(math.ceil((s.x + r) * k)))
            X, Y = np.meshgrid(xs[x0:x1], ys[y0:y1])
            canvas[y0:y1, x0:x1][_mask(shapes[oid], s, X, Y)] = COLOURS[s.colour]
        acc = np.zeros((H, W, 3), np.uint16)  # box-filter the supersampled canvas down, rounding
        for dy in range(k):
            for dx in range(k):
                acc += canvas[dy::k, dx::k]
        out[f] = (acc + k * k // 2) // (k * k)
    return out


def encode_h264(frames: np.ndarray, fps: float, crf: int = 18, gop: int | None = None) -> bytes:
    """H.264 mp4 bytes of uint8 RGB frames, deterministic (one encoder thread, fixed options)."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=int(round(fps)))
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        stream.codec_context.gop_size = gop or len(frames)
        stream.codec_context.thread_count = 1
        # Byte-identical output: one thread, and no macroblock-tree rate control, whose lookahead
        # made about 1 clip in 50 differ between runs in one process (measured: 0 in 1,200 without it).
        stream.codec_context.options = {"preset": "veryfast", "crf": str(crf),
                                        "x264-params": "threads=1:lookahead-threads=1:mbtree=0"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode(None))
    return buf.getvalue()


def _png(frame: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


# --------------------------------------------------------------------------- samples and shards

def _lm_sentence(cfg: SynthConfig, index: int) -> str:
    """A sentence of the world's video language, for text-only LM pre-training (never rendered)."""
    lm_cfg = SynthConfig(split="adapt", n=1, seed=cfg.seed + 1_000_003, frames=16, size=cfg.size)
    return sample_clip(lm_cfg, index).caption


def generate_samples(cfg: SynthConfig) -> Iterator[dict]:
    """Yields the split's samples in order, ``cfg.n`` of them."""
    emitted, index = 0, 0
    while emitted < cfg.n:
        clip = sample_clip(cfg, index)
        rng = np.random.default_rng([cfg.seed, SPLIT_IDS[cfg.split], index, 1])
        key = f"{cfg.split}-{index:06d}"
        if cfg.split == "pretrain":
            frame = render(clip)[0]
            yield {"__key__": key, "png": _png(frame), "json": clip.model_dump_json(), "txt": clip.caption,
                   "gt.txt": clip.caption, "lm.txt": _lm_sentence(cfg, index)}
            emitted += 1
            index += 1
            continue
        twin = reverse_clip(clip) if rng.random() < cfg.reverse_frac and cfg.n - emitted >= 2 else None
        if twin is not None and twin.caption == clip.caption:
            twin = None  # e.g. a lone rotation: its reversal reads the same, no use as a pair
        frames = render(clip)
        pair = [(key, clip, frames)]
        if twin is not None:
            clip.pair_key, twin.pair_key = f"{key}-rev", key
            pair.append((f"{key}-rev", twin, frames[::-1]))
        for k, c, fr in pair:
            yield {"__key__": k, "mp4": encode_h264(np.ascontiguousarray(fr), c.fps, cfg.crf),
                   "json": c.model_dump_json(), "txt": alt_text(c, rng), "gt.txt": c.caption,
                   "qa.json": json.dumps(instructions(c))}
            emitted += 1
        index += 1


def committed(cfg: SynthConfig, out: str | Path) -> list[Path] | None:
    """The split's shard paths if an identical configuration already committed all of them, else None."""
    from engine.shards import read_stats

    names = [f"{cfg.split}-{k:05d}.tar" for k in range(-(-cfg.n // cfg.shard_size))]
    stats = [read_stats(out, name) for name in names]
    if all(s is not None and s.config_hash == cfg.config_hash() for s in stats):
        return [Path(out) / name for name in names]
    return None


def synth(cfg: SynthConfig, out: str | Path, progress: bool = True) -> list[Path]:
    """Writes ``out/{split}-NNNNN.tar`` shards (plus their stats and empty ledgers).

    Runs started at once into one directory take turns: the later one waits, then finds the shards an
    identical configuration committed and reuses them.

    Returns:
        The shard paths written, in order.
    """
    from engine.shards import directory_lock

    Path(out).mkdir(parents=True, exist_ok=True)
    with directory_lock(out):
        return _synth(cfg, out, progress)


def _synth(cfg: SynthConfig, out: str | Path, progress: bool) -> list[Path]:
    import time

    from tqdm import tqdm

    from engine import __version__
    from engine.shards import ShardWriter

    done = committed(cfg, out)
    if done is not None:
        return done  # an identical earlier run committed every shard: nothing to redo
    paths: list[Path] = []
    writer: ShardWriter | None = None
    t0 = time.perf_counter()
    bar = tqdm(total=cfg.n, desc=f"synth {cfg.split}", unit="clip", disable=not progress)

    def commit(w: ShardWriter) -> None:
        w.commit(config_hash=cfg.config_hash(), tool=f"engine synth {__version__}", source=f"toy-world:{cfg.split}",
                 seconds={"total": round(time.perf_counter() - t0, 3)})
        paths.append(w.path)

    try:
        for i, sample in enumerate(generate_samples(cfg)):
            if i % cfg.shard_size == 0:
                if writer is not None:
                    commit(writer)
                writer = ShardWriter(out, f"{cfg.split}-{i // cfg.shard_size:05d}.tar")
            writer.write(sample)
            bar.update(1)
        if writer is not None:
            commit(writer)
    finally:
        bar.close()
        if writer is not None and not writer.committed:
            writer.abort()
    return paths
