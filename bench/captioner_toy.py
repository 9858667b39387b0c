"""Caption accuracy of the toy chain base -> stage 1 -> stage 2, with learning curves against CPU minutes.

Usage: python bench/captioner_toy.py [--preset quick|full] [--work bench/work/captioner] [--eval-n 200]
           [--config qwen2-vl-tiny] [--frames N] [--steps STAGE=N ...] [--data SPLIT=N ...] [--two-event N]
           [--two-event-visual] [--eval-large N] [--task-weight TYPE=N ...] [--batch-size STAGE=N ...]
           [--pack | --no-pack] [--init-seed N] [--image-weight N] [--vision-lr-scale X] [--adam-beta2 STAGE=X]
           [--base CKPT] [--train-vision PARTS] [--rehearse N] [--language-extra N]

Writes bench/results/captioner_toy[_full].json: per-attribute accuracy (object, colour, action,
direction within its axis, event order, exact match; see captioner/toy_metrics.py) on the `test`
split for (a) the base image model captioning the middle frame, (b) after stage 1 (visual
adaptation), (c) after stages 1 + 2 (language adaptation), also on the `compositional` split,
and learning curves (accuracy at checkpoints written during each adaptation stage, against
cumulative CPU minutes of this process, which runs everything in-process; the evaluations'
own time is left out). A stage the work directory already holds finished is reused: its
minutes, wall time and curve are those recorded in its `bench_stage.json` when this bench
trained it.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import captioner  # noqa: E402,F401  - arms the torchvision fix before transformers loads
from captioner.cli import PRESETS, parse_task_weights  # noqa: E402
from captioner.evaluate import (  # noqa: E402
    evaluate_frames, evaluate_toy, forced_choice_toy, load_eval_clips, load_eval_frames,
)
from captioner.load import load_captioner  # noqa: E402
from captioner.tiny import build_tiny  # noqa: E402
from captioner.toy_metrics import score_by_axis, score_by_event_count, two_event_misses  # noqa: E402
from captioner.train import RUN_FIELDS, TrainConfig, config_changes, read_state, train  # noqa: E402
from engine.synth import SynthConfig, synth  # noqa: E402

SPLITS = {  # clips per split: the quick preset uses the demo's data; the full preset more of it
    "quick": {"pretrain": 2000, "adapt": 1000, "test": 200, "compositional": 200},
    # the full preset's language stage memorised 4000 adapt clips (train loss 0.006, test exact flat at 0.54
    # from 10k to 20k steps): it gets three times the clips, which cost ~3 CPU-minutes to make
    "full": {"pretrain": 16000, "adapt": 12000, "test": 200, "compositional": 200},
}
# extra adapt clips with exactly two events (engine synth --events 2, seed 1) for the language stage. The world
# places a second event only where it fits, so ~10% of adapt clips have two (15% of test): trained on those
# alone, the full preset's captioner stopped after the first event (two-event clips: action 0.42, exact 0.07).
# Added to the visual stage as well they cost one-event accuracy (README, experiments).
TWO_EVENT = {"quick": 0, "full": 2000}
# stage 1 also trains on the pretrain split's still frames (the base's own), one image batch per N video batches:
# without them it lost most of the base's shape reading (held-out frames 0.885 -> 0.565 on init seed 0), and the
# chain's outcome spread with it (README, experiments). 0: clips only
REHEARSE = {"quick": 0, "full": 3}
STAGE_RECORD = "bench_stage.json"  # in a stage's checkpoint directory: its CPU minutes, wall time and curve
# the final model (c) is also scored on a larger test split (seed 0, so its first clips are the test split's):
# on 200 test clips (230 events) action accuracy has a standard error of ~0.02
EVAL_LARGE = {"quick": 0, "full": 1000}
KEYS = ("object", "colour", "action", "direction_within_axis", "event_order", "exact", "parse_rate")


def cpu_minutes() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return (r.ru_utime + r.ru_stime) / 60


def short(metrics: dict) -> dict:
    return {k: (round(metrics[k], 4) if isinstance(metrics.get(k), float) else metrics.get(k)) for k in KEYS}


def _override(item: str, valid: dict, flag: str) -> tuple[str, int]:
    name, _, value = item.partition("=")
    if name not in valid or not value.isdigit() or int(value) < 1:
        raise SystemExit(f"{flag} {item!r}: expected NAME=N with NAME one of {', '.join(valid)} and N >= 1")
    return name, int(value)


def _float_override(item: str, valid: dict, flag: str) -> tuple[str, float]:
    name, _, value = item.partition("=")
    if name not in valid:
        raise SystemExit(f"{flag} takes STAGE=X with STAGE one of {', '.join(valid)}, got {item!r}")
    try:
        return name, float(value)
    except ValueError:
        raise SystemExit(f"{flag} {item!r}: {value!r} is not a number") from None


def stage_record(ckpt: Path) -> dict | None:
    """What this bench recorded when it trained the checkpoint (CPU minutes, wall, curve), if the record is the
    finished checkpoint's own (same step), else None."""
    record = ckpt / STAGE_RECORD
    saved = json.loads(record.read_text()) if record.is_file() else None
    return saved if saved is not None and saved.get("step") == (read_state(ckpt) or {}).get("step") else None


def by_event_count(examples: list) -> dict:
    """The metrics of (key, prediction, reference) triples, apart for references with one and with two events."""
    groups = score_by_event_count([p for _, p, _ in examples], [r for _, _, r in examples])
    return {name: {**short(m), "clips": m["clips"]} for name, m in groups.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="quick", choices=list(PRESETS))
    ap.add_argument("--work", default=str(ROOT / "bench" / "work" / "captioner"))
    ap.add_argument("--eval-n", type=int, default=200, help="test clips per evaluation")
    ap.add_argument("--segments", type=int, default=3, help="learning-curve points per adaptation stage")
    ap.add_argument("--out", help="result JSON (default bench/results/captioner_toy[_PRESET].json)")
    ap.add_argument("--width", type=int, help="tiny model width (language model and vision tower)")
    ap.add_argument("--layers", type=int, help="tiny model depth")
    ap.add_argument("--config", default="qwen2-vl-tiny", help="tiny architecture (captioner.tiny.TINY_CONFIGS)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (tiny models run as fast on 1 as on 2)")
    ap.add_argument("--frames", type=int, help="frames per clip in both adaptation stages and evaluation "
                    "(default: the preset's)")
    ap.add_argument("--steps", action="append", default=[], metavar="STAGE=N",
                    help="override one stage's steps, e.g. --steps language=12000 (repeatable)")
    ap.add_argument("--still-frames", action=argparse.BooleanOptionalAction, default=None,
                    help="each sampled frame fills its own temporal patch: one frame per slice of visual tokens, "
                    "twice the tokens of paired frames (captioner adapt --still-frames; default: the preset's)")
    ap.add_argument("--pixel-branch", type=int, metavar="CHANNELS", help="visual stage: the temporal adapter's "
                    "pixel branch with this many channels, 0 for none (captioner adapt --pixel-branch; default: "
                    "the preset's)")
    ap.add_argument("--two-event", type=int, metavar="N", help="add N adapt clips with exactly two events "
                    "(engine synth --events 2, seed 1) to the language stage (default: the preset's, TWO_EVENT)")
    ap.add_argument("--two-event-visual", action="store_true", help="add them to the visual stage too")
    ap.add_argument("--language-extra", type=int, default=0, metavar="N", help="add N more adapt clips (engine "
                    "synth, seed 2) to the language stage only (its 14000 clips end at a train loss of 0.004; "
                    "measured: 12000 more with fewer steps did not pay, README)")
    ap.add_argument("--eval-large", type=int, metavar="N", help="also score the final model on N test clips "
                    "(default: the preset's, EVAL_LARGE; 0: no)")
    ap.add_argument("--task-weight", action="append", default=[], metavar="TYPE=N",
                    help="language stage: use instruction pairs of TYPE N times per epoch, e.g. caption=2 "
                    "(repeatable; captioner adapt --task-weight)")
    ap.add_argument("--lr", action="append", default=[], metavar="STAGE=X",
                    help="override one stage's peak learning rate, e.g. --lr image=2e-3 (repeatable)")
    ap.add_argument("--adam-beta2", action="append", default=[], metavar="STAGE=X",
                    help="override one stage's AdamW second-moment decay, e.g. --adam-beta2 image=0.95 (repeatable)")
    ap.add_argument("--vision-lr-scale", type=float, metavar="X", help="image stage: the vision side trains at its "
                    "learning rate times X (captioner pretrain-toy --vision-lr-scale; default: the preset's)")
    ap.add_argument("--batch-size", action="append", default=[], metavar="STAGE=N",
                    help="override one stage's batch size, e.g. --batch-size language=3 (repeatable)")
    ap.add_argument("--pack", action=argparse.BooleanOptionalAction, default=None,
                    help="language stage: pack each clip's instruction pairs in one sequence, --batch-size then "
                    "counting clips (captioner adapt --pack; default: the preset's)")
    ap.add_argument("--init-seed", type=int, default=0, help="seed of the tiny model's random initial weights "
                    "(captioner tiny --seed): one draw of the whole chain")
    ap.add_argument("--image-weight", type=int, help="image stage: image batches per text batch (captioner "
                    "pretrain-toy --input-weight image=N; default: the preset's)")
    ap.add_argument("--train-vision", metavar="PARTS", help="visual stage: the vision side's parts that train "
                    "(adapter, merger, tower; comma-separated; captioner adapt --train-vision)")
    ap.add_argument("--rehearse", type=int, metavar="N", help="visual stage: also train on the pretrain split's "
                    "still frames (the base's own), one image batch per N video batches, so stage 1 keeps the "
                    "image path it starts from (captioner adapt --shards '{ADAPT,PRETRAIN}' --input-weight video=N); "
                    "0: clips only (default: the preset's, REHEARSE)")
    ap.add_argument("--base", help="start stage 1 from this base checkpoint (e.g. one bench/captioner_base.py "
                    "trained) instead of training one: its minutes are not counted")
    ap.add_argument("--data", action="append", default=[], metavar="SPLIT=N",
                    help="override one split's clip count, e.g. --data adapt=8000 (repeatable)")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    two_event = TWO_EVENT[args.preset] if args.two_event is None else args.two_event
    language_extra = args.language_extra
    if language_extra < 0:
        raise SystemExit(f"--language-extra must be >= 0, got {language_extra}")
    rehearse = REHEARSE[args.preset] if args.rehearse is None else args.rehearse
    if rehearse < 0:
        raise SystemExit(f"--rehearse must be >= 0, got {rehearse}")
    if rehearse and args.train_vision == "adapter":
        raise SystemExit("--train-vision adapter leaves the still frames nothing to train: add --rehearse 0")
    if two_event < 0:
        raise SystemExit(f"--two-event must be >= 0, got {two_event}")
    if args.base and (args.init_seed or args.image_weight or args.vision_lr_scale is not None):
        raise SystemExit("--base replaces the base's stages: --init-seed, --image-weight and --vision-lr-scale do "
                         "not apply to it")
    if args.two_event_visual and not two_event:
        raise SystemExit("--two-event-visual needs two-event clips: --two-event N with N >= 1")
    work = Path(args.work) / (args.preset + ("" if args.config == "qwen2-vl-tiny" else f"-{args.config}")
                              + (f"-w{args.width}" if args.width else "")
                              + (f"-l{args.layers}" if args.layers else "")
                              + (f"-f{args.frames}" if args.frames else "")
                              + ({True: "-still", False: "-paired", None: ""}[args.still_frames])
                              + (f"-pixels{args.pixel_branch}" if args.pixel_branch is not None else "")
                              + (f"-init{args.init_seed}" if args.init_seed else "")
                              + (f"-imagew{args.image_weight}" if args.image_weight else "")
                              + (f"-base{Path(args.base).resolve().parent.name}" if args.base else "")
                              + (f"-vision{args.train_vision.replace(',', '+')}" if args.train_vision else "")
                              + (f"-rehearse{rehearse}" if rehearse != REHEARSE[args.preset] else "")
                              + "".join(f"-{x.replace('=', '')}" for x in args.steps + args.data + args.task_weight)
                              + "".join(f"-batch{x.replace('=', '')}" for x in args.batch_size)
                              + "".join(f"-lr{x.replace('=', '')}" for x in args.lr)
                              + "".join(f"-beta2{x.replace('=', '')}" for x in args.adam_beta2)
                              + (f"-visionlr{args.vision_lr_scale:g}" if args.vision_lr_scale is not None
                                 and args.vision_lr_scale != PRESETS[args.preset]["image"].get("vision_lr_scale", 1)
                                 else "")
                              + ({True: "-pack", False: "-nopack", None: ""}[args.pack])
                              + (f"-two{two_event}" if two_event != TWO_EVENT[args.preset] else "")
                              + ("-twovisual" if args.two_event_visual else "")
                              + (f"-extra{language_extra}" if language_extra else ""))
    splits = dict(SPLITS[args.preset])
    for item in args.data:
        split, n = _override(item, splits, "--data")
        splits[split] = n
    preset = {stage: dict(kw) for stage, kw in PRESETS[args.preset].items()}
    for item in args.steps:
        stage, n = _override(item, preset, "--steps")
        preset[stage]["steps"] = n
    for flag, field, items in (("--lr", "lr", args.lr), ("--adam-beta2", "adam_beta2", args.adam_beta2)):
        for item in items:
            stage, value = _float_override(item, preset, flag)
            preset[stage][field] = value
    for item in args.batch_size:
        stage, n = _override(item, preset, "--batch-size")
        preset[stage]["batch_size"] = n
    if args.vision_lr_scale is not None:
        preset["image"]["vision_lr_scale"] = args.vision_lr_scale
    if args.pack is not None:
        preset["language"]["pack"] = args.pack
    if args.still_frames is not None:
        preset["visual"]["still_frames"] = args.still_frames
    if args.pixel_branch is not None:
        preset["visual"]["pixel_branch"] = args.pixel_branch
    if args.train_vision:
        preset["visual"]["vision_parts"] = args.train_vision
    if args.image_weight:
        preset["image"]["input_weights"] = {"image": args.image_weight}
    try:
        weights = parse_task_weights(args.task_weight)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    if weights:
        preset["language"]["task_weights"] = {**preset["language"].get("task_weights", {}), **weights}
    if args.frames:
        for stage in ("visual", "language"):
            preset[stage]["frames"] = args.frames
    data = Path(args.work) / ("toy-" + "-".join(f"{k}{v}" for k, v in splits.items()))
    t_wall = time.perf_counter()
    for split, n in splits.items():  # synth reuses shards an identical configuration committed
        synth(SynthConfig(split=split, n=n, seed=0), data, progress=False)
    adapt = language_adapt = str(data / "adapt-*.tar")
    if two_event:
        extra = Path(args.work) / f"toy-adapt{two_event}-events2-seed1"
        synth(SynthConfig(split="adapt", n=two_event, seed=1, events=2), extra, progress=False)
        language_adapt = "{" + adapt + "," + str(extra / "adapt-*.tar") + "}"
        if args.two_event_visual:
            adapt = language_adapt
    if language_extra:
        more = Path(args.work) / f"toy-adapt{language_extra}-seed2"
        synth(SynthConfig(split="adapt", n=language_extra, seed=2), more, progress=False)
        language_adapt = "{" + language_adapt.strip("{}") + "," + str(more / "adapt-*.tar") + "}"
    if rehearse:
        adapt = "{" + adapt + "," + str(data / "pretrain-*.tar") + "}"
        preset["visual"]["input_weights"] = {"video": rehearse}
    else:  # one kind of batch: a preset's mix means nothing
        preset["visual"].pop("input_weights", None)
    frames = preset["visual"].get("frames", 8)
    test = load_eval_clips(str(data / "test-*.tar"), frames=frames, limit=args.eval_n)
    comp = load_eval_clips(str(data / "compositional-*.tar"), frames=frames, limit=args.eval_n)
    held_out = Path(args.work) / f"toy-pretrain{args.eval_n}-seed1"  # frames no stage trained on
    synth(SynthConfig(split="pretrain", n=args.eval_n, seed=1), held_out, progress=False)
    still = load_eval_frames(str(held_out / "pretrain-*.tar"))
    result: dict = {"benchmark": "captioner_toy", "command": "python bench/captioner_toy.py " + " ".join(
        argv if argv is not None else sys.argv[1:]), "preset": args.preset, "preset_config": preset,
        "data": {**splits, "adapt_two_event": two_event, "language_extra_adapt": language_extra,
                 "two_event_stages": (
            ["visual", "language"] if args.two_event_visual else ["language"] if two_event else []),
                 "visual_rehearsal": {"frames": splits["pretrain"], "video_batches_per_image_batch": rehearse}
                 if rehearse else None},
        "eval_clips": len(test[0]),
        "machine": {"platform": platform.platform(), "cpus": 2, "torch_threads": args.threads},
        "model": {"config": args.config, "width": args.width, "layers": args.layers}, "curves": {}, "stages": {},
        "reused_stages": []}
    cpu0 = cpu_minutes()
    eval_cpu = [0.0]  # CPU minutes spent evaluating learning-curve points, left out of the training minutes
    eval_wall = [0.0]  # and their wall seconds
    reused_cpu = [0.0]  # training CPU minutes that reused stages recorded when they were trained
    reused_wall = [0.0]  # and their training wall seconds

    def count_reused(stage: str, saved: dict) -> None:
        """Adds a reused stage's recorded training minutes and wall time to the chain's."""
        reused_cpu[0] += saved["cpu_min"]
        reused_wall[0] += saved["stage"]["wall_s"]
        result["stages"][stage] = saved["stage"]

    def train_cpu() -> float:
        """Training CPU minutes of the chain so far: this process's (evaluations left out) and reused stages'."""
        return cpu_minutes() - cpu0 - eval_cpu[0] + reused_cpu[0]

    base = Path(args.base) if args.base else work / "base"
    if args.base and not read_state(base):
        raise SystemExit(f"--base {args.base}: no trainer_state.json there; a base is what `captioner "
                         "pretrain-toy` or bench/captioner_base.py writes")
    chain = {  # stage: (starting checkpoint, shards, checkpoint written, learning-curve points)
        "lm": (work / "init", data / "pretrain-*.tar", work / "base" / "lm", 1),
        "image": (work / "base" / "lm", data / "pretrain-*.tar", work / "base", 1),
        "visual": (base, adapt, work / "stage1", args.segments),
        "language": (work / "stage1", language_adapt, work / "stage2", args.segments)}

    def checked(stage: str) -> tuple[TrainConfig, dict | None]:
        """The stage's config and the state its checkpoint directory holds, refused if that is another run
        (it would mix two runs in one result)."""
        model, shards, out, segments = chain[stage]
        kw = dict(preset[stage])
        steps = kw.pop("steps")
        state = read_state(out)
        cfg = TrainConfig(stage=stage, model=str(model), shards=str(shards), out=str(out), steps=steps,
                          save_every=-(-steps // segments) if segments > 1 else 0, resume=state is not None, **kw)
        if state and (changed := config_changes(state, cfg, RUN_FIELDS + ("steps",))):
            raise SystemExit(f"{out} holds a run with other settings than this one ({'; '.join(changed)}): "
                             "pass another --work, or delete that directory and those of the stages after it")
        return cfg, state

    if args.base:  # the base is given: its stages are not this run's
        del chain["lm"], chain["image"]
        result["base"] = {"checkpoint": str(base), "config": read_state(base).get("config")}
        # a base this bench trained (another run's work directory) left its stages' records beside it: their
        # minutes count, so chain_cpu_min stays the whole chain's; a base trained elsewhere has none
        saved = {"lm": stage_record(base / "lm"), "image": stage_record(base)}
        if all(saved.values()):
            for stage, rec in saved.items():
                count_reused(stage, rec)
            result["reused_stages"].extend(saved)
            print(f"base {base}: counting the {sum(r['cpu_min'] for r in saved.values()):.2f} CPU-minutes its "
                  f"{STAGE_RECORD} records say its stages took", flush=True)
        else:
            result.setdefault("uncounted_stages", []).extend(["lm", "image"])
    for stage in chain:  # before any training: a refusal should not come after an hour of it
        checked(stage)

    def run(stage: str, curve: list | None) -> None:
        cfg, state = checked(stage)  # again: the stage before may have been trained since
        out = chain[stage][2]
        record = out / STAGE_RECORD  # what this bench measured while it trained the stage
        start = train_cpu()
        if state and state.get("finished"):
            result["reused_stages"].append(stage)
            saved = stage_record(out)
            if saved is None:
                result.setdefault("uncounted_stages", []).append(stage)
                print(f"{stage}: reusing the finished run in {out}, which has no {STAGE_RECORD} of its "
                      "training: its CPU minutes are not counted", flush=True)
                return
            count_reused(stage, saved)
            if curve is not None:
                curve.extend({**p, "cpu_min": round(start + p["cpu_min"], 2)} for p in saved["curve"])
            print(f"{stage}: reusing the finished run in {out} ({saved['cpu_min']} CPU-minutes when trained)",
                  flush=True)
            return
        if state:
            result.setdefault("resumed_stages", []).append(stage)  # its minutes before the resume are not known
        points: list[dict] = []  # learning-curve points, CPU minutes from the stage's start

        def evaluate(step: int, ckpt: Path) -> None:  # a learning-curve point, in the middle of the run
            if curve is None:
                return
            cpu_train = train_cpu()  # evaluation time is not training time
            e0, w0 = cpu_minutes(), time.perf_counter()
            cap = load_captioner(str(ckpt))
            m = evaluate_toy(cap, None, mode="video", clips=test)["metrics"]
            fc = forced_choice_toy(cap, *test)
            eval_cpu[0] += cpu_minutes() - e0
            eval_wall[0] += time.perf_counter() - w0
            point = {"step": step, "cpu_min": round(cpu_train, 2), **short(m),
                     **{f"fc_{k}": (None if fc[k] is None else round(fc[k], 4)) for k in ("direction", "order")}}
            curve.append(point)
            points.append({**point, "cpu_min": round(cpu_train - start, 2)})
            print(stage, step, point, flush=True)

        t0, w_eval = time.perf_counter(), eval_wall[0]
        summary = train(cfg, progress=False, on_checkpoint=evaluate)
        wall = time.perf_counter() - t0 - (eval_wall[0] - w_eval)  # curve evaluation left out
        result["stages"][stage] = {"steps": cfg.steps, "wall_s": round(wall, 1),
                                   "loss": summary.get("loss"), "examples": summary.get("examples")}
        if not state:  # a resumed stage's record would miss its minutes before the resume
            record.write_text(json.dumps({"step": cfg.steps, "cpu_min": round(train_cpu() - start, 2),
                                          "stage": result["stages"][stage], "curve": points}, indent=1) + "\n")

    init = work / "init"
    if not args.base:
        if not (init / "config.json").exists():
            build_tiny(init, vocab_from=str(data / "pretrain-*.tar"), name=args.config, width=args.width,
                       layers=args.layers, seed=args.init_seed)
        run("lm", None)
        run("image", None)
    result["base_cpu_min"] = round(train_cpu(), 2)
    for stage in ("visual", "language"):
        result["curves"][stage] = []
        run(stage, result["curves"][stage])
    result["chain_cpu_min"] = round(train_cpu(), 2)  # training only: data generation and evaluations left out
    result["curve_eval_cpu_min"] = round(eval_cpu[0], 2)
    # this process's wall (data, training, curve evaluations) plus the training wall reused stages recorded
    result["chain_wall_min"] = round((time.perf_counter() - t_wall + reused_wall[0]) / 60, 2)
    # peak resident memory of this process so far (Linux reports KiB): the stages ran in it, one after another
    result["chain_max_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)

    evals = {}
    caps: dict[Path, object] = {}  # each checkpoint loaded once

    def captioner_at(model: Path):
        if model not in caps:
            caps[model] = load_captioner(str(model))
        return caps[model]

    for name, model, mode in (("a_base_middle_frame", base, "middle-frame"),
                              ("b_stage1", work / "stage1", "video"), ("c_stage1_2", work / "stage2", "video"),
                              ("c_stage1_2_middle_frame", work / "stage2", "middle-frame")):
        cap = captioner_at(model)
        r = evaluate_toy(cap, None, mode=mode, clips=test)
        evals[name] = {"test": short(r["metrics"]), "forced_choice_test": forced_choice_toy(cap, *test, mode=mode),
                       "examples": r["examples"][:6]}
        if name.startswith("b_") or name == "c_stage1_2":
            evals[name]["compositional"] = short(evaluate_toy(cap, None, mode=mode, clips=comp)["metrics"])
            evals[name]["forced_choice_compositional"] = forced_choice_toy(cap, *comp, mode=mode)
        if name == "c_stage1_2":
            evals[name]["test_by_event_count"] = by_event_count(r["examples"])
        if name in ("a_base_middle_frame", "b_stage1"):  # their language model is the base's: it still says
            # what a frame shows, and how well it names the shapes sets what the stages after it can reach
            f = evaluate_frames(cap, still)
            evals[name]["frames_held_out"] = {k: f["metrics"][k] for k in ("shape", "colour", "object_set", "exact",
                                                                          "n")}
            print(name, "held-out frames", evals[name]["frames_held_out"], flush=True)
        print(name, evals[name]["test"], evals[name]["forced_choice_test"], flush=True)
    large = EVAL_LARGE[args.preset] if args.eval_large is None else args.eval_large
    if large:
        large_dir = Path(args.work) / f"toy-test{large}"
        synth(SynthConfig(split="test", n=large, seed=0), large_dir, progress=False)
        r = evaluate_toy(captioner_at(work / "stage2"), None, mode="video",
                         clips=load_eval_clips(str(large_dir / "test-*.tar"), frames=frames))
        evals["c_stage1_2"]["test_large"] = {**short(r["metrics"]), "clips": len(r["examples"]),
                                             "events": r["metrics"]["n_events"]}
        evals["c_stage1_2"]["test_large_by_event_count"] = by_event_count(r["examples"])
        # per reference action, and what the captions said instead where they missed it
        evals["c_stage1_2"]["test_large_by_action"] = {
            action: {k: (round(v, 4) if isinstance(v, float) else v) for k, v in m.items()}
            for action, m in score_by_axis([p for _, p, _ in r["examples"]], [ref for _, _, ref in r["examples"]],
                                           by="action").items()}
        # two-event clips by kind of miss: which event (first or second) lost its object or its action
        evals["c_stage1_2"]["test_large_two_event_misses"] = two_event_misses(
            [p for _, p, _ in r["examples"]], [ref for _, _, ref in r["examples"]])
        print("c_stage1_2 on", large, "test clips", evals["c_stage1_2"]["test_large"], flush=True)
    result["evaluations"] = evals
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / (
        "captioner_toy.json" if args.preset == "quick" else f"captioner_toy_{args.preset}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
