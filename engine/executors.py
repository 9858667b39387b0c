"""Where `engine caption` runs: this process (`local`) or a Ray cluster (`ray`), behind one signature.

    stats = run_caption(CaptionJob(model="stage2/"), "pool/pool-*.tar", "captioned/", executor="local")

Both executors run the same `engine.caption.caption_shards` on the same plans and
write the same bytes. `local`: one captioner in this process and a decode worker
pool. `ray`: one captioner actor per GPU (or per ``cpus_per_actor`` CPUs), each
with its own decode pool; every shard is one actor call. Ray restarts a dead
actor and retries its call (``max_restarts``/``max_task_retries``); a shard that
died half-way left only a hidden temporary file, so the retry redoes it whole.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from data_specs import ShardStats
from engine.caption import (CaptionJob, JobIdentity, ShardPlan, caption_shards, identity_of, plan_shards,
                            write_job_file)
from engine.shards import expand_urls

EXECUTORS = ("local", "ray")


@dataclass
class JobResult:
    out: str
    config_hash: str
    written: list[ShardStats] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # shards already committed by this configuration

    @property
    def n_ok(self) -> int:
        return sum(s.n_ok for s in self.written)

    @property
    def n_failed(self) -> int:
        return sum(s.n_failed for s in self.written)


def resolve_decode_fn(spec: str):
    module, _, name = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"decode_fn {spec!r} can not be imported: {exc}") from None


def _load(job: CaptionJob):
    from captioner.load import load_captioner

    return load_captioner(job.model, backend=job.backend, dtype=job.dtype, device=job.device, revision=job.revision)


def _progress_bar(enabled: bool, desc: str):
    from tqdm import tqdm

    # a bar redrawn in place on a terminal; in a log file (not a TTY) a line every 30 s, not a flood
    return tqdm(desc=desc, unit="clip", disable=not enabled, mininterval=0.5 if sys.stderr.isatty() else 30)


def run_local(job: CaptionJob, plans: Sequence[ShardPlan], out: str | Path, identity: JobIdentity,
              progress: bool = True) -> list[ShardStats]:
    from engine.decode_pool import DecodePool

    captioner = _load(job)
    with DecodePool(workers=job.decode_workers, fn=resolve_decode_fn(job.decode_fn),
                    default_timeout=job.decode_timeout) as pool, _progress_bar(progress, "caption") as bar:
        return caption_shards(plans, out, job, captioner, pool, identity=identity, bar=bar)


class _CaptionWorker:
    """A Ray actor: one captioner and one decode pool, captioning whole shards on request."""

    def __init__(self, job: CaptionJob, identity: JobIdentity, out: str):
        from engine.decode_pool import DecodePool

        self.job, self.identity, self.out = job, identity, out
        self.captioner = _load(job)
        self.pool = DecodePool(workers=job.decode_workers, fn=resolve_decode_fn(job.decode_fn),
                               default_timeout=job.decode_timeout)

    def caption_shard(self, plan: ShardPlan) -> dict:
        stats = caption_shards([plan], self.out, self.job, self.captioner, self.pool, identity=self.identity)
        return stats[0].model_dump()

    def pid(self) -> int:
        import os

        return os.getpid()


def run_ray(job: CaptionJob, plans: Sequence[ShardPlan], out: str | Path, identity: JobIdentity,
            progress: bool = True, address: str | None = None, actors: int | None = None,
            cpus_per_actor: float = 1.0, max_retries: int = 3) -> list[ShardStats]:
    """Captions the planned shards on a Ray cluster (``address``; None starts or joins a local one).

    Raises:
        ImportError: ray is not installed (names the extra).
    """
    try:
        import ray
        from ray.util import ActorPool
    except ImportError:
        raise ImportError("--executor ray needs Ray: pip install 'pseudocap[ray]'") from None
    from tqdm import tqdm

    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False, include_dashboard=False)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    want_gpu = gpus > 0 and job.device != "cpu"
    n = actors or (gpus if want_gpu else max(1, int(ray.cluster_resources().get("CPU", 1) // cpus_per_actor)))
    n = max(1, min(n, len(plans)))
    options = dict(max_restarts=max_retries, max_task_retries=max_retries,
                   num_gpus=1 if want_gpu else 0, num_cpus=0 if want_gpu else cpus_per_actor)
    Worker = ray.remote(_CaptionWorker).options(**options)
    workers = [Worker.remote(job, identity, str(out)) for _ in range(n)]
    by_name: dict[str, ShardStats] = {}
    with tqdm(total=len(plans), desc="caption (ray)", unit="shard", disable=not progress) as bar:
        for result in ActorPool(workers).map_unordered(lambda w, p: w.caption_shard.remote(p), list(plans)):
            stats = ShardStats.model_validate(result)
            by_name[stats.shard] = stats
            bar.update(1)
    for w in workers:
        ray.kill(w)
    return [by_name[p.name] for p in plans]


def run_caption(job: CaptionJob, shards: str | Sequence[str], out: str | Path, executor: str = "local",
                progress: bool = True, recaption_if_changed: bool = False, retry_failed: bool = False,
                **executor_options) -> JobResult:
    """Plans the job (skipping committed shards), records it in ``OUT/engine_job.json``, and runs it.

    Raises:
        ValueError: an unknown executor, no input shards, or clashing input names.
        ConfigMismatch: ``out`` holds shards of another configuration (see `plan_shards`).
    """
    if executor not in EXECUTORS:
        raise ValueError(f"unknown executor {executor!r}; valid: {', '.join(EXECUTORS)}")
    urls = expand_urls(shards)
    if not urls:
        raise ValueError(f"no input shards match {shards!r}")
    identity = identity_of(job)
    plan = plan_shards(urls, out, identity.config_hash, recaption_if_changed=recaption_if_changed,
                       retry_failed=retry_failed)
    result = JobResult(out=str(out), config_hash=identity.config_hash, skipped=plan.done)
    if not plan.todo:
        return result
    write_job_file(out, job, identity, urls)
    run = run_local if executor == "local" else run_ray
    result.written = run(job, plan.todo, out, identity, progress=progress, **executor_options)
    return result
