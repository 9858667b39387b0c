"""Decode speed of each installed backend (and ``auto``) on synthetic 640x360 H.264 clips.

Usage: python bench/decode.py [--repeats N] [--clips N] [--out bench/results/decode.json]

For each keyframe interval (GOP 30 and GOP 250) it renders a few 10-second,
30 fps, 640x360 clips with content that changes every frame (moving
gradients, shapes and texture), encodes them once with
`engine.synth.encode_h264` (crf 23), then times
``decode_video(data, Sampling.uniform(8), backend=b)`` per clip: one warm-up
call each, then ``--repeats`` rounds in which the backends take turns (so
load from elsewhere on the machine hits them alike). The time includes the
PyAV probe that every `decode_video` call makes, i.e. what a caller pays.
It records the median, mean and min milliseconds per clip, frames/s (8 / seconds), each backend's
time relative to PyAV in the same run, the backend ``auto`` picked, the
largest frame difference against PyAV (a fast but wrong backend is no win),
the machine and the library versions. The result feeds `engine.decode.AUTO_ORDER`.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from importlib import metadata
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.decode import AUTO_ORDER, DecodeLimits, Sampling, decode_video, installed_backends  # noqa: E402
from engine.synth import encode_h264  # noqa: E402

WIDTH, HEIGHT, FPS, SECONDS = 640, 360, 30, 10
GOPS = (30, 250)
N_SAMPLED = 8
CRF = 23


def render_clip(seed: int, width: int = WIDTH, height: int = HEIGHT, frames: int = FPS * SECONDS) -> np.ndarray:
    """uint8 RGB [frames, height, width, 3]: a drifting colour gradient, moving shapes and a scrolling texture."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    texture = rng.normal(0.0, 1.0, (height // 8 + 1, width // 8 + 1)).astype(np.float32)
    texture = np.kron(texture, np.ones((8, 8), np.float32))[:height, :width] * 10.0  # blocky, compressible grain
    phase = rng.uniform(0, 2 * np.pi, 3)
    freq = rng.uniform(0.004, 0.012, (3, 2))
    shapes = []
    for _ in range(5):
        shapes.append({
            "colour": rng.integers(40, 256, 3).astype(np.float32),
            "pos": rng.uniform([0, 0], [width, height]),
            "vel": rng.uniform(-6, 6, 2),
            "r": rng.uniform(20, 60),
            "square": bool(rng.random() < 0.5),
        })
    out = np.empty((frames, height, width, 3), np.uint8)
    xs, ys = x[0], y[:, 0]
    for t in range(frames):
        img = np.empty((height, width, 3), np.float32)
        for c in range(3):  # sin(a x + b y + p) = sin(a x) cos(b y + p) + cos(a x) sin(b y + p): two outer products
            p = phase[c] + 0.07 * (c + 1) * t
            img[..., c] = 128 + 90 * (np.outer(np.cos(freq[c, 1] * ys + p), np.sin(freq[c, 0] * xs))
                                      + np.outer(np.sin(freq[c, 1] * ys + p), np.cos(freq[c, 0] * xs)))
        shift = (t * 3) % width
        img += np.roll(texture, shift, axis=1)[..., None]
        for s in shapes:
            cx, cy = (s["pos"] + s["vel"] * t) % [width, height]
            if s["square"]:
                mask = (np.abs(x - cx) < s["r"]) & (np.abs(y - cy) < s["r"])
            else:
                mask = (x - cx) ** 2 + (y - cy) ** 2 < s["r"] ** 2
            img[mask] = s["colour"]
        out[t] = np.clip(img, 0, 255).astype(np.uint8)
    return out


def time_clip(data: bytes, backends: list[str], repeats: int, limits: DecodeLimits):
    """Times every backend on one clip: a warm-up call each, then ``repeats`` rounds that visit the
    backends in turn (rotating the order), so load from elsewhere on the machine hits all of them alike.

    Returns ({backend: [seconds per call]}, {backend: the warm-up's Frames}).
    """
    sampling = Sampling.uniform(N_SAMPLED)
    first = {b: decode_video(data, sampling, backend=b, limits=limits) for b in backends}
    times: dict[str, list[float]] = {b: [] for b in backends}
    for rep in range(repeats):
        for b in backends[rep % len(backends):] + backends[:rep % len(backends)]:
            t0 = time.perf_counter()
            decode_video(data, sampling, backend=b, limits=limits)
            times[b].append(time.perf_counter() - t0)
    return times, first


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for dist in ("av", "decord", "torchcodec", "numpy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    import av

    out["libavcodec_pyav"] = ".".join(map(str, av.library_versions.get("libavcodec", ()))) or None
    out["libavcodec_decord"] = None  # decord bundles its own FFmpeg: read it off the wheel's library names
    spec = importlib.util.find_spec("decord")
    if spec is not None and spec.origin:
        libs = sorted(Path(spec.origin).parent.parent.glob("decord.libs/libavcodec*.so*"))
        if libs:
            out["libavcodec_decord"] = libs[0].name.split(".so.", 1)[-1]
    return out


def machine() -> dict:
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"platform": platform.platform(), "machine": platform.machine(), "processor": cpu,
            "cpu_count": os.cpu_count(), "cpus_usable": usable}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5, help="timed decodes per clip and backend (after 1 warm-up)")
    ap.add_argument("--clips", type=int, default=3, help="distinct clips per GOP setting")
    ap.add_argument("--threads", type=int, default=DecodeLimits().threads, help="decoder threads per decode")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "decode.json"))
    args = ap.parse_args(argv)
    if args.repeats < 1 or args.clips < 1:
        ap.error("--repeats and --clips must be >= 1")

    limits = DecodeLimits(threads=args.threads)
    backends = installed_backends() + ["auto"]
    started = time.perf_counter()

    # render each clip once and encode it at every GOP setting
    clips: dict[int, list[bytes]] = {g: [] for g in GOPS}
    t0 = time.perf_counter()
    for k in range(args.clips):
        frames = render_clip(seed=1000 + k)
        for g in GOPS:
            clips[g].append(encode_h264(frames, fps=FPS, crf=CRF, gop=g))
        del frames
    prep_s = time.perf_counter() - t0

    results = []
    for g in GOPS:
        timed = [time_clip(data, backends, args.repeats, limits) for data in clips[g]]
        av_med = [statistics.median(times["av"]) for times, _ in timed]
        for b in backends:
            rows, picked, max_mad, same_idx = [], set(), 0.0, True
            for ci, (times, first) in enumerate(timed):
                got, ref = first[b], first["av"]
                picked.add(got.backend)
                same_idx &= got.indices == ref.indices
                if got.frames.shape == ref.frames.shape:
                    mad = np.abs(got.frames.astype(np.int16) - ref.frames.astype(np.int16)).mean()
                    max_mad = max(max_mad, float(mad))
                else:
                    max_mad = float("inf")
                med = statistics.median(times[b])
                rows.append({"clip": ci, "bytes": len(clips[g][ci]), "num_frames": got.num_frames,
                             "indices": got.indices, "times_ms": [round(t * 1e3, 3) for t in times[b]],
                             "median_ms": round(med * 1e3, 3), "mean_ms": round(statistics.fmean(times[b]) * 1e3, 3),
                             "min_ms": round(min(times[b]) * 1e3, 3), "frames_per_s": round(N_SAMPLED / med, 2),
                             "ratio_to_av": round(med / av_med[ci], 3)})
            all_times = [t for times, _ in timed for t in times[b]]
            med_ms = statistics.median(r["median_ms"] for r in rows)  # median over clips of per-clip medians
            av_ms = statistics.median(m * 1e3 for m in av_med)
            results.append({
                "gop": g, "backend": b, "picked": sorted(picked), "clips": rows,
                "median_ms": round(med_ms, 3),
                "mean_ms": round(statistics.fmean(all_times) * 1e3, 3),
                "min_ms": round(min(all_times) * 1e3, 3),
                "frames_per_s": round(N_SAMPLED / (med_ms / 1e3), 2),
                "ratio_to_av": round(med_ms / av_ms, 3),  # < 1: faster than PyAV, same clips, same run
                "same_indices_as_av": same_idx,
                "max_mean_abs_diff_vs_av": round(max_mad, 4),
            })

    fastest = {}
    for g in GOPS:
        named = [r for r in results if r["gop"] == g and r["backend"] != "auto"]
        fastest[str(g)] = min(named, key=lambda r: r["median_ms"])["backend"]
    report = {
        "benchmark": "decode",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python bench/decode.py", *(argv if argv is not None else sys.argv[1:])]),
        "settings": {"width": WIDTH, "height": HEIGHT, "fps": FPS, "seconds": SECONDS, "frames": FPS * SECONDS,
                     "crf": CRF, "gops": list(GOPS), "clips_per_gop": args.clips, "sampling": f"uniform({N_SAMPLED})",
                     "repeats": args.repeats, "warmup": 1, "decoder_threads": args.threads,
                     "timing": "wall clock of decode_video(), PyAV probe included"},
        "machine": machine(),
        "versions": versions(),
        "installed_backends": installed_backends(),
        "auto_order": list(AUTO_ORDER),
        "auto_picked": sorted({p for r in results if r["backend"] == "auto" for p in r["picked"]}),
        "fastest": fastest,
        "results": results,
        "prepare_s": round(prep_s, 2),
        "total_s": round(time.perf_counter() - started, 2),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")

    m = report["machine"]
    print(f"decode: {WIDTH}x{HEIGHT}, {FPS * SECONDS} frames, uniform({N_SAMPLED}), {args.clips} clips x "
          f"{args.repeats} repeats, {args.threads} decoder thread(s); {m['cpus_usable']} cpus, {m['platform']}")
    print(f"{'gop':>4} {'backend':<8} {'picked':<8} {'median ms':>10} {'mean ms':>8} {'min ms':>7} {'frames/s':>9} "
          f"{'x PyAV':>7} {'max |d| vs av':>14}")
    for r in results:
        print(f"{r['gop']:>4} {r['backend']:<8} {','.join(r['picked']):<8} {r['median_ms']:>10.1f} "
              f"{r['mean_ms']:>8.1f} {r['min_ms']:>7.1f} {r['frames_per_s']:>9.1f} {r['ratio_to_av']:>7.2f} "
              f"{r['max_mean_abs_diff_vs_av']:>14.3f}")
    print("fastest: " + ", ".join(f"gop {g}: {b}" for g, b in fastest.items())
          + f"; auto picked {', '.join(report['auto_picked'])}; total {report['total_s']:.0f} s -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
