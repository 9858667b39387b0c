"""Standard video-retrieval benchmark layouts as data: annotation files, video file names, caption protocol.

A layout says what the public release of a benchmark ships and how it is scored;
`dualenc.benchmarks.load_benchmark` reads a downloaded copy according to it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from data_specs.base import Spec

AnnotationKind = Literal["jsfusion-csv", "msvd-descriptions", "didemo-json"]
"""The annotation parsers `dualenc.benchmarks` has; several layouts may share one."""


class BenchmarkLayout(Spec):
    """One benchmark: where its annotations and videos are, and which retrieval protocol it follows."""

    name: str = Field(description="the --benchmark name, e.g. 'msrvtt-1ka'")
    title: str = Field(description="a human-readable title for reports")
    annotation_kind: AnnotationKind = Field(description="which parser reads the annotation file")
    annotation_format: str = Field(description="the annotation file in a sentence: its columns or JSON fields")
    annotation_files: list[str] = Field(
        min_length=1,
        description="file names of the public release; the first is the annotation file, the others are "
                    "optional companions (a split list) looked up next to it. When --annotations is a "
                    "directory, they are looked up in it")
    video_pattern: str = Field(
        description="the file name of a video in --videos, with '{video_id}' for the id the annotations use")
    video_extensions: list[str] = Field(
        description="extensions tried, in order, after the pattern's own (re-encoded copies are common)")
    captions: Literal["first", "all"] = Field(
        description="'first': one text per video (single-caption protocol); 'all': every caption is a "
                    "text->video query and video->text counts the best-ranked caption of the video")
    text_unit: Literal["sentence", "paragraph"] = Field(
        description="'paragraph': the sentences of a video are joined into one query text")
    reference: str = Field(description="the paper or protocol the layout follows")


BENCHMARKS: dict[str, BenchmarkLayout] = {b.name: b for b in (
    BenchmarkLayout(
        name="msrvtt-1ka",
        title="MSR-VTT 1k-A (JSFusion test split)",
        annotation_kind="jsfusion-csv",
        annotation_format="CSV with a header row and columns key,vid_key,video_id,sentence (e.g. "
                          "ret0,msr7579,video7579,<caption>); one row per video, 1000 rows; only video_id and "
                          "sentence are read",
        annotation_files=["MSRVTT_JSFUSION_test.csv"],
        video_pattern="{video_id}.mp4",
        video_extensions=["mp4", "webm", "mkv", "avi"],
        captions="first",
        text_unit="sentence",
        reference="Yu et al., A Joint Sequence Fusion Model (JSFusion), ECCV 2018; the 1k-A split as "
                  "evaluated by CLIP4Clip (Luo et al., 2021)",
    ),
    BenchmarkLayout(
        name="msvd",
        title="MSVD (YouTube2Text) test split",
        annotation_kind="msvd-descriptions",
        annotation_format="text lines 'VIDEO_ID caption words ...' (VIDEO_ID like -4wsuPCjDBc_5_15, several "
                          "lines per video, '#' starts a comment line) in AllVideoDescriptions.txt, and "
                          "test_list.txt with one video id per line",
        annotation_files=["AllVideoDescriptions.txt", "test_list.txt"],
        video_pattern="{video_id}.avi",
        video_extensions=["avi", "mp4", "webm", "mkv"],
        captions="all",
        text_unit="sentence",
        reference="Chen & Dolan, Collecting Highly Parallel Data for Paraphrase Evaluation, ACL 2011; the "
                  "670-video test split of Venugopalan et al. 2015 as evaluated by CLIP4Clip",
    ),
    BenchmarkLayout(
        name="didemo",
        title="DiDeMo paragraph-to-video retrieval",
        annotation_kind="didemo-json",
        annotation_format="JSON list of moment objects with fields video (a file name like "
                          "12345678@N00_1234567890_abcdef.mov), description (one sentence) and times; several "
                          "objects per video, whose descriptions joined in file order form the video's paragraph",
        annotation_files=["test_data.json"],
        video_pattern="{video_id}",
        video_extensions=["mp4", "mov", "avi", "mkv", "webm"],
        captions="first",
        text_unit="paragraph",
        reference="Hendricks et al., Localizing Moments in Video with Natural Language, ICCV 2017; "
                  "paragraph-to-video retrieval as in ClipBERT (Lei et al., 2021) and CLIP4Clip",
    ),
)}
"""Every shipped layout by its --benchmark name."""


class UnknownBenchmarkError(KeyError, ValueError):
    """An unknown benchmark name; a KeyError for lookups and a ValueError for argument checks."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0])


def list_benchmarks() -> list[str]:
    """Names of the shipped benchmark layouts."""
    return sorted(BENCHMARKS)


def get_benchmark(name: str) -> BenchmarkLayout:
    """The layout called ``name``.

    Raises:
        UnknownBenchmarkError: (a KeyError and a ValueError) naming the valid names.
    """
    try:
        return BENCHMARKS[name]
    except KeyError:
        raise UnknownBenchmarkError(
            f"unknown benchmark {name!r}; valid: {', '.join(list_benchmarks())}") from None
