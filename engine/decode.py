"""Frames from video bytes: one function, several backends, bounded in size, length and time.

    frames = decode_video(mp4_bytes, Sampling.uniform(8))
    frames.frames      # uint8 [T, H, W, 3]
    frames.indices     # the frame indices actually used (after clamping)
    frames.timestamps  # seconds, one per frame

Backends: ``av`` (PyAV, always installed), ``decord`` and ``torchcodec`` when
installed; ``auto`` takes the fastest installed one (see `AUTO_ORDER`, measured
by ``bench/decode.py``: PyAV here) and falls back to PyAV if another fails on a clip. Every
decode is first probed with PyAV against `DecodeLimits` (pixels, aspect, duration),
so a hostile file is rejected before any backend spends time on it.

Time limits need a process boundary (decord can spin forever holding the GIL):
pass ``timeout=`` here, or use `engine.decode_pool.DecodePool` for many clips.
"""

from __future__ import annotations

import io
import importlib.util
import math
import threading
from dataclasses import dataclass, field

import av
import numpy as np

from engine.errors import BackendUnavailable, DecodeError

BACKENDS = ("av", "decord", "torchcodec")
SAMPLING_VERSION = 2
"""Bumped whenever a `Sampling` rule picks different frames: caches of sampled frames key on it."""
AUTO_ORDER = ("av", "decord", "torchcodec")
"""Preference of ``backend="auto"``: fastest first, as measured by bench/decode.py (bench/results/decode.json).

Measured on 640x360 H.264 (8 frames of 300, 1 thread): decord took 1.16-1.73x PyAV's time, and it
returns silently wrong frames on MPEG program streams (off by a group of pictures), VOB, raw MPEG-1
and ASF; so PyAV, the reference, comes first. decord stays available by name."""


@dataclass(frozen=True)
class Sampling:
    """Which frames to take: exactly one of ``n`` (uniform), ``fps`` or ``indices``.

    Uniform sampling takes the centre frame of ``n`` equal segments (TSN-style), so it never
    depends on the last frame, which containers often lie about; ties at segment boundaries are
    broken mirror-symmetrically, so a reversed clip samples the reversed frames.
    """

    n: int | None = None
    fps: float | None = None
    indices: tuple[int, ...] | None = None
    max_frames: int | None = None  # with fps: an upper bound on frames returned

    def __post_init__(self) -> None:
        given = [v is not None for v in (self.n, self.fps, self.indices)]
        if sum(given) != 1:
            raise ValueError("Sampling takes exactly one of n, fps or indices")
        if self.n is not None and self.n < 1:
            raise ValueError(f"Sampling.n must be >= 1, got {self.n}")
        if self.fps is not None and self.fps <= 0:
            raise ValueError(f"Sampling.fps must be > 0, got {self.fps}")
        if self.indices is not None and (not self.indices or min(self.indices) < 0):
            raise ValueError("Sampling.indices must be a non-empty list of indices >= 0")

    @classmethod
    def uniform(cls, n: int) -> "Sampling":
        return cls(n=n)

    @classmethod
    def at_fps(cls, fps: float, max_frames: int | None = None) -> "Sampling":
        return cls(fps=fps, max_frames=max_frames)

    @classmethod
    def at(cls, indices) -> "Sampling":
        return cls(indices=tuple(int(i) for i in indices))

    def resolve(self, num_frames: int, fps: float) -> list[int]:
        """Frame indices for a video of ``num_frames`` frames at ``fps``, clamped to [0, num_frames)."""
        if num_frames < 1:
            return []
        last = num_frames - 1
        if self.n is not None:
            # segment centres, floored in the first half and ceiled-minus-one in the second, so the rule is
            # mirror-symmetric: a clip and its time reversal sample the same frames (order-blind heads
            # then see identical inputs, as the reversal probes assume)
            out = []
            for i in range(self.n):
                x = (i + 0.5) * num_frames / self.n
                out.append(min(last, int(math.floor(x)) if 2 * i + 1 <= self.n else int(math.ceil(x)) - 1))
            return out
        if self.fps is not None:
            step = (fps or self.fps) / self.fps
            out = [min(last, int(round(i * step))) for i in range(max(1, int(num_frames / step + 1e-9)))]
            if self.max_frames is not None and len(out) > self.max_frames:
                out = [out[int((i + 0.5) * len(out) / self.max_frames)] for i in range(self.max_frames)]
            return out
        return [min(last, i) for i in self.indices]


@dataclass(frozen=True)
class DecodeLimits:
    """Bounds that keep one hostile or huge file from hurting a job."""

    max_pixels: int = 1280 * 720  # larger frames are downscaled (aspect kept) to at most this many pixels
    max_input_pixels: int = 8192 * 8192  # larger inputs are rejected: decoding them alone costs too much
    max_aspect: float = 20.0  # a 1x4000 "video" is not footage
    max_duration_s: float = 4 * 3600.0
    threads: int = 1  # decoder threads per decode; parallelism comes from the worker pool


@dataclass
class Frames:
    """Decoded frames and exactly how they were obtained."""

    frames: np.ndarray  # uint8 [T, H, W, 3], RGB
    indices: list[int]
    timestamps: list[float]
    backend: str
    num_frames: int  # frames the video holds, as counted by the decoder that produced `frames`
    fps: float
    source_size: tuple[int, int]  # (width, height) before any downscale
    notes: list[str] = field(default_factory=list)  # e.g. "downscaled 7680x4320 -> 1280x720"


@dataclass
class _Probe:
    width: int
    height: int
    fps: float
    duration_s: float | None
    out_size: tuple[int, int]
    notes: list[str]


def installed_backends() -> list[str]:
    """The decode backends importable here, PyAV first."""
    return ["av"] + [b for b in ("decord", "torchcodec") if importlib.util.find_spec(b) is not None]


def _even(x: float) -> int:
    return max(2, int(round(x / 2)) * 2)


def _open(data: bytes) -> av.container.InputContainer:
    if not data:
        raise DecodeError("empty-video", "the video member has 0 bytes")
    try:
        return av.open(io.BytesIO(data), mode="r", metadata_errors="ignore")
    except (av.error.FFmpegError, ValueError, UnicodeDecodeError) as exc:
        raise DecodeError("not-a-video", f"no container format recognised ({type(exc).__name__}: {exc})") from None


def probe(data: bytes, limits: DecodeLimits = DecodeLimits()) -> _Probe:
    """Reads size, rate and duration from the container and checks them against ``limits``.

    Raises:
        DecodeError: 'empty-video', 'not-a-video', 'no-video-stream',
            'degenerate-frame-size', 'frame-too-large' or 'too-long'.
    """
    with _open(data) as container:
        if not container.streams.video and not container.streams.audio:
            # e.g. random bytes that happen to parse as a subtitle format ('lrc', 'srt')
            raise DecodeError("not-a-video", f"probed as {container.format.name!r}, which holds no audio or video")
        if not container.streams.video:
            raise DecodeError("no-video-stream", f"container {container.format.name!r} holds no video stream")
        stream = container.streams.video[0]
        w, h = stream.codec_context.width, stream.codec_context.height
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        fps = float(rate) if rate else 0.0
        duration = None
        if stream.duration is not None and stream.time_base is not None:
            duration = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            duration = container.duration / 1e6
    if w <= 0 or h <= 0:
        raise DecodeError("degenerate-frame-size", f"the stream reports a {w}x{h} frame")
    if max(w, h) / min(w, h) > limits.max_aspect:
        raise DecodeError("degenerate-frame-size", f"{w}x{h} frame: aspect ratio {max(w, h) / min(w, h):.0f}:1 "
                          f"exceeds the limit {limits.max_aspect:g}:1")
    if w * h > limits.max_input_pixels:
        raise DecodeError("frame-too-large", f"{w}x{h} frame ({w * h} pixels) exceeds max_input_pixels "
                          f"{limits.max_input_pixels}")
    if duration is not None and duration > limits.max_duration_s:
        raise DecodeError("too-long", f"{duration:.0f} s exceeds max_duration_s {limits.max_duration_s:g}")
    notes: list[str] = []
    out = (w, h)
    if w * h > limits.max_pixels:
        scale = math.sqrt(limits.max_pixels / (w * h))
        out = (_even(w * scale), _even(h * scale))
        while out[0] * out[1] > limits.max_pixels:
            out = (out[0] - 2, max(2, out[1] - 2))
        notes.append(f"downscaled {w}x{h} -> {out[0]}x{out[1]}")
    return _Probe(w, h, fps, duration, out, notes)


# --------------------------------------------------------------------------- PyAV

def _decode_av(data: bytes, sampling: Sampling, p: _Probe, limits: DecodeLimits) -> Frames:
    with _open(data) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO" if limits.threads > 1 else "SLICE"
        stream.codec_context.thread_count = limits.threads
        tb = stream.time_base
        packets = [pk for pk in container.demux(stream) if pk.size > 0]
        if not packets:
            raise DecodeError("no-decodable-frame", "the video stream holds no packets")
        if any(pk.pts is None for pk in packets):
            return _decode_av_sequential(data, sampling, p, limits)
        pts_sorted = sorted(pk.pts for pk in packets)
        index_of = {pts: i for i, pts in enumerate(pts_sorted)}
        if len(index_of) != len(pts_sorted):  # duplicate timestamps: presentation order is unknowable
            return _decode_av_sequential(data, sampling, p, limits)
        fps = p.fps or (len(pts_sorted) / p.duration_s if p.duration_s else 0.0)
        targets = sampling.resolve(len(pts_sorted), fps)
        wanted = {pts_sorted[i] for i in targets}
        got: dict[int, np.ndarray] = {}
        # keyframes in decode order, to skip groups of pictures that hold no wanted frame
        keys = [(i, pk.pts) for i, pk in enumerate(packets) if pk.is_keyframe]
        ctx = stream.codec_context
        i = 0
        while i < len(packets) and len(got) < len(wanted):
            remaining = min(w for w in wanted if w not in got)
            jump = max((k for k, kpts in keys if kpts <= remaining and k > i), default=None)
            if jump is not None:
                ctx.flush_buffers()
                i = jump
            try:
                frames = ctx.decode(packets[i])
            except av.error.FFmpegError:
                frames = []  # a corrupt packet loses its frame; clamping below copes
            for frame in frames:
                if frame.pts in wanted and frame.pts not in got:
                    got[frame.pts] = _to_rgb(frame, p.out_size)
            i += 1
        if len(got) < len(wanted):
            try:
                for frame in ctx.decode(None):  # drain frames held back for reordering
                    if frame.pts in wanted and frame.pts not in got:
                        got[frame.pts] = _to_rgb(frame, p.out_size)
            except av.error.FFmpegError:
                pass
        if len(got) < len(wanted):  # over-reported or corrupt frames: count what really decodes
            return _decode_av_sequential(data, sampling, p, limits)
        t0 = pts_sorted[0]
        return Frames(frames=np.stack([got[pts_sorted[i]] for i in targets]), indices=targets,
                      timestamps=[float((pts_sorted[i] - t0) * tb) for i in targets], backend="av",
                      num_frames=len(pts_sorted), fps=fps, source_size=(p.width, p.height), notes=list(p.notes))


def _decode_av_sequential(data: bytes, sampling: Sampling, p: _Probe, limits: DecodeLimits) -> Frames:
    """Counts the frames that really decode, then takes the sampled ones: two passes, always exact."""

    def frames_of(container):
        stream = container.streams.video[0]
        stream.codec_context.thread_count = limits.threads
        packets = container.demux(stream)
        while True:
            try:
                packet = next(packets)
            except StopIteration:
                return
            except av.error.FFmpegError:
                return  # the container's data ends in garbage: keep what decoded so far
            try:
                yield from stream.codec_context.decode(packet)  # an empty packet at the end drains
            except av.error.FFmpegError:
                continue  # a corrupt packet loses its frame only

    with _open(data) as container:
        times = [f.time for f in frames_of(container)]
    if not times:
        raise DecodeError("no-decodable-frame", "the container holds a video stream but no frame decodes")
    fps = p.fps or (len(times) / max(times[-1] - times[0], 1e-6) if len(times) > 1 else 1.0)
    targets = sampling.resolve(len(times), fps)
    wanted = set(targets)
    got: dict[int, np.ndarray] = {}
    with _open(data) as container:
        for i, frame in enumerate(frames_of(container)):
            if i in wanted:
                got[i] = _to_rgb(frame, p.out_size)
            if len(got) == len(wanted):
                break
    targets = [i if i in got else max(got) for i in targets]  # a second pass that decoded fewer: clamp
    t0 = times[0] or 0.0
    return Frames(frames=np.stack([got[i] for i in targets]), indices=targets,
                  timestamps=[float((times[i] or 0.0) - t0) for i in targets], backend="av",
                  num_frames=len(times), fps=fps, source_size=(p.width, p.height), notes=list(p.notes))


_local = threading.local()


def _to_rgb(frame: av.VideoFrame, size: tuple[int, int]) -> np.ndarray:
    """The frame as uint8 RGB at ``size``, through this thread's one `VideoReformatter`.

    ``frame.to_ndarray(format="rgb24")`` builds a new swscale context for every frame: 0.9 ms of CPU and
    7 ms of wall time per 112x112 frame here, against 0.04 and 0.08 ms with the context kept (it is rebuilt
    only when the source format, size or target change); the pixels are the same (tests/test_decode.py).
    """
    reformatter = getattr(_local, "reformatter", None)
    if reformatter is None:
        from av.video.reformatter import VideoReformatter

        reformatter = _local.reformatter = VideoReformatter()
    resize = {"width": size[0], "height": size[1], "interpolation": "AREA"} if (frame.width, frame.height) != size \
        else {}
    # one swscale thread: decode parallelism comes from worker processes, and a kept context holds no thread pool
    return reformatter.reformat(frame, format="rgb24", threads=1, **resize).to_ndarray()


# --------------------------------------------------------------------------- decord

def _decode_decord(data: bytes, sampling: Sampling, p: _Probe, limits: DecodeLimits) -> Frames:
    import decord

    kw = {} if p.out_size == (p.width, p.height) else {"width": p.out_size[0], "height": p.out_size[1]}
    try:
        vr = decord.VideoReader(io.BytesIO(data), ctx=decord.cpu(0), num_threads=limits.threads, **kw)
        n = len(vr)
        if n < 1:
            raise DecodeError("no-decodable-frame", "decord found no frame")
        fps = float(vr.get_avg_fps()) or p.fps
        targets = sampling.resolve(n, fps)
        batch = vr.get_batch(targets).asnumpy()
        stamps = [float(t) for t in vr.get_frame_timestamp(targets)[:, 0]]
    except decord.DECORDError as exc:
        raise DecodeError("backend-failed", f"decord: {str(exc).splitlines()[0][:300]}") from None
    if min(stamps) < 0:  # decord turns a missing pts into a huge negative time: its indexing is off too
        raise DecodeError("backend-failed", f"decord: negative timestamp {min(stamps):.3g} s (unindexed stream)")
    return Frames(frames=np.ascontiguousarray(batch), indices=targets, timestamps=stamps, backend="decord",
                  num_frames=n, fps=fps, source_size=(p.width, p.height), notes=list(p.notes))


# --------------------------------------------------------------------------- torchcodec

def _decode_torchcodec(data: bytes, sampling: Sampling, p: _Probe, limits: DecodeLimits) -> Frames:
    import torch
    from torchcodec.decoders import VideoDecoder

    try:
        dec = VideoDecoder(data, device="cpu", num_ffmpeg_threads=limits.threads, seek_mode="exact")
        n = int(dec.metadata.num_frames)
        fps = float(dec.metadata.average_fps or p.fps)
        targets = sampling.resolve(n, fps)
        batch = dec.get_frames_at(indices=targets)
    except (RuntimeError, ValueError) as exc:
        raise DecodeError("backend-failed", f"torchcodec: {str(exc).splitlines()[0][:300]}") from None
    x = batch.data  # uint8 [T, C, H, W]
    if (x.shape[-1], x.shape[-2]) != p.out_size:
        x = torch.nn.functional.interpolate(x.float(), size=(p.out_size[1], p.out_size[0]), mode="area")
        x = x.round().clamp(0, 255).to(torch.uint8)
    return Frames(frames=x.permute(0, 2, 3, 1).contiguous().numpy(), indices=targets,
                  timestamps=[float(t) for t in batch.pts_seconds], backend="torchcodec", num_frames=n, fps=fps,
                  source_size=(p.width, p.height), notes=list(p.notes))


_IMPL = {"av": _decode_av, "decord": _decode_decord, "torchcodec": _decode_torchcodec}


# --------------------------------------------------------------------------- entry point

def decode_video(data: bytes, sampling: Sampling = Sampling(n=8), backend: str = "auto",
                 limits: DecodeLimits = DecodeLimits(), timeout: float | None = None) -> Frames:
    """Decodes sampled frames from video bytes.

    Args:
        data: the bytes of a video file (mp4, webm, mkv, avi, mov, mpg, ...).
        sampling: which frames (uniform ``n``, ``fps`` or explicit ``indices``).
        backend: 'auto', 'av', 'decord' or 'torchcodec'.
        limits: size, aspect, duration and thread bounds.
        timeout: seconds; when set, the decode runs in a worker process that is
            killed if it overruns (see `engine.decode_pool`).

    Returns:
        `Frames` with the uint8 RGB frames, the indices and timestamps used.

    Raises:
        DecodeError: with a reason ('not-a-video', 'no-decodable-frame',
            'frame-too-large', 'timeout', ...). The caller adds shard and key.
        BackendUnavailable: a named backend is not installed (says which extra).
    """
    if timeout is not None:
        from engine.decode_pool import shared_pool

        return shared_pool(limits.threads).decode(data, sampling, backend, limits, timeout=timeout)
    if backend == "auto":
        order = [b for b in AUTO_ORDER if b in installed_backends()]
    elif backend in BACKENDS:
        if backend not in installed_backends():
            extra = {"decord": "pip install 'pseudocap[decord]'", "torchcodec": "pip install torchcodec"}[backend]
            raise BackendUnavailable(f"decode backend {backend!r} is not installed: {extra}")
        order = [backend]
    else:
        raise ValueError(f"unknown decode backend {backend!r}; valid: auto, {', '.join(BACKENDS)}")
    p = probe(data, limits)
    last: DecodeError | None = None
    for name in order:
        try:
            return _IMPL[name](data, sampling, p, limits)
        except DecodeError as exc:
            if backend != "auto" or name == "av":
                raise
            last = exc  # a faster backend stumbled on this clip: PyAV is the reference, try it
    assert last is not None
    raise last
