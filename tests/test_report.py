"""Reports: what report.md says, that report.html is self-contained and escaped, comparisons, a headless render."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess

import pytest
from PIL import Image

from dualenc.report import compare_reports, write_report

EVIL = "the red circle <script>alert(1)</script> moves left & stops."


def _metrics(shards_sha256: str = "ab" * 32, t2v_r1: float = 0.4125) -> dict:
    ks = [1, 2, 3, 5, 10, 20, 50]
    edges = [1, 2, 3, 5, 9, 17, 33, 65, 129, 401]
    sim_edges = [round(-0.2 + 0.1 * i, 2) for i in range(13)]
    top = [{"key": f"test-{i:06d}", "score": 0.71 - 0.03 * n, "correct": i == 12, "thumb": "thumbs/test-000012.jpg"}
           for n, i in enumerate([7, 3, 12, 30, 41])]
    top[4]["thumb"] = None  # a clip whose thumbnail could not be made
    return {
        "text_to_video_R@1": t2v_r1, "text_to_video_R@5": 0.7, "text_to_video_R@10": 0.8125,
        "text_to_video_MdR": 2.0, "text_to_video_MnR": 9.37,
        "video_to_text_R@1": 0.39, "video_to_text_R@5": 0.68, "video_to_text_R@10": 0.8,
        "video_to_text_MdR": 2.5, "video_to_text_MnR": 10.2,
        "ci95": {"text_to_video_R@1": [t2v_r1 - 0.0475, t2v_r1 + 0.0475], "text_to_video_R@5": [0.655, 0.745],
                 "text_to_video_R@10": [0.775, 0.85], "video_to_text_R@1": [0.34, 0.44],
                 "video_to_text_R@5": [0.63, 0.73], "video_to_text_R@10": [0.76, 0.84]},
        "protocol": {"shards": ["toy/test-00000.tar", "toy/test-00001.tar"], "shards_sha256": shards_sha256,
                     "frames": 8, "sampling": "uniform(8)", "text_key": ["gt.txt"], "index": "flat",
                     "captions": "all", "model": "toy-vit", "checkpoint_sha256": "cd" * 32,
                     "command": "dualenc eval --checkpoint runs/a", "videos": 400, "texts": 400,
                     "queries": {"text_to_video": 400, "video_to_text": 400}, "bootstrap": None,
                     "definitions": {"rank": "1 + the number of negatives scoring >= the positive",
                                     "R@K": "fraction of queries whose rank is <= K"}},
        "seconds": {"text_to_video": 0.01, "video_to_text": 0.01},
        "curves": {d: {"k": ks, "recall": [min(1.0, 0.4 + 0.1 * i) for i in range(len(ks))]}
                   for d in ("text_to_video", "video_to_text")},
        "rank_histogram": {d: {"bin_edges": edges, "counts": [165, 80, 60, 40, 30, 15, 6, 3, 1]}
                           for d in ("text_to_video", "video_to_text")},
        "similarity": {"positive": {"bin_edges": sim_edges, "counts": [0, 0, 0, 1, 3, 10, 40, 80, 120, 90, 40, 16],
                                    "mean": 0.58},
                       "negative": {"bin_edges": sim_edges, "counts": [50, 900, 8000, 40000, 60000, 40000, 8000,
                                                                          900, 50, 0, 0, 0], "mean": 0.21}},
        "examples": [{"direction": "text_to_video", "query": EVIL, "query_key": "test-000012", "rank": 3, "top": top},
                     {"direction": "text_to_video", "query": "a blue square grows.", "query_key": "test-000099",
                      "rank": 17, "top": [dict(h, correct=False) for h in top]}],
        "label": "vidla-gt",
    }


@pytest.fixture
def report_dir(tmp_path):
    """A report directory as `dualenc eval` leaves it: metrics.json and one 32x32 JPEG thumbnail."""
    run = tmp_path / "run"
    (run / "thumbs").mkdir(parents=True)
    Image.new("RGB", (32, 32), (200, 40, 40)).save(run / "thumbs" / "test-000012.jpg", format="JPEG")
    (run / "metrics.json").write_text(json.dumps(_metrics()))
    return run


def _imgs(page: str) -> list[str]:
    return re.findall(r"<img\b[^>]*>", page)


def test_markdown_has_metrics_ci_protocol_and_examples(report_dir):
    paths = write_report(report_dir)
    assert paths == {"md": report_dir / "report.md", "html": report_dir / "report.html"}
    md = paths["md"].read_text()
    assert "41.2 [36.5, 46.0]" in md and "81.2 [77.5, 85.0]" in md  # R@K in percent, one decimal, with the CI
    assert "| text → video | 41.2 [36.5, 46.0] | 70.0 [65.5, 74.5] | 81.2 [77.5, 85.0] | 2 | 9.4 |" in md
    assert "| video → text |" in md and "| 2.5 | 10.2 |" in md
    assert "- **definitions**:\n  - *rank*: 1 + the number" in md  # definitions as a sub-list
    assert "**`test-000012` 0.650 ✓ correct**" in md
    assert "<script>" not in md and "&lt;script&gt;" in md


def test_html_is_self_contained_with_embedded_plots_and_thumbnails(report_dir):
    page = write_report(report_dir)["html"].read_text()
    assert "http://" not in page and "https://" not in page and 'src="thumbs/' not in page
    imgs = _imgs(page)
    assert imgs and all(re.search(r'src="data:image/', tag) for tag in imgs)
    assert sum("data:image/png" in tag for tag in imgs) == 3  # recall curves, rank histogram, similarity
    thumb = base64.b64encode((report_dir / "thumbs" / "test-000012.jpg").read_bytes()).decode()
    assert f'src="data:image/jpeg;base64,{thumb}"' in page
    assert "no thumbnail" in page  # the hit whose thumb is null
    assert "<script" not in page  # nothing to run, nothing that can error


def test_gallery_marks_the_correct_clip_and_escapes_captions(report_dir):
    page = write_report(report_dir)["html"].read_text()
    assert "<script>alert(1)</script>" not in page
    assert html_escaped(EVIL) in page
    correct = re.findall(r'<figure class="ok">.*?</figure>', page)
    assert len(correct) == 1 and "test-000012" in correct[0] and "✓ correct" in correct[0]
    assert "correct at rank 17 (not in the top 5)" in page


def html_escaped(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def test_bare_metrics_still_render_and_say_what_is_absent(tmp_path):
    bare = {k: v for k, v in _metrics().items() if k not in ("curves", "rank_histogram", "similarity", "examples",
                                                             "label")}
    bare["ci95"] = {}
    paths = write_report(tmp_path / "bare", bare)
    md, page = paths["md"].read_text(), paths["html"].read_text()
    assert "| text → video | 41.2 | 70.0 | 81.2 | 2 | 9.4 |" in md
    assert "Absent from metrics.json: curves, rank_histogram, similarity, examples, ci95, approximate" in md
    assert "No example queries" in page and "bootstrap was off" in page and not _imgs(page)


def test_approximate_block(report_dir):
    metrics = _metrics()
    metrics["approximate"] = {"index": "ivf", "options": {"nlist": 16}, "text_to_video_recall@10_vs_exact": 0.97}
    paths = write_report(report_dir, metrics)
    assert "## Approximate index (ivf)" in paths["md"].read_text()
    assert "text_to_video_recall@10_vs_exact" in paths["html"].read_text()


def test_thumbnails_outside_the_report_dir_are_not_embedded(report_dir, tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "elsewhere.jpg", format="JPEG")
    metrics = _metrics()
    for hit in metrics["examples"][0]["top"]:
        hit["thumb"] = "../elsewhere.jpg"
    page = write_report(report_dir, metrics)["html"].read_text()
    assert base64.b64encode((tmp_path / "elsewhere.jpg").read_bytes()).decode() not in page


def test_missing_report_raises_naming_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        write_report(tmp_path / "nope")


@pytest.fixture
def three_runs(tmp_path):
    runs = []
    for name, r1, sha in [("b", 0.30, "ab" * 32), ("a", 0.45, "ab" * 32), ("c", 0.5, "ef" * 32)]:
        metrics = _metrics(shards_sha256=sha, t2v_r1=r1)
        if name != "c":  # c falls back to its directory's name
            metrics["label"] = "same"
        else:
            del metrics["label"]
        metrics["protocol"]["text_key"] = ["txt"] if name == "b" else ["gt.txt"]
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps(metrics))
        runs.append(tmp_path / name)
    return runs


def test_compare_table_json_curves_and_differences(three_runs, tmp_path):
    paths = compare_reports(three_runs[:2], tmp_path / "cmp", labels=["txt-trained", "gt-trained"])
    md = paths["md"].read_text()
    rows = [line for line in md.splitlines() if line.startswith("| ") and "---" not in line][1:3]
    assert [r.split(" | ")[0] for r in rows] == ["| txt-trained", "| gt-trained"]  # the order given
    assert rows[0].startswith("| txt-trained | 30.0 [") and rows[1].startswith("| gt-trained | 45.0 [")
    summary = json.loads(paths["json"].read_text())
    assert summary["labels"] == ["txt-trained", "gt-trained"]
    assert summary["metrics"]["text_to_video_R@1"] == [0.30, 0.45]
    assert summary["metrics"]["video_to_text_MdR"] == [2.5, 2.5]
    assert summary["protocol_differences"] == {"text_key": [["txt"], ["gt.txt"]]} and not summary["warnings"]
    assert "not comparable" not in md and "| text_key | txt | gt.txt |" in md
    page = paths["html"].read_text()
    (curves,) = _imgs(page)  # both directions' overlaid curves in one image
    assert 'src="data:image/png;base64,' in curves and 'alt="recall curves"' in curves
    assert "http://" not in page and "https://" not in page


def test_compare_warns_on_different_shards_and_disambiguates_labels(three_runs, tmp_path):
    paths = compare_reports(three_runs, tmp_path / "cmp")
    summary = json.loads(paths["json"].read_text())
    assert summary["labels"] == ["same", "same (2)", "c"]
    assert "not comparable" in paths["md"].read_text() and "not comparable" in paths["html"].read_text()
    assert "shards_sha256" in summary["protocol_differences"]
    metrics = json.loads((three_runs[0] / "metrics.json").read_text())
    del metrics["protocol"]["shards_sha256"]
    (three_runs[0] / "metrics.json").write_text(json.dumps(metrics))
    summary = json.loads(compare_reports(three_runs[:2], tmp_path / "cmp2")["json"].read_text())
    assert summary["warnings"] == ["shards_sha256 is missing for same: whether the runs saw the same evaluation "
                                   "shards is unknown."]


def test_compare_missing_run_raises_naming_it(three_runs, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing-run"):
        compare_reports([three_runs[0], tmp_path / "missing-run"], tmp_path / "cmp")
    (three_runs[1] / "metrics.json").unlink()
    with pytest.raises(FileNotFoundError, match=f"metrics.json in {re.escape(str(three_runs[1]))}"):
        compare_reports(three_runs, tmp_path / "cmp")


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


# the page's console messages reach stderr as `[...:INFO:CONSOLE:1] "Uncaught ...", source: file://...` (older
# builds: `CONSOLE(1)`); the rest is container noise (dbus, vaapi, sandbox). The report has no script, so any is a bug.
PAGE_CONSOLE = re.compile(r":CONSOLE[:(]\d+|Uncaught")


@pytest.mark.skipif(_chromium() is None, reason="no chromium binary on PATH")
def test_headless_chromium_renders_without_console_errors(report_dir, tmp_path):
    page = write_report(report_dir)["html"]
    shot = tmp_path / "shot.png"
    flags = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'profile'}"]
    subprocess.run([*flags, f"--screenshot={shot}", "--window-size=1280,2400", page.as_uri()],
                   capture_output=True, timeout=60, check=False)
    assert shot.is_file() and shot.stat().st_size > 20_000
    with Image.open(shot) as im:
        assert im.size == (1280, 2400) and len(im.convert("L").getcolors(256)) > 50  # not blank
    dump = subprocess.run([*flags, "--enable-logging=stderr", "--v=0", "--dump-dom", page.as_uri()],
                          capture_output=True, text=True, timeout=60, check=False)
    assert "Example queries" in dump.stdout
    console = [line for line in dump.stderr.splitlines() if PAGE_CONSOLE.search(line)]
    assert not console, console
