"""JSON Schema export of the data contract.

    python -m data_specs schema                 # all schemas, one JSON object, to stdout
    python -m data_specs schema caption_record  # one schema
    python -m data_specs schema --out DIR       # DIR/<name>.schema.json for each
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from data_specs import SCHEMAS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_specs", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("schema", help="print or write JSON Schemas of the data contract")
    p.add_argument("names", nargs="*", metavar="NAME", help=f"schemas to export (default: all): {', '.join(SCHEMAS)}")
    p.add_argument("--out", type=Path, help="write DIR/<name>.schema.json instead of printing")
    args = parser.parse_args(argv)

    unknown = [n for n in args.names if n not in SCHEMAS]
    if unknown:
        parser.error(f"unknown schema {', '.join(unknown)}; valid: {', '.join(SCHEMAS)}")
    names = args.names or list(SCHEMAS)
    schemas = {n: SCHEMAS[n].model_json_schema() for n in names}
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        for n, s in schemas.items():
            (args.out / f"{n}.schema.json").write_text(json.dumps(s, indent=2) + "\n")
        print(f"wrote {len(schemas)} schema(s) to {args.out}")
    else:
        out = schemas[names[0]] if len(names) == 1 else schemas
        json.dump(out, sys.stdout, indent=2)
        sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
