"""`engine caption`: video shards in, the same shards with pseudo-captions out, every key exactly once.

    job = CaptionJob(model="stage2/", frames=8, batch_size=16)
    plans = plan_shards(job, expand_urls("pool/pool-*.tar"), "captioned/")
    stats = caption_shards(plans, "captioned/", job, load_captioner(job.model), pool)

Per shard: read (a thread) -> decode (worker processes behind bounded queues,
see `engine.decode_pool`) -> batch -> caption (this process, the only one that
holds the model) -> write (a hidden temporary tar renamed into place, then the
error ledger, then the stats marker). The reader runs ahead of the captioner by
two batches, so decoding batch n+1 overlaps captioning batch n, across shard
boundaries too. A bad sample costs only itself: it goes to the shard's ledger
with its stage and reason, and its neighbours come through.

Resume rules (`plan_shards`): a shard whose stats marker carries this job's
configuration hash is done and skipped; any other state (no marker, a marker
of another configuration) is redone from the input, never appended to. With
``recaption_if_changed`` (or by `retry_failed`), outputs of an earlier run whose
caption provenance matches this job are carried over unchanged and only the
rest is captioned.
"""

from __future__ import annotations

import hashlib
import json
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from data_specs import CaptionRecord, GenerationParams, Provenance, ShardStats
from data_specs.prompts import DEFAULT_PROMPT, PromptTemplate, get_prompt
from engine import __version__
from engine.decode import SAMPLING_VERSION, DecodeLimits, Sampling
from engine.errors import SHARD_KEY, MemberError, SampleError
from engine.faults import crash_point
from engine.shards import ErrorCollector, ShardWriter, iter_shard, ledger_path, read_json, read_stats, read_text, video_member

JOB_FILE = "engine_job.json"  # the job's configuration, beside its output shards (for retry-failed)
FRAME_PROMPT = "caption-frame-v1"


@dataclass
class CaptionJob:
    """What `engine caption` does to every clip. Fields that change outputs go into the configuration hash."""

    model: str
    """checkpoint directory or hub id of an image-text-to-text model"""
    backend: str = "hf"
    """'hf' (transformers, any device) or 'vllm' (GPU, the `gpu` extra)"""
    prompt: str | None = None
    """prompt template id; default: caption-video-v1, or caption-frame-v1 with frames == 1"""
    frames: int = 8
    """uniformly sampled frames per clip; 1 with an image prompt is the per-frame baseline (middle frame)"""
    batch_size: int = 16
    max_new_tokens: int = 64
    num_beams: int = 1
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    decode_workers: int = 2
    """decode worker processes (each decodes one clip at a time, one decoder thread)"""
    decode_backend: str = "auto"
    decode_timeout: float = 60.0
    """seconds per clip before its decode worker is killed and the clip recorded as 'timeout'"""
    max_pixels: int = 1280 * 720
    """larger frames are downscaled before captioning"""
    dtype: str = "auto"
    device: str = "auto"
    revision: str | None = None
    decode_fn: str = "engine.decode:decode_video"
    """'module:function' with decode_video's signature (a custom decoder; tests inject faults here)"""

    def __post_init__(self) -> None:
        problems = []
        if self.backend not in ("hf", "vllm"):
            problems.append(f"--backend must be hf or vllm, got {self.backend!r}")
        for name in ("frames", "batch_size", "max_new_tokens", "num_beams", "decode_workers", "max_pixels"):
            if getattr(self, name) < 1:
                problems.append(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.decode_timeout <= 0:
            problems.append(f"--decode-timeout must be positive, got {self.decode_timeout}")
        try:
            template = self.prompt_template
            if self.frames == 1 and template.media == "video":
                problems.append(f"--frames 1 needs an image prompt (e.g. {FRAME_PROMPT}); {template.id!r} is a video "
                                "prompt and a video needs at least 2 frames")
        except KeyError as exc:
            problems.append(str(exc.args[0]))
        if ":" not in self.decode_fn:
            problems.append(f"decode_fn must be 'module:function', got {self.decode_fn!r}")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def prompt_template(self) -> PromptTemplate:
        return get_prompt(self.prompt or (FRAME_PROMPT if self.frames == 1 else DEFAULT_PROMPT))

    @property
    def generation(self) -> GenerationParams:
        return GenerationParams(max_new_tokens=self.max_new_tokens, do_sample=self.do_sample, num_beams=self.num_beams,
                                temperature=self.temperature, top_p=self.top_p, seed=self.seed)

    @property
    def sampling(self) -> Sampling:
        return Sampling.uniform(self.frames)

    @property
    def sampling_tag(self) -> str:
        return f"uniform-{self.frames}@v{SAMPLING_VERSION}"

    @property
    def kind(self) -> str:
        return "frame" if self.prompt_template.media == "image" else "pseudo"

    @property
    def limits(self) -> DecodeLimits:
        return DecodeLimits(max_pixels=self.max_pixels)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "CaptionJob":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{source}: unknown field(s) {unknown}; valid: {sorted(known)}")
        return cls(**data)


def caption_signature(prov: Provenance) -> str:
    """What makes two captions the same caption: model weights, prompt, generation parameters and sampling.

    Two runs whose signatures agree would write the same caption (under greedy decoding), so
    `--recaption-if-changed` keeps such outputs and re-captions the rest.
    """
    body = {"model": prov.weights_hash or [prov.model_id, prov.model_revision], "prompt": [prov.prompt_id,
            prov.prompt_hash], "generation": prov.generation.model_dump(), "sampling": prov.sampling}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class JobIdentity:
    """The parts of a job's provenance known once the model is loaded: its signature and configuration hash."""

    model_id: str
    revision: str | None
    weights_hash: str | None
    backend: str
    template: PromptTemplate
    job: CaptionJob

    def provenance(self, **per_clip: Any) -> Provenance:
        return Provenance(model_id=self.model_id, model_revision=self.revision, weights_hash=self.weights_hash,
                          backend=self.backend, prompt_id=self.template.id, prompt_hash=self.template.content_hash,
                          sampling=self.job.sampling_tag, generation=self.job.generation,
                          engine_version=__version__, **per_clip)

    @property
    def signature(self) -> str:
        return caption_signature(self.provenance())

    @property
    def config_hash(self) -> str:
        """Everything that decides a shard's output: the caption signature plus decoding and the backend."""
        body = {"signature": self.signature, "backend": self.backend, "decode_backend": self.job.decode_backend,
                "max_pixels": self.job.max_pixels, "kind": self.job.kind, "decode_fn": self.job.decode_fn}
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


def identity_of(job: CaptionJob, captioner=None) -> JobIdentity:
    """The job's identity, from a loaded captioner or, before loading, from the checkpoint's files."""
    if captioner is not None:
        return JobIdentity(model_id=captioner.model_id, revision=captioner.revision,
                           weights_hash=captioner.weights_hash, backend=captioner.backend,
                           template=job.prompt_template, job=job)
    from captioner.interface import weights_hash_of

    return JobIdentity(model_id=str(job.model), revision=job.revision, weights_hash=weights_hash_of(job.model),
                       backend=job.backend, template=job.prompt_template, job=job)


# --------------------------------------------------------------------------- planning

@dataclass
class ShardPlan:
    """One input shard's work: its URL, its output name, and whether earlier outputs may be carried over."""

    url: str
    name: str
    reuse: bool = False  # read the existing output shard in lockstep and keep outputs whose signature matches

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Plan:
    todo: list[ShardPlan] = field(default_factory=list)
    done: list[str] = field(default_factory=list)  # output names already committed by this configuration


class ConfigMismatch(ValueError):
    """The output directory holds committed shards of another configuration."""


def output_name(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1]


def plan_shards(urls: Sequence[str], out: str | Path, config_hash: str, recaption_if_changed: bool = False,
                retry_failed: bool = False) -> Plan:
    """Which shards to (re)do.

    Raises:
        ValueError: two input shards share a file name (outputs map 1:1 by name).
        ConfigMismatch: committed shards of another configuration, without ``recaption_if_changed``.
    """
    names: dict[str, str] = {}
    for url in urls:
        name = output_name(url)
        if name in names:
            raise ValueError(f"input shards {names[name]} and {url} share the file name {name!r}; outputs are named "
                             "after their inputs, so names must be unique")
        names[name] = url
    plan, foreign = Plan(), []
    for url in urls:
        name = output_name(url)
        stats = read_stats(out, name)
        if stats is None:
            plan.todo.append(ShardPlan(url, name, reuse=False))
        elif stats.config_hash == config_hash and not (retry_failed and _ledger_rows(out, name)):
            plan.done.append(name)
        elif stats.config_hash == config_hash or recaption_if_changed:
            plan.todo.append(ShardPlan(url, name, reuse=True))
        else:
            foreign.append(f"{name} ({stats.config_hash})")
    if foreign:
        raise ConfigMismatch(
            f"{out} holds {len(foreign)} shard(s) captioned with another configuration than this job's "
            f"({config_hash}): {', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''}. Pass "
            "--recaption-if-changed to re-caption only the samples whose provenance differs, or choose another --out")
    return plan


def _ledger_rows(out: str | Path, name: str) -> list[dict]:
    path = ledger_path(out, name)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --------------------------------------------------------------------------- the pipeline

@dataclass
class _Item:
    key: str
    sample: dict[str, Any]  # the input members (bytes), kept for the output
    future: Any = None  # decode future; None for carried-over outputs
    reused: dict[str, Any] | None = None  # the earlier output's members, written unchanged


def _peekable(it: Iterator[dict[str, Any]]):
    """An iterator with ``.peek()`` (None at the end)."""
    class P:
        def __init__(self):
            self.head = next(it, None)

        def peek(self):
            return self.head

        def pop(self):
            head, self.head = self.head, next(it, None)
            return head
    return P()


def _produce(plans: list[ShardPlan], out: Path, job: CaptionJob, signature: str, pool, events: queue.Queue,
             stop: threading.Event) -> None:
    """The reader thread: samples of every shard, in order, each with its decode already submitted."""
    def put(event) -> bool:
        while not stop.is_set():
            try:
                events.put(event, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    try:
        for plan in plans:
            if not put(("start", plan)):
                return
            old = _peekable(_old_outputs(out / plan.name, signature)) if plan.reuse else None
            read_s, t = 0.0, time.perf_counter()
            errors = ErrorCollector()
            for sample in iter_shard(plan.url, handler=errors):
                key = sample["__key__"]
                while errors.errors:
                    if not put(("error", errors.errors.pop(0))):
                        return
                try:
                    ext = video_member(sample)
                    read_text(sample, "txt")  # alt-text and metadata must be readable: the ledger says if not
                    read_json(sample, "json")
                except SampleError as exc:
                    read_s += time.perf_counter() - t
                    if not put(("error", exc.located(url=plan.url, key=key))):
                        return
                    t = time.perf_counter()
                    continue
                item = _Item(key, {k: v for k, v in sample.items() if not k.startswith("__")})
                # Outputs keep their inputs' order (minus failures), so one look at the head suffices;
                # an earlier output that no longer lines up is simply not reused.
                if old is not None and old.peek() is not None and old.peek()[0] == key:
                    _, members, same = old.pop()
                    if same:
                        item.reused = members
                read_s += time.perf_counter() - t
                if item.reused is None:
                    item.future = pool.submit(sample[ext], job.sampling, job.decode_backend, job.limits,
                                              timeout=job.decode_timeout)
                if not put(("item", item)):
                    return
                t = time.perf_counter()
            read_s += time.perf_counter() - t
            for exc in errors.errors:
                if not put(("error", exc)):
                    return
            if not put(("end", read_s)):
                return
        put(("done", None))
    except BaseException as exc:  # noqa: BLE001 - the consumer re-raises it in the main thread
        put(("fatal", exc))


def _old_outputs(path: Path, signature: str) -> Iterator[tuple[str, dict[str, Any], bool]]:
    """(key, members, provenance matches) for each sample of an earlier output shard, in order.

    An unreadable earlier output just ends the iteration: its samples are captioned again.
    """
    if not path.exists():
        return
    for sample in iter_shard(str(path), handler=lambda exc: True):
        members = {k: v for k, v in sample.items() if not k.startswith("__")}
        try:
            record = CaptionRecord.model_validate_json(members["caption.json"])
            same = caption_signature(record.provenance) == signature
        except (KeyError, ValueError):
            same = False
        yield sample["__key__"], members, same


class _ShardRun:
    """The consumer's state for the shard being written."""

    def __init__(self, plan: ShardPlan, out: Path):
        self.plan, self.t0 = plan, time.perf_counter()
        self.writer = ShardWriter(out, plan.name)
        self.pending: list[_Item] = []
        self.seconds = {"read": 0.0, "decode": 0.0, "decode_wait": 0.0, "caption": 0.0, "write": 0.0}
        self.n_reused = 0


def caption_shards(plans: Sequence[ShardPlan], out: str | Path, job: CaptionJob, captioner, pool,
                   identity: JobIdentity | None = None, bar=None) -> list[ShardStats]:
    """Runs the pipeline over the planned shards and commits each one; returns their stats in order.

    Args:
        plans: from `plan_shards` (``todo``).
        captioner: a loaded `captioner.interface.Captioner` (this process runs it).
        pool: an `engine.decode_pool.DecodePool` built with ``job.decode_fn``.
        identity: the job's provenance identity (computed from ``captioner`` when omitted).
        bar: a tqdm bar to advance by samples (optional).
    """
    out = Path(out)
    identity = identity or identity_of(job, captioner)
    signature, config_hash = identity.signature, identity.config_hash
    template, params = job.prompt_template, job.generation
    events: queue.Queue = queue.Queue(maxsize=2 * job.batch_size)
    stop = threading.Event()
    reader = threading.Thread(target=_produce, args=(list(plans), out, job, signature, pool, events, stop),
                              name="engine-reader", daemon=True)
    reader.start()
    results: list[ShardStats] = []
    run: _ShardRun | None = None
    n_errors = 0
    try:
        while True:
            kind, value = events.get()
            if kind == "start":
                run = _ShardRun(value, out)
            elif kind == "item":
                run.pending.append(value)
                if len(run.pending) >= job.batch_size:
                    n_errors += _flush(run, captioner, template, params, identity, bar)
            elif kind == "error":
                run.writer.fail(value)
                n_errors += 1
                if bar is not None:
                    bar.update(1)
            elif kind == "end":
                n_errors += _flush(run, captioner, template, params, identity, bar)
                run.seconds["read"] = value
                total = time.perf_counter() - run.t0
                seconds = {k: round(v, 3) for k, v in run.seconds.items()} | {"total": round(total, 3)}
                crash_point("shard:before-commit")
                results.append(run.writer.commit(
                    config_hash=config_hash, tool=f"engine caption {__version__}", source=run.plan.url,
                    seconds=seconds, clips_per_s=round(len(run.writer.keys) / total, 3) if total > 0 else None,
                    n_reused=run.n_reused))
                run = None
            elif kind == "fatal":
                raise value
            elif kind == "done":
                break
            if bar is not None:
                bar.set_postfix(errors=n_errors, shards=f"{len(results)}/{len(plans)}", refresh=False)
    finally:
        stop.set()
        if run is not None:
            run.writer.abort()
        while reader.is_alive():  # unblock a reader waiting on a full queue, then let it see `stop`
            try:
                events.get_nowait()
            except queue.Empty:
                reader.join(timeout=0.1)
    return results


def _flush(run: _ShardRun, captioner, template: PromptTemplate, params: GenerationParams,
           identity: JobIdentity, bar) -> int:
    """Decodes (waits for), captions and writes the pending items in input order; returns the failures."""
    from captioner.interface import Clip

    items, run.pending = run.pending, []
    if not items:
        return 0
    url = run.plan.url
    frames: dict[str, Any] = {}
    failures: dict[str, SampleError] = {}
    for it in items:
        if it.future is None:
            continue
        t = time.perf_counter()
        try:
            frames[it.key] = it.future.result()
        except SampleError as exc:
            failures[it.key] = exc.located(url=url, key=it.key)
        run.seconds["decode_wait"] += time.perf_counter() - t
        run.seconds["decode"] += getattr(it.future, "decode_seconds", 0.0)
        it.future = None
    keys = [it.key for it in items if it.key in frames]
    t = time.perf_counter()
    captions = dict(zip(keys, captioner.caption([Clip(k, frames[k].frames) for k in keys], template, params)))
    run.seconds["caption"] += time.perf_counter() - t
    t = time.perf_counter()
    for it in items:
        if it.reused is not None:
            run.writer.write({"__key__": it.key, **it.reused})
            run.n_reused += 1
        elif it.key in failures:
            run.writer.fail(failures[it.key])
        elif not captions[it.key].ok:
            reason, _, detail = captions[it.key].error.partition(": ")
            failures[it.key] = SampleError(reason, detail, url=url, key=it.key, stage="caption")
            run.writer.fail(failures[it.key])
        else:
            run.writer.write(_output_sample(it, captions[it.key], frames[it.key], identity, template))
    run.seconds["write"] += time.perf_counter() - t
    if bar is not None:
        bar.update(len(items))
    crash_point("shard:after-batch")
    return len(failures)


def _output_sample(item: _Item, result, decoded, identity: JobIdentity, template: PromptTemplate) -> dict[str, Any]:
    """The input's members unchanged, the caption as ``txt``, the alt-text moved to ``alt.txt``, provenance."""
    indices, stamps = list(decoded.indices), list(decoded.timestamps)
    if template.media == "image" and len(indices) > 1:  # the per-frame baseline captions the middle frame
        mid = len(indices) // 2
        indices, stamps = indices[mid:mid + 1], stamps[mid:mid + 1]
    record = CaptionRecord(text=result.text, kind=identity.job.kind, provenance=identity.provenance(
        frame_indices=indices, frame_timestamps=[round(float(s), 4) for s in stamps], decoder=decoded.backend,
        input_tokens=result.input_tokens, output_tokens=result.output_tokens, finish_reason=result.finish_reason,
        latency_s=round(result.latency_s, 4), budget_note=result.budget_note or None))
    sample = {"__key__": item.key, **item.sample}
    if "txt" in sample and "alt.txt" not in sample:
        sample["alt.txt"] = sample.pop("txt")
    sample["txt"] = result.text
    sample["caption.json"] = record.model_dump_json()
    return sample


def write_job_file(out: str | Path, job: CaptionJob, identity: JobIdentity, inputs: Sequence[str]) -> Path:
    """``OUT/engine_job.json``: the configuration and inputs, so `retry-failed` and humans can see what ran."""
    path = Path(out) / JOB_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {"job": job.to_dict(), "config_hash": identity.config_hash, "signature": identity.signature,
            "weights_hash": identity.weights_hash, "inputs": list(inputs), "engine_version": __version__}
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(body, indent=2) + "\n")
    tmp.replace(path)
    return path


def read_job_file(out: str | Path) -> dict[str, Any]:
    path = Path(out) / JOB_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: {out} was not written by `engine caption`")
    return json.loads(path.read_text())
