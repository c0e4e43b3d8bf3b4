"""Loading from built-in names, local directories and hub ids; generation parameter checks."""

import json

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline

from accel import GenerationParamsError, ModelNotFoundError
from accel.generate import GenerationParams, generate
from accel.loading import DEFAULTS_FILE, load_pipeline, make_model
from accel.models.registry import BUILTIN_MODELS
from helpers import run


def test_save_pretrained_round_trip_is_exact(load, tmp_path):
    pipe = load("tiny-flux")
    pipe.save_pretrained(tmp_path / "flux")
    again = load_pipeline(str(tmp_path / "flux"))
    assert np.array_equal(run(pipe, "tiny-flux", cfg=True), run(again, "tiny-flux", cfg=True))


def test_make_model_writes_a_loadable_directory_with_defaults(load, tmp_path):
    path = make_model("tiny-sd3", tmp_path / "sd3")
    assert (path / "model_index.json").is_file()
    defaults = json.loads((path / DEFAULTS_FILE).read_text())
    again = load_pipeline(str(path))
    assert again.accel_defaults.num_inference_steps == defaults["num_inference_steps"]
    assert np.array_equal(run(load("tiny-sd3"), "tiny-sd3"), run(again, "tiny-sd3"))


def plain_call(pipe, prompt="a red circle on the left", seed=0, **kwargs):
    """The README's library call: diffusers' own defaults for every knob not given."""
    out = pipe(prompt, generator=torch.Generator().manual_seed(seed), output_type="np", **kwargs)
    return np.asarray(out.frames if hasattr(out, "frames") else out.images)


@pytest.mark.parametrize("name", ["tiny-flux", "tiny-sd3", "tiny-wan", "bench-flux"])
def test_plain_call_gives_the_models_documented_size_and_text_length(load, name):
    """diffusers' defaults alone would give 1024 px (tiny-flux, bench-flux), 480x832 px and 81 frames (tiny-wan)
    and 512 T5 tokens; a built-in's plain call uses its model's (one step here, to keep it cheap)."""
    pipe, record = load(name), BUILTIN_MODELS[name]
    lengths = []  # of FLUX's T5 input
    hooks = [pipe.text_encoder_2.register_forward_pre_hook(lambda module, args: lengths.append(args[0].shape[1]))
             ] if record.family == "flux" else []
    try:
        out = plain_call(pipe, num_inference_steps=1)
    finally:
        for hook in hooks:
            hook.remove()
    frames = (record.default_frames,) if record.default_frames else ()
    assert out.shape == (1, *frames, record.default_height, record.default_width, 3)
    if record.family == "flux":
        assert lengths == [record.pipeline_kwargs.get("max_sequence_length", 512)]


@pytest.mark.parametrize("name", ["shapes-flux", "tiny-flux", "tiny-sd3", "tiny-wan"])
def test_generate_path_equals_the_plain_call(load, name):
    """The project's generate path fills in the model's defaults; the plain call, with the same seed, now too."""
    pipe = load(name)
    result = generate(pipe, GenerationParams.parse(prompt="a red circle on the left", seed=3))
    assert np.array_equal(result.videos if result.is_video else result.images, plain_call(pipe, seed=3))


@pytest.mark.parametrize("name, diffusers_class", [("shapes-flux", "FluxPipeline"), ("tiny-wan", "WanPipeline")])
def test_make_model_directory_reloads_bit_identical_under_a_plain_call(load, tmp_path, name, diffusers_class):
    path = make_model(name, tmp_path / name)
    assert json.loads((path / "model_index.json").read_text())["_class_name"] == diffusers_class
    again = load_pipeline(str(path))
    assert again.accel_defaults == load(name).accel_defaults
    assert np.array_equal(plain_call(again), plain_call(load(name)))
    # still a standard diffusers checkpoint: plain diffusers loads it, as its own class with its own defaults
    assert type(DiffusionPipeline.from_pretrained(path, local_files_only=True)).__module__.startswith("diffusers.")


def test_builtins_are_deterministic():
    a, b = load_pipeline("tiny-flux"), load_pipeline("tiny-flux")
    assert np.array_equal(run(a, "tiny-flux"), run(b, "tiny-flux"))


@pytest.mark.parametrize(
    "source, message",
    [
        ("no-such-model", "not a built-in name"),
        ("black-forest-labs/FLUX.1-dev", "could not load from the Hugging Face Hub"),
        ("./does/not/exist/", "not found"),
    ],
)
def test_unknown_sources_are_clear_errors(source, message):
    with pytest.raises(ModelNotFoundError, match=message):
        load_pipeline(source)


def test_directory_without_model_index_is_refused(tmp_path):
    with pytest.raises(ModelNotFoundError, match="model_index.json"):
        load_pipeline(str(tmp_path))


@pytest.mark.parametrize("bad", [{"device": "cuda:7"}, {"dtype": "float8"}, {"attention_backend": "warp-speed"}])
def test_bad_load_options_are_clear_errors(bad):
    import torch

    if bad.get("device", "").startswith("cuda") and torch.cuda.is_available():
        pytest.skip("a CUDA device exists")
    with pytest.raises(ValueError):
        load_pipeline("tiny-flux", **bad)


def test_xformers_only_when_it_really_runs():
    from accel.loading import xformers_runs

    import torch

    if not torch.cuda.is_available():
        assert xformers_runs(torch.device("cpu")) is False


@pytest.mark.parametrize(
    "model, params, message",
    [
        ("tiny-flux", {"height": 100}, "height: 100 is not a multiple of 16"),
        ("tiny-flux", {"width": 72}, "width: 72 is not a multiple of 16"),
        ("tiny-flux", {"num_inference_steps": 0}, "num_inference_steps"),
        ("tiny-flux", {"num_inference_steps": -3}, "num_inference_steps"),
        ("tiny-flux", {"num_frames": 5}, "num_frames: not supported by FluxPipeline"),
        ("tiny-wan", {"true_cfg_scale": 2.0}, "true_cfg_scale: not supported by WanPipeline"),
        ("tiny-wan", {"num_frames": 6}, "num_frames: 6 must be 4k\\+1"),
        ("tiny-flux", {"guidance_scale": -1}, "guidance_scale"),
        ("tiny-flux", {"num_outputs": 0}, "num_outputs"),
        ("tiny-flux", {"prompt": None}, "prompt"),
        ("tiny-flux", {"steps": 3}, "steps"),
    ],
)
def test_bad_generation_params_name_the_field(load, model, params, message):
    pipe = load(model)
    values = {"prompt": "a red circle", **params}
    with pytest.raises(GenerationParamsError, match=message):
        generate(pipe, GenerationParams.parse(**{k: v for k, v in values.items()}))


def test_generate_is_reproducible_and_matches_the_plain_pipeline(load):
    pipe = load("tiny-flux")
    params = GenerationParams.parse(prompt="a red circle on the left", seed=3, height=64, width=64, num_inference_steps=4)
    first, second = generate(pipe, params), generate(pipe, params)
    assert np.array_equal(first.images, second.images)
    assert np.array_equal(first.images, run(pipe, "tiny-flux", seed=3))
    assert first.latents is not None and first.report["steps"] == 4


def test_generate_video_shape(load):
    pipe = load("tiny-wan")
    result = generate(pipe, GenerationParams.parse(prompt="a ball", height=32, width=32, num_frames=5, num_inference_steps=2))
    assert result.is_video and result.videos.shape == (1, 5, 32, 32, 3)


def test_interrupt_from_on_step_stops_within_one_step(load):
    pipe = load("tiny-flux")
    seen = []

    def on_step(step, total):
        seen.append(step)
        return step < 2

    result = generate(pipe, GenerationParams.parse(prompt="x", height=64, width=64, num_inference_steps=8), on_step=on_step)
    assert seen == [1, 2]
    assert result.report["steps"] == 2
    pipe._interrupt = False


@pytest.mark.parametrize("name", ["tiny-wan", "tiny-flux"])
def test_an_interrupted_call_is_not_decoded(load, name):
    """Diffusers decodes after `_interrupt`; a cancelled video must not spend seconds decoding frames nobody reads."""
    pipe = load(name)
    decodes = []
    decode = type(pipe.vae).decode
    pipe.vae.__class__ = type("CountingVAE", (type(pipe.vae),),
                              {"decode": lambda self, *a, **k: decodes.append(1) or decode(self, *a, **k)})
    try:
        params = GenerationParams.parse(prompt="a ball", num_inference_steps=4)
        result = generate(pipe, params, on_step=lambda step, total: step < 1)
        assert result.interrupted and result.images is None and result.videos is None and decodes == []
        assert "decode" not in pipe.vae.__dict__  # the guard is gone after the call
        again = generate(pipe, params)
        assert not again.interrupted and again.frames().size and decodes == [1]
    finally:
        pipe.vae.__class__ = type(pipe.vae).__mro__[1]


def test_our_kernels_package_is_not_mistaken_for_hub_kernels():
    from diffusers.utils import is_kernels_available

    import kernels  # noqa: F401  (ours)

    assert is_kernels_available() is False
