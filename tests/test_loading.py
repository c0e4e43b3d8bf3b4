"""Loading from built-in names, local directories and hub ids; generation parameter checks."""

import json

import numpy as np
import pytest

from accel import GenerationParamsError, ModelNotFoundError
from accel.generate import GenerationParams, generate
from accel.loading import DEFAULTS_FILE, load_pipeline, make_model
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


def test_our_kernels_package_is_not_mistaken_for_hub_kernels():
    from diffusers.utils import is_kernels_available

    import kernels  # noqa: F401  (ours)

    assert is_kernels_available() is False
