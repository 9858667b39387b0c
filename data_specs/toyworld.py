"""The toy world's grammar and scene graph: what exists, what can happen, and how it is said.

The renderer lives in `engine.synth`; this module is the contract its `json`
member follows, and the vocabulary every caption of the world is built from.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from data_specs.base import Spec

COLOURS: dict[str, tuple[int, int, int]] = {
    # far apart in YUV as well as RGB, so 4:2:0 chroma keeps them distinct
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 80, 230),
    "yellow": (235, 215, 40),
}
BACKGROUND: tuple[int, int, int] = (70, 70, 70)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")

Action = Literal[
    "move_left", "move_right", "move_up", "move_down",
    "grow", "shrink", "rotate", "appear", "disappear", "recolour",
]
ACTIONS: tuple[str, ...] = Action.__args__  # type: ignore[attr-defined]

INVERSE: dict[str, str] = {
    "move_left": "move_right", "move_right": "move_left",
    "move_up": "move_down", "move_down": "move_up",
    "grow": "shrink", "shrink": "grow",
    "rotate": "rotate",
    "appear": "disappear", "disappear": "appear",
    "recolour": "recolour",
}
"""What an action looks like played backwards."""

AXIS: dict[str, str] = {
    "move_left": "horizontal", "move_right": "horizontal",
    "move_up": "vertical", "move_down": "vertical",
    "grow": "size", "shrink": "size",
    "rotate": "rotation",
    "appear": "visibility", "disappear": "visibility",
    "recolour": "colour",
}
"""The axis an action moves along; direction-within-axis accuracy compares actions on one axis."""

VERBS: dict[str, str] = {
    "move_left": "moves left", "move_right": "moves right",
    "move_up": "moves up", "move_down": "moves down",
    "grow": "grows", "shrink": "shrinks", "rotate": "rotates",
    "appear": "appears", "disappear": "disappears", "recolour": "turns {to_colour}",
}

ROTATION_SAFE_SHAPES = ("square", "triangle")  # a rotating circle looks like a still one

HELD_OUT: tuple[tuple[str, str, str], ...] = (
    # (colour, shape, axis) combinations seen only in the `compositional` split.
    # Every colour, shape and axis still occurs elsewhere: only the combination is new.
    ("red", "circle", "horizontal"),
    ("blue", "square", "size"),
    ("green", "triangle", "vertical"),
    ("yellow", "circle", "visibility"),
    ("red", "triangle", "size"),
    ("blue", "circle", "vertical"),
    ("green", "square", "horizontal"),
    ("yellow", "triangle", "horizontal"),
    ("green", "circle", "colour"),
    ("yellow", "square", "rotation"),
)

SPLITS = ("pretrain", "adapt", "pool", "test", "compositional")
SPLIT_IDS = {name: i for i, name in enumerate(SPLITS)}  # mixed into the seed: splits never share clips


class ObjectState(Spec):
    """One object in one frame. Coordinates are pixels, origin top-left."""

    x: float = Field(description="centre, pixels from the left")
    y: float = Field(description="centre, pixels from the top")
    size: float = Field(gt=0, description="diameter (circle) or side length (square, triangle)")
    angle: float = Field(0.0, description="rotation in degrees, counter-clockwise as seen on screen")
    colour: str
    visible: bool = True


class ToyObject(Spec):
    id: int = Field(ge=0)
    shape: Literal["circle", "square", "triangle"]
    initial: ObjectState


class ToyEvent(Spec):
    """An action of one object over frames [start, end] (inclusive)."""

    object_id: int = Field(ge=0)
    action: Action
    start: int = Field(ge=0)
    end: int = Field(ge=0)
    colour: str = Field(description="the object's colour when the event starts")
    to_colour: str | None = Field(None, description="recolour only: the colour it turns")
    amount: float = Field(0.0, description="pixels (moves), scale factor (grow/shrink) or degrees (rotate)")


class ToyClip(Spec):
    """The `json` member of a toy-world sample: scene graph plus metadata."""

    split: Literal["pretrain", "adapt", "pool", "test", "compositional"]
    seed: int
    index: int = Field(ge=0, description="the generating clip's index within the split")
    fps: float = Field(gt=0)
    frames: int = Field(ge=1)
    width: int = Field(ge=2)
    height: int = Field(ge=2)
    reversed: bool = Field(False, description="frames are the pair clip's frames in reverse order")
    pair_key: str | None = Field(None, description="key of the time-reversed twin, if any")
    objects: list[ToyObject]
    events: list[ToyEvent] = Field(default_factory=list)
    tracks: dict[str, list[ObjectState]] = Field(
        description="object id → its state in every frame (one entry per frame)")
    caption: str = Field(description="the ground-truth caption (also the gt.txt member)")
