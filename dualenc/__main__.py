"""`python -m dualenc`: the same as the `dualenc` command."""

from dualenc.cli import run

run()
