"""The `dualenc` command. Its commands (train, embed, distill, eval, report) are not built yet; see the README's status table.

`main(argv)` returns an exit code (tests call it); `run()` is the console entry point.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from dualenc import __version__


def build_parser() -> argparse.ArgumentParser:
    return argparse.ArgumentParser(
        prog="dualenc", description="pseudocap's video-text dual encoder: training, distillation, FAISS retrieval evaluation, reports.",
        epilog="No commands are available yet: train, embed, distill, eval, report are planned (see the README).")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    parser.add_argument("--version", action="version", version=f"pseudocap dualenc {__version__}")
    parser.parse_args(argv)
    parser.print_help()
    return 2


def run() -> None:
    sys.exit(main())
