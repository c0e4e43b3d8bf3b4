"""The built-in random models: they build offline, generate deterministically, condition on the text, run CFG,
and survive a save_pretrained / from_pretrained round trip."""

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline

from accel.models.pipelines import own_memory
from accel.models.registry import RANDOM_MODELS as BUILTIN_MODELS
from accel.models.registry import BuiltinModel, build_pipeline
from helpers import CFG, assert_eval_fp32
from helpers import SMALL as HELPER_SMALL

TINY = ("tiny-flux", "tiny-wan", "tiny-sd3")
SMALL = {name: {**settings, "num_inference_steps": 2} for name, settings in HELPER_SMALL.items()}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run on one thread


@pytest.fixture(scope="module")
def pipes():
    return {name: build_pipeline(name) for name in TINY}


def run(pipe, name, prompt="a red circle on the left", **overrides):
    pipe.set_progress_bar_config(disable=True)
    kwargs = {**SMALL[name], **overrides}
    out = pipe(prompt=prompt, generator=torch.Generator().manual_seed(0), output_type="np", **kwargs)
    return np.asarray(out.frames if hasattr(out, "frames") else out.images)


def realign(pipe):
    """The reloaded pipeline with its weights copied into aligned memory (why: `accel.models.pipelines.own_memory`)."""
    own_memory(pipe)
    return pipe


def test_registry_records():
    assert {"tiny-flux", "tiny-wan", "tiny-sd3", "bench-flux"} <= set(BUILTIN_MODELS)
    from accel.adapters import ADAPTERS

    for name, model in BUILTIN_MODELS.items():
        assert isinstance(model, BuiltinModel) and model.name == name and callable(model.builder)
        assert model.family in ADAPTERS, f"{name}: family {model.family!r} has no adapter"
        video = model.task in ("text-to-video", "image-to-video")
        assert video == (ADAPTERS[model.family].task == "text-to-video")
        assert (model.default_frames is None) == (not video)
        multiple = 16
        assert model.default_height % multiple == 0 and model.default_width % multiple == 0
        if model.default_frames is not None:
            assert (model.default_frames - 1) % 4 == 0
    with pytest.raises(AttributeError):
        BUILTIN_MODELS["tiny-flux"].default_steps = 3  # frozen


def test_unknown_name_lists_known_names():
    with pytest.raises(ValueError) as info:
        build_pipeline("no-such-model")
    assert "no-such-model" in str(info.value)
    for name in BUILTIN_MODELS:
        assert name in str(info.value)


@pytest.mark.parametrize("name", TINY)
def test_builds_generates_deterministically(pipes, name):
    pipe = pipes[name]
    assert_eval_fp32(pipe)
    first = run(pipe, name)
    expected = (1, 5, 32, 32, 3) if name == "tiny-wan" else (1, 64, 64, 3)
    assert first.shape == expected and np.isfinite(first).all()
    assert np.array_equal(first, run(pipe, name))  # same pipeline, fresh generator
    assert np.array_equal(first, run(build_pipeline(name, seed=0), name))  # same seed, new build
    assert not np.array_equal(first, run(build_pipeline(name, seed=1), name))  # other weights


@pytest.mark.parametrize("name", TINY)
def test_text_conditions_the_output(pipes, name):
    pipe = pipes[name]
    base = run(pipe, name)
    assert not np.array_equal(base, run(pipe, name, prompt="a blue square at the top"))
    # any text works: empty, unicode, longer than every tokenizer's limit (CLIP 77, T5 max_sequence_length)
    for prompt in ("", "héllo wörld, 世界 🙂", "word " * 600):
        assert np.isfinite(run(pipe, name, prompt=prompt)).all()


@pytest.mark.parametrize("name", TINY)
def test_classifier_free_guidance(pipes, name):
    pipe = pipes[name]
    calls = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(kwargs["hidden_states"].shape[0]), with_kwargs=True
    )
    try:
        plain = run(pipe, name)
        n_plain, calls[:] = list(calls), []
        guided = run(pipe, name, **CFG[name])
        n_guided = list(calls)
    finally:
        handle.remove()
    assert np.isfinite(guided).all() and not np.array_equal(plain, guided)
    steps = SMALL[name]["num_inference_steps"]
    assert n_plain == [1] * steps
    if name == "tiny-sd3":
        assert n_guided == [2] * steps  # one call on cat([uncond, cond])
    else:
        assert n_guided == [1] * (2 * steps)  # separate cond and uncond calls


def test_batches_of_prompts(pipes):
    out = run(pipes["tiny-flux"], "tiny-flux", prompt=["a red circle", "a blue square"], num_images_per_prompt=2)
    assert out.shape == (4, 64, 64, 3)


@pytest.mark.parametrize("name", ["tiny-flux", "tiny-wan"])
def test_save_and_reload_round_trip(pipes, name, tmp_path):
    pipe = pipes[name]
    pipe.save_pretrained(tmp_path)
    loaded = DiffusionPipeline.from_pretrained(tmp_path, local_files_only=True)
    assert type(loaded) is type(pipe)
    for key, component in pipe.components.items():
        other = loaded.components[key]
        if isinstance(component, torch.nn.Module):
            a, b = component.state_dict(), other.state_dict()
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), key
            assert not other.training
        elif hasattr(component, "tokenize"):
            for text in ("A red circle!", "", "héllo 世界"):
                assert component(text).input_ids == other(text).input_ids, key
        elif component is not None:
            public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
            assert public(component.config) == public(other.config), key
    expected = run(pipe, name, **CFG[name])
    np.testing.assert_allclose(run(loaded, name, **CFG[name]), expected, rtol=0, atol=1e-5)
    assert np.array_equal(run(realign(loaded), name, **CFG[name]), expected)


def test_bench_flux_shape():
    pipe = build_pipeline("bench-flux")
    transformer = pipe.transformer
    assert len(transformer.transformer_blocks) == 4 and len(transformer.single_transformer_blocks) == 8
    assert transformer.config.num_attention_heads * transformer.config.attention_head_dim == 384
    record = BUILTIN_MODELS["bench-flux"]
    latents, image_ids = pipe.prepare_latents(
        1,
        transformer.config.in_channels // 4,
        record.default_height,
        record.default_width,
        torch.float32,
        torch.device("cpu"),
        torch.Generator().manual_seed(0),
    )
    assert latents.shape == (1, 1024, 64) and image_ids.shape == (1024, 3)
