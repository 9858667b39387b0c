"""Benchmark layouts: MSR-VTT 1k-A, MSVD and DiDeMo annotations parse into samples of real video files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from data_specs.benchmarks import BENCHMARKS, BenchmarkLayout, get_benchmark, list_benchmarks
from dualenc.benchmarks import iter_samples, load_benchmark
from engine.decode import Sampling, decode_video
from engine.synth import encode_h264


@pytest.fixture(scope="module")
def mp4() -> bytes:
    frames = np.random.default_rng(0).integers(0, 256, size=(4, 32, 32, 3), dtype=np.uint8)
    return encode_h264(frames, fps=4)


def _videos(folder, names, data=b"not decoded here"):
    folder.mkdir(exist_ok=True)
    for name in names:
        (folder / name).write_bytes(data if isinstance(data, bytes) else data(name))
    return folder


MSRVTT_CSV = """key,vid_key,video_id,sentence
ret0,msr7579,video7579,a girl wearing red top and black trousers is putting a sweater on a hanger
ret1,msr7725,video7725,"a man, in a suit, is talking"
ret2,msr9258,video9258,  a dog   runs on the beach
ret3,msr7000,video7000,a video with no file
"""


def _msrvtt(tmp_path, mp4, csv_text=MSRVTT_CSV):
    videos = _videos(tmp_path / "videos", ["video7579.mp4", "video7725.mp4", "video9258.webm"], mp4)
    ann = tmp_path / "MSRVTT_JSFUSION_test.csv"
    ann.write_text(csv_text)
    return videos, ann


def test_msrvtt_one_caption_per_video_in_csv_order_and_missing_listed(tmp_path, mp4):
    videos, ann = _msrvtt(tmp_path, mp4)
    bench = load_benchmark("msrvtt-1ka", videos, tmp_path)  # a directory holding the CSV works too
    assert bench.layout.captions == "first" and bench.layout.text_unit == "sentence"
    assert [k for k, _ in bench.videos] == ["video7579", "video7725", "video9258"]
    assert bench.videos[2][1] == videos / "video9258.webm"  # an alternative extension is found
    assert bench.texts == [
        ("video7579", "a girl wearing red top and black trousers is putting a sweater on a hanger"),
        ("video7725", "a man, in a suit, is talking"),
        ("video9258", "a dog runs on the beach"),
    ]
    assert bench.missing == ["video7000"]
    assert any("1 of 4 videos" in w and "not comparable" in w for w in bench.warnings)


def test_msrvtt_keeps_only_the_first_caption_of_a_video(tmp_path, mp4):
    videos, ann = _msrvtt(tmp_path, mp4, MSRVTT_CSV + "ret4,msr7579,video7579,a second caption\n")
    bench = load_benchmark("msrvtt-1ka", videos, ann)
    assert bench.captions_by_key()["video7579"] == [
        "a girl wearing red top and black trousers is putting a sweater on a hanger"]
    assert any("first caption" in w for w in bench.warnings)


def test_iter_samples_yields_the_file_bytes_as_decodable_videos(tmp_path, mp4):
    videos, ann = _msrvtt(tmp_path, mp4)
    samples = list(iter_samples(load_benchmark("msrvtt-1ka", videos, ann)))
    assert [s["__key__"] for s in samples] == ["video7579", "video7725", "video9258"]
    first, last = samples[0], samples[2]
    assert first["__url__"] == str(videos / "video7579.mp4") and first["mp4"] == mp4
    assert last["webm"] == (videos / "video9258.webm").read_bytes()
    assert json.loads(samples[1]["captions.json"]) == ["a man, in a suit, is talking"]
    assert samples[1]["txt"] == b"a man, in a suit, is talking"
    assert json.loads(first["json"]) == {"benchmark": "msrvtt-1ka", "video_id": "video7579"}
    frames = decode_video(first["mp4"], Sampling.uniform(2))
    assert frames.frames.shape == (2, 32, 32, 3)


def test_limit_keeps_the_first_videos_found(tmp_path, mp4):
    videos, ann = _msrvtt(tmp_path, mp4)
    bench = load_benchmark("msrvtt-1ka", videos, ann, limit=2)
    assert [k for k, _ in bench.videos] == ["video7579", "video7725"]
    assert [k for k, _ in bench.texts] == ["video7579", "video7725"]


def test_a_csv_without_the_sentence_column_names_the_file_and_column(tmp_path, mp4):
    videos, ann = _msrvtt(tmp_path, mp4, "key,vid_key,video_id,caption\nret0,msr7579,video7579,a girl\n")
    with pytest.raises(ValueError, match=r"MSRVTT_JSFUSION_test\.csv: line 1: missing column 'sentence'"):
        load_benchmark("msrvtt-1ka", videos, ann)


def test_an_empty_sentence_names_its_line(tmp_path, mp4):
    videos, ann = _msrvtt(tmp_path, mp4, MSRVTT_CSV.replace("a dog   runs on the beach", "  "))
    with pytest.raises(ValueError, match=r"MSRVTT_JSFUSION_test\.csv: line 4: empty sentence for video 'video9258'"):
        load_benchmark("msrvtt-1ka", videos, ann)


def test_no_video_found_names_the_directory_and_an_expected_path(tmp_path, mp4):
    _, ann = _msrvtt(tmp_path, mp4)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"found in .*empty.*expected .*empty/video7579\.mp4"):
        load_benchmark("msrvtt-1ka", empty, ann)


def test_an_unreadable_video_raises_an_oserror_naming_the_path(tmp_path, mp4):
    videos, ann = _msrvtt(tmp_path, mp4)
    bench = load_benchmark("msrvtt-1ka", videos, ann)
    (videos / "video7725.mp4").unlink()
    samples = iter_samples(bench)
    next(samples)
    with pytest.raises(FileNotFoundError, match="video7725.mp4"):
        next(samples)


MSVD_DESCRIPTIONS = """###################################################################
# Microsoft Research Video Description Corpus
###################################################################
-4wsuPCjDBc_5_15 a squirrel is eating a peanut in it's shell
-4wsuPCjDBc_5_15 a chipmunk is eating
train_clip_1_9 a man is cooking
-7KMZQEsJW4_205_208 a woman is slicing an onion

-4wsuPCjDBc_5_15 a squirrel eats
-7KMZQEsJW4_205_208 someone cuts an onion
ZbzDGXEwtGc_6_15 a cat plays the piano
"""


def _msvd(tmp_path, test_list="-4wsuPCjDBc_5_15\n-7KMZQEsJW4_205_208\nZbzDGXEwtGc_6_15\n"):
    videos = _videos(tmp_path / "YouTubeClips",
                     ["-4wsuPCjDBc_5_15.avi", "-7KMZQEsJW4_205_208.mp4", "train_clip_1_9.avi"])
    ann = tmp_path / "msvd"
    ann.mkdir()
    (ann / "AllVideoDescriptions.txt").write_text(MSVD_DESCRIPTIONS)
    if test_list is not None:
        (ann / "test_list.txt").write_text(test_list)
    return videos, ann


def test_msvd_keeps_every_caption_of_the_test_videos_and_skips_comments(tmp_path):
    videos, ann = _msvd(tmp_path)
    bench = load_benchmark("msvd", videos, ann)
    assert bench.layout.captions == "all"
    assert [k for k, _ in bench.videos] == ["-4wsuPCjDBc_5_15", "-7KMZQEsJW4_205_208"]
    assert bench.captions_by_key() == {
        "-4wsuPCjDBc_5_15": ["a squirrel is eating a peanut in it's shell", "a chipmunk is eating",
                             "a squirrel eats"],
        "-7KMZQEsJW4_205_208": ["a woman is slicing an onion", "someone cuts an onion"],
    }
    assert [k for k, _ in bench.texts] == ["-4wsuPCjDBc_5_15", "-4wsuPCjDBc_5_15", "-7KMZQEsJW4_205_208",
                                           "-4wsuPCjDBc_5_15", "-7KMZQEsJW4_205_208"]  # annotation order
    assert bench.missing == ["ZbzDGXEwtGc_6_15"]  # train_clip_1_9 is not in the test list
    samples = list(iter_samples(bench))
    assert [sorted(k for k in s if not k.startswith("__")) for s in samples] == [
        ["avi", "captions.json", "json", "txt"], ["captions.json", "json", "mp4", "txt"]]
    assert samples[0]["txt"].decode().splitlines()[1] == "a chipmunk is eating"


def test_msvd_without_a_test_list_uses_every_video_with_a_file_and_says_so(tmp_path):
    videos, ann = _msvd(tmp_path, test_list=None)
    bench = load_benchmark("msvd", videos, ann / "AllVideoDescriptions.txt")
    assert [k for k, _ in bench.videos] == ["-4wsuPCjDBc_5_15", "train_clip_1_9", "-7KMZQEsJW4_205_208"]
    assert any("no test_list.txt" in w for w in bench.warnings)


def test_msvd_test_ids_without_captions_name_the_split_line(tmp_path):
    videos, ann = _msvd(tmp_path, test_list="-4wsuPCjDBc_5_15\nnot_annotated_1_2\n")
    with pytest.raises(ValueError, match=r"test_list\.txt: 1 video ids .*line 2: 'not_annotated_1_2'"):
        load_benchmark("msvd", videos, ann)


def test_msvd_never_unpickles(tmp_path):
    videos, _ = _msvd(tmp_path)
    pkl_dir = tmp_path / "clip4clip"
    pkl_dir.mkdir()
    (pkl_dir / "raw-captions.pkl").write_bytes(b"\x80\x04 not to be loaded")
    with pytest.raises(FileNotFoundError, match="pickles are never loaded"):
        load_benchmark("msvd", videos, pkl_dir)
    with pytest.raises(ValueError, match="pickles are never loaded"):
        load_benchmark("msvd", videos, pkl_dir / "raw-captions.pkl")


DIDEMO = [
    {"video": "10015567@N08_3655084291_d8b58466fa.mov", "description": "a baby walks in.", "times": [[0, 0]]},
    {"video": "10015567@N08_3655084291_d8b58466fa_mov", "description": "the dog barks", "times": [[1, 1]]},
    {"video": "10015567@N08_3655084291_d8b58466fa.mov", "description": "she sits  down.", "times": [[2, 3]]},
    {"video": "10015567@N08_3655084291_d8b58466fa.mov", "description": "a baby walks in.", "times": [[0, 1]]},
    {"video": "22222222@N00_1111111111_abcdef0123.m4v", "description": "nobody has this", "times": [[0, 0]]},
    {"video": "33333333@N01_2222222222_0123abcdef.mp4", "description": "a car passes", "times": [[4, 4]]},
]


def test_didemo_joins_a_videos_sentences_into_one_paragraph_with_dot_free_unique_keys(tmp_path):
    videos = _videos(tmp_path / "videos", [
        "10015567@N08_3655084291_d8b58466fa.mp4",       # re-encoded: the .mov id is found as .mp4
        "10015567@N08_3655084291_d8b58466fa_mov.mp4",   # an id without extension, whose key would collide
        "33333333@N01_2222222222_0123abcdef.mp4",
    ], data=lambda name: name.encode())
    (tmp_path / "test_data.json").write_text(json.dumps(DIDEMO))
    bench = load_benchmark("didemo", videos, tmp_path / "test_data.json")
    assert bench.layout.text_unit == "paragraph" and bench.layout.captions == "first"
    keys = [k for k, _ in bench.videos]
    assert keys == ["10015567@N08_3655084291_d8b58466fa_mov", "10015567@N08_3655084291_d8b58466fa_mov_1",
                    "33333333@N01_2222222222_0123abcdef_mp4"]
    assert all("." not in k and "/" not in k for k in keys) and len(set(keys)) == len(keys)
    assert [bench.ids[k] for k in keys] == [
        "10015567@N08_3655084291_d8b58466fa.mov", "10015567@N08_3655084291_d8b58466fa_mov",
        "33333333@N01_2222222222_0123abcdef.mp4"]
    assert bench.texts == [(keys[0], "a baby walks in. she sits down."), (keys[1], "the dog barks"),
                           (keys[2], "a car passes")]
    assert bench.missing == ["22222222@N00_1111111111_abcdef0123.m4v"]
    samples = list(iter_samples(bench))
    assert samples[1]["mp4"] == b"10015567@N08_3655084291_d8b58466fa_mov.mp4"
    assert json.loads(samples[0]["json"])["video_id"] == "10015567@N08_3655084291_d8b58466fa.mov"


@pytest.mark.parametrize("text, reason", [
    ('[{"video": "a.mp4", "description": "x"', r"line 1 column \d+: bad JSON"),
    ('[{"video": "a.mp4", "description": "x"}, {"video": "b.mp4"}]', r"item 2 \(of 2\): missing field 'description'"),
    ('[{"video": "a.mp4", "description": " "}]', r"item 1 \(of 1\): empty description"),
])
def test_a_malformed_didemo_file_names_the_file_and_where(tmp_path, text, reason):
    videos = _videos(tmp_path / "videos", ["a.mp4"])
    (tmp_path / "test_data.json").write_text(text)
    with pytest.raises(ValueError, match=r"test_data\.json: " + reason):
        load_benchmark("didemo", videos, tmp_path)


def test_layouts_are_data_and_an_unknown_name_lists_the_valid_ones(tmp_path):
    assert list_benchmarks() == ["didemo", "msrvtt-1ka", "msvd"]
    for name, layout in BENCHMARKS.items():
        assert BenchmarkLayout.model_validate(layout.model_dump()) == layout and layout.name == name
    assert get_benchmark("msvd").video_pattern == "{video_id}.avi"
    for exc in (KeyError, ValueError):
        with pytest.raises(exc, match="unknown benchmark 'lsmdc'; valid: didemo, msrvtt-1ka, msvd"):
            get_benchmark("lsmdc")
    with pytest.raises(ValueError, match="valid: didemo"):
        load_benchmark("msrvtt", tmp_path, tmp_path)
