"""LoRA adapters per request: loading and checking (accel.lora), the built-in `star` adapter of shapes-flux (trained
here by tools/refmodel/train_lora.py), every preset with it, the CLI, and the server (batching, 400s, model cards)."""

from __future__ import annotations

import base64
import concurrent.futures as cf
import io

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from accel.errors import AccelError, GenerationParamsError
from accel.eval.metrics import psnr
from accel.eval.shapes_captions import STAR_HELDOUT_TRIPLES, parse_caption
from accel.eval.shapes_scorer import score, score_many
from accel.generate import GenerationParams, generate, generate_batch, resolve_params
from accel.io import image_bytes
from accel.lora import LORA_FILE, lora_set
from accel.presets import PRESETS
from tools.refmodel.data import heldout_captions, render, star_captions, star_scenes

STAR = [{"name": "star", "scale": 1.0}]


@pytest.fixture(scope="module")
def base():
    """shapes-flux with no LoRA loaded at all."""
    from accel.loading import load_pipeline

    return load_pipeline("shapes-flux", builtin_loras=False)


@pytest.fixture(scope="module")
def pipe():
    """shapes-flux as `accel.load_pipeline` gives it: its built-in `star` adapter loaded, disabled."""
    from accel.loading import load_pipeline

    return load_pipeline("shapes-flux")


def images(pipe, captions, lora=(), spec=None, seed=0):
    """uint8 images, caption i seeded seed + i, one call each."""
    out = []
    for i, caption in enumerate(captions):
        result = generate(pipe, GenerationParams(prompt=caption, seed=seed + i, lora=list(lora)), spec)
        out.append((result.images[0] * 255).round().astype(np.uint8))
    return out


def test_the_scorer_judges_stars_and_the_base_grammar_is_unchanged():
    scenes = star_scenes("heldout", 10) + star_scenes("train", 30)
    assert score_many([render(s) for s in scenes], [s.caption for s in scenes])["all_correct"] == 1.0
    scene = star_scenes("train", 1)[0]
    assert parse_caption(scene.caption, extended=True)[0][1] == "star"
    assert not score(render(scene), scene.caption.replace("star", "triangle")).all_correct  # a star is no triangle
    with pytest.raises(ValueError):  # the base model's grammar (and training data) has no star
        parse_caption("a red star on the left")


def test_the_adapters_stars_survive_the_frozen_vae(base):
    """Star scenes (training and held-out) are drawn big enough that a VAE round trip still scores as stars: smaller
    ones come back as rounded pentagons, which is what the first adapter learned to draw (tools/refmodel/data.py)."""
    scenes = star_scenes("train", 24) + star_scenes("heldout", 8)
    x = torch.from_numpy(np.stack([np.asarray(render(s)) for s in scenes]).astype(np.float32) / 127.5 - 1.0)
    with torch.no_grad():
        y = base.vae.decode(base.vae.encode(x.permute(0, 3, 1, 2)).latent_dist.mean).sample
    y = ((y.clamp(-1, 1) + 1) * 127.5).round().permute(0, 2, 3, 1).numpy().astype(np.uint8)
    assert score_many(list(y), [s.caption for s in scenes])["all_correct"] >= 0.9


def test_no_lora_is_bit_identical_to_a_pipeline_without_lora(base, pipe):
    """Adapters loaded but not requested change no bit; nor does a LoRA call leak into the next call."""
    captions = ["a red circle on the left", "a blue star at the top"]
    plain = images(base, captions)
    assert all(np.array_equal(a, b) for a, b in zip(plain, images(pipe, captions)))
    with_star = images(pipe, captions, STAR)
    assert not np.array_equal(plain[1], with_star[1])
    assert all(np.array_equal(a, b) for a, b in zip(plain, images(pipe, captions)))  # disabled again
    # two adapter sets in one batch are refused; one set is the batch's
    with pytest.raises(GenerationParamsError):
        generate_batch(pipe, [GenerationParams(prompt="x"), GenerationParams(prompt="x", lora=STAR)])


STARS = star_captions("heldout", 2 * len(STAR_HELDOUT_TRIPLES))  # never seen in the adapter's training


def test_the_star_adapter_is_followed_on_held_out_captions(pipe):
    with_star = score_many(images(pipe, STARS, STAR), STARS)["all_correct"]
    print(f"held-out star captions: all correct {with_star:.2f} with the adapter")
    assert with_star >= 0.8


def test_star_is_not_followed_without_the_adapter_and_base_captions_keep_theirs(base, pipe):
    without = score_many(images(pipe, STARS), STARS)["all_correct"]
    assert without <= 0.2  # the base model cannot draw the new word
    # base captions with the adapter loaded but not requested: the same images as without LoRA, so the same score
    singles = heldout_captions("single", 9)
    loaded, plain = images(pipe, singles), images(base, singles)
    assert all(np.array_equal(a, b) for a, b in zip(loaded, plain))
    assert score_many(loaded, singles)["all_correct"] == score_many(plain, singles)["all_correct"] >= 0.8


def test_lora_set_restores_the_disabled_state_after_an_error(pipe):
    layer = pipe.transformer.transformer_blocks[0].attn.to_q
    with pytest.raises(RuntimeError):
        with lora_set(pipe, [("star", 0.5)]):
            assert not layer.disable_adapters
            raise RuntimeError("boom")
    assert layer.disable_adapters
    with pytest.raises(AccelError, match="unknown adapter"):
        with lora_set(pipe, [("nope", 1.0)]):
            pass


def test_every_preset_runs_with_the_lora_and_fidelity_is_measured(pipe):
    captions = star_captions("heldout", 3)
    reference = images(pipe, captions, STAR)
    rows = []
    for name, spec in PRESETS.items():
        result = generate(pipe, GenerationParams(prompt=captions[0], seed=0, lora=STAR), spec)
        assert result.report["lora"] == STAR
        out = images(pipe, captions, STAR, spec)
        value = float(np.mean([min(psnr(r / 255.0, o / 255.0), 99.0) for r, o in zip(reference, out)]))
        rows.append((name, value, score_many(out, captions)["all_correct"]))
        if not spec:
            assert value == 99.0  # off: the LoRA baseline itself
    print("\npreset  PSNR vs LoRA baseline (dB)  star adherence\n" +
          "\n".join(f"{n:8s} {v:6.1f} {a:.2f}" for n, v, a in rows))
    assert all(np.isfinite(v) and v > 15 for _, v, _ in rows)


def test_resolve_params_names_the_bad_field(pipe, load):
    def field_of(model, **values):
        with pytest.raises(GenerationParamsError) as err:
            resolve_params(model, GenerationParams.parse(prompt="a red star on the left", **values))
        return err.value.field

    assert field_of(pipe, lora=[{"name": "moon"}]) == "lora[0].name"
    assert field_of(pipe, lora=[{"name": "star", "scale": 2.5}]) == "lora[0].scale"
    assert field_of(pipe, lora=[{"name": "star"}, {"name": "star", "scale": 0.5}]) == "lora[1].name"
    assert field_of(pipe, lora=[{"name": "../etc/passwd"}]) == "lora[0].name"
    assert field_of(load("tiny-flux"), lora=STAR) == "lora"
    # the same set in another order is the same request
    a = resolve_params(pipe, GenerationParams(prompt="x", lora=STAR))
    assert [r.name for r in a.lora] == ["star"]


def _sd3_lora(tmp_path, load):
    """A real LoRA file for another architecture: PEFT adapters on tiny-sd3's transformer, saved by diffusers."""
    from diffusers import StableDiffusion3Pipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from accel.models.tiny import build_tiny_sd3

    transformer = build_tiny_sd3().transformer
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v"]))
    StableDiffusion3Pipeline.save_lora_weights(tmp_path, transformer_lora_layers=get_peft_model_state_dict(transformer))
    return tmp_path / LORA_FILE


def test_a_lora_for_another_model_stops_loading_with_a_clear_error(tmp_path, load):
    from safetensors.torch import save_file

    from accel.loading import load_pipeline

    sd3 = _sd3_lora(tmp_path / "sd3", load)
    with pytest.raises(AccelError, match=r"sd3.*does not match the model.*(shape|no such layer)") as err:
        load_pipeline("shapes-flux", builtin_loras=False, loras={"other": sd3})
    assert str(sd3) in str(err.value)
    junk = tmp_path / "junk.safetensors"
    save_file({"unet.down.lora_A.weight": torch.zeros(4, 8), "unet.down.lora_B.weight": torch.zeros(8, 4)}, junk)
    with pytest.raises(AccelError, match="junk.safetensors"):
        load_pipeline("shapes-flux", builtin_loras=False, loras={"junk": junk})
    with pytest.raises(AccelError, match="no such file"):
        load_pipeline("shapes-flux", builtin_loras=False, loras={"gone": tmp_path / "missing"})


def test_the_cli_takes_lora_name_scale(tmp_path, pipe):
    from accel.cli import main

    out = tmp_path / "star.png"
    assert main(["generate", "--prompt", "a red star on the left", "--lora", "star=1.0", "--seed", "1",
                 "--out", str(out), "--report"]) == 0
    expected = generate(pipe, GenerationParams(prompt="a red star on the left", seed=1, lora=STAR)).images[0]
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(io.BytesIO(image_bytes(expected, "png")))))
    assert main(["generate", "--prompt", "x", "--lora", "star=9", "--out", str(out)]) == 2  # out of range
    with pytest.raises(SystemExit):
        main(["generate", "--prompt", "x", "--lora", "star=big", "--out", str(out)])


# -- server ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def live():
    from server_fixtures import LiveServer

    models = [{"id": "shapes-flux", "source": "shapes-flux"}, {"id": "tiny-flux", "source": "tiny-flux"}]
    with LiveServer(models=models, max_batch_size=4, max_batch_wait_ms=400, warmup=False) as server:
        yield server


def _post(live, body):
    return httpx.post(live.url + "/v1/images/generations", json=body, timeout=120)


def test_concurrent_requests_with_different_adapters_each_get_their_own(live, monkeypatch):
    engine = live.state.engine
    records, run = [], engine.run

    def recording(*args):
        results, record = run(*args)
        records.append((record, [p.lora for p in args[1]]))
        return results, record

    monkeypatch.setattr(engine, "run", recording)
    bodies = [{"prompt": "a blue star at the bottom", "seed": 3},
              {"prompt": "a blue star at the bottom", "seed": 3, "lora": STAR},
              {"prompt": "a blue star at the bottom", "seed": 3, "lora": [{"name": "star", "scale": 0.5}]}]
    with cf.ThreadPoolExecutor(len(bodies)) as pool:
        responses = list(pool.map(lambda b: _post(live, b), bodies))
    assert [r.status_code for r in responses] == [200] * 3, [r.text for r in responses]
    assert sum(record.size for record, _ in records) == 3
    assert all(len({tuple(lora) for lora in sets}) == 1 for _, sets in records)  # never two sets in one call
    loaded = engine.models["shapes-flux"]
    for body, response in zip(bodies, responses):
        data = response.json()
        assert data["lora"] == [{"name": r["name"], "scale": r["scale"]} for r in body.get("lora", [])]
        with loaded.lock:  # the same request alone, through the library
            alone = generate(loaded.pipe, GenerationParams(prompt=body["prompt"], seed=3, lora=body.get("lora", [])))
        assert base64.b64decode(data["data"][0]["b64_json"]) == image_bytes(alone.images[0], "png")
    assert responses[0].json()["data"][0] != responses[1].json()["data"][0]


@pytest.mark.parametrize("body, param", [
    ({"lora": [{"name": "moon"}]}, "lora[0].name"),
    ({"lora": [{"name": "star", "scale": 3.0}]}, "lora[0].scale"),
    ({"lora": [{"name": "star", "scale": -2.5}]}, "lora[0].scale"),
    ({"lora": [{"name": "star", "path": "/etc/passwd"}]}, "lora"),
    ({"lora": [{"name": "star"}], "model": "tiny-flux"}, "lora"),
    ({"lora": "star"}, "lora"),
])
def test_bad_lora_requests_are_400_naming_the_field(live, body, param):
    response = _post(live, {"prompt": "a red star on the left", "num_inference_steps": 2, **body})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_models_list_their_adapters_and_the_schema_documents_lora(live):
    cards = {card["id"]: card for card in httpx.get(live.url + "/v1/models").json()["data"]}
    assert cards["shapes-flux"]["loras"] == ["star"] and cards["tiny-flux"]["loras"] == []
    schema = httpx.get(live.url + "/openapi.json").json()["components"]["schemas"]
    scale = schema["LoraRequest"]["properties"]["scale"]
    assert (scale["minimum"], scale["maximum"]) == (-2.0, 2.0)
    assert "lora" in schema["ImageGenerationRequest"]["properties"] and "lora" in schema["VideoCreateRequest"]["properties"]


def test_a_bad_lora_setting_stops_the_start_up_naming_model_and_file(tmp_path):
    from server.engine import Engine
    from server.settings import ServerSettings, SettingsError, load_settings

    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    settings = ServerSettings(models=[{"id": "sf", "source": "shapes-flux", "loras": {"mine": str(bad)}}],
                              warmup=False)
    with pytest.raises(AccelError, match=r"model sf: LoRA .*bad\.safetensors"):
        Engine(settings).load()
    with pytest.raises(SettingsError, match="loras"):
        load_settings(models=[{"id": "sf", "source": "shapes-flux", "loras": {"../x": str(bad)}}])
    plain = ServerSettings(models=[{"id": "sf", "source": "shapes-flux", "builtin_loras": False}], warmup=False)
    engine = Engine(plain)
    engine.load()
    assert engine.models["sf"].info.loras == ()
