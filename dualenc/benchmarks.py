"""Standard retrieval benchmarks (MSR-VTT 1k-A, MSVD, DiDeMo) read from their public release as embedder samples.

A downloaded benchmark is a videos directory and an annotation file; `load_benchmark`
parses the annotations of a layout in `data_specs.benchmarks`, finds each video's file
and gives every video a webdataset-safe key; `iter_samples` then reads one video at a
time into the sample shape the embedder reads from shards.

Example:
    import json
    from dualenc.benchmarks import iter_samples, load_benchmark

    bench = load_benchmark("msvd", videos="MSVD/YouTubeClips", annotations="MSVD/")
    for warning in bench.warnings:
        print(warning)                      # e.g. how many videos have no file
    for sample in iter_samples(bench):
        key, video = sample["__key__"], sample["avi"]
        captions = json.loads(sample["captions.json"])
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from data_specs import VIDEO_EXTENSIONS
from data_specs.benchmarks import AnnotationKind, BenchmarkLayout, get_benchmark

_UNSAFE_KEY_CHARS = re.compile(r"[./\\]")
"""webdataset splits a member name at the first dot, and a slash would make a directory."""


@dataclass
class Benchmark:
    """A benchmark as found on disk.

    Attributes:
        layout: the layout it was read with.
        videos: ``(key, file)`` of every video that has a file, in annotation (or split list) order.
        texts: ``(video key, text)`` of every query text, in annotation order; a video has one text
            (``layout.captions == "first"``) or several (``"all"``).
        missing: ids of videos in the annotations that have no file; their texts are left out.
        warnings: what a user should know before comparing scores with published numbers.
        ids: the original video id of every key (keys replace ``.``, ``/`` and ``\\`` with ``_``).
    """

    layout: BenchmarkLayout
    videos: list[tuple[str, Path]]
    texts: list[tuple[str, str]]
    missing: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    ids: dict[str, str] = field(default_factory=dict)

    def captions_by_key(self) -> dict[str, list[str]]:
        """The texts of every video key, in annotation order."""
        out: dict[str, list[str]] = {key: [] for key, _ in self.videos}
        for key, text in self.texts:
            out[key].append(text)
        return out


@dataclass
class _Parsed:
    video_ids: list[str]  # every video of the split, in gallery order
    texts: list[tuple[str, str]]  # (video id, text) in annotation order
    warnings: list[str] = field(default_factory=list)


def load_benchmark(name: str, videos: str | Path, annotations: str | Path, *,
                   limit: int | None = None) -> Benchmark:
    """Reads a downloaded benchmark: parses its annotations and finds the file of every video.

    Args:
        name: a layout name from `data_specs.benchmarks.BENCHMARKS` (``msrvtt-1ka``, ``msvd``, ``didemo``).
        videos: the directory holding the video files (not searched recursively).
        annotations: the annotation file, or a directory holding the layout's ``annotation_files``.
            For MSVD, ``test_list.txt`` is looked up next to ``AllVideoDescriptions.txt``.
        limit: keep only the first ``limit`` videos that have a file (and their texts), for a quick run.

    Returns:
        The benchmark; videos without a file are listed in ``missing`` and explained in ``warnings``.

    Raises:
        UnknownBenchmarkError: an unknown name (a KeyError and ValueError naming the valid ones).
        FileNotFoundError: the videos directory or annotation file does not exist, or not one video has
            a file (naming the directory and an expected path).
        ValueError: a malformed annotation file, naming the file, the line (or JSON item) and the reason;
            a pickle instead of a text annotation file (pickles are never loaded); ``limit`` below 1.
    """
    layout = get_benchmark(name)
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    videos = Path(videos)
    if not videos.is_dir():
        raise FileNotFoundError(f"--videos {videos} is not a directory")
    ann_file, companions = _locate_annotations(layout, Path(annotations))
    parsed = _PARSERS[layout.annotation_kind](ann_file, companions)
    if not parsed.video_ids:
        raise ValueError(f"{ann_file}: no videos in the annotations")
    warnings = list(parsed.warnings)
    texts = _apply_caption_protocol(layout, parsed.texts, warnings)

    listing = _listing(videos)
    found: list[tuple[str, Path]] = []
    missing: list[str] = []
    for vid in parsed.video_ids:
        path = _resolve(layout, videos, vid, listing)
        if path is None:
            missing.append(vid)
        else:
            found.append((vid, path))
    if not found:
        example = videos / _candidates(layout, parsed.video_ids[0])[0]
        raise FileNotFoundError(
            f"no video of {layout.name} found in {videos} (none of {len(parsed.video_ids)} ids in {ann_file} "
            f"has a file; e.g. expected {example}, or the same name with extension "
            f"{'/'.join(layout.video_extensions)})")
    if missing:
        warnings.append(
            f"{len(missing)} of {len(parsed.video_ids)} videos in {ann_file} have no file in {videos} "
            f"(e.g. {', '.join(missing[:3])}); their texts are left out, so scores are not comparable with "
            f"published {layout.title} numbers")
    if limit is not None and limit < len(found):
        warnings.append(f"limited to the first {limit} of {len(found)} videos found")
        found = found[:limit]
    odd = sorted({p.suffix.lower() or "(none)" for _, p in found} - {f".{e}" for e in VIDEO_EXTENSIONS})
    if odd:
        warnings.append(f"video files with extension {', '.join(odd)} are not a video member the engine knows; "
                        f"their samples carry the video as {layout.video_extensions[0]!r} (the decoder reads "
                        f"the container from the bytes)")

    key_of = _keys([vid for vid, _ in found])
    return Benchmark(
        layout=layout,
        videos=[(key_of[vid], path) for vid, path in found],
        texts=[(key_of[vid], text) for vid, text in texts if vid in key_of],
        missing=missing,
        warnings=warnings,
        ids={key: vid for vid, key in key_of.items()},
    )


def iter_samples(bench: Benchmark) -> Iterator[dict]:
    """Yields one webdataset-style sample per video, reading one file at a time.

    A sample is ``{"__key__", "__url__": file path, <ext>: video bytes, "txt": texts joined by newlines,
    "captions.json": JSON list of the texts, "json": {"benchmark", "video_id"}}``, where ``<ext>`` is the
    file's extension lower-cased (``mp4``, ``avi``, ...), or the layout's first extension for a file whose
    extension is not one of `data_specs.VIDEO_EXTENSIONS` (``load_benchmark`` warns about those).

    Raises:
        OSError: a video file cannot be read (the subclass of the cause, naming the path).
    """
    captions = bench.captions_by_key()
    for key, path in bench.videos:
        try:
            data = path.read_bytes()
        except OSError as exc:
            # OSError(errno, ...) comes back as the matching subclass (PermissionError, ...)
            raise OSError(exc.errno, f"cannot read video {bench.ids.get(key, key)!r} of {bench.layout.name}: "
                                     f"{exc.strerror or exc}", str(path)) from exc
        texts = captions[key]
        meta = {"benchmark": bench.layout.name, "video_id": bench.ids.get(key, key)}
        yield {
            "__key__": key,
            "__url__": str(path),
            _member_ext(bench.layout, path): data,
            "txt": "\n".join(texts).encode("utf-8"),
            "captions.json": json.dumps(texts, ensure_ascii=False).encode("utf-8"),
            "json": json.dumps(meta, ensure_ascii=False).encode("utf-8"),
        }


# --------------------------------------------------------------------------- locating files

def _locate_annotations(layout: BenchmarkLayout, annotations: Path) -> tuple[Path, list[Path | None]]:
    """The annotation file and its companions (None where absent), looked up in a directory or next to a file."""
    main_name, *companion_names = layout.annotation_files
    if annotations.suffix.lower() in (".pkl", ".pickle"):
        raise ValueError(f"{annotations}: a pickle; pickles are never loaded (unpickling can run code), "
                         f"give the {main_name} of the {layout.title} release instead")
    if annotations.is_dir():
        folder, main = annotations, annotations / main_name
        if not main.is_file():
            pickles = sorted(p.name for p in annotations.glob("*.pkl"))
            note = (f"; {', '.join(pickles)} found, but pickles are never loaded (unpickling can run code)"
                    if pickles else "")
            raise FileNotFoundError(f"--annotations {annotations} has no {main_name}{note}")
    elif annotations.is_file():
        folder, main = annotations.parent, annotations
    else:
        raise FileNotFoundError(f"--annotations {annotations} does not exist")
    companions = [(folder / n) if (folder / n).is_file() else None for n in companion_names]
    return main, companions


def _listing(videos: Path) -> tuple[set[str], dict[str, str]]:
    """File names in the directory, and the same lower-cased (for a '.AVI' where '.avi' is expected)."""
    names = {e.name for e in os.scandir(videos) if e.is_file()}
    return names, {n.lower(): n for n in sorted(names)}


def _candidates(layout: BenchmarkLayout, video_id: str) -> list[str]:
    primary = layout.video_pattern.format(video_id=video_id)
    stem, _ = os.path.splitext(primary)
    names = [primary, *(f"{stem}.{e}" for e in layout.video_extensions)]
    if layout.video_pattern == "{video_id}":
        # an id that is a file name may have been re-encoded keeping it whole: 'x.mov' -> 'x.mov.mp4'
        names += [f"{primary}.{e}" for e in layout.video_extensions]
    return list(dict.fromkeys(names))


def _resolve(layout: BenchmarkLayout, videos: Path, video_id: str,
             listing: tuple[set[str], dict[str, str]]) -> Path | None:
    names, lowered = listing
    candidates = _candidates(layout, video_id)
    for name in candidates:
        if name in names or ("/" in name and (videos / name).is_file()):
            return videos / name
    for name in candidates:
        if name.lower() in lowered:
            return videos / lowered[name.lower()]
    return None


def _member_ext(layout: BenchmarkLayout, path: Path) -> str:
    # the embedder looks for a member in VIDEO_EXTENSIONS; the decoder sniffs the container from the
    # bytes, so a '.m4v' or extension-less file only needs a member name it will look for
    ext = path.suffix.lower().lstrip(".")
    return ext if ext in VIDEO_EXTENSIONS else layout.video_extensions[0]


def _keys(video_ids: list[str]) -> dict[str, str]:
    """A unique, dot-free key for every id, stable under truncation (assigned in order)."""
    used: set[str] = set()
    out: dict[str, str] = {}
    for vid in video_ids:
        base = _UNSAFE_KEY_CHARS.sub("_", vid)
        key, n = base, 1
        while key in used:
            key, n = f"{base}_{n}", n + 1
        used.add(key)
        out[vid] = key
    return out


# --------------------------------------------------------------------------- parsing

def _clean(text: str) -> str:
    return " ".join(text.split())


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise ValueError(f"{path}: line {line}: not UTF-8 ({exc.reason} at byte {exc.start})") from None


def _apply_caption_protocol(layout: BenchmarkLayout, texts: list[tuple[str, str]],
                            warnings: list[str]) -> list[tuple[str, str]]:
    if layout.captions == "all":
        return texts
    kept: dict[str, str] = {}
    for vid, text in texts:
        kept.setdefault(vid, text)
    if len(kept) < len(texts):
        warnings.append(f"{len(texts) - len(kept)} further captions of already-captioned videos dropped: "
                        f"{layout.title} uses the first caption of each video")
    return list(kept.items())


def _parse_jsfusion_csv(path: Path, companions: list[Path | None]) -> _Parsed:
    reader = csv.DictReader(io.StringIO(_read_text(path), newline=""))
    if not reader.fieldnames:
        raise ValueError(f"{path}: line 1: empty file; expected a header row with columns video_id and sentence")
    reader.fieldnames = header = [f.strip() for f in reader.fieldnames]
    absent = [c for c in ("video_id", "sentence") if c not in header]
    if absent:
        raise ValueError(f"{path}: line 1: missing column {', '.join(repr(c) for c in absent)} "
                         f"(the header has {', '.join(header)})")
    texts: list[tuple[str, str]] = []
    for row in reader:
        line = reader.line_num
        sentence = row["sentence"] or ""
        extra = row.pop(None, None)
        if extra:
            if header[-1] != "sentence":
                raise ValueError(f"{path}: line {line}: {len(header) + len(extra)} fields, the header has "
                                 f"{len(header)}")
            sentence = ",".join([sentence, *extra])  # an unquoted comma inside the last column
        vid, sentence = (row["video_id"] or "").strip(), _clean(sentence)
        if not vid:
            raise ValueError(f"{path}: line {line}: empty video_id")
        if not sentence:
            raise ValueError(f"{path}: line {line}: empty sentence for video {vid!r}")
        texts.append((vid, sentence))
    return _Parsed(video_ids=list(dict.fromkeys(v for v, _ in texts)), texts=texts)


def _read_id_list(path: Path) -> list[tuple[int, str]]:
    return [(n, line.strip()) for n, line in enumerate(_read_text(path).splitlines(), 1) if line.strip()]


def _parse_msvd(path: Path, companions: list[Path | None]) -> _Parsed:
    texts: list[tuple[str, str]] = []
    for n, line in enumerate(_read_text(path).splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        vid, *rest = line.split(None, 1)
        caption = _clean(rest[0]) if rest else ""
        if not caption:
            raise ValueError(f"{path}: line {n}: no caption after video id {vid!r}")
        texts.append((vid, caption))
    annotated = list(dict.fromkeys(v for v, _ in texts))
    split = companions[0] if companions else None
    if split is None:
        return _Parsed(video_ids=annotated, texts=texts, warnings=[
            f"no test_list.txt next to {path}: using all {len(annotated)} annotated videos that have a file, "
            f"not the standard 670-video test split"])

    warnings: list[str] = []
    rows = _read_id_list(split)
    wanted = list(dict.fromkeys(vid for _, vid in rows))
    if len(wanted) < len(rows):
        warnings.append(f"{split}: {len(rows) - len(wanted)} repeated video ids ignored")
    known = set(annotated)
    unknown = [(n, vid) for n, vid in rows if vid not in known]
    if unknown:
        shown = "; ".join(f"line {n}: {vid!r}" for n, vid in unknown[:3])
        raise ValueError(f"{split}: {len(unknown)} video ids have no caption in {path} ({shown}); "
                         f"are the split list and the descriptions from the same release?")
    chosen = set(wanted)
    return _Parsed(video_ids=wanted, texts=[(v, t) for v, t in texts if v in chosen], warnings=warnings)


def _parse_didemo(path: Path, companions: list[Path | None]) -> _Parsed:
    try:
        items = json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: line {exc.lineno} column {exc.colno}: bad JSON ({exc.msg})") from None
    if not isinstance(items, list):
        raise ValueError(f"{path}: line 1: expected a JSON list of moment objects, got {type(items).__name__}")
    sentences: dict[str, list[str]] = {}
    for i, item in enumerate(items, 1):
        where = f"{path}: item {i} (of {len(items)})"
        if not isinstance(item, dict):
            raise ValueError(f"{where}: expected an object, got {type(item).__name__}")
        for name in ("video", "description"):
            if not isinstance(item.get(name), str):
                raise ValueError(f"{where}: missing field {name!r}" if name not in item
                                 else f"{where}: field {name!r} is not a string")
        vid, sentence = item["video"].strip(), _clean(item["description"])
        if not vid:
            raise ValueError(f"{where}: empty video")
        if not sentence:
            raise ValueError(f"{where}: empty description for video {vid!r}")
        paragraph = sentences.setdefault(vid, [])
        if sentence not in paragraph:  # the same sentence annotated for two moments says nothing new
            paragraph.append(sentence)
    return _Parsed(video_ids=list(sentences), texts=[(v, " ".join(s)) for v, s in sentences.items()])


_PARSERS: dict[AnnotationKind, Callable[[Path, list[Path | None]], _Parsed]] = {
    "jsfusion-csv": _parse_jsfusion_csv,
    "msvd-descriptions": _parse_msvd,
    "didemo-json": _parse_didemo,
}
