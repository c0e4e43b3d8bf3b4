"""The tiny Wan 2.2 (two experts, T2V and I2V), LTX-Video (T2V and I2V), CogVideoX and PixArt-Σ builders: they build
offline, generate deterministically per seed, run CFG, take any prompt, and survive a save_pretrained /
`accel.load_pipeline(dir)` round trip bit for bit; their registry records' defaults give outputs of the default size."""

import numpy as np
import pytest
import torch
from PIL import Image

import accel
from accel.models.cogvideox import build_tiny_cogvideox
from accel.models.ltx import build_tiny_ltx, build_tiny_ltx_i2v
from accel.models.pixart import build_tiny_pixart
from accel.models.registry import RANDOM_MODELS
from accel.models.wan22 import build_tiny_wan22, build_tiny_wan22_i2v
from helpers import assert_eval_fp32

BUILDERS = {
    "tiny-wan22": build_tiny_wan22,
    "tiny-wan22-i2v": build_tiny_wan22_i2v,
    "tiny-ltx": build_tiny_ltx,
    "tiny-ltx-i2v": build_tiny_ltx_i2v,  # not registered
    "tiny-cogvideox": build_tiny_cogvideox,
    "tiny-pixart": build_tiny_pixart,
}
# small settings: Wan 2.2 T2V needs 3 steps to reach its low-noise expert (timesteps 999, 960, 857; boundary 875),
# I2V reaches it at 2 (999, 833; boundary 900)
SMALL = {
    "tiny-wan22": dict(height=32, width=32, num_frames=5, num_inference_steps=3, guidance_scale=1.0),
    "tiny-wan22-i2v": dict(height=32, width=32, num_frames=5, num_inference_steps=2, guidance_scale=1.0),
    "tiny-ltx": dict(height=64, width=64, num_frames=9, num_inference_steps=2, guidance_scale=1.0),
    "tiny-ltx-i2v": dict(height=64, width=64, num_frames=9, num_inference_steps=2, guidance_scale=1.0),
    "tiny-cogvideox": dict(height=32, width=32, num_frames=9, num_inference_steps=2, guidance_scale=1.0),
    "tiny-pixart": dict(
        height=64, width=64, num_inference_steps=2, guidance_scale=1.0, use_resolution_binning=False,
        clean_caption=False,
    ),
}
CFG = dict(guidance_scale=3.0, negative_prompt="blurry")
TWO_EXPERTS = ("tiny-wan22", "tiny-wan22-i2v")
IMAGE_TO_VIDEO = ("tiny-wan22-i2v", "tiny-ltx-i2v")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run on one thread


@pytest.fixture(scope="module")
def pipes():
    return {name: build(0) for name, build in BUILDERS.items()}


def image(size=64):
    """A red-to-blue gradient, so that the image's latents are not uniform."""
    ramp = np.linspace(0, 255, size, dtype=np.uint8)
    pixels = np.stack([np.tile(ramp[::-1], (size, 1)), np.zeros((size, size), np.uint8), np.tile(ramp, (size, 1))], -1)
    return Image.fromarray(pixels)


def run(pipe, name, prompt="a red circle on the left", **overrides):
    pipe.set_progress_bar_config(disable=True)
    kwargs = {**SMALL[name], **overrides}
    if name in IMAGE_TO_VIDEO:
        kwargs["image"] = image(kwargs["height"])
    out = pipe(prompt=prompt, generator=torch.Generator().manual_seed(0), output_type="np", **kwargs)
    return np.asarray(out.frames if hasattr(out, "frames") else out.images)


def transformers(pipe):
    return [pipe.transformer] + ([pipe.transformer_2] if getattr(pipe, "transformer_2", None) is not None else [])


def expected_shape(name):
    settings = SMALL[name]
    frames = (settings["num_frames"],) if "num_frames" in settings else ()
    return (1, *frames, settings["height"], settings["width"], 3)


@pytest.mark.parametrize("name", BUILDERS)
def test_builds_and_generates_deterministically_per_seed(pipes, name):
    pipe = pipes[name]
    assert_eval_fp32(pipe)
    first = run(pipe, name)
    assert first.shape == expected_shape(name) and np.isfinite(first).all() and first.std() > 0
    assert np.array_equal(first, run(pipe, name))  # same pipeline, fresh generator
    assert np.array_equal(first, run(BUILDERS[name](0), name))  # same seed, new build
    assert not np.array_equal(first, run(BUILDERS[name](1), name))  # other weights


@pytest.mark.parametrize("name", TWO_EXPERTS)
def test_wan22_experts_differ_and_both_denoise(pipes, name):
    pipe = pipes[name]
    assert pipe.config.boundary_ratio == {"tiny-wan22": 0.875, "tiny-wan22-i2v": 0.9}[name]
    high, low = pipe.transformer.state_dict(), pipe.transformer_2.state_dict()
    assert high.keys() == low.keys() and not all(torch.equal(high[k], low[k]) for k in high)
    if name == "tiny-wan22-i2v":
        assert pipe.image_encoder is None and pipe.image_processor is None
        assert pipe.transformer.config.in_channels == 16 + 4 + 16  # latents + first-frame mask + image latents
    calls = []
    handles = [
        expert.register_forward_pre_hook(lambda module, args, kwargs, i=i: calls.append(i), with_kwargs=True)
        for i, expert in enumerate(transformers(pipe))
    ]
    try:
        run(pipe, name, **CFG)
    finally:
        for handle in handles:
            handle.remove()
    steps = SMALL[name]["num_inference_steps"]
    high_steps = 2 if name == "tiny-wan22" else 1
    assert calls == [0] * (2 * high_steps) + [1] * (2 * (steps - high_steps))  # cond + uncond per step


@pytest.mark.parametrize("name", BUILDERS)
def test_classifier_free_guidance(pipes, name):
    pipe = pipes[name]
    batches = []

    def record(module, args, kwargs):  # PixArtSigmaPipeline passes the latents positionally
        batches.append((args[0] if args else kwargs["hidden_states"]).shape[0])

    handles = [expert.register_forward_pre_hook(record, with_kwargs=True) for expert in transformers(pipe)]
    try:
        plain = run(pipe, name)
        n_plain, batches[:] = list(batches), []
        guided = run(pipe, name, **CFG)
        n_guided = list(batches)
    finally:
        for handle in handles:
            handle.remove()
    assert np.isfinite(guided).all() and not np.array_equal(plain, guided)
    steps = SMALL[name]["num_inference_steps"]
    assert n_plain == [1] * steps
    if name in TWO_EXPERTS:
        assert n_guided == [1] * (2 * steps)  # separate cond and uncond calls
    else:
        assert n_guided == [2] * steps  # one call on cat([uncond, cond])


@pytest.mark.parametrize("name", BUILDERS)
def test_any_prompt(pipes, name):
    pipe = pipes[name]
    base = run(pipe, name)
    assert not np.array_equal(base, run(pipe, name, prompt="a blue square at the top"))
    for prompt in ("", "héllo wörld, 世界 🙂", "word " * 600):
        assert np.isfinite(run(pipe, name, prompt=prompt, **CFG)).all()


@pytest.mark.parametrize("name", BUILDERS)
def test_save_and_load_pipeline_round_trip(pipes, name, tmp_path):
    pipe = pipes[name]
    pipe.save_pretrained(tmp_path)
    loaded = accel.load_pipeline(str(tmp_path))  # aligned weights: own_memory
    assert type(loaded).__name__ == type(pipe).__name__
    for key, component in pipe.components.items():
        other = loaded.components[key]
        if isinstance(component, torch.nn.Module):
            a, b = component.state_dict(), other.state_dict()
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), key
        elif hasattr(component, "tokenize"):
            for text in ("A red circle!", "", "héllo 世界"):
                assert component(text).input_ids == other(text).input_ids, key
        elif component is not None:
            public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
            assert public(component.config) == public(other.config), key
        else:
            assert other is None, key
    assert np.array_equal(run(loaded, name, **CFG), run(pipe, name, **CFG))


@pytest.mark.parametrize("name", [name for name in BUILDERS if name in RANDOM_MODELS])
def test_registry_defaults_give_the_default_size(name):
    record = RANDOM_MODELS[name]
    assert record.builder is BUILDERS[name] and "TODO" not in record.description
    assert record.task == ("image-to-video" if name in IMAGE_TO_VIDEO else
                           "text-to-image" if record.default_frames is None else "text-to-video")
    pipe = accel.load_pipeline(name)
    extra = {"image": image(record.default_height)} if name in IMAGE_TO_VIDEO else {}
    out = pipe(prompt="a red circle", generator=torch.Generator().manual_seed(0), output_type="np", **extra)
    out = np.asarray(out.frames if hasattr(out, "frames") else out.images)
    frames = (record.default_frames,) if record.default_frames else ()
    assert out.shape == (1, *frames, record.default_height, record.default_width, 3) and np.isfinite(out).all()
