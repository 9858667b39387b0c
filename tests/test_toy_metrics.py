"""Toy-world caption metrics: the parser reads the grammar back, and each metric measures what it says."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from captioner.toy_metrics import (
    ALIGNMENTS, DIRECTIONAL_AXES, ParsedEvent, align_events, format_caption, normalise, parse_caption, score,
    score_by_axis, score_static, static_objects,
)
from data_specs.toyworld import ACTIONS, AXIS, COLOURS, INVERSE, SHAPES
from engine.synth import SynthConfig, reverse_clip, sample_clip, static_caption

METRICS = ("object", "colour", "action", "to_colour", "direction_within_axis", "event_order", "exact", "parse_rate")


@pytest.fixture(scope="module")
def clips():
    cfg = SynthConfig(split="test", n=1)
    return [sample_clip(cfg, i) for i in range(200)]


def clip_events(clip) -> list[ParsedEvent]:
    shapes = {o.id: o.shape for o in clip.objects}
    return [ParsedEvent(e.colour, shapes[e.object_id], e.action, e.to_colour)
            for e in sorted(clip.events, key=lambda e: e.start)]


# --------------------------------------------------------------------------- parser

def test_round_trip_of_generated_captions(clips):
    assert {len(c.events) for c in clips} == {1, 2}
    for clip in clips:
        events = clip_events(clip)
        assert parse_caption(clip.caption) == events, clip.caption
        assert format_caption(events) == clip.caption


def test_every_word_of_the_grammar_parses():
    colours = list(COLOURS)
    for colour, shape, action in itertools.product(colours, SHAPES, ACTIONS):
        to = next(c for c in colours if c != colour) if action == "recolour" else None
        event = ParsedEvent(colour, shape, action, to)
        assert parse_caption(format_caption([event])) == [event]
    pair = [ParsedEvent("red", "circle", "move_up"), ParsedEvent("blue", "triangle", "recolour", "yellow")]
    assert parse_caption(format_caption(pair)) == pair


@pytest.mark.parametrize("text", [
    "The Red Circle Moves Left.",
    "  the red   circle moves left  .  ",
    "the red circle moves left",
    "THE RED CIRCLE MOVES LEFT",
    "the red circle\tmoves\nleft.",
])
def test_parser_tolerates_case_whitespace_and_a_missing_period(text):
    assert parse_caption(text) == [ParsedEvent("red", "circle", "move_left")]


def test_parser_tolerates_whitespace_around_the_separator():
    want = [ParsedEvent("green", "square", "disappear"), ParsedEvent("blue", "square", "recolour", "red")]
    for text in ("the green square disappears, then the blue square turns red.",
                 "the green square disappears , then the blue square turns red",
                 "the green square disappears,then  the blue square turns red."):
        assert parse_caption(text) == want


@pytest.mark.parametrize("text", [
    "", "   ", ".", "a red circle moves left.", "the red circle moves left. it was fun.", "the purple circle grows.",
    "the red hexagon grows.", "the red circle jumps.", "the red square turns purple.", "the red square turns.",
    "the red circle moves left, then", "the red circle moves left and the blue square grows.",
    "the red circle moves left..", "red circle moves left.", "the red circle moves sideways.",
    "<|im_end|>", "the the red circle grows.",
])
def test_text_outside_the_grammar_is_unparseable(text):
    assert parse_caption(text) is None


def test_non_text_is_unparseable():
    assert parse_caption(None) is None  # type: ignore[arg-type]


def test_normalise():
    assert normalise("  The Red circle  moves left . ") == "the red circle moves left"
    assert normalise("the red circle moves left") == normalise("the red circle moves left.")


# --------------------------------------------------------------------------- score

def test_perfect_predictions_score_one_everywhere(clips):
    refs = [c.caption for c in clips]
    for align in ALIGNMENTS:
        s = score(refs, refs, align=align)
        for m in METRICS:
            assert s[m] == 1.0, (align, m)
        assert s["n"] == 200 and s["n_parsed"] == 200
        assert s["n_events"] == sum(len(c.events) for c in clips)
        assert s["n_order"] == sum(len(c.events) == 2 for c in clips) > 0
        assert 0 < s["n_direction"] < s["n_events"]
        assert s["n_to_colour"] == sum(e.action == "recolour" for c in clips for e in c.events) > 0


def test_time_reversed_predictions_keep_objects_but_lose_direction_and_order(clips):
    refs = [c.caption for c in clips]
    rev = [reverse_clip(c).caption for c in clips]
    one = [i for i, c in enumerate(clips) if len(c.events) == 1]
    two = [i for i, c in enumerate(clips) if len(c.events) == 2]

    s1 = score([rev[i] for i in one], [refs[i] for i in one])  # one event: both alignments agree
    assert s1 == score([rev[i] for i in one], [refs[i] for i in one], align="object")
    assert s1["object"] == 1.0
    assert s1["colour"] > 0.8  # only recolour events name the other colour when reversed
    assert s1["direction_within_axis"] == 0.0 and s1["n_direction"] > 50
    assert s1["action"] < 0.3  # what is left: rotations (which read the same backwards)
    assert s1["parse_rate"] == 1.0

    s2 = score([rev[i] for i in two], [refs[i] for i in two])
    assert s2["event_order"] == 0.0 and s2["n_order"] == len(two) > 10

    s_all = score(rev, refs, align="object")
    assert s_all["object"] == 1.0 and s_all["colour"] > 0.8
    assert s_all["direction_within_axis"] == 0.0 and s_all["event_order"] == 0.0
    assert s_all["n_direction"] == score(refs, refs)["n_direction"]


def test_position_alignment_scores_swapped_events_against_the_other_object():
    ref = ["the red circle appears, then the blue square disappears."]
    swapped = ["the blue square appears, then the red circle disappears."]  # the time-reversed caption
    by_pos = score(swapped, ref)
    assert by_pos["object"] == 0.0 and by_pos["colour"] == 0.0
    assert by_pos["direction_within_axis"] == 1.0  # appear vs appear: right by accident
    by_obj = score(swapped, ref, align="object")
    assert by_obj["object"] == 1.0 and by_obj["colour"] == 1.0
    assert by_obj["direction_within_axis"] == 0.0 and by_obj["n_direction"] == 2
    assert by_pos["event_order"] == by_obj["event_order"] == 0.0


def test_garbage_text_fails_to_parse_and_scores_zero(clips):
    refs = [c.caption for c in clips]
    garbage = ["", "lorem ipsum", "<|endoftext|><|endoftext|>", "the the the", "red circle left"] * 40
    for align in ALIGNMENTS:
        s = score(garbage, refs, align=align)
        assert s["parse_rate"] == 0.0 and s["n_parsed"] == 0
        for m in ("object", "colour", "action", "event_order", "exact"):
            assert s[m] == 0.0, m
        # no predicted event to compare with: no denominator
        assert s["direction_within_axis"] is None and s["n_direction"] == 0
        assert s["to_colour"] is None


def test_missing_and_extra_predicted_events():
    ref = ["the red circle moves left, then the blue square grows."]
    short = score(["the red circle moves left."], ref)
    assert short["object"] == short["colour"] == short["action"] == 0.5
    assert short["event_order"] == 0.0 and short["parse_rate"] == 1.0
    extra = score(["the red circle moves left, then the blue square grows, then the green circle rotates."], ref)
    assert extra["object"] == extra["action"] == extra["event_order"] == 1.0
    assert extra["exact"] == 0.0


def test_order_is_a_subsequence_check():
    ref = ["the red circle moves left, then the blue square grows."]
    assert score(["the red circle moves left, then the green triangle rotates, then the blue square grows."],
                 ref)["event_order"] == 1.0
    assert score(["the red circle moves right, then the blue square grows."], ref)["event_order"] == 0.0


def test_attributes_are_scored_separately():
    ref = ["the red square turns green."]
    s = score(["the red circle turns blue."], ref)
    assert (s["object"], s["colour"], s["action"], s["to_colour"]) == (0.0, 1.0, 1.0, 0.0)
    assert s["direction_within_axis"] is None  # colour is not a two-direction axis
    s = score(["the yellow square shrinks."], ["the yellow square grows."])
    assert (s["object"], s["colour"], s["action"], s["direction_within_axis"]) == (1.0, 1.0, 0.0, 0.0)
    s = score(["the yellow square moves up."], ["the yellow square grows."])  # other axis: not a direction error
    assert s["direction_within_axis"] is None and s["action"] == 0.0
    s = score(["The Yellow Square grows"], ["the yellow square grows."])
    assert s["exact"] == 1.0


def test_random_direction_predictor_is_at_chance(clips):
    rng = np.random.default_rng(0)
    refs = [c.caption for c in clips]
    preds = []
    for clip in clips:
        events = [e._replace(action=INVERSE[e.action])
                  if AXIS[e.action] in DIRECTIONAL_AXES and rng.random() < 0.5 else e
                  for e in clip_events(clip)]
        preds.append(format_caption(events))
    s = score(preds, refs)
    assert 0.4 <= s["direction_within_axis"] <= 0.6
    assert s["n_direction"] == score(refs, refs)["n_direction"]
    assert s["object"] == s["colour"] == 1.0


def test_directional_axes_are_the_two_way_ones():
    assert set(DIRECTIONAL_AXES) == {"horizontal", "vertical", "size", "visibility"}


def test_score_by_axis(clips):
    refs = [c.caption for c in clips]
    rev = [reverse_clip(c).caption for c in clips]
    perfect = score_by_axis(refs, refs)
    assert set(perfect) == set(AXIS.values())
    assert sum(a["n_events"] for a in perfect.values()) == score(refs, refs)["n_events"]
    by_axis = score_by_axis(rev, refs, align="object")
    for axis in DIRECTIONAL_AXES:
        assert by_axis[axis]["direction_within_axis"] == 0.0
        assert perfect[axis]["direction_within_axis"] == 1.0
    assert by_axis["rotation"]["direction_within_axis"] is None
    assert by_axis["rotation"]["action"] == 1.0
    assert by_axis["rotation"]["said_instead"] == {} and perfect["horizontal"]["said_instead"] == {}


def test_score_by_action_says_what_was_said_instead(clips):
    refs = [c.caption for c in clips]
    rev = [reverse_clip(c).caption for c in clips]
    by_action = score_by_axis(rev, refs, align="object", by="action")
    assert set(by_action) == {e.action for c in clips for e in c.events}
    for action, a in by_action.items():
        if INVERSE[action] != action:  # played backwards, every such event is said as its inverse
            assert a["action"] == 0.0 and a["said_instead"] == {INVERSE[action]: a["n_events"]}
    dropped = score_by_axis(["the red circle rotates."] * len(refs), refs, by="action")
    assert all(sum(a["said_instead"].values()) == a["n_events"] - round(a["action"] * a["n_events"])
               for a in dropped.values())
    assert sum(a["said_instead"].get(None, 0) for a in dropped.values()) == sum(
        max(0, len(c.events) - 1) for c in clips)  # a second reference event has no aligned prediction
    with pytest.raises(ValueError, match="grouping"):
        score_by_axis(refs, refs, by="colour")


def test_align_events():
    a, b = ParsedEvent("red", "circle", "grow"), ParsedEvent("blue", "square", "rotate")
    assert align_events([a, b], [b, a]) == [b, a]
    assert align_events([a, b], [b, a], align="object") == [a, b]
    assert align_events([a, b], [a]) == [a, None]
    recoloured = ParsedEvent("green", "circle", "recolour", "red")  # the same object, named by its other colour
    assert align_events([a], [b, recoloured], align="object") == [recoloured]
    with pytest.raises(ValueError, match="alignment"):
        align_events([a], [a], align="time")


def test_bad_arguments():
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        score(["x", "y"], ["the red circle grows."])
    with pytest.raises(ValueError, match="reference 0 is not in the toy grammar"):
        score(["the red circle grows."], ["a red circle left of a blue square."])
    with pytest.raises(ValueError, match="alignment"):
        score([], [], align="time")
    empty = score([], [])
    assert empty["n"] == 0 and empty["object"] is None and empty["exact"] is None


# --------------------------------------------------------------------------- frame captions

@pytest.fixture(scope="module")
def frames():
    cfg = SynthConfig(split="pretrain", n=1)
    return [sample_clip(cfg, i) for i in range(200)]


def test_static_objects_read_every_object_of_a_frame_caption(frames):
    for clip in frames:
        assert static_objects(static_caption(clip)) == [(clip.tracks[str(o.id)][0].colour, o.shape)
                                                        for o in clip.objects]


def test_frame_caption_scores_count_shapes_by_colour_and_ignore_object_order(frames):
    refs = [static_caption(c) for c in frames]
    perfect = score_static(refs, refs)
    assert perfect == {"shape": 1.0, "colour": 1.0, "object_set": 1.0, "exact": 1.0, "n": 200,
                       "n_objects": sum(len(c.objects) for c in frames)}
    # the same objects named in another order: the set is right, the text is not
    multi = [c for c in frames if len(c.objects) >= 2]
    assert multi
    swapped = [" and ".join(f"a {col} {shape}" for col, shape in reversed(static_objects(static_caption(c)))) + "."
               for c in multi]
    s = score_static(swapped, [static_caption(c) for c in multi])
    assert s["shape"] == s["colour"] == s["object_set"] == 1.0 and s["exact"] == 0.0
    # every first object given the next shape: its shape is wrong, its colour still named
    wrong = []
    for ref in refs:
        (col, shape), *rest = static_objects(ref)
        other = SHAPES[(SHAPES.index(shape) + 1) % len(SHAPES)]
        wrong.append(ref.replace(f"a {col} {shape}", f"a {col} {other}", 1))
    s = score_static(wrong, refs)
    n_obj = perfect["n_objects"]
    assert s["shape"] == pytest.approx((n_obj - 200) / n_obj) and s["colour"] == 1.0
    assert s["object_set"] == s["exact"] == 0.0
    # text outside the grammar names nothing
    assert score_static(["no idea"] * 200, refs)["colour"] == 0.0


def test_frame_caption_scores_refuse_a_reference_without_objects():
    with pytest.raises(ValueError, match="reference 0 names no object"):
        score_static(["a red circle."], ["the red circle moves left."])


def test_score_by_event_count_scores_one_and_two_event_clips_apart():
    from captioner.toy_metrics import score_by_event_count

    refs = ["the red circle moves left.", "the blue square grows, then the red circle appears.",
            "the green triangle rotates."]
    preds = ["the red circle moves left.", "the blue square grows.", "the green triangle shrinks."]
    groups = score_by_event_count(preds, refs)
    assert list(groups) == ["1_event", "2_event"]
    assert groups["1_event"]["clips"] == 2 and groups["1_event"]["action"] == 0.5
    assert groups["2_event"]["clips"] == 1 and groups["2_event"]["action"] == 0.5  # the second event unsaid
    assert groups["2_event"]["exact"] == 0.0
    with pytest.raises(ValueError, match="2 predictions but 3 references"):
        score_by_event_count(preds[:2], refs)
    with pytest.raises(ValueError, match="reference 1 is not in the toy grammar"):
        score_by_event_count(preds[:2], refs[:1] + ["a red circle."])


def test_two_event_misses_say_whether_the_object_the_action_or_the_order_went_wrong():
    from captioner.toy_metrics import two_event_misses

    ref = "the blue square grows, then the red circle appears."
    preds = [ref, "the red circle appears, then the blue square grows.", "the blue square grows.",
             "the blue triangle grows, then the red circle disappears.", "a blue square, please.",
             "the blue square grows, then the red circle turns green."]
    assert two_event_misses(preds + ["x"], [ref] * 6 + ["the green triangle rotates."]) == {
        "exact": 1, "order swapped": 1, "said 1 event(s)": 1, "event 1: object": 1, "event 2: action": 2,
        "unparsed": 1, "event 1: right": 1}
