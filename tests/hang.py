"""Decode functions that misbehave, for DecodePool tests (importable by spawned workers)."""

import os
import re


def hold_gil_forever(data, sampling, backend, limits):
    """Catastrophic regex backtracking: C code that never releases the GIL, like a stuck decord."""
    re.match(r"(a+)+$", "a" * 64 + "b")
    raise AssertionError("unreachable in any test's lifetime")


def crash(data, sampling, backend, limits):
    os._exit(3)


def echo_len(data, sampling, backend, limits):
    return len(data)
