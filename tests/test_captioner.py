"""The captioner on a tiny Qwen2-VL: save -> load -> batched generate, budgets, isolation, backends, training."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from captioner.interface import Budgeted, Clip
from captioner.load import load_captioner
from captioner.tiny import build_tiny
from data_specs import GenerationParams
from data_specs.prompts import PROMPTS, get_prompt
from engine.synth import SynthConfig, render, sample_clip, synth

VIDEO, FRAME = get_prompt("caption-video-v1"), get_prompt("caption-frame-v1")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("tiny"), layers=2, width=64)


@pytest.fixture(scope="module")
def cap(tiny_dir):
    c = load_captioner(str(tiny_dir), backend="hf", device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # loud random weights: greedy outputs differ from clip to clip
        for p in c.model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return c


@pytest.fixture(scope="module")
def clips():
    cfg = SynthConfig(split="test", n=1, seed=9)
    out = [Clip(f"k{i}", render(sample_clip(cfg, i))[::2]) for i in range(5)]
    out[3] = Clip("k3", out[3].frames[:4])  # a shorter clip: left padding must not change its caption
    return out


def test_tiny_checkpoint_loads_like_a_real_one(tiny_dir):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    proc = AutoProcessor.from_pretrained(tiny_dir)
    model = AutoModelForImageTextToText.from_pretrained(tiny_dir)
    assert type(model).__name__ == "Qwen2VLForConditionalGeneration"
    assert type(proc).__name__ == "Qwen2VLProcessor"
    assert (tiny_dir / "model.safetensors").exists() and not list(tiny_dir.glob("*.bin"))
    ids = proc.tokenizer.convert_tokens_to_ids(["<|video_pad|>", "<|image_pad|>"])
    assert ids == [model.config.video_token_id, model.config.image_token_id]


def test_a_missing_checkpoint_directory_is_named_not_sent_to_the_hub(tmp_path):
    from captioner.load import load_captioner

    for model in (str(tmp_path / "run" / "stage2"), "./stage2", "runs/full/stage2"):
        with pytest.raises(FileNotFoundError, match="no checkpoint directory"):
            load_captioner(model)


@pytest.mark.parametrize("prompt", [VIDEO, FRAME], ids=["video", "image"])
def test_batched_greedy_equals_one_by_one(cap, clips, prompt):
    params = GenerationParams(max_new_tokens=8)
    batched = cap.caption(clips, prompt, params)
    single = [cap.caption([c], prompt, params)[0] for c in clips]
    assert [r.text for r in batched] == [r.text for r in single]
    assert len({r.text for r in batched}) > 1, "outputs do not depend on the input: the test would be vacuous"
    assert all(r.ok and r.output_tokens > 0 and r.input_tokens > 0 for r in batched)
    assert batched[3].input_tokens < batched[0].input_tokens or prompt is FRAME


def test_token_budget_lowers_frames_then_rejects(cap, clips):
    long_clip = Clip("long", np.concatenate([clips[0].frames] * 8))  # 64 frames: 512 visual tokens
    old = cap.context_length
    try:
        cap.context_length = 300
        res = cap.caption([long_clip, clips[1]], VIDEO, GenerationParams(max_new_tokens=8))
        assert res[0].ok and res[0].frames_used < 64 and "frames 64->" in res[0].budget_note
        cap.context_length = 28  # less than the prompt and the new tokens: nothing fits
        res = cap.caption([long_clip, clips[1]], VIDEO, GenerationParams(max_new_tokens=8))
        assert all(not r.ok and r.error.startswith("over-budget") for r in res)
    finally:
        cap.context_length = old


def test_one_bad_clip_does_not_lose_the_batch(cap, clips):
    bad = Clip("bad", np.zeros((4, 112, 112), np.uint8))  # no channel axis: the processor fails on it
    res = cap.caption([clips[0], bad, clips[1]], VIDEO, GenerationParams(max_new_tokens=6))
    assert [r.ok for r in res] == [True, False, True]
    assert res[1].key == "bad" and res[1].error.startswith("generation-failed")
    assert res[0].text == cap.caption([clips[0]], VIDEO, GenerationParams(max_new_tokens=6))[0].text


def test_prompts_are_data_with_content_hashes():
    assert len({p.content_hash for p in PROMPTS.values()}) == len(PROMPTS)
    assert VIDEO.content_hash == get_prompt("caption-video-v1").content_hash
    with pytest.raises(KeyError, match="valid: caption-video-v1"):
        get_prompt("nope")


def test_vllm_backend_without_vllm_names_the_extra(tiny_dir):
    pytest.importorskip("transformers")
    try:
        import vllm  # noqa: F401
        pytest.skip("vllm is installed here")
    except ImportError:
        pass
    with pytest.raises(ImportError, match=r"pseudocap\[gpu\]"):
        load_captioner(str(tiny_dir), backend="vllm")
    with pytest.raises(ValueError, match="valid: hf, vllm"):
        load_captioner(str(tiny_dir), backend="tgi")


def test_vllm_prompt_and_output_parsing_match_hf(cap, clips):
    from captioner.backend_hf import render_prompt
    from captioner.backend_vllm import build_request, parse_output, sampling_kwargs

    b = Budgeted(clips[0], clips[0].frames, 64)
    req = build_request(cap.processor, VIDEO, b)
    assert req["prompt"] == render_prompt(cap.processor, VIDEO) and req["multi_modal_data"]["video"] is b.frames
    assert sampling_kwargs(GenerationParams(max_new_tokens=9)) == {"max_tokens": 9, "n": 1, "temperature": 0.0}
    with pytest.raises(ValueError, match="beam"):
        sampling_kwargs(GenerationParams(num_beams=4))
    fake = SimpleNamespace(prompt_token_ids=[1] * 90, outputs=[SimpleNamespace(
        text=" the red circle moves left.\n", token_ids=[5, 6, 7], finish_reason="length")])
    r = parse_output(fake, b, 0.5)
    assert (r.text, r.input_tokens, r.output_tokens, r.finish_reason, r.ok) == (
        "the red circle moves left.", 90, 3, "length", True)
    fake.outputs[0].finish_reason = "abort"
    assert not parse_output(fake, b, 0.5).ok


# --------------------------------------------------------------------------- training recipes

@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    from engine.synth import synth

    out = tmp_path_factory.mktemp("toycap")
    synth(SynthConfig(split="pretrain", n=48, seed=1), out, progress=False)
    synth(SynthConfig(split="adapt", n=24, seed=1), out, progress=False)
    return out


def _params(path):
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def test_lm_stage_learns_and_resumes_exactly(tiny_dir, toy, tmp_path):
    from captioner.train import TrainConfig, read_state, train

    kw = dict(stage="lm", model=str(tiny_dir), shards=str(toy / "pretrain-*.tar"), steps=24, batch_size=8,
              lr=3e-3, warmup=2, log_every=1)
    seen = []  # a learning curve's hook: each checkpoint is on disk, at its step, when the hook runs
    train(TrainConfig(out=str(tmp_path / "a"), save_every=8, **kw), progress=False,
          on_checkpoint=lambda step, out: seen.append((step, read_state(out)["step"])))
    assert seen == [(8, 8), (16, 16), (24, 24)]
    cut = train(TrainConfig(out=str(tmp_path / "b"), stop_at=10, **kw), progress=False)
    assert cut.get("stopped") and cut["step"] == 10
    with pytest.raises(ValueError, match=r"holds another run \(lr: 0\.003 -> 0\.001\)"):
        train(TrainConfig(out=str(tmp_path / "b"), resume=True, **{**kw, "lr": 1e-3}), progress=False)
    resumed = train(TrainConfig(out=str(tmp_path / "b"), resume=True, **kw), progress=False)
    assert resumed["step"] == 24
    a, b = _params(tmp_path / "a"), _params(tmp_path / "b")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    losses = [__import__("json").loads(x)["loss"] for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:3])


def test_training_flushes_denormals_and_leaves_the_float_mode_as_it_was(tiny_dir, toy, tmp_path):
    from captioner.train import TrainConfig, _denormals_flushed, flushing_denormals, train

    if not torch.set_flush_denormal(False):
        pytest.skip("this CPU cannot flush denormals (not x86 with SSE3)")
    kw = dict(stage="lm", model=str(tiny_dir), shards=str(toy / "pretrain-*.tar"), steps=2, batch_size=4,
              save_every=1)
    for flush in (True, False):
        seen = []  # the float mode while the stage trains (the checkpoint hook runs inside it)
        train(TrainConfig(out=str(tmp_path / str(flush)), flush_denormals=flush, **kw), progress=False,
              on_checkpoint=lambda step, out: seen.append(_denormals_flushed()))
        assert seen == [flush, flush]
        assert not _denormals_flushed()  # the caller's mode (torch's default) is back
    with flushing_denormals():  # a caller that flushes already keeps flushing after a stage that flushed too
        train(TrainConfig(out=str(tmp_path / "nested"), flush_denormals=True, **kw), progress=False)
        assert _denormals_flushed()
    assert not _denormals_flushed()


def test_weight_decay_shrinks_matrices_not_norms_and_resumes_exactly(tiny_dir, toy, tmp_path):
    from captioner.train import TrainConfig, train

    # decoupled decay: each step multiplies a matrix by (1 - lr * wd) = 0.9; a gradient step moves it ~lr
    kw = dict(stage="lm", model=str(tiny_dir), shards=str(toy / "pretrain-*.tar"), steps=4, batch_size=4,
              lr=1e-3, warmup=1, weight_decay=100.0)
    train(TrainConfig(out=str(tmp_path / "a"), **kw), progress=False)
    train(TrainConfig(out=str(tmp_path / "b"), stop_at=2, **kw), progress=False)
    train(TrainConfig(out=str(tmp_path / "b"), resume=True, **kw), progress=False)
    before, a, b = _params(tiny_dir), _params(tmp_path / "a"), _params(tmp_path / "b")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    lm = [k for k in before if ".visual." not in f".{k}"]
    norms = [k for k in lm if "norm" in k]
    matrices = [k for k in lm if before[k].ndim == 2 and not torch.equal(before[k], a[k])]
    assert norms and matrices
    assert all((a[k] - before[k]).abs().max() < 1e-2 for k in norms)
    assert all(a[k].norm() < 0.8 * before[k].norm() for k in matrices), [
        (k, float(a[k].norm() / before[k].norm())) for k in matrices if a[k].norm() >= 0.8 * before[k].norm()]


def test_vision_lr_scale_and_adam_beta2_shape_the_optimizer_and_resume_exactly(tiny_dir, toy, tmp_path):
    from captioner.train import TrainConfig, train

    # Adam's first step moves each weight with a gradient by about its learning rate, whatever the gradient's size
    kw = dict(stage="image", model=str(tiny_dir), shards=str(toy / "pretrain-*.tar"), steps=1, batch_size=4,
              lr=1e-3, warmup=1, min_lr_ratio=1.0)
    train(TrainConfig(out=str(tmp_path / "plain"), **kw), progress=False)
    train(TrainConfig(out=str(tmp_path / "scaled"), vision_lr_scale=8.0, **kw), progress=False)
    before, plain, scaled = _params(tiny_dir), _params(tmp_path / "plain"), _params(tmp_path / "scaled")
    vision = [k for k in before if ".visual." in f".{k}" and not torch.equal(before[k], plain[k])]
    lm = [k for k in before if ".visual." not in f".{k}" and not torch.equal(before[k], plain[k])]
    assert vision and lm

    def step(after, keys):
        return max(float((after[k] - before[k]).abs().max()) for k in keys)

    assert step(plain, vision) == pytest.approx(1e-3, rel=0.05)
    assert step(scaled, vision) == pytest.approx(8e-3, rel=0.05)
    assert all(torch.equal(plain[k], scaled[k]) for k in lm)  # the same first gradients, the same lr
    # the scale and AdamW's beta2 are part of the run, and a cut run resumes with them
    kw.update(steps=4, vision_lr_scale=8.0, adam_beta2=0.95, min_lr_ratio=0.1)
    train(TrainConfig(out=str(tmp_path / "a"), **kw), progress=False)
    groups = torch.load(tmp_path / "a" / "optimizer.pt", weights_only=False)["optimizer"]["param_groups"]
    assert {g["lr_scale"] for g in groups} == {1.0, 8.0} and {tuple(g["betas"]) for g in groups} == {(0.9, 0.95)}
    train(TrainConfig(out=str(tmp_path / "b"), stop_at=2, **kw), progress=False)
    for field, value in (("vision_lr_scale", 1.0), ("adam_beta2", 0.999)):
        with pytest.raises(ValueError, match=rf"{field}: .* -> {value}"):
            train(TrainConfig(out=str(tmp_path / "b"), resume=True, **{**kw, field: value}), progress=False)
    train(TrainConfig(out=str(tmp_path / "b"), resume=True, **kw), progress=False)
    a, b = _params(tmp_path / "a"), _params(tmp_path / "b")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    for stage in ("lm", "language"):  # stages that train no vision side refuse it
        with pytest.raises(ValueError, match="--vision-lr-scale applies to the stages that train the vision side"):
            TrainConfig(stage=stage, model="m", shards="s", out="o", vision_lr_scale=2.0)
    with pytest.raises(ValueError, match=r"--adam-beta2 must be in \(0, 1\)"):
        TrainConfig(stage="lm", model="m", shards="s", out="o", adam_beta2=1.0)


@pytest.mark.parametrize("stage,moves", [("visual", "visual."), ("language", "layers.0.mlp")])
def test_adaptation_stages_freeze_the_other_side(tiny_dir, toy, tmp_path, stage, moves):
    from captioner.train import TrainConfig, train

    train(TrainConfig(stage=stage, model=str(tiny_dir), shards=str(toy / "adapt-*.tar"), out=str(tmp_path / stage),
                      steps=3, batch_size=4, frames=4, warmup=1), progress=False)
    before, after = _params(tiny_dir), _params(tmp_path / stage)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all((".visual." in f".{k}") == (stage == "visual") for k in changed), sorted(changed)[:5]
    assert any(moves in k for k in changed)


def test_visual_stage_can_train_the_adapter_alone_or_with_the_merger(tiny_dir, toy, tmp_path):
    from safetensors.torch import load_file

    from captioner.adapter import WEIGHTS_FILE
    from captioner.train import TrainConfig, train

    def run(parts):
        out = tmp_path / f"run{len(list(tmp_path.iterdir()))}"
        train(TrainConfig(stage="visual", model=str(tiny_dir), shards=str(toy / "adapt-*.tar"), out=str(out),
                          steps=3, batch_size=4, frames=4, warmup=1, lr=1e-2, temporal_adapter=True,
                          vision_parts=parts), progress=False)
        before, after = _params(tiny_dir), _params(out)
        return {k for k in before if not torch.equal(before[k], after[k])}, load_file(str(out / WEIGHTS_FILE))

    changed, adapter = run(("adapter",))
    assert not changed  # the image model's tower and merger exactly as they were
    assert adapter["up.weight"].abs().sum() > 0  # and the adapter trained
    with pytest.raises(ValueError, match="holds still frames.*--train-vision adapter freezes both"):
        train(TrainConfig(stage="visual", model=str(tiny_dir), shards="{%s,%s}" % (toy / "adapt-*.tar",
                          toy / "pretrain-*.tar"), out=str(tmp_path / "frames"), steps=1, frames=4,
                          temporal_adapter=True, vision_parts="adapter"), progress=False)
    changed, _ = run("adapter,merger")  # as --train-vision gives it
    assert changed and all(".visual.merger." in f".{k}" for k in changed), sorted(changed)[:5]
    with pytest.raises(ValueError, match="--train-vision takes parts among adapter, merger, tower, got blocks"):
        TrainConfig(stage="visual", model="m", shards="s", out="o", vision_parts=("blocks",))
    with pytest.raises(ValueError, match="--train-vision applies to the visual stage"):
        TrainConfig(stage="language", model="m", shards="s", out="o", vision_parts=("merger",))
    with pytest.raises(ValueError, match="--train-vision adapter needs --temporal-adapter"):
        TrainConfig(stage="visual", model="m", shards="s", out="o", vision_parts=("adapter",))


def test_visual_stage_rehearses_still_frames_given_with_the_clips(tiny_dir, toy):
    from collections import Counter

    from transformers import AutoProcessor

    from captioner.train import TrainConfig, batch_plan, build_examples
    from engine.shards import read_samples, read_text

    processor = AutoProcessor.from_pretrained(tiny_dir)
    shards = "{%s,%s}" % (toy / "adapt-*.tar", toy / "pretrain-*.tar")  # clips, and the base's still frames
    cfg = TrainConfig(stage="visual", model=str(tiny_dir), shards=shards, out="unused", frames=4, batch_size=4,
                      input_weights={"video": 3})
    examples, report = build_examples(cfg, processor, progress=False)
    assert Counter(e.media for e in examples) == {"video": 24, "image": 48} and report["samples"] == 72
    frame_q = processor.tokenizer(FRAME.text, add_special_tokens=False)["input_ids"]
    still = next(e for e in examples if e.media == "image")
    ids = still.input_ids.tolist()
    assert any(ids[i:i + len(frame_q)] == frame_q for i in range(len(ids)))  # asked with the frame prompt
    answers = {read_text(s, "gt.txt") for s in read_samples(str(toy / "pretrain-*.tar"))}
    said = processor.tokenizer.decode(still.input_ids[still.labels != -100]).replace("<|im_end|>", "").strip()
    assert said in answers  # and answered with the frame's static caption
    plan = batch_plan(examples, cfg)
    assert [plan(step, 0)[0] for step in range(8)] == ["video"] * 3 + ["image"] + ["video"] * 3 + ["image"]


def test_visual_stage_keeps_the_processors_pixel_values_exactly_in_a_quarter_of_the_memory(tiny_dir, toy, clips):
    from transformers import AutoProcessor

    from captioner.train import PixelCodec, TrainConfig, build_examples, collate

    processor = AutoProcessor.from_pretrained(tiny_dir)
    shards = "{%s,%s}" % (toy / "adapt-*.tar", toy / "pretrain-*.tar")
    cfg = TrainConfig(stage="visual", model=str(tiny_dir), shards=shards, out="unused", frames=4)
    examples, _ = build_examples(cfg, processor, progress=False)
    for media in ("video", "image"):
        two = [e for e in examples if e.media == media][:2]
        assert all(e.pixels.dtype == torch.uint8 for e in two)
        batch = collate(two, processor.tokenizer.pad_token_id)
        kind = "pixel_values_videos" if media == "video" else "pixel_values"
        assert torch.equal(batch[kind], torch.cat([e.pixel_values() for e in two]))
        assert batch[kind].dtype == torch.float32 and len(batch[kind]) == sum(len(e.pixels) for e in two)
    # what the processor makes of a clip at the world's size comes back exactly (bf16 kept 3 significant digits)
    video = processor.video_processor(videos=[clips[0].frames], return_tensors="pt", do_sample_frames=False)
    codec = PixelCodec(processor.video_processor)
    pixels = video["pixel_values_videos"]
    codes = codec.encode(pixels)
    assert codes.dtype == torch.uint8 and codes.shape == pixels.shape
    assert torch.allclose(codec.decode(codes), pixels, rtol=0, atol=1e-6)
    # the processor resizes 8-bit frames in 8 bits: a resized clip's values are codes too
    resized = processor.video_processor(videos=[clips[0].frames[:, :50, :50]], return_tensors="pt",
                                        do_sample_frames=False)["pixel_values_videos"]
    assert torch.allclose(codec.decode(codec.encode(resized)), resized, rtol=0, atol=1e-6)
    # values that are not codes (float frames, another normalisation) are not encoded (build_examples keeps bf16)
    assert codec.encode(pixels + 0.5 / 255) is None
    assert codec.encode(pixels * 3) is None


def test_lora_adaptation_merges_into_a_plain_checkpoint(tiny_dir, toy, tmp_path):
    pytest.importorskip("peft")
    from captioner.train import TrainConfig, train

    train(TrainConfig(stage="language", model=str(tiny_dir), shards=str(toy / "adapt-*.tar"), out=str(tmp_path / "l"),
                      steps=3, batch_size=4, frames=4, warmup=1, lr=1e-2, lora=True, lora_rank=4), progress=False)
    before, after = _params(tiny_dir), _params(tmp_path / "l")
    assert set(before) == set(after)  # merged: no adapter tensors left, loads like any checkpoint
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and not any(".visual." in f".{k}" for k in changed)
    assert load_captioner(str(tmp_path / "l")).caption([Clip("x", np.zeros((4, 112, 112, 3), np.uint8))], VIDEO,
                                                       GenerationParams(max_new_tokens=3))[0].ok


# --------------------------------------------------------------------------- temporal adapter, forced choice

def test_new_temporal_adapter_is_the_identity_and_sees_only_video(tiny_dir, clips):
    from transformers import AutoModelForImageTextToText

    from captioner.adapter import adapter_of, attach_adapter
    from captioner.fast_vision import speed_up_vision

    cap = load_captioner(str(tiny_dir), device="cpu")
    enc = cap.inputs([Budgeted(clips[0], clips[0].frames, 0)], VIDEO)
    with torch.no_grad():
        plain = cap.model(**enc).logits
        attach_adapter(cap.model)
        assert torch.equal(cap.model(**enc).logits, plain)  # zero-initialised output: the image model, unchanged
        for p in adapter_of(cap.model).up.parameters():
            p.normal_(std=0.5)
        assert not torch.allclose(cap.model(**enc).logits, plain)
        img = cap.inputs([Budgeted(clips[0], clips[0].frames[:1], 0)], FRAME)
        fresh = AutoModelForImageTextToText.from_pretrained(tiny_dir).eval()
        speed_up_vision(fresh)  # as load_captioner's model: the same code path, so the same bits
        assert torch.equal(cap.model(**img).logits, fresh(**img).logits)  # images never pass through it


def test_a_deep_copy_of_a_model_with_an_adapter_runs_its_own_adapter(tiny_dir, clips):
    import copy

    from captioner.adapter import adapter_of, attach_adapter

    cap = load_captioner(str(tiny_dir), device="cpu")
    attach_adapter(cap.model)
    enc = cap.inputs([Budgeted(clips[0], clips[0].frames, 0)], VIDEO)
    twin = copy.deepcopy(cap.model)
    with torch.no_grad():
        before = cap.model(**enc).logits
        for p in adapter_of(twin).up.parameters():
            p.normal_(std=0.5)
        assert not torch.allclose(twin(**enc).logits, before)  # the copy's adapter, not the original's
        assert torch.equal(cap.model(**enc).logits, before)


def test_visual_stage_with_adapter_saves_a_plain_checkpoint_beside_it(tiny_dir, toy, tmp_path):
    from transformers import AutoModelForImageTextToText

    from captioner.adapter import CONFIG_FILE, WEIGHTS_FILE
    from captioner.train import TrainConfig, train

    out = tmp_path / "s1"
    train(TrainConfig(stage="visual", model=str(tiny_dir), shards=str(toy / "adapt-*.tar"), out=str(out), steps=4,
                      batch_size=4, frames=4, warmup=1, lr=1e-2, temporal_adapter=True), progress=False)
    assert (out / CONFIG_FILE).exists() and (out / WEIGHTS_FILE).exists()
    assert set(_params(out)) == set(_params(tiny_dir))  # model.safetensors holds no adapter tensor
    AutoModelForImageTextToText.from_pretrained(out)  # still a checkpoint transformers loads as is
    from safetensors.torch import load_file

    assert load_file(str(out / WEIGHTS_FILE))["up.weight"].abs().sum() > 0  # it trained
    # stage 2 starts from it, keeps it frozen and passes it on
    train(TrainConfig(stage="language", model=str(out), shards=str(toy / "adapt-*.tar"), out=str(tmp_path / "s2"),
                      steps=2, batch_size=4, frames=4, warmup=1), progress=False)
    assert load_file(str(tmp_path / "s2" / WEIGHTS_FILE)).keys() == load_file(str(out / WEIGHTS_FILE)).keys()
    assert all(torch.equal(load_file(str(tmp_path / "s2" / WEIGHTS_FILE))[k], v)
               for k, v in load_file(str(out / WEIGHTS_FILE)).items())
    assert load_captioner(str(tmp_path / "s2")).caption([Clip("x", np.zeros((4, 112, 112, 3), np.uint8))], VIDEO,
                                                        GenerationParams(max_new_tokens=3))[0].ok
    with pytest.raises(ValueError, match="temporal adapter"):
        load_captioner(str(out), backend="vllm")
    cfg = json.loads((out / CONFIG_FILE).read_text())
    (out / CONFIG_FILE).write_text(json.dumps({**cfg, "layers": 0}))  # written by another version
    with pytest.raises(ValueError, match=r"temporal_adapter\.json: unknown temporal-adapter field\(s\) layers"):
        load_captioner(str(out))


def test_still_frames_give_every_frame_its_own_slice_in_training_and_generation(tiny_dir, toy, clips, tmp_path):
    from captioner.adapter import CONFIG_FILE, adapter_of, attach_adapter
    from captioner.train import TrainConfig, build_examples, train
    from transformers import AutoProcessor

    out = tmp_path / "s1"
    train(TrainConfig(stage="visual", model=str(tiny_dir), shards=str(toy / "adapt-*.tar"), out=str(out), steps=2,
                      batch_size=4, frames=4, warmup=1, temporal_adapter=True, still_frames=True), progress=False)
    assert json.loads((out / CONFIG_FILE).read_text())["still_frames"] is True
    still, paired = load_captioner(str(out), device="cpu"), load_captioner(str(tiny_dir), device="cpu")
    assert still.frame_repeat == 2 and paired.frame_repeat == 1
    clip = clips[0]
    enc = still.inputs([Budgeted(clip, clip.frames[:4], 0)], VIDEO)
    assert enc["video_grid_thw"][0, 0].item() == 4  # 4 frames, 4 slices (paired: 2)
    pix = enc["pixel_values_videos"].reshape(-1, 3, 2, 14, 14)  # patches: channels, temporal patch, rows, columns
    assert torch.equal(pix[:, :, 0], pix[:, :, 1])  # each slice holds one frame
    assert still.visual_tokens(4, 112, 112, "video") == 2 * paired.visual_tokens(4, 112, 112, "video") == 64
    r = still.caption([Clip("x", clip.frames[:4])], VIDEO, GenerationParams(max_new_tokens=2))[0]
    assert r.ok and r.input_tokens == still.prompt_tokens(VIDEO) - 1 + 64  # the budget counts what the model reads
    # a new still-frames adapter leaves the image model as it was: slice k's tokens are frame k's as an image
    core = paired.model.model
    attach_adapter(paired.model, still_frames=True)
    with torch.no_grad():
        video = core.get_video_features(enc["pixel_values_videos"], enc["video_grid_thw"]).pooler_output[0]
        for k in range(4):
            img = paired.inputs([Budgeted(clip, clip.frames[k:k + 1], 0)], FRAME)
            image = core.get_image_features(img["pixel_values"], img["image_grid_thw"]).pooler_output[0]
            assert torch.allclose(video[16 * k:16 * (k + 1)], image, atol=1e-5)
    with pytest.raises(ValueError, match="still_frames=True"):
        attach_adapter(paired.model)  # asking for paired frames from a still-frames model
    # the language stage follows the checkpoint: its examples carry one slice per frame
    cfg = TrainConfig(stage="language", model=str(out), shards=str(toy / "adapt-*.tar"), out=str(tmp_path / "s2"),
                      steps=1, frames=4, max_samples=2)
    examples, _ = build_examples(cfg, AutoProcessor.from_pretrained(out), progress=False, frame_repeat=2)
    assert {tuple(e.grid_thw[0].tolist()) for e in examples} == {(4, 8, 8)}
    train(cfg, progress=False)
    assert adapter_of(load_captioner(str(tmp_path / "s2")).model).cfg.still_frames
    with pytest.raises(ValueError, match="--still-frames applies to the visual stage with --temporal-adapter"):
        TrainConfig(stage="language", model=str(out), shards="x", out="y", still_frames=True)


def test_pixel_branch_reads_the_frames_the_tower_reads_and_starts_as_the_identity(tiny_dir, clips):
    import torch.nn.functional as F

    from captioner.adapter import AdapterConfig, TemporalAdapter, adapter_of, attach_adapter

    cap = load_captioner(str(tiny_dir), device="cpu")
    clip = clips[0]
    enc = cap.inputs([Budgeted(clip, clip.frames[:4], 0)], VIDEO)
    # the branch reads the processor's flat patches; its cells are 7-px squares of each slice's first frame
    branch = TemporalAdapter(AdapterConfig(dim=64, pixel_channels=5)).pixel_branch
    t, h, w = (int(n) for n in enc["video_grid_thw"][0])
    cells = branch.cells(enc["pixel_values_videos"][None], (t, h // 2, w // 2))
    proc = cap.processor.video_processor
    mean, std = (torch.tensor(v, dtype=torch.float32)[:, None, None] for v in (proc.image_mean, proc.image_std))
    frames = (torch.from_numpy(clip.frames[:4:2]).permute(0, 3, 1, 2).float() / 255 - mean) / std  # 0 and 2
    kernel = branch.embed.weight.view(5, 3, 7, 7)
    expected = F.conv2d(frames, kernel, branch.embed.bias, stride=7)  # [slices, channels, H/7, W/7]
    assert cells.shape == expected.shape and torch.allclose(cells, expected, atol=1e-4)
    with torch.no_grad():
        plain = cap.model(**enc).logits
        adapter = attach_adapter(cap.model, pixel_channels=4)
        assert torch.equal(cap.model(**enc).logits, plain)  # a new adapter is the identity, pixel branch and all
        for p in adapter.up.parameters():
            p.normal_(std=0.5)
    cap.model(**enc).logits.square().sum().backward()
    assert adapter.pixel_branch.embed.weight.grad.abs().sum() > 0  # the loss reaches the branch through the pixels
    with pytest.raises(ValueError, match="pixel_channels=4"):
        attach_adapter(cap.model)  # an adapter without the branch would read these tokens otherwise
    assert adapter_of(cap.model) is adapter


def test_visual_stage_with_a_pixel_branch_records_it_and_the_later_stages_follow(tiny_dir, toy, tmp_path):
    from safetensors.torch import load_file

    from captioner.adapter import CONFIG_FILE, WEIGHTS_FILE, adapter_of
    from captioner.train import TrainConfig, train

    out = tmp_path / "s1"
    train(TrainConfig(stage="visual", model=str(tiny_dir), shards=str(toy / "adapt-*.tar"), out=str(out), steps=3,
                      batch_size=4, frames=4, warmup=1, lr=1e-2, temporal_adapter=True, pixel_branch=4),
          progress=False)
    assert json.loads((out / CONFIG_FILE).read_text())["pixel_channels"] == 4
    weights = load_file(str(out / WEIGHTS_FILE))
    assert weights["pixel_branch.embed.weight"].shape == (4, 3 * 7 * 7)  # 7-px cells: 28-px tokens in 4x4
    # the language stage precomputes the frozen vision side's tokens through the branch and passes it on
    train(TrainConfig(stage="language", model=str(out), shards=str(toy / "adapt-*.tar"), out=str(tmp_path / "s2"),
                      steps=2, batch_size=4, frames=4, warmup=1), progress=False)
    s2 = load_captioner(str(tmp_path / "s2"))
    assert adapter_of(s2.model).cfg.pixel_channels == 4
    assert all(torch.equal(load_file(str(tmp_path / "s2" / WEIGHTS_FILE))[k], v) for k, v in weights.items())
    assert s2.caption([Clip("x", np.zeros((4, 112, 112, 3), np.uint8))], VIDEO,
                      GenerationParams(max_new_tokens=3))[0].ok
    with pytest.raises(ValueError, match="--pixel-branch applies to the visual stage with --temporal-adapter"):
        TrainConfig(stage="language", model=str(out), shards="x", out="y", pixel_branch=4)
    with pytest.raises(ValueError, match="--pixel-branch must be >= 0"):
        TrainConfig(stage="visual", model=str(out), shards="x", out="y", temporal_adapter=True, pixel_branch=-1)


def test_log_likelihood_is_the_training_loss_of_the_answer(cap, clips):
    answers = ["the red circle moves left.", "the blue square grows, then the red circle appears."]
    lls = cap.log_likelihoods(clips[1], VIDEO, answers)
    tok = cap.processor.tokenizer
    for answer, ll in zip(answers, lls):
        enc = cap.inputs([Budgeted(clips[1], clips[1].frames, 0)], VIDEO)
        a_ids = torch.tensor([tok(answer + "<|im_end|>", add_special_tokens=False)["input_ids"]])
        ids = torch.cat([enc["input_ids"], a_ids], dim=1)
        labels = torch.cat([torch.full_like(enc["input_ids"], -100), a_ids], dim=1)
        mm = torch.cat([enc["mm_token_type_ids"], torch.zeros_like(a_ids)], dim=1)
        with torch.no_grad():
            loss = cap.model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels, mm_token_type_ids=mm,
                             pixel_values_videos=enc["pixel_values_videos"],
                             video_grid_thw=enc["video_grid_thw"]).loss
        assert ll == pytest.approx(-loss.item() * a_ids.shape[1], rel=1e-4)
    assert lls[0] != lls[1]


def test_forced_choice_scores_true_captions_against_flipped_twins(cap, clips):
    from captioner.evaluate import forced_choice_toy

    refs = ["the red circle moves left.", "the blue square rotates.",
            "the green triangle grows, then the red circle appears.", "the yellow square turns red.",
            "the red circle disappears."]
    fc = forced_choice_toy(cap, clips, refs)
    assert fc["n_direction"] == 4 and fc["n_order"] == 1  # rotate and recolour have no two-way foil
    assert 0.0 <= fc["direction"] <= 1.0 and fc["order"] in (0.0, 0.5, 1.0)
    with pytest.raises(ValueError, match="toy grammar"):
        forced_choice_toy(cap, clips[:1], ["a caption outside the grammar"])


def test_frame_evaluation_reads_pretrain_images_and_scores_what_the_model_says(cap, tmp_path):
    from captioner.evaluate import evaluate_frames, load_eval_frames

    synth(SynthConfig(split="pretrain", n=6, seed=4, shard_size=4), tmp_path, progress=False)
    frames = load_eval_frames(str(tmp_path / "pretrain-*.tar"), limit=5)
    assert [c.frames.shape for c in frames[0]] == [(1, 112, 112, 3)] * 5
    r = evaluate_frames(cap, frames)
    assert r["metrics"]["n"] == 5 and r["metrics"]["n_objects"] >= 5
    assert [e[2] for e in r["examples"]] == frames[1]
    assert all(isinstance(e[1], str) for e in r["examples"])  # the loud random model: whatever it says, scored


def test_tiny_config_with_7px_patches_keeps_processor_and_model_in_step(tmp_path, cap):
    p7 = load_captioner(str(build_tiny(tmp_path / "p7", name="qwen2-vl-tiny-p7")), device="cpu")
    assert p7.visual_tokens(4, 112, 112, "video") == 4 * cap.visual_tokens(4, 112, 112, "video") == 128
    out = p7.caption([Clip("x", np.zeros((4, 112, 112, 3), np.uint8))], VIDEO, GenerationParams(max_new_tokens=3))
    assert out[0].ok and out[0].input_tokens > 128
    with pytest.raises(ValueError, match="multiple of 14"):
        build_tiny(tmp_path / "bad", name="qwen2-vl-tiny-p7", image_size=120)


def test_tiny_config_sets_the_language_models_m_rope(tmp_path, monkeypatch):
    from captioner import tiny

    cfg = json.loads((build_tiny(tmp_path / "rope", name="qwen2-vl-tiny-rope") / "config.json").read_text())
    assert cfg["text_config"]["rope_parameters"] == {"rope_type": "default", "rope_theta": 10.0,
                                                     "mrope_section": [2, 3, 3]}
    monkeypatch.setitem(tiny.TINY_CONFIGS, "bad", {**tiny.TINY_CONFIGS["qwen2-vl-tiny"], "mrope_section": [4, 4, 4]})
    with pytest.raises(ValueError, match=r"mrope_section \[4, 4, 4\] must sum to head_dim / 2 = 8"):
        build_tiny(tmp_path / "bad", name="bad")


def test_batched_greedy_equals_one_by_one_through_a_trained_adapter(tiny_dir, clips):
    from captioner.adapter import attach_adapter

    c = load_captioner(str(tiny_dir), device="cpu")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in c.model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
        for p in attach_adapter(c.model).parameters():  # each video's tokens must stay its own
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    params = GenerationParams(max_new_tokens=8)
    batched = [r.text for r in c.caption(clips, VIDEO, params)]
    assert batched == [c.caption([x], VIDEO, params)[0].text for x in clips]
    assert len(set(batched)) > 1


def test_visual_stage_with_adapter_resumes_exactly(tiny_dir, toy, tmp_path):
    from safetensors.torch import load_file

    from captioner.adapter import WEIGHTS_FILE
    from captioner.train import TrainConfig, train

    kw = dict(stage="visual", model=str(tiny_dir), shards=str(toy / "adapt-*.tar"), steps=6, batch_size=4, frames=4,
              warmup=1, lr=1e-2, temporal_adapter=True)
    train(TrainConfig(out=str(tmp_path / "a"), **kw), progress=False)
    assert train(TrainConfig(out=str(tmp_path / "b"), stop_at=3, **kw), progress=False)["step"] == 3
    train(TrainConfig(out=str(tmp_path / "b"), resume=True, **kw), progress=False)
    for name in ("model.safetensors", WEIGHTS_FILE):
        a, b = load_file(str(tmp_path / "a" / name)), load_file(str(tmp_path / "b" / name))
        assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a), name


def test_language_stage_on_precomputed_features_trains_as_through_pixels(tiny_dir, toy, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from captioner.adapter import WEIGHTS_FILE, attach_adapter, detached, save_adapter
    from captioner.train import TrainConfig, train

    start = tmp_path / "start"  # a non-identity adapter on the frozen side: the features are more than the tower's
    model = AutoModelForImageTextToText.from_pretrained(tiny_dir)
    # one draw whatever ran before: Adam's first steps move a weight whose gradient is near zero by up to the lr
    # either way, so how far float rounding carries depends on the draw (another one measured past 1e-4)
    torch.manual_seed(0)
    for p in attach_adapter(model).up.parameters():
        torch.nn.init.normal_(p, std=0.2)
    with detached(model):
        model.save_pretrained(start)
    save_adapter(model, start)
    AutoProcessor.from_pretrained(tiny_dir).save_pretrained(start)
    kw = dict(stage="language", model=str(start), shards=str(toy / "adapt-*.tar"), steps=5, batch_size=4, frames=4,
              warmup=1, lr=1e-2)
    fast = train(TrainConfig(out=str(tmp_path / "fast"), **kw), progress=False)
    slow = train(TrainConfig(out=str(tmp_path / "slow"), precompute_features=False, **kw), progress=False)
    assert (fast["visual_features"], slow["visual_features"]) == ("precomputed", "per step")
    assert fast["loss"] == pytest.approx(slow["loss"], rel=1e-4)
    a, b, s = _params(tmp_path / "fast"), _params(tmp_path / "slow"), _params(start)
    # float rounding of the two batchings, through 5 Adam steps of up to 1e-2 each: measured up to 1.2e-4, where
    # training moved weights by up to 3.7e-2
    assert all(torch.allclose(a[k], b[k], atol=5e-4) for k in a)
    assert any(not torch.allclose(a[k], s[k], atol=1e-3) for k in a)  # it trained
    assert torch.equal(load_file(str(tmp_path / "fast" / WEIGHTS_FILE))["up.weight"],
                       load_file(str(start / WEIGHTS_FILE))["up.weight"])  # frozen, passed on


def test_task_weights_repeat_or_drop_instruction_pairs_by_type(tiny_dir, toy):
    from collections import Counter

    from transformers import AutoProcessor

    from captioner.train import TrainConfig, build_examples
    from engine.shards import read_json, read_samples

    processor = AutoProcessor.from_pretrained(tiny_dir)
    qa = [q for s in read_samples(str(toy / "adapt-*.tar")) for q in read_json(s, "qa.json")]
    types = Counter(q["type"] for q in qa)
    kw = dict(stage="language", model=str(tiny_dir), shards=str(toy / "adapt-*.tar"), out="unused", frames=4)

    def n_examples(weights: dict) -> int:
        return len(build_examples(TrainConfig(task_weights=weights, **kw), processor, progress=False)[0])

    assert n_examples({}) == len(qa)
    assert n_examples({"caption": 3, "causal": 0}) == len(qa) + 2 * types["caption"] - types["causal"]
    with pytest.raises(ValueError, match="TYPE=N"):
        TrainConfig(task_weights={"caption": -1}, **kw)
    with pytest.raises(ValueError, match="language stage"):
        TrainConfig(**{**kw, "stage": "visual"}, task_weights={"caption": 2})


def test_a_setting_added_since_a_run_compares_as_its_default():
    from dataclasses import asdict

    from captioner.train import TrainConfig, config_changes

    cfg = TrainConfig(stage="language", model="hub/id", shards="data/x.tar", out="o")
    older = {k: v for k, v in asdict(cfg).items() if k != "task_weights"}  # a run from before --task-weight
    assert config_changes({"config": older}, cfg) == []
    weighted = TrainConfig(stage="language", model="hub/id", shards="data/x.tar", out="o", task_weights={"caption": 2})
    assert config_changes({"config": older}, weighted) == ["task_weights: {} -> {'caption': 2}"]
    before_pack = {k: v for k, v in asdict(cfg).items() if k != "pack"}
    assert config_changes({"config": before_pack}, cfg) == []
    packed = TrainConfig(stage="language", model="hub/id", shards="data/x.tar", out="o", pack=True)
    assert config_changes({"config": before_pack}, packed) == ["pack: False -> True"]


def test_packed_pairs_give_the_loss_and_gradients_of_the_pairs_apart(tiny_dir, toy, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from captioner.train import (TrainConfig, _to, answer_loss, apply_freezing, build_examples, collate,
                                 frozen_features, mrope_positions, train)

    processor = AutoProcessor.from_pretrained(tiny_dir)
    model = AutoModelForImageTextToText.from_pretrained(tiny_dir)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # loud weights: a leak between pairs would move the loss
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    kw = dict(stage="language", model=str(tiny_dir), shards=str(toy / "adapt-*.tar"), out="unused", frames=4)
    model = apply_freezing(model, TrainConfig(**kw))
    pad = processor.tokenizer.pad_token_id

    def examples(pack: bool, positions: bool) -> tuple[list, dict]:
        return build_examples(TrainConfig(pack=pack, **kw), processor, progress=False,
                              features=frozen_features(model, "cpu"),
                              positions=mrope_positions(model) if positions else None)

    apart, report = examples(pack=False, positions=False)  # the model computes positions and every logit
    packed, packed_report = examples(pack=True, positions=True)
    assert packed_report["examples"] == report["examples"] == len(apart)
    assert packed_report["sequences"] == report["samples"] == len(packed) < len(apart)
    assert packed_report["unpacked_clips"] == 0
    clips = packed[:3]
    pairs = apart[:sum(e.pairs for e in clips)]  # the same pairs, in the same order
    assert sum(len(e.input_ids) for e in clips) < 0.7 * sum(len(e.input_ids) for e in pairs)
    params = [p for p in model.parameters() if p.requires_grad]
    reference = model(**_to(collate(pairs, pad), "cpu")).loss
    for batch in (collate(pairs, pad), collate(clips, pad)):
        loss = answer_loss(model, _to(batch, "cpu"))
        assert loss.item() == pytest.approx(reference.item(), rel=1e-5)
        for a, b in zip(torch.autograd.grad(loss, params, retain_graph=True),
                        torch.autograd.grad(reference, params, retain_graph=True)):
            assert torch.allclose(a, b, atol=1e-6)
    # a packed clip beside unpacked pairs in a batch: each keeps its own attention
    placed = examples(pack=False, positions=True)[0]
    mixed = answer_loss(model, _to(collate([clips[0], *placed[clips[0].pairs:len(pairs)]], pad), "cpu"))
    assert mixed.item() == pytest.approx(reference.item(), rel=1e-5)
    with pytest.raises(ValueError, match="M-RoPE positions"):
        collate([clips[0], *pairs[clips[0].pairs:]], pad)
    model.set_attn_implementation("eager")  # eager attention adds its mask: the mask is built for it
    assert answer_loss(model, _to(collate(clips, pad), "cpu")).item() == pytest.approx(reference.item(), rel=1e-5)
    model.set_attn_implementation("sdpa")

    summary = train(TrainConfig(**{**kw, "out": str(tmp_path / "packed")}, pack=True, steps=3, batch_size=2,
                                warmup=1), progress=False)
    assert summary["step"] == 3 and summary["sequences"] == report["samples"]
    with pytest.raises(ValueError, match="--pack applies to the language stage"):
        TrainConfig(**{**kw, "stage": "visual"}, pack=True)


def test_input_weights_set_how_often_each_kind_of_batch_comes_and_every_example_still_comes_once_per_epoch():
    from collections import Counter

    from captioner.train import Example, TrainConfig, batch_plan, config_changes

    def ex(media, n):
        return Example(input_ids=torch.tensor([n]), labels=torch.tensor([n]), mm_token_type_ids=torch.tensor([0]),
                       media=media)

    examples = [ex("image", n) for n in range(8)] + [ex(None, 100 + n) for n in range(12)]
    kw = dict(stage="image", model="m", shards="s", out="o", batch_size=2)
    plan = batch_plan(examples, TrainConfig(input_weights={"image": 3}, **kw))
    batches = [plan(step, 0) for step in range(16)]
    assert [k for k, _ in batches[:8]] == ["image"] * 3 + ["text"] + ["image"] * 3 + ["text"]
    assert Counter(k for k, _ in batches) == {"image": 12, "text": 4}
    images = [int(e.input_ids) for k, b in batches if k == "image" for e in b]
    assert sorted(images[:8]) == list(range(8)) and sorted(images[8:16]) == list(range(8))  # epochs of 4 batches
    again = batch_plan(examples, TrainConfig(input_weights={"image": 3}, **kw))  # a resumed run: same batches
    assert [[int(e.input_ids) for e in again(s, 0)[1]] for s in (15, 3)] == \
        [[int(e.input_ids) for e in batches[s][1]] for s in (15, 3)]
    # the default alternates, as every run before input_weights did
    assert [k for k, _ in (batch_plan(examples, TrainConfig(**kw))(s, 0) for s in range(4))] == ["image", "text"] * 2
    with pytest.raises(ValueError, match="--input-weight"):
        TrainConfig(input_weights={"frames": 2}, **kw)
    with pytest.raises(ValueError, match="--input-weight"):
        TrainConfig(input_weights={"image": 0}, **kw)
    assert config_changes({"config": {**TrainConfig(**kw).__dict__}}, TrainConfig(input_weights={"image": 3}, **kw)) \
        == ["input_weights: {} -> {'image': 3}"]
    from captioner.cli import parse_task_weights

    assert parse_task_weights(["image=3"], flag="--input-weight", minimum=1) == {"image": 3}
    with pytest.raises(ValueError, match="--input-weight 'image=0'"):
        parse_task_weights(["image=0"], flag="--input-weight", minimum=1)


@pytest.mark.parametrize("config", ["qwen2-vl-tiny", "qwen2-vl-tiny-v96"])
def test_sped_up_vision_tower_computes_what_transformers_does_with_the_same_parameters(tiny_dir, clips, config,
                                                                                       tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from captioner.adapter import adapter_of, attach_adapter
    from captioner.fast_vision import speed_up_vision

    if config != "qwen2-vl-tiny":  # a vision tower of another width than the language model's
        tiny_dir = build_tiny(tmp_path / config, name=config)
    processor = AutoProcessor.from_pretrained(tiny_dir)
    plain, fast = (AutoModelForImageTextToText.from_pretrained(tiny_dir).train() for _ in range(2))
    for m in (plain, fast):
        attach_adapter(m)
    with torch.no_grad():  # an adapter that does something, the same in both
        for p in adapter_of(plain).parameters():
            p.normal_(std=0.2)
    fast.load_state_dict(plain.state_dict())
    keys = list(fast.state_dict())
    assert speed_up_vision(fast) == 1 + fast.config.vision_config.depth  # the patch embedding and each block
    assert speed_up_vision(fast) == 0 and list(fast.state_dict()) == keys  # idempotent; parameters as they were

    def features(model, frames_per_clip):  # one batch of clips through the vision side and the adapter
        enc = processor.video_processor(videos=frames_per_clip, return_tensors="pt", do_sample_frames=False)
        return model.model.get_video_features(enc["pixel_values_videos"], enc["video_grid_thw"],
                                              return_dict=True).pooler_output

    same_size = [c.frames[:4] for c in clips[:3]]  # every slice one length: the batched path
    mixed = [clips[0].frames[:4], clips[1].frames[:2, :56, :56]]  # slices of two lengths: transformers' loop
    for batch in (same_size, mixed):
        a, b = features(plain, batch), features(fast, batch)
        for x, y in zip(a, b):
            torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-4 * float(x.detach().abs().max()))
        sum(x.square().mean() for x in a).backward()
        sum(y.square().mean() for y in b).backward()
        for (name, p), q in zip(plain.named_parameters(), fast.parameters()):
            if p.grad is not None:
                torch.testing.assert_close(q.grad, p.grad, rtol=1e-3, atol=1e-3 * float(p.grad.abs().max()),
                                           msg=lambda m, name=name: f"{name}: {m}")
                p.grad = q.grad = None
    image = processor.image_processor(images=[c.frames[0] for c in clips[:3]], return_tensors="pt")
    torch.testing.assert_close(
        torch.cat(fast.model.get_image_features(image["pixel_values"], image["image_grid_thw"]).pooler_output),
        torch.cat(plain.model.get_image_features(image["pixel_values"], image["image_grid_thw"]).pooler_output),
        rtol=1e-4, atol=1e-3)
