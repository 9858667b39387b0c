"""Checks and summaries of an `engine caption` output directory.

    report = verify("pool/pool-*.tar", "captioned/")   # every input key exactly once: output or ledger
    assert report.ok, report.problems
    table = summarize("captioned/")                     # totals, failures by reason, throughput, time split
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from data_specs import CaptionRecord, ShardStats
from engine.errors import SHARD_KEY
from engine.shards import ErrorCollector, expand_urls, iter_shard, ledger_path, read_stats


@dataclass
class VerifyReport:
    shards: int = 0
    input_keys: int = 0
    output_keys: int = 0
    ledger_keys: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and self.shards > 0


def verify(inputs: str | Sequence[str], out: str | Path) -> VerifyReport:
    """Every input key is in exactly one of output shard or ledger; every output shard reads whole.

    Input keys are what a reader finds in the input shard, good or bad (a bad
    sample's key is known from its error); a shard-level read failure (e.g. a
    truncated tar) must be in the ledger as a '<shard>' row.
    """
    out = Path(out)
    report = VerifyReport()
    for url in expand_urls(inputs):
        name = url.rstrip("/").rsplit("/", 1)[-1]
        report.shards += 1
        stats = read_stats(out, name)
        if stats is None:
            report.problems.append(f"{name}: not committed (no {name[:-4] if name.endswith('.tar') else name}"
                                   "_stats.json): run the job again to finish it")
            continue
        errors = ErrorCollector()
        in_keys = [s["__key__"] for s in iter_shard(url, handler=errors)]
        in_all = set(in_keys) | {e.key for e in errors.errors if e.key and e.key != SHARD_KEY}
        input_shard_failed = any(e.key == SHARD_KEY for e in errors.errors)
        report.input_keys += len(in_all)
        try:
            out_keys = []
            # an input without one good sample gives a valid, empty output tar: not an error here
            for sample in iter_shard(str(out / name), handler=_empty_is_fine):
                out_keys.append(sample["__key__"])
                CaptionRecord.model_validate_json(sample["caption.json"])
                sample["txt"].decode("utf-8")
        except Exception as exc:  # noqa: BLE001 - any failure to read the output whole is the finding
            report.problems.append(f"{name}: the output shard does not read whole: {exc}")
            continue
        ledger = _ledger(out, name)
        # a 'duplicate-key' row is the second sample under a key whose first sample may well be in the output
        ledger_keys = [r["key"] for r in ledger if r["key"] != SHARD_KEY and r["reason"] != "duplicate-key"]
        report.output_keys += len(out_keys)
        report.ledger_keys += len(ledger_keys)
        where = f"{name}:"
        for label, keys in (("output", out_keys), ("ledger", ledger_keys)):
            dup = sorted({k for k in keys if keys.count(k) > 1})
            if dup:
                report.problems.append(f"{where} keys twice in the {label}: {dup[:5]}")
        both = sorted(set(out_keys) & set(ledger_keys))
        if both:
            report.problems.append(f"{where} keys both in the output and in the ledger: {both[:5]}")
        missing = sorted(in_all - set(out_keys) - set(ledger_keys))
        if missing:
            report.problems.append(f"{where} input keys in neither output nor ledger: {missing[:5]}"
                                   f"{' ...' if len(missing) > 5 else ''} ({len(missing)})")
        extra = sorted(set(out_keys) - in_all)
        if extra:
            report.problems.append(f"{where} output keys that are not in the input: {extra[:5]}")
        if input_shard_failed and not any(r["key"] == SHARD_KEY for r in ledger):
            report.problems.append(f"{where} the input shard fails to read whole but the ledger has no "
                                   f"'{SHARD_KEY}' row")
        n_rows = sum(r["key"] != SHARD_KEY for r in ledger)
        if stats.n_ok != len(out_keys) or stats.n_failed != n_rows:
            report.problems.append(f"{where} stats say {stats.n_ok} ok / {stats.n_failed} failed, the files hold "
                                   f"{len(out_keys)} / {n_rows}")
    if report.shards == 0:
        report.problems.append(f"no input shards match {inputs!r}")
    return report


def _empty_is_fine(exc) -> bool:
    if exc.reason == "empty-shard":
        return True
    raise exc


def _ledger(out: Path, name: str) -> list[dict]:
    path = ledger_path(out, name)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def all_stats(out: str | Path) -> list[ShardStats]:
    return [ShardStats.model_validate_json(p.read_text()) for p in sorted(Path(out).glob("*_stats.json"))]


def summarize(out: str | Path) -> dict:
    """Totals over the directory's committed shards (their ``*_stats.json``)."""
    stats = all_stats(out)
    by_reason: dict[str, int] = {}
    seconds: dict[str, float] = {}
    for s in stats:
        for k, v in s.failures_by_reason.items():
            by_reason[k] = by_reason.get(k, 0) + v
        for k, v in s.seconds.items():
            seconds[k] = round(seconds.get(k, 0.0) + v, 3)
    n_ok = sum(s.n_ok for s in stats)
    total = seconds.get("total", 0.0)
    return {"out": str(out), "shards": len(stats), "n_input": sum(s.n_input for s in stats), "n_ok": n_ok,
            "n_failed": sum(s.n_failed for s in stats), "n_reused": sum(s.n_reused for s in stats),
            "failures_by_reason": dict(sorted(by_reason.items(), key=lambda kv: -kv[1])),
            "clips_per_s": round(n_ok / total, 3) if total else None, "seconds": seconds,
            "config_hashes": sorted({s.config_hash for s in stats}), "tools": sorted({s.tool for s in stats})}


def format_summary(summary: dict) -> str:
    """The summary as the table `engine stats` prints."""
    lines = [f"{summary['out']}: {summary['shards']} shard(s) committed"]
    rows = [("samples", summary["n_input"]), ("captioned", summary["n_ok"]), ("failed", summary["n_failed"]),
            ("carried over", summary["n_reused"]),
            ("clips/s", summary["clips_per_s"] if summary["clips_per_s"] is not None else "-")]
    lines += [f"  {k:<14} {v:>10}" for k, v in rows]
    if summary["failures_by_reason"]:
        lines.append("  failures by reason:")
        lines += [f"    {k:<24} {v:>8}" for k, v in summary["failures_by_reason"].items()]
    sec = summary["seconds"]
    if sec:
        total = sec.get("total") or 1.0
        lines.append("  time (s, summed over shards; stages overlap, so they need not add up to total):")
        lines += [f"    {k:<12} {v:>10.1f}  {100 * v / total:5.1f}%" for k, v in sec.items()]
    if len(summary["config_hashes"]) > 1:
        lines.append(f"  note: shards of {len(summary['config_hashes'])} configurations: "
                     f"{', '.join(summary['config_hashes'])}")
    return "\n".join(lines)
