"""The random built-ins with language-model text encoders (FLUX.2 klein, Qwen-Image, Z-Image, HunyuanVideo 1.5):
they build offline, generate deterministically by seed, run CFG, take any prompt, and survive a save_pretrained /
accel.load_pipeline(dir) round trip bit for bit."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.utils import is_torchvision_available

import accel
from accel.models.flux2 import build_tiny_flux2, build_tiny_flux2_klein
from accel.models.hunyuanvideo15 import build_tiny_hunyuanvideo15, build_tiny_hunyuanvideo15_i2v
from accel.models.pipelines import own_memory, prepare
from accel.models.qwen_image import build_tiny_qwen_image, build_tiny_qwen_image_edit
from accel.models.registry import RANDOM_MODELS
from accel.models.zimage import build_tiny_zimage
from helpers import assert_eval_fp32

IMAGE = dict(height=64, width=64, num_inference_steps=2)
VIDEO = dict(height=64, width=64, num_frames=5, num_inference_steps=2)
EDIT_IMAGE = Image.fromarray(np.arange(32 * 48 * 3, dtype=np.uint8).reshape(32, 48, 3))
SQUARE_IMAGE = Image.fromarray(np.arange(48 * 48 * 3, dtype=np.uint8).reshape(48, 48, 3))
needs_torchvision = pytest.mark.skipif(not is_torchvision_available(), reason="Qwen2VLProcessor needs torchvision")

# name -> builder, plain settings, CFG settings, CFG layout ("separate": a cond and an uncond call a step; "list": one
# call on per-sample lists [cond, uncond]), expected output shape
CASES = {
    "flux2-klein": (build_tiny_flux2_klein, dict(IMAGE, guidance_scale=1.0), dict(guidance_scale=4.0), "separate",
                    (1, 64, 64, 3)),
    "qwen-image": (build_tiny_qwen_image, IMAGE, dict(true_cfg_scale=4.0, negative_prompt="blurry"), "separate",
                   (1, 64, 64, 3)),
    "qwen-image-edit": (build_tiny_qwen_image_edit, dict(IMAGE, image=EDIT_IMAGE),
                        dict(true_cfg_scale=4.0, negative_prompt="blurry"), "separate", (1, 64, 64, 3)),
    "zimage": (build_tiny_zimage, dict(IMAGE, guidance_scale=0.0), dict(guidance_scale=4.0), "list", (1, 64, 64, 3)),
    "hunyuanvideo15": (build_tiny_hunyuanvideo15, VIDEO, dict(guidance_scale=6.0), "separate", (1, 5, 64, 64, 3)),
    # no height/width: the size is the transformer's target_size bucket nearest to the image's aspect ratio
    "hunyuanvideo15-i2v": (build_tiny_hunyuanvideo15_i2v, dict(num_frames=5, num_inference_steps=2, image=SQUARE_IMAGE),
                           dict(guidance_scale=6.0), "separate", (1, 5, 64, 64, 3)),
}
NAMES = [pytest.param(name, marks=needs_torchvision) if name == "qwen-image-edit" else name for name in CASES]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run on one thread


@pytest.fixture(scope="module")
def pipes():
    return {}


def get(pipes, name, seed=0):
    if (name, seed) not in pipes:
        pipes[name, seed] = prepare(CASES[name][0](seed))
    return pipes[name, seed]


def run(pipe, name, prompt="a red circle on the left", cfg=False, **overrides):
    _, plain, guided, _, _ = CASES[name]
    kwargs = {**plain, **(guided if cfg else {}), **overrides}
    guider = getattr(pipe, "guider", None)
    if guider is not None:  # HunyuanVideo 1.5: the guider holds the scale; scale 1 is a single pass
        pipe.guider = guider.new(guidance_scale=kwargs.pop("guidance_scale", 1.0))
    try:
        out = pipe(prompt=prompt, generator=torch.Generator().manual_seed(0), output_type="np", **kwargs)
    finally:
        if guider is not None:
            pipe.guider = guider
    return np.asarray(out.frames if hasattr(out, "frames") else out.images)


def weights(pipe):
    return {
        key: {k: v.clone() for k, v in component.state_dict().items()}
        for key, component in pipe.components.items()
        if isinstance(component, torch.nn.Module)
    }


def same_weights(a, b):
    return a.keys() == b.keys() and all(
        a[key].keys() == b[key].keys() and all(torch.equal(a[key][k], b[key][k]) for k in a[key]) for key in a
    )


@pytest.mark.parametrize("name", NAMES)
def test_builds_and_generates_deterministically(pipes, name):
    pipe = get(pipes, name)
    assert_eval_fp32(pipe)
    first = run(pipe, name)
    assert first.shape == CASES[name][4] and np.isfinite(first).all()
    assert np.array_equal(first, run(pipe, name))
    assert same_weights(weights(pipe), weights(CASES[name][0](0)))  # same seed, same weights
    assert not np.array_equal(first, run(get(pipes, name, seed=1), name))  # other seed, other weights


@pytest.mark.parametrize("name", NAMES)
def test_classifier_free_guidance(pipes, name):
    pipe = get(pipes, name)
    calls = []

    def count(module, args, kwargs):
        states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        calls.append(len(states) if isinstance(states, list) else states.shape[0])

    handle = pipe.transformer.register_forward_pre_hook(count, with_kwargs=True)
    try:
        plain = run(pipe, name)
        n_plain, calls[:] = list(calls), []
        guided = run(pipe, name, cfg=True)
        n_guided = list(calls)
    finally:
        handle.remove()
    assert np.isfinite(guided).all() and not np.array_equal(plain, guided)
    steps = CASES[name][1]["num_inference_steps"]
    assert n_plain == [1] * steps
    assert n_guided == ([2] * steps if CASES[name][3] == "list" else [1] * (2 * steps))


@pytest.mark.parametrize("name", NAMES)
def test_any_prompt(pipes, name):
    pipe = get(pipes, name)
    base = run(pipe, name)
    assert not np.array_equal(base, run(pipe, name, prompt="a blue square at the top"))
    # empty, unicode, a quoted (glyph) text for HunyuanVideo's ByT5, longer than the pipelines' limits
    for prompt in ("", 'héllo wörld, 世界 🙂 "SALE"', "word " * 400):
        assert np.isfinite(run(pipe, name, prompt=prompt)).all()


@pytest.mark.parametrize("name", NAMES)
def test_save_and_load_pipeline_round_trip(pipes, name, tmp_path):
    pipe = get(pipes, name)
    pipe.save_pretrained(tmp_path)
    loaded = accel.load_pipeline(str(tmp_path))
    assert type(loaded).__name__ == type(pipe).__name__
    for key, component in pipe.components.items():
        other = loaded.components[key]
        if isinstance(component, torch.nn.Module):
            assert same_weights({key: component.state_dict()}, {key: other.state_dict()}), key
            assert not other.training
        elif hasattr(component, "tokenize") or hasattr(component, "tokenizer"):
            for text in ("A red circle!", "", "héllo 世界 <|im_end|>"):
                assert component(text=text)["input_ids"] == other(text=text)["input_ids"], key
        elif component is not None:  # scheduler, guider (configs), SigLIP's image processor (to_dict)
            public = lambda c: {k: v for k, v in dict(c).items() if not k.startswith("_")}  # noqa: E731
            config = lambda c: c.config if hasattr(c, "config") else c.to_dict()  # noqa: E731
            assert public(config(component)) == public(config(other)), key
    if hasattr(pipe.tokenizer, "apply_chat_template") and pipe.tokenizer.chat_template:
        messages = [{"role": "user", "content": "a red circle"}]
        assert loaded.tokenizer.apply_chat_template(messages, tokenize=False) == pipe.tokenizer.apply_chat_template(
            messages, tokenize=False
        )
    own_memory(loaded)
    assert np.array_equal(run(loaded, name, cfg=True), run(pipe, name, cfg=True))


def test_flux2_is_klein():
    assert same_weights(weights(build_tiny_flux2(0)), weights(build_tiny_flux2_klein(0)))


@pytest.mark.parametrize("name", ["tiny-flux2", "tiny-qwen-image", "tiny-zimage", "tiny-hunyuanvideo15"])
def test_registry_defaults_generate(name):
    record = RANDOM_MODELS[name]
    assert "TODO" not in record.description
    pipe = accel.load_pipeline(name)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompt="a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
               output_type="np")
    frames = np.asarray(out.frames if hasattr(out, "frames") else out.images)
    size = (record.default_height, record.default_width, 3)
    assert frames.shape == ((1, record.default_frames, *size) if record.default_frames else (1, *size))
    assert np.isfinite(frames).all()


def test_hunyuanvideo15_serves_progress_and_cancel_without_a_step_callback():
    """HunyuanVideo 1.5's call takes no `callback_on_step_end`: the generate path (server jobs, progress, cancel)
    must neither pass one (a TypeError on every request) nor lose progress: steps come from the scheduler."""
    import accel
    from accel.generate import GenerationParams, generate_batch

    pipe = accel.load_pipeline("tiny-hunyuanvideo15")
    request = GenerationParams.parse(prompt="a cat", num_inference_steps=3, height=32, width=32, num_frames=5)
    steps = []
    result = generate_batch(pipe, [request], "abcache:warmup=1,interval=2", on_step=lambda i, n: steps.append((i, n)))[0]
    assert steps == [(1, 3), (2, 3), (3, 3)] and result.videos.shape == (1, 5, 32, 32, 3)
    assert result.latents is not None and result.report["block_fraction_computed"] < 1
    cancelled = generate_batch(pipe, [request], None, on_step=lambda i, n: i < 2)[0]
    assert cancelled.interrupted and "step" not in pipe.scheduler.__dict__
