"""Caption accuracy per attribute on the toy world: object, colour, action, direction and event order.

A toy-world caption is one or more events joined by ", then " and ended by a
period, each event being "the {colour} {shape} {verb}" with the verb taken from
`data_specs.toyworld.VERBS` (e.g. "the red circle moves left, then the blue
square turns green."). `parse_caption` reads such text back into
`ParsedEvent`s; `score` compares predicted captions with reference captions
attribute by attribute, so that a model that names the right objects but
ignores frame order (and so gets directions and order wrong) is told apart from
one that gets everything wrong. The parser is built from the grammar constants
(`COLOURS`, `SHAPES`, `VERBS`), so it follows the grammar if that changes.

    score(["the red circle moves right."], ["the red circle moves left."])
    # object 1.0, colour 1.0, action 0.0, direction_within_axis 0.0, exact 0.0, ...
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence
from typing import NamedTuple

from data_specs.toyworld import AXIS, COLOURS, SHAPES, VERBS


class ParsedEvent(NamedTuple):
    """One event of a caption, as the grammar says it.

    Attributes:
        colour: the object's colour when the event starts (the colour the caption names).
        shape: one of `SHAPES`.
        action: one of `ACTIONS` (e.g. 'move_left', 'recolour').
        to_colour: the colour it turns into (recolour only), else None.
    """

    colour: str
    shape: str
    action: str
    to_colour: str | None = None


DIRECTIONAL_AXES: tuple[str, ...] = tuple(
    sorted(axis for axis in set(AXIS.values()) if sum(ax == axis for ax in AXIS.values()) == 2))
"""Axes with exactly two directions (horizontal, vertical, size, visibility): where direction is a question."""

EVENT_SEPARATOR = ", then "
"""What joins the events of a caption (as `engine.synth.caption` writes it)."""


def _alternation(words: Sequence[str]) -> str:
    return "(?:" + "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True)) + ")"


def _words(literal: str) -> str:
    """A literal with every run of spaces matching any whitespace."""
    return r"\s+".join(re.escape(part) for part in literal.split(" "))


def _build_phrase_regex() -> tuple[re.Pattern[str], list[str]]:
    """One regex for one event phrase; named group ``a{i}`` marks action i, ``t{i}`` its to_colour."""
    colour = _alternation(list(COLOURS))
    actions = list(VERBS)
    verbs = []
    for i, action in enumerate(actions):
        parts = []
        for literal, field, _spec, _conv in string.Formatter().parse(VERBS[action]):
            parts.append(_words(literal))
            if field is None:
                continue
            if field != "to_colour":
                raise ValueError(f"VERBS[{action!r}] has a placeholder {{{field}}} the parser does not know")
            parts.append(f"(?P<t{i}>{colour})")
        verbs.append(f"(?P<a{i}>{''.join(parts)})")
    pattern = (rf"the\s+(?P<colour>{colour})\s+(?P<shape>{_alternation(SHAPES)})\s+"
               rf"(?:{'|'.join(verbs)})")
    return re.compile(pattern), actions


_PHRASE, _PHRASE_ACTIONS = _build_phrase_regex()
_SEPARATOR = re.compile(r"\s*" + r"\s*".join(re.escape(w) for w in EVENT_SEPARATOR.split()) + r"\s+")


def normalise(text: str) -> str:
    """Lower case, single spaces, no surrounding whitespace, no final period (what `exact` compares)."""
    text = " ".join(text.lower().split())
    if text.endswith("."):
        text = text[:-1].rstrip()
    text = re.sub(r"\s+,", ",", text)
    return text


def parse_caption(text: str) -> list[ParsedEvent] | None:
    """Parses a caption of the toy grammar into its events, in the order the caption names them.

    Tolerant of case, extra whitespace (also around the comma) and a missing final period;
    anything else outside the grammar (an unknown word, a missing "the", a trailing remark,
    an empty string) makes the whole caption unparseable.

    Args:
        text: the caption, e.g. "The red circle moves left, then the blue square appears."

    Returns:
        The events in caption order, or None when the text is not in the grammar.
    """
    if not isinstance(text, str):
        return None
    norm = normalise(text)
    if not norm:
        return None
    events = []
    for phrase in _SEPARATOR.split(norm):
        m = _PHRASE.fullmatch(phrase.strip())
        if m is None:
            return None
        i = next(int(k[1:]) for k, v in m.groupdict().items() if k.startswith("a") and v is not None)
        events.append(ParsedEvent(m["colour"], m["shape"], _PHRASE_ACTIONS[i], m.groupdict().get(f"t{i}")))
    return events


def format_caption(events: Sequence[ParsedEvent]) -> str:
    """The caption the grammar writes for these events (the inverse of `parse_caption`).

    Raises:
        KeyError: an unknown action.
    """
    return EVENT_SEPARATOR.join(f"the {e.colour} {e.shape} {VERBS[e.action].format(to_colour=e.to_colour)}"
                                for e in events) + "."


ALIGNMENTS = ("position", "object")
"""How `score` pairs predicted events with reference events."""


def align_events(ref: Sequence[ParsedEvent], pred: Sequence[ParsedEvent],
                 align: str = "position") -> list[ParsedEvent | None]:
    """The predicted event compared with each reference event (None: missing).

    Args:
        ref: the reference's events.
        pred: the prediction's events (empty when it did not parse).
        align: 'position': reference event j meets predicted event j. 'object': reference event j
            meets the first unused predicted event about the same object (same shape, and the
            colours it shows, ``{colour, to_colour}``, overlap), else the unused predicted event
            at position j, else none. 'object' keeps a prediction with the right events in the
            wrong order from scoring its events against another object's.

    Raises:
        ValueError: an unknown ``align``.
    """
    if align == "position":
        return [pred[j] if j < len(pred) else None for j in range(len(ref))]
    if align != "object":
        raise ValueError(f"unknown alignment {align!r}; valid: {', '.join(ALIGNMENTS)}")
    used: set[int] = set()
    out: list[ParsedEvent | None] = []
    for j, r in enumerate(ref):
        shown = {r.colour, r.to_colour} - {None}
        pick = next((i for i, p in enumerate(pred) if i not in used and p.shape == r.shape
                     and shown & ({p.colour, p.to_colour} - {None})), None)
        if pick is None and j < len(pred) and j not in used:
            pick = j
        if pick is not None:
            used.add(pick)
        out.append(None if pick is None else pred[pick])
    return out


def _ratio(hits: int, total: int) -> float | None:
    return hits / total if total else None


def score(predictions: list[str], references: list[str], align: str = "position") -> dict:
    """Caption accuracy per attribute over clips (predictions[i] describes the clip of references[i]).

    Events are aligned by position (the default): reference event j is compared with the j-th
    event of the parsed prediction. A prediction that does not parse, or has fewer events,
    counts as missing that event; extra predicted events are not penalised (except by `exact`).
    With ``align="object"`` each reference event is compared with the predicted event about
    the same object instead (see `align_events`); ``event_order`` and ``exact`` do not depend
    on the alignment. By position, a two-event prediction in the wrong order is scored against
    the other object's event: its colour is then wrong, and its direction is right or wrong by
    accident (time-reversed captions of two-event clips score well above chance on
    ``direction_within_axis`` that way); by object, they are not.

    Definitions (each value is None when its denominator is 0):

    - ``object``: share of reference events whose aligned predicted event has the same shape.
      Denominator ``n_events`` (all reference events); a missing predicted event is wrong.
    - ``colour``: the same for the colour the caption names (the object's colour when the event
      starts). Denominator ``n_events``.
    - ``action``: the same for the action (e.g. 'move_left'; recolour's target colour is not
      compared here, see ``to_colour``). Denominator ``n_events``.
    - ``to_colour``: over reference recolour events whose aligned prediction is a recolour: the
      same target colour. Denominator ``n_to_colour``.
    - ``direction_within_axis``: over reference events on an axis with two directions
      (`DIRECTIONAL_AXES`: horizontal, vertical, size, visibility) whose aligned predicted event
      is on the same `AXIS`: the same action, i.e. the right direction given the right axis.
      Rotation and colour are excluded (one action each). Denominator ``n_direction``; chance is 0.5.
    - ``event_order``: over references with two (or more) events: every reference event's
      (colour, shape, action) occurs in the prediction, in the reference's order (the reference
      is a subsequence of the prediction). Denominator ``n_order``.
    - ``exact``: the normalised texts (`normalise`: case, whitespace, final period) are equal.
      Denominator ``n``.
    - ``parse_rate``: share of predictions that `parse_caption` parses. Denominator ``n``.

    Args:
        predictions: predicted captions, one per clip.
        references: ground-truth captions (toy grammar), one per clip, same order.
        align: 'position' or 'object' (see `align_events`).

    Returns:
        The metrics above plus their denominators ``n``, ``n_events``, ``n_direction``,
        ``n_order``, ``n_to_colour``, and ``n_parsed``.

    Raises:
        ValueError: the lists differ in length, a reference is not in the toy grammar, or an
            unknown ``align``.
    """
    if align not in ALIGNMENTS:
        raise ValueError(f"unknown alignment {align!r}; valid: {', '.join(ALIGNMENTS)}")
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    c = dict.fromkeys(("object", "colour", "action", "to_colour", "direction", "order", "exact", "parsed"), 0)
    n_events = n_direction = n_order = n_to_colour = 0
    for k, (pred_text, ref_text) in enumerate(zip(predictions, references)):
        ref = parse_caption(ref_text)
        if ref is None:
            raise ValueError(f"reference {k} is not in the toy grammar: {ref_text!r}")
        pred = parse_caption(pred_text)
        c["parsed"] += pred is not None
        c["exact"] += isinstance(pred_text, str) and normalise(pred_text) == normalise(ref_text)
        pred = pred or []
        for r, p in zip(ref, align_events(ref, pred, align)):
            n_events += 1
            if p is None:
                continue
            c["object"] += p.shape == r.shape
            c["colour"] += p.colour == r.colour
            c["action"] += p.action == r.action
            if r.action == "recolour" and p.action == "recolour":
                n_to_colour += 1
                c["to_colour"] += p.to_colour == r.to_colour
            if AXIS[r.action] in DIRECTIONAL_AXES and AXIS[p.action] == AXIS[r.action]:
                n_direction += 1
                c["direction"] += p.action == r.action
        if len(ref) >= 2:
            n_order += 1
            c["order"] += _is_subsequence([e[:3] for e in ref], [e[:3] for e in pred])
    n = len(references)
    return {
        "object": _ratio(c["object"], n_events),
        "colour": _ratio(c["colour"], n_events),
        "action": _ratio(c["action"], n_events),
        "to_colour": _ratio(c["to_colour"], n_to_colour),
        "direction_within_axis": _ratio(c["direction"], n_direction),
        "event_order": _ratio(c["order"], n_order),
        "exact": _ratio(c["exact"], n),
        "parse_rate": _ratio(c["parsed"], n),
        "n": n, "n_events": n_events, "n_direction": n_direction, "n_order": n_order,
        "n_to_colour": n_to_colour, "n_parsed": c["parsed"],
    }


def score_by_event_count(predictions: list[str], references: list[str]) -> dict[str, dict]:
    """`score` apart for the clips whose reference has one event, two events, ...

    Returns:
        ``{"1_event": {**metrics, "clips": n}, "2_event": {...}}`` for the counts present.

    Raises:
        ValueError: as `score` (lengths differ, a reference outside the grammar).
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    groups: dict[str, tuple[list[str], list[str]]] = {}
    for k, (pred, ref) in enumerate(zip(predictions, references)):
        events = parse_caption(ref)
        if events is None:
            raise ValueError(f"reference {k} is not in the toy grammar: {ref!r}")
        g = groups.setdefault(f"{len(events)}_event", ([], []))
        g[0].append(pred)
        g[1].append(ref)
    return {name: {**score(*g), "clips": len(g[0])} for name, g in sorted(groups.items())}


def two_event_misses(predictions: list[str], references: list[str]) -> dict[str, int]:
    """What went wrong in the captions of two-event clips: clips by kind of miss, most frequent first.

    Per two-event reference: 'exact'; 'unparsed' or 'said N event(s)' when the caption does not give two
    events; 'order swapped' when it gives both events the other way round; else, for each event k
    (aligned by position), 'event k: right', 'event k: object' (shape or colour wrong, action right),
    'event k: action', 'event k: object and action' (another object's event, or none that happened) or
    'event k: recolour target'.
    One-event references are left out.
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    out: Counter = Counter()
    for pred_text, ref_text in zip(predictions, references):
        ref = parse_caption(ref_text)
        if ref is None or len(ref) != 2:
            continue
        pred = parse_caption(pred_text)
        if pred is None:
            out["unparsed"] += 1
        elif len(pred) != 2:
            out[f"said {len(pred)} event(s)"] += 1
        elif pred == ref:
            out["exact"] += 1
        elif pred[::-1] == ref:
            out["order swapped"] += 1
        else:
            for k, (p, r) in enumerate(zip(pred, ref), 1):
                obj, act = (p.colour, p.shape) != (r.colour, r.shape), p.action != r.action
                out[f"event {k}: " + ("object and action" if obj and act else "object" if obj else "action" if act
                                       else "recolour target" if p != r else "right")] += 1
    return dict(out.most_common())


def score_by_axis(predictions: list[str], references: list[str], align: str = "position",
                  by: str = "axis") -> dict[str, dict]:
    """Event-level accuracy split by the `AXIS` of each reference event, or by its action (aligned as in `score`).

    Args:
        by: 'axis' (left/right together, ...) or 'action' (each of `ACTIONS` apart).

    Returns:
        group name -> {"object", "colour", "action", "direction_within_axis", "n_events", "n_direction",
        "said_instead"} with the definitions of `score`, over the reference events of that group (groups
        without reference events are left out; ``direction_within_axis`` is None outside
        `DIRECTIONAL_AXES`). ``said_instead``: for the events whose action was missed, the action the
        prediction gave (None: no aligned event) -> count, most frequent first.

    Raises:
        ValueError: as `score`, or an unknown ``by``.
    """
    if align not in ALIGNMENTS:
        raise ValueError(f"unknown alignment {align!r}; valid: {', '.join(ALIGNMENTS)}")
    if by not in ("axis", "action"):
        raise ValueError(f"unknown grouping {by!r}; valid: axis, action")
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    acc: dict[str, dict] = {}
    for k, (pred_text, ref_text) in enumerate(zip(predictions, references)):
        ref = parse_caption(ref_text)
        if ref is None:
            raise ValueError(f"reference {k} is not in the toy grammar: {ref_text!r}")
        pred = parse_caption(pred_text) or []
        for r, p in zip(ref, align_events(ref, pred, align)):
            a = acc.setdefault(AXIS[r.action] if by == "axis" else r.action, {
                **dict.fromkeys(("object", "colour", "action", "direction", "n_events", "n_direction"), 0),
                "said_instead": Counter()})
            a["n_events"] += 1
            if p is None or p.action != r.action:
                a["said_instead"][p.action if p is not None else None] += 1
            if p is None:
                continue
            a["object"] += p.shape == r.shape
            a["colour"] += p.colour == r.colour
            a["action"] += p.action == r.action
            if AXIS[r.action] in DIRECTIONAL_AXES and AXIS[p.action] == AXIS[r.action]:
                a["n_direction"] += 1
                a["direction"] += p.action == r.action
    return {group: {"object": _ratio(a["object"], a["n_events"]), "colour": _ratio(a["colour"], a["n_events"]),
                    "action": _ratio(a["action"], a["n_events"]),
                    "direction_within_axis": _ratio(a["direction"], a["n_direction"]),
                    "n_events": a["n_events"], "n_direction": a["n_direction"],
                    "said_instead": dict(a["said_instead"].most_common())}
            for group, a in sorted(acc.items())}


_STATIC_OBJECT = re.compile(rf"\ba\s+(?P<colour>{_alternation(list(COLOURS))})\s+(?P<shape>{_alternation(SHAPES)})\b")


def static_objects(text: str) -> list[tuple[str, str]]:
    """The (colour, shape) pairs a frame caption names ("a red circle left of a blue square." -> two), in order."""
    if not isinstance(text, str):
        return []
    return [(m["colour"], m["shape"]) for m in _STATIC_OBJECT.finditer(" ".join(text.lower().split()))]


def score_static(predictions: list[str], references: list[str]) -> dict:
    """Accuracy of frame captions (`engine.synth.static_caption`: "a red circle left of a blue square.").

    What the base image model must get right before it ever sees a video: which shapes are in the frame.
    A frame's objects have distinct colours, so a reference object is found by its colour.

    - ``shape``: share of reference objects that the prediction names with their colour and the right shape.
      Denominator ``n_objects``.
    - ``colour``: share of reference objects whose colour the prediction names. Denominator ``n_objects``.
    - ``object_set``: the prediction names exactly the reference's (colour, shape) pairs, in any order.
      Denominator ``n``.
    - ``exact``: the normalised texts are equal (`normalise`). Denominator ``n``.

    Raises:
        ValueError: the lists differ in length, or a reference names no object.
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    shape = colour = same_set = exact = n_objects = 0
    for k, (pred_text, ref_text) in enumerate(zip(predictions, references)):
        ref = static_objects(ref_text)
        if not ref:
            raise ValueError(f"reference {k} names no object of the toy grammar: {ref_text!r}")
        pred = static_objects(pred_text)
        named = dict(reversed(pred))  # colour -> the first shape the prediction gives it
        n_objects += len(ref)
        shape += sum(named.get(c) == s for c, s in ref)
        colour += sum(c in named for c, _ in ref)
        same_set += sorted(pred) == sorted(ref)
        exact += isinstance(pred_text, str) and normalise(pred_text) == normalise(ref_text)
    n = len(references)
    return {"shape": _ratio(shape, n_objects), "colour": _ratio(colour, n_objects),
            "object_set": _ratio(same_set, n), "exact": _ratio(exact, n), "n": n, "n_objects": n_objects}


def _is_subsequence(needle: list, haystack: list) -> bool:
    it = iter(haystack)
    return all(any(x == y for y in it) for x in needle)
