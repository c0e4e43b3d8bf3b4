"""Tests for shapes-flux, the FLUX-architecture reference model trained by the project on coloured shapes.

(a) the committed weights load offline and generate deterministically at the model's defaults;
(b) the training script runs end to end (both stages, tiny) and ``--resume`` continues exactly where it stopped;
(c) the committed model follows held-out prompts (compositions never seen in training) as issue 8 requires, checked by
    the exact scorer.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel

from accel.eval.shapes_captions import ALL_TRIPLES, make_caption
from accel.eval.shapes_scorer import score
from accel.loading import load_pipeline
from accel.models.registry import TRAINED_MODELS as REFMODELS
from accel.models.shapes_flux import (
    MAX_SEQUENCE_LENGTH,
    VOCABULARY,
    WEIGHTS_DIR,
    ShapesFluxWeightsMissing,
    build_untrained,
    load_shapes_flux,
)
from tools.refmodel.evaluate import evaluate, generate_images


@pytest.fixture(scope="module")
def shapes_flux():
    return load_shapes_flux()


def test_registry_entry_and_architecture(shapes_flux):
    entry = REFMODELS["shapes-flux"]
    assert (entry.task, entry.family) == ("text-to-image", "flux")
    assert (entry.default_height, entry.default_width, entry.default_steps) == (128, 128, 28)
    assert entry.pipeline_kwargs == {"max_sequence_length": MAX_SEQUENCE_LENGTH}
    assert entry.builder is load_shapes_flux
    pipe = shapes_flux
    assert isinstance(pipe, FluxPipeline)
    tr = pipe.transformer
    assert isinstance(tr, FluxTransformer2DModel)
    assert len(tr.transformer_blocks) >= 1 and len(tr.single_transformer_blocks) >= 1  # both block types
    assert pipe.vae_scale_factor == 16
    assert pipe.scheduler.config.use_dynamic_shifting
    assert pipe.vae.config.scaling_factor != 1.0  # measured latent statistics
    # no caption of the grammar is truncated by the T5 tokenizer at the model's max_sequence_length
    longest = max((make_caption([a, b]) for a in ALL_TRIPLES for b in ALL_TRIPLES if a[2] != b[2]), key=len)
    assert len(pipe.tokenizer_2(longest).input_ids) <= MAX_SEQUENCE_LENGTH
    # every word of the grammar is one T5 token; other words fall back to characters, never <unk>
    assert len(pipe.tokenizer_2(longest).input_ids) == len(longest.split()) + 1
    assert set(VOCABULARY) >= set(longest.split())
    assert pipe.tokenizer_2.unk_token_id not in pipe.tokenizer_2("a purple hexagon, top-left").input_ids
    # the committed weights stay small
    size = sum(f.stat().st_size for f in WEIGHTS_DIR.rglob("*") if f.is_file())
    assert size <= 40 * 2**20


def test_loads_offline_and_is_deterministic(shapes_flux):
    entry = REFMODELS["shapes-flux"]

    def run(seed):
        return shapes_flux(
            "a red circle on the left",
            height=entry.default_height,
            width=entry.default_width,
            num_inference_steps=4,
            guidance_scale=entry.default_guidance,
            generator=torch.Generator().manual_seed(seed),
            output_type="np",
            **entry.pipeline_kwargs,
        ).images

    a, b, c = run(0), run(0), run(1)
    assert a.shape == (1, 128, 128, 3)
    assert np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_plain_diffusers_call_of_the_builtin_gives_the_documented_image():
    """The README's library example: diffusers' call defaults alone (2048 px, 512 T5 tokens for this model) gave a
    blank image; the built-in's plain call draws at 128x128 with 16 T5 tokens, as the model was trained."""
    pipe = load_pipeline("shapes-flux")
    lengths = []
    hook = pipe.text_encoder_2.register_forward_pre_hook(lambda module, args: lengths.append(args[0].shape[1]))
    try:
        image = pipe("a red circle on the left", generator=torch.Generator().manual_seed(0)).images[0]
    finally:
        hook.remove()
    assert image.size == (128, 128) and lengths == [MAX_SEQUENCE_LENGTH]
    assert score(image, "a red circle on the left").all_correct


def test_missing_weights_error(tmp_path):
    with pytest.raises(ShapesFluxWeightsMissing, match="tools.refmodel.train"):
        load_shapes_flux(weights_dir=tmp_path / "nope")


def test_untrained_architecture_generates_at_128():
    pipe = build_untrained(0)
    img = pipe("a blue square at the top", height=128, width=128, num_inference_steps=2,
               max_sequence_length=MAX_SEQUENCE_LENGTH, generator=torch.Generator().manual_seed(0),
               output_type="np").images
    assert img.shape == (1, 128, 128, 3)


@pytest.mark.slow
def test_training_smoke_and_resume(tmp_path):
    from tools.refmodel.train import main

    common = ["--batch-size", "4", "--vae-batch-size", "4", "--pool-size", "32", "--vae-stat-images", "8",
              "--ckpt-every", "2", "--device", "cpu"]
    a = tmp_path / "a"
    main(["--stage", "all", "--out", str(a), "--vae-steps", "3", "--transformer-steps", "2", *common])
    assert (a / "model_index.json").is_file() and (a / "vae" / "config.json").is_file()
    pipe = load_shapes_flux(weights_dir=a)
    assert pipe.vae.config.scaling_factor != 1.0
    out = generate_images(pipe, ["a green square in the center"], steps=2)
    assert out[0].shape == (128, 128, 3) and out[0].dtype == np.uint8

    # a pool whose text embeddings came from other text encoders keeps its latents and encodes the captions again
    pool_path = a / "checkpoints" / "pool.pt"
    pool = torch.load(pool_path, weights_only=False)
    torch.save({**pool, "text_key": None, "prompt_embeds": torch.zeros(1)}, pool_path)
    main(["--stage", "transformer", "--out", str(a), "--steps", "2", "--resume", *common])  # runs no step
    rebuilt = torch.load(pool_path, weights_only=False)
    assert rebuilt["text_key"] == pool["text_key"]
    torch.testing.assert_close(rebuilt["latents"], pool["latents"], rtol=0, atol=0)
    torch.testing.assert_close(rebuilt["prompt_embeds"], pool["prompt_embeds"], rtol=0, atol=0)

    # an interrupted run (stopped after its step-2 checkpoint) ...
    main(["--stage", "transformer", "--out", str(a), "--steps", "4", "--stop-at", "2", *common])
    assert torch.load(a / "checkpoints" / "transformer.pt", weights_only=False)["step"] == 2
    # ... continued with --resume from its step-2 checkpoint to step 4 ...
    main(["--stage", "transformer", "--out", str(a), "--steps", "4", "--resume", *common])
    log = [json.loads(line) for line in (a / "checkpoints" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["stage"] == "transformer" and log[-1].get("done")
    resumed = torch.load(a / "checkpoints" / "transformer.pt", weights_only=False)
    assert resumed["step"] == 4
    # ... exactly as an uninterrupted 4-step run from the same VAE does
    b = tmp_path / "b"
    main(["--stage", "transformer", "--out", str(b), "--vae", str(a / "vae"), "--steps", "4", *common])
    straight = torch.load(b / "checkpoints" / "transformer.pt", weights_only=False)
    for k, v in straight["model"].items():
        torch.testing.assert_close(resumed["model"][k], v, rtol=1e-5, atol=1e-6)

    # --train-text-encoder warm-starts from that frozen-T5 checkpoint: T5 learns, and its EMA weights are exported
    main(["--stage", "transformer", "--out", str(b), "--steps", "6", "--resume", "--train-text-encoder", *common])
    state = torch.load(b / "checkpoints" / "transformer.pt", weights_only=False)
    frozen_pipe = load_shapes_flux(weights_dir=a)
    assert state["step"] == 6 and len(state["ema_text"]) == len(list(frozen_pipe.text_encoder_2.parameters()))
    frozen = frozen_pipe.text_encoder_2.state_dict()
    exported = load_shapes_flux(weights_dir=b).text_encoder_2.state_dict()
    assert any(not torch.equal(frozen[k], state["text_encoder"][k]) for k in frozen)
    assert any(not torch.equal(frozen[k], exported[k]) for k in frozen)


def test_adherence_target_on_heldout_compositions(shapes_flux):
    """Issue 8's target at the default 28 steps, on captions whose (colour, shape, position) triples never appeared
    in training: >= 85% of single-shape and >= 50% of two-shape captions fully right. Measured on the committed
    weights (development CPU): 18/18 single and 23/32 double (0.719); on 64 of each: 1.000 / 0.766
    (docs/refmodel.md). 32 double captions leave a margin of several images for float differences across CPUs."""
    results = evaluate(shapes_flux, 18, steps=28, n_double=32, n_train=0, verbose=False)
    single, double = results["heldout_single"], results["heldout_double"]
    assert (single["n"], double["n"]) == (18, 32)
    assert single["all_correct"] >= 0.85, single
    assert double["all_correct"] >= 0.5, double
    assert single["position"] >= 0.95 and double["position"] >= 0.9, results
