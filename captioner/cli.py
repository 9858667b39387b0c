"""The `captioner` command. Its commands (tiny, pretrain-toy, adapt, generate) are not built yet; see the README's status table.

`main(argv)` returns an exit code (tests call it); `run()` is the console entry point.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from captioner import __version__


def build_parser() -> argparse.ArgumentParser:
    return argparse.ArgumentParser(
        prog="captioner", description="pseudocap's captioner: an image VLM adapted to video (visual, then language adaptation).",
        epilog="No commands are available yet: tiny, pretrain-toy, adapt, generate are planned (see the README).")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    parser.add_argument("--version", action="version", version=f"pseudocap captioner {__version__}")
    parser.parse_args(argv)
    parser.print_help()
    return 2


def run() -> None:
    sys.exit(main())
