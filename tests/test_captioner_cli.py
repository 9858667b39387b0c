"""The `captioner` command end to end on tiny data: tiny -> pretrain-toy -> adapt x2 -> generate."""

from __future__ import annotations

import json

from captioner.cli import main
from engine.synth import SynthConfig, synth


def test_chain_of_commands_runs_and_reruns_reuse_finished_steps(tmp_path, capsys):
    toy = tmp_path / "toy"
    synth(SynthConfig(split="pretrain", n=32, seed=2), toy, progress=False)
    synth(SynthConfig(split="adapt", n=16, seed=2), toy, progress=False)
    synth(SynthConfig(split="test", n=4, seed=2), toy, progress=False)
    few = ["--steps", "4", "--batch-size", "4", "--warmup", "1", "--quiet"]
    assert main(["pretrain-toy", "--shards", str(toy / "pretrain-*.tar"), "--out", str(tmp_path / "base"), *few]) == 0
    for stage, src, dst in (("visual", "base", "s1"), ("language", "s1", "s2")):
        assert main(["adapt", "--stage", stage, "--model", str(tmp_path / src), "--shards",
                     str(toy / "adapt-*.tar"), "--out", str(tmp_path / dst), "--frames", "4", *few]) == 0
    state = json.loads((tmp_path / "s2" / "trainer_state.json").read_text())
    assert state["finished"] and state["step"] == 4 and state["config"]["stage"] == "language"
    capsys.readouterr()
    assert main(["adapt", "--stage", "language", "--model", str(tmp_path / "s1"), "--shards",
                 str(toy / "adapt-*.tar"), "--out", str(tmp_path / "s2"), *few]) == 0
    assert "already trained" in capsys.readouterr().out
    assert main(["adapt", "--stage", "language", "--model", str(tmp_path / "s1"), "--shards",  # not another run
                 str(toy / "adapt-*.tar"), "--out", str(tmp_path / "s2"), *few, "--lr", "5e-3"]) == 2
    assert "holds a finished run with other settings (lr: 0.002 -> 0.005)" in capsys.readouterr().err
    assert main(["adapt", "--stage", "language", "--model", str(tmp_path / "s1"), "--shards",  # nor another stage
                 str(toy / "adapt-*.tar"), "--out", str(tmp_path / "s1"), *few]) == 2
    assert "stage: 'visual' -> 'language'" in capsys.readouterr().err
    visual = ["adapt", "--stage", "visual", "--model", str(tmp_path / "base"), "--shards", str(toy / "adapt-*.tar"),
              "--out", str(tmp_path / "s1"), "--frames", "4", *few]
    assert main([*visual, "--resume", "--steps", "5"]) == 0  # stage 1 trained further: stage 2 is out of date
    assert main(["adapt", "--stage", "language", "--model", str(tmp_path / "s1"), "--shards",
                 str(toy / "adapt-*.tar"), "--out", str(tmp_path / "s2"), *few]) == 2
    assert "has been trained further or again since this run started from it" in capsys.readouterr().err
    assert main(["generate", "--model", str(tmp_path / "s2"), "--shards", str(toy / "test-*.tar"), "--n", "3"]) == 0
    out = capsys.readouterr().out
    assert out.count("gt: the ") == 3
    from captioner.adapter import CONFIG_FILE

    assert (tmp_path / "s1" / CONFIG_FILE).exists() and (tmp_path / "s2" / CONFIG_FILE).exists()  # the preset's
    two_dir = tmp_path / "two"  # the toy split's first clips have one event each: two with two events
    synth(SynthConfig(split="test", n=2, seed=2, events=2, reverse_frac=0.0), two_dir, progress=False)
    shards = "{" + str(toy / "test-*.tar") + "," + str(two_dir / "test-*.tar") + "}"
    assert main(["eval-toy", "--model", str(tmp_path / "s2"), "--shards", shards, "--n", "0",
                 "--num-beams", "2", "--json", str(tmp_path / "eval.json")]) == 0
    out = capsys.readouterr().out
    assert "forced choice" in out and "direction_within_axis" in out and "beam search, 2 beams" in out
    assert "two-event clips, by what went wrong" in out
    report = json.loads((tmp_path / "eval.json").read_text())
    n = report["generation"]["n"]
    assert n >= 6 and report["frames"] == 4 and report["num_beams"] == 2
    groups = report["generation_by_event_count"]
    assert sum(g["clips"] for g in groups.values()) == n and groups["2_event"]["clips"] == 2
    assert sum(n for k, n in report["two_event_misses"].items() if not k.startswith("event 2")) == 2
    assert report["forced_choice"]["n_direction"] + report["forced_choice"]["n_order"] >= 1


def test_bad_flags_are_named(tmp_path, capsys):
    assert main(["adapt", "--stage", "visual", "--model", "x", "--shards", "y", "--out", str(tmp_path),
                 "--steps", "0", "--lr", "-1"]) == 2
    err = capsys.readouterr().err
    assert "--steps" in err and "--lr" in err
    for flags, named in ((["--stage", "language", "--task-weight", "caption=two"], "--task-weight 'caption=two'"),
                         (["--stage", "visual", "--task-weight", "caption=2"], "applies to the language stage"),
                         (["--stage", "visual", "--pack"], "--pack applies to the language stage")):
        assert main(["adapt", "--model", "x", "--shards", "y", "--out", str(tmp_path), *flags]) == 2
        assert named in capsys.readouterr().err


def test_presets_and_flags_set_the_optimizer_of_each_stage():
    from captioner.cli import _config, build_parser

    def config(stage, *flags):
        args = build_parser().parse_args(["adapt", "--stage", "visual", "--model", "m", "--shards", "s", "--out", "o",
                                          *flags])
        return _config(args, stage, "m", "o")

    # the full preset runs every stage at AdamW beta2 0.95 (its image stage leaves the shape plateau early)
    assert {config(stage, "--preset", "full").adam_beta2 for stage in ("lm", "image", "visual", "language")} == {0.95}
    assert config("visual").adam_beta2 == 0.999  # the quick preset keeps torch's default
    # the full preset samples 8 frames in both adaptation stages (two Conv3d slices per event of a two-event
    # clip) and packs the language stage's pairs, three clips a step; flags still override it
    full_language = config("language", "--preset", "full")
    assert (config("visual", "--preset", "full").frames, full_language.frames) == (8, 8)
    assert (full_language.pack, full_language.batch_size) == (True, 3)
    assert not config("visual", "--preset", "full").pack  # packing is the language stage's alone
    assert config("language", "--preset", "full", "--frames", "4", "--no-pack").frames == 4
    assert not config("language", "--preset", "full", "--no-pack").pack
    assert config("image", "--preset", "full", "--adam-beta2", "0.9").adam_beta2 == 0.9
    assert config("image", "--vision-lr-scale", "4").vision_lr_scale == 4.0
    assert config("lm", "--vision-lr-scale", "4").vision_lr_scale == 1.0  # pretrain-toy's text stage has no vision
