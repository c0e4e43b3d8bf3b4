"""Conformance matrix: every method × every pipeline variant the adapters accept that builds offline × CFG mode,
with invariants that must hold on all of them (not one hand-picked path).

Variants, a tiny model of every family the adapters accept: FLUX.1 text-to-image (no CFG, true CFG), img2img /
inpaint / Kontext with true CFG (no cache context: branches come from call order); FLUX.2 [klein] (CFG, editing with
a reference image); Qwen-Image (no CFG, true CFG); Z-Image (no CFG, batched CFG with the conditional half first);
PixArt-Σ (no CFG, batched CFG); SD3 (no CFG, batched CFG, CFG + skip-layer guidance); Wan 2.1 (no CFG, CFG); Wan 2.2
with two experts (`transformer_2`), text- and image-to-video; HunyuanVideo 1.5 text- and image-to-video (CFG by its
guider's "pred_cond"/"pred_uncond" calls); LTX-Video text- and image-to-video and CogVideoX (batched CFG under one
"cond_uncond" context). Not built: FLUX.2 [dev] and Qwen-Image-Edit (their processors need torchvision), FLUX
Fill/Control (other input channels; the call layout is one of the above). A family is supported exactly when its
rows pass; a method a family does not support (`Method.families`) must be refused, naming the supported ones.

Invariants, each an assertion:
- a skip-nothing setting of every method is bit-identical to the plain pipeline;
- a skipping setting runs, and its counts add up (per transformer call every block is counted, computed <= total);
- a method sees exactly the branches the pipeline runs (per step: cond/uncond, batch, extra guidance passes, each
  expert's own) and its per-branch work adds up to the pipeline's calls;
- after the block every module's `forward`, every attention processor and the pipeline's class are the very same
  objects as before, no hook is left, and repeated blocks do not grow anything;
- every pipeline call inside one block is accelerated with fresh state (three calls give the same output).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from diffusers import FluxImg2ImgPipeline, FluxInpaintPipeline, FluxKontextPipeline, WanPipeline
from PIL import Image

from accel import accelerate
from accel.adapters import adapter_for
from accel.caching.abcache import euler_steps
from accel.methods import METHODS as REGISTRY
from accel.models.pipelines import prepare
from accel.session import AccelSession
from helpers import registries_empty

STEPS = 3
IMAGE = Image.fromarray((np.arange(64 * 64 * 3) % 251).astype(np.uint8).reshape(64, 64, 3))
MASK = Image.fromarray(np.where(np.arange(64 * 64).reshape(64, 64) % 64 < 32, 255, 0).astype(np.uint8))


def _flux_variant(cls):
    def build(load):
        return cls(**load("tiny-flux").components)

    return build


def _wan22(load):
    base = load("tiny-wan")
    parts = {k: v for k, v in base.components.items() if k in ("tokenizer", "text_encoder", "vae", "scheduler")}
    second = copy.deepcopy(base.transformer)
    with torch.no_grad():
        for p in second.parameters():
            p.mul_(0.9)  # a different expert
    return WanPipeline(**parts, transformer=base.transformer, transformer_2=second, boundary_ratio=0.875)  # steps at t 999 | 857, 600


TRUE_CFG = dict(true_cfg_scale=2.0, negative_prompt="blurry")
FLUX_SIZE = dict(height=64, width=64)
WAN_SIZE = dict(height=32, width=32, num_frames=5)
VIDEO_CFG = dict(guidance_scale=3.0, negative_prompt="blurry")


def _builder(module, name):
    def build(load):
        from importlib import import_module

        return prepare(getattr(import_module(f"accel.models.{module}"), name)())

    return build


def _builtin(name):
    return lambda load: load(name)


# name: (family, builder, call kwargs, the branches the pipeline runs, its denoiser calls per generation of STEPS steps)
VARIANTS = {
    "flux-t2i": ("flux", _builtin("tiny-flux"), dict(FLUX_SIZE), {"cond"}, STEPS),
    "flux-t2i-truecfg": ("flux", _builtin("tiny-flux"), dict(FLUX_SIZE, **TRUE_CFG), {"cond", "uncond"}, 2 * STEPS),
    "flux-img2img-truecfg": ("flux", _flux_variant(FluxImg2ImgPipeline),
                             dict(FLUX_SIZE, image=IMAGE, strength=1.0, **TRUE_CFG), {"cond", "uncond"}, 2 * STEPS),
    "flux-inpaint-truecfg": ("flux", _flux_variant(FluxInpaintPipeline),
                             dict(FLUX_SIZE, image=IMAGE, mask_image=MASK, strength=1.0, **TRUE_CFG),
                             {"cond", "uncond"}, 2 * STEPS),
    "flux-kontext-truecfg": ("flux", _builtin("tiny-flux-kontext"),
                             dict(FLUX_SIZE, image=IMAGE, _auto_resize=False, max_area=64 * 64, **TRUE_CFG),
                             {"cond", "uncond"}, 2 * STEPS),
    "sd3": ("sd3", _builtin("tiny-sd3"), dict(FLUX_SIZE, guidance_scale=1.0), {"cond"}, STEPS),
    "sd3-cfg": ("sd3", _builtin("tiny-sd3"), dict(FLUX_SIZE, guidance_scale=3.0, negative_prompt="blurry"),
                {"batch"}, STEPS),
    # skip-layer guidance runs on steps i with start*N < i < stop*N: steps 1 and 2 of 3
    "sd3-cfg-slg": ("sd3", _builtin("tiny-sd3"), dict(FLUX_SIZE, guidance_scale=3.0, skip_guidance_layers=[1],
                                                      skip_layer_guidance_start=0.0, skip_layer_guidance_stop=1.0),
                    {"batch", "extra1"}, STEPS + 2),
    "wan": ("wan", _builtin("tiny-wan"), dict(WAN_SIZE, guidance_scale=1.0), {"cond"}, STEPS),
    "wan-cfg": ("wan", _builtin("tiny-wan"), dict(WAN_SIZE, **VIDEO_CFG), {"cond", "uncond"}, 2 * STEPS),
    "wan22-cfg": ("wan", _wan22, dict(WAN_SIZE, **VIDEO_CFG),
                  {"cond", "uncond", "cond@transformer_2", "uncond@transformer_2"}, 2 * STEPS),
    # the built-in: 3 steps at t 999, 960 | 857 (the boundary is 875)
    "wan22-t2v-builtin": ("wan", _builtin("tiny-wan22"), dict(WAN_SIZE, **VIDEO_CFG),
                          {"cond", "uncond", "cond@transformer_2", "uncond@transformer_2"}, 2 * STEPS),
    "wan22-i2v-cfg": ("wan", _builtin("tiny-wan22-i2v"), dict(WAN_SIZE, image=IMAGE, **VIDEO_CFG),
                      {"cond", "uncond", "cond@transformer_2", "uncond@transformer_2"}, 2 * STEPS),
    "ltx-cfg": ("ltx", _builtin("tiny-ltx"), dict(height=32, width=32, num_frames=9, **VIDEO_CFG),
                {"cond_uncond"}, STEPS),
    "ltx": ("ltx", _builtin("tiny-ltx"), dict(height=32, width=32, num_frames=9, guidance_scale=1.0),
            {"cond_uncond"}, STEPS),
    "ltx-i2v-cfg": ("ltx", _builder("ltx", "build_tiny_ltx_i2v"),
                    dict(image=IMAGE, height=32, width=32, num_frames=9, **VIDEO_CFG), {"cond_uncond"}, STEPS),
    "cogvideox-cfg": ("cogvideox", _builtin("tiny-cogvideox"), dict(height=32, width=32, num_frames=9, **VIDEO_CFG),
                      {"cond_uncond"}, STEPS),
    "pixart-cfg": ("pixart", _builtin("tiny-pixart"), dict(FLUX_SIZE, **VIDEO_CFG), {"batch"}, STEPS),
    "pixart": ("pixart", _builtin("tiny-pixart"), dict(FLUX_SIZE, guidance_scale=1.0), {"cond"}, STEPS),
    "flux2-klein-cfg": ("flux2", _builtin("tiny-flux2"), dict(FLUX_SIZE, guidance_scale=3.0), {"cond", "uncond"},
                        2 * STEPS),
    "flux2-klein-edit": ("flux2", _builtin("tiny-flux2"), dict(FLUX_SIZE, image=[IMAGE], guidance_scale=1.0),
                         {"cond"}, STEPS),
    "qwen-image": ("qwen-image", _builtin("tiny-qwen-image"), dict(FLUX_SIZE), {"cond"}, STEPS),
    "qwen-image-truecfg": ("qwen-image", _builtin("tiny-qwen-image"), dict(FLUX_SIZE, **TRUE_CFG),
                           {"cond", "uncond"}, 2 * STEPS),
    "zimage-cfg": ("zimage", _builtin("tiny-zimage"), dict(FLUX_SIZE, guidance_scale=3.0, negative_prompt="blurry"),
                   {"batch"}, STEPS),
    "zimage": ("zimage", _builtin("tiny-zimage"), dict(FLUX_SIZE, guidance_scale=0.0), {"cond"}, STEPS),
    "hunyuanvideo15-cfg": ("hunyuanvideo15", _builtin("tiny-hunyuanvideo15"), dict(WAN_SIZE, negative_prompt="blurry"),
                           {"pred_cond", "pred_uncond"}, 2 * STEPS),
    "hunyuanvideo15-i2v-cfg": ("hunyuanvideo15", _builder("hunyuanvideo15", "build_tiny_hunyuanvideo15_i2v"),
                               dict(image=IMAGE, num_frames=5, negative_prompt="blurry"),
                               {"pred_cond", "pred_uncond"}, 2 * STEPS),
}
PIPELINE_SKIPS = {"sd3-cfg-slg": 2}  # block forwards the pipeline itself skips per generation (SLG: 1 block x 2 calls)
FAMILY = {name: variant[0] for name, variant in VARIANTS.items()}

# per method: a setting that skips nothing, and one that skips (or adds) work
METHODS = {
    "sortblock": ("sortblock:K=1", "sortblock:K=2,beta=0.5,schedule=constant,start=1000,end=0"),
    "abcache": ("abcache:interval=1", "abcache:warmup=1,interval=2"),
    "abcache_adaptive": ("abcache_adaptive:tolerance=0", "abcache_adaptive:tolerance=10"),
    "fbcache": ("fbcache:threshold=0", "fbcache:threshold=1.0"),
    "taylorseer": ("taylorseer:disable_cache_before_step=1000", "taylorseer:cache_interval=2,disable_cache_before_step=1"),
    "magcache": ("magcache:calibrate=true", "magcache:mag_ratios=[1.0],threshold=1.0,retention_ratio=0"),
    "s2": ("s2:omega=0", "s2:interval=[0,1]"),
    "prune": ("prune:blocks=[]", None),  # the skipping one names a block of the variant's first stack
    "sparse_attention": ("sparse_attention:dense_steps=1000", "sparse_attention:block_size=16,dense_steps=1,sparsity=0.5,backend=reference"),
}


def supported(method: str, family: str) -> bool:
    """What the method declares (`Method.families`); the rest must be refused (test_unsupported_is_refused)."""
    families = REGISTRY[method].families
    return families is None or family in families


def cases():
    for variant in VARIANTS:
        for method in METHODS:
            if supported(method, FAMILY[variant]):
                yield pytest.param(variant, method, id=f"{variant}-{method}")


@pytest.mark.parametrize("variant,method", [
    pytest.param(v, m, id=f"{v}-{m}") for v in dict(zip(FAMILY.values(), FAMILY)).values() for m in METHODS
    if not supported(m, FAMILY[v])])
def test_unsupported_is_refused(load, variant, method):
    """A method that does not support a family is refused before any work, naming the families it supports."""
    from accel.errors import SpecError

    pipe = pipeline(load, variant)
    with pytest.raises(SpecError, match="supported: " + ", ".join(REGISTRY[method].families)):
        with accelerate(pipe, skipping_spec(pipe, method)):
            pass


_built: dict[str, object] = {}


def pipeline(load, variant):
    if variant not in _built:
        _built[variant] = VARIANTS[variant][1](load)
    return _built[variant]


def call(pipe, variant, prompt="a red circle on the left", seed=0):
    kwargs = dict(VARIANTS[variant][2], num_inference_steps=STEPS, output_type="np")
    out = pipe(prompt=prompt, generator=torch.Generator().manual_seed(seed), **kwargs)
    return np.asarray(out.frames if hasattr(out, "frames") else out.images)


def snapshot(pipe):
    """Identities of everything a session may touch: each module's own `forward`, each attention processor, the
    pipeline's class, and the transformers' children order."""
    modules = [m for name in ("transformer", "transformer_2") if getattr(pipe, name, None) is not None
               for m in getattr(pipe, name).modules()]
    return (type(pipe), [id(m.__dict__.get("forward")) for m in modules],
            [id(getattr(m, "processor", None)) for m in modules],
            [list(getattr(pipe, n)._modules) for n in ("transformer", "transformer_2") if getattr(pipe, n, None)])


def skipping_spec(pipe, method):
    if method == "prune":
        stack = next(iter(AccelSession(pipe, []).stacks))
        return f'prune:blocks=["{stack}.1"]'
    spec = METHODS[method][1]
    if method == "abcache" and adapter_for(pipe).flow_output:  # AB-Cache's noise blend where it runs, velocity else
        spec += ",prediction=noise_blend"
    if method in ("abcache", "abcache_adaptive") and euler_steps(pipe.scheduler):  # and the correction
        spec += ",correct=true"
    return spec


_plain: dict[str, np.ndarray] = {}


@pytest.mark.parametrize("variant,method", list(cases()))
def test_conformance(load, monkeypatch, variant, method):
    pipe = pipeline(load, variant)
    if variant not in _plain:
        _plain[variant] = call(pipe, variant)
    before = snapshot(pipe)

    with accelerate(pipe, METHODS[method][0]) as report:
        out = call(pipe, variant)
    assert np.array_equal(_plain[variant], out), f"{method} skip-nothing differs from plain on {variant}"
    assert report.block_fraction_computed == 1.0 or method == "s2"

    seen: list[tuple[int, str]] = []
    start = AccelSession.start

    def start_and_record(session):  # record (step, branch) of every denoiser call of every pipeline call
        start(session)
        session.add_call_hook(lambda ctx, run: seen.append((ctx.step_index, ctx.branch)) or run())

    monkeypatch.setattr(AccelSession, "start", start_and_record)
    with accelerate(pipe, skipping_spec(pipe, method), seed=0) as report:
        outs = [call(pipe, variant) for _ in range(2)]
    monkeypatch.undo()
    _, _, _, branches, calls = VARIANTS[variant]
    assert np.array_equal(outs[0], outs[1]), "the second call in the block did not start from fresh state"
    assert len(report.calls) == 2 and [c.transformer_calls for c in report.calls] == [calls, calls]
    assert {branch for _, branch in seen} == branches and len(seen) == 2 * calls
    first = report.calls[0]
    per_transformer = sum(AccelSession(pipe, []).adapter.block_sizes(pipe.transformer).values())
    plain_blocks = calls * per_transformer - PIPELINE_SKIPS.get(variant, 0)
    assert sum(first.blocks_total.values()) == plain_blocks
    assert all(0 <= first.blocks_computed[s] <= t for s, t in first.blocks_total.items())
    assert report.transformer_calls == 2 * calls and sum(report.blocks_total.values()) == 2 * plain_blocks
    if method == "abcache":
        counters = first.details["abcache"]
        assert counters.computed_calls + counters.extrapolated_calls == calls
        assert counters.extrapolated_calls > 0 or variant.startswith("wan22")  # an expert's branches start afresh
    if method == "s2":
        assert first.details["s2"].active_steps == STEPS  # the cond (or batch) call of each step, never another

    assert snapshot(pipe) == before, "something the session touched was not restored"
    assert registries_empty(pipe.transformer)
    assert getattr(pipe, "transformer_2", None) is None or registries_empty(pipe.transformer_2)


def test_repeated_blocks_grow_nothing(load):
    """100 accelerated calls with a module-level peer (TaylorSeer wraps attention modules) leave every module as
    it was: no wrapper outlives its block."""
    pipe = load("tiny-flux")
    before = snapshot(pipe)
    forwards = [m.forward for m in pipe.transformer.modules()]
    for _ in range(100):
        with accelerate(pipe, "taylorseer:cache_interval=2,disable_cache_before_step=1"):
            pipe.transformer(**_direct_inputs(pipe))
    assert snapshot(pipe) == before
    assert [m.forward for m in pipe.transformer.modules()] == forwards


def _direct_inputs(pipe):
    g = torch.Generator().manual_seed(0)
    return dict(hidden_states=torch.randn(1, 16, 64, generator=g), encoder_hidden_states=torch.randn(1, 8, 32, generator=g),
                pooled_projections=torch.randn(1, 32, generator=g), timestep=torch.tensor([0.5]),
                img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3), guidance=torch.tensor([3.5]), return_dict=False)


@pytest.mark.parametrize("name,spec", [("tiny-flux", "s2:interval=[0,1]"), ("bench-flux", "s2:interval=[0,1],drop_ratio=0.5"), ("tiny-sd3", "s2:interval=[0,1]"),
                                       ("tiny-flux", "abcache:warmup=1,interval=2"), ("tiny-wan", "abcache:warmup=1,interval=2"),
                                       ("tiny-flux", "taylorseer:cache_interval=2,disable_cache_before_step=1"),
                                       ("tiny-flux", 'prune:blocks=["single_transformer_blocks.1"]')])
def test_an_item_alone_equals_the_same_item_in_a_batch(load, name, spec):
    """For batch-invariant methods (`Method.batch_invariant`): an output does not depend on what else is in its batch
    (S² draws each item's masks from the item's own seed)."""
    from accel.generate import GenerationParams, generate_batch
    from accel.spec import parse_spec

    assert parse_spec(spec).batch_invariant
    pipe = load(name)
    size = dict(height=32, width=32, num_frames=5) if name == "tiny-wan" else dict(height=64, width=64)
    cfg = dict(true_cfg_scale=2.0) if "flux" in name else dict(guidance_scale=3.0)
    requests = [GenerationParams.parse(prompt=p, seed=s, num_inference_steps=4, negative_prompt="blurry", **size, **cfg)
                for p, s in (("a red circle on the left", 3), ("a blue square at the top", 11))]
    together = generate_batch(pipe, requests, spec)
    for request, batched in zip(requests, together):
        alone = generate_batch(pipe, [request], spec)[0]
        np.testing.assert_allclose(batched.frames(), alone.frames(), atol=2e-5)


PAIRS = [("s2:interval=[0,1]", "abcache:warmup=1,interval=2"), ("s2:interval=[0,1]", "sortblock:K=2,beta=0.5,start=1000,end=0"),
         ("prune:blocks=[BLOCK]", "sortblock:K=2,beta=0.5,start=1000,end=0"), ("prune:blocks=[BLOCK]", "taylorseer:cache_interval=2"),
         ("sparse_attention:block_size=16,dense_steps=1,sparsity=0.5,backend=reference", "abcache:warmup=1,interval=2"),
         ("sparse_attention:block_size=16,dense_steps=1,sparsity=0.5,backend=reference", "s2:interval=[0,1]")]


# not Z-Image (its plain batched call is not reproducible from one call to the next in diffusers 0.42.1) nor
# HunyuanVideo 1.5 (its plain pipeline fails with several videos per prompt)
@pytest.mark.parametrize("variant", ["flux-t2i-truecfg", "flux-img2img-truecfg", "sd3-cfg-slg", "wan22-cfg",
                                     "qwen-image-truecfg", "ltx-cfg"])
@pytest.mark.parametrize("pair", PAIRS, ids=lambda pair: "+".join(p.split(":")[0] for p in pair))
def test_pairs_with_batches(load, variant, pair):
    """Pairs of composable methods on batches (2 prompts x 2 images each): no exception, counts add up, the
    pipeline is left as it was; and the pair's skip-nothing settings are bit-identical to plain on the batch."""
    if "sparse_attention" in pair[0] and not supported("sparse_attention", FAMILY[variant]):
        pytest.skip("sparse attention does not support this family")
    pipe = pipeline(load, variant)
    stack = next(iter(AccelSession(pipe, []).stacks))
    spec = [p.replace("BLOCK", f'"{stack}.1"') for p in pair]
    batch = dict(prompt=["a red circle on the left", "a blue square at the top"], num_images_per_prompt=2)
    if "num_frames" in VARIANTS[variant][2]:  # video pipelines count outputs per prompt as videos
        batch = dict(prompt=batch["prompt"], num_videos_per_prompt=2)
    kwargs = dict(VARIANTS[variant][2], num_inference_steps=STEPS, output_type="np", **batch)
    if "negative_prompt" in kwargs:
        kwargs["negative_prompt"] = ["blurry", "blurry"]
    before = snapshot(pipe)

    def generate():
        out = pipe(generator=torch.Generator().manual_seed(0), **kwargs)
        return np.asarray(out.frames if hasattr(out, "frames") else out.images)

    plain = generate()
    skip_nothing = [METHODS[p.split(":")[0]][0] for p in pair]
    with accelerate(pipe, skip_nothing):
        assert np.array_equal(generate(), plain)
    with accelerate(pipe, spec, seed=list(range(4))) as report:
        out = generate()
    assert out.shape == plain.shape and np.isfinite(out).all()
    calls = VARIANTS[variant][4]
    assert report.transformer_calls == calls
    assert all(0 <= report.blocks_computed[s] <= t for s, t in report.blocks_total.items())
    assert snapshot(pipe) == before and registries_empty(pipe.transformer)


def test_s2_pass_leaves_the_other_methods_state_unchanged(load):
    """S²'s sub-network pass runs under its own branch: sparse attention's masks of the cond branch are not
    overwritten by searches on the sub-network, so with a negligible S² weight the output is that of sparse
    attention alone (it was not: the cond pass then ran with the sub-network's masks)."""
    pipe = load("bench-flux")
    sparse = "sparse_attention:block_size=16,dense_steps=1,search_steps=[1,3],sparsity=0.5,backend=reference"
    kwargs = dict(height=128, width=128, num_inference_steps=5, output_type="np")

    def generate(spec):
        with accelerate(pipe, spec, seed=0) as report:
            image = pipe("a red circle on the left", generator=torch.Generator().manual_seed(0), **kwargs).images
        return np.asarray(image), report

    alone, alone_report = generate(sparse)
    both, both_report = generate([sparse, "s2:interval=[0,1],omega=1e-9"])
    assert alone_report.details["sparse_attention"].sparse_calls > 0
    assert both_report.details["s2"].extra_forwards == 5
    np.testing.assert_allclose(both, alone, atol=1e-5)


def test_another_pipeline_sharing_the_transformer_gets_fresh_state_per_loop(load):
    """A pipeline built from the accelerated one's components (`from_pipe`, `**pipe.components`) is not wrapped,
    but each of its denoising loops starts afresh (the step goes back): no state crosses its calls."""
    from diffusers import FluxPipeline

    pipe = load("tiny-flux")
    other = FluxPipeline(**pipe.components)
    kwargs = dict(prompt="a red circle", height=64, width=64, num_inference_steps=4, output_type="np")
    spec = "abcache:warmup=1,interval=2"
    with accelerate(pipe, spec):
        reference = pipe(generator=torch.Generator().manual_seed(0), **kwargs).images
    with accelerate(pipe, spec) as report:
        first, second = (other(generator=torch.Generator().manual_seed(0), **kwargs).images for _ in range(2))
    assert np.array_equal(first, reference) and np.array_equal(second, reference)
    assert len(report.calls) == 2 and report.steps == 8


def test_s2_never_cuts_arguments_without_a_batch_dimension(load):
    """FLUX's position ids are (tokens, 3): with as many tokens as items, S²'s per-mask row selection cut them too."""
    from diffusers import FluxTransformer2DModel

    from accel.generate import GenerationParams, generate

    base = load("tiny-flux")
    config = dict(base.transformer.config, num_layers=4, num_single_layers=4)
    torch.manual_seed(0)
    pipe = type(base)(**{**base.components, "transformer": FluxTransformer2DModel.from_config(config).eval()})
    pipe.accel_defaults = base.accel_defaults
    params = GenerationParams(prompt="a red circle", height=32, width=32, num_inference_steps=2, num_outputs=4)
    result = generate(pipe, params, "s2:interval=[0,1],drop_ratio=0.5")  # 4 image tokens, 4 items
    assert result.report["details"]["s2"]["extra_forwards"] > 2  # items drew different masks: several passes
    assert np.isfinite(result.images).all()


def test_a_sessions_pipeline_class_keeps_no_session_alive(load):
    """The wrapped pipeline class is made once per class and finds its session on the instance: caches keyed on the
    class (e.g. its call signature) cannot keep every request's session alive."""
    import gc

    pipe = load("tiny-flux")
    classes = set()
    for _ in range(3):
        with accelerate(pipe, "abcache"):
            classes.add(type(pipe))
    gc.collect()
    assert len(classes) == 1 and not any(isinstance(o, AccelSession) for o in gc.get_objects())


def test_readme_support_matrix_is_generated():
    """README's family x method table is `accel methods --matrix`, not a hand-written copy that can drift."""
    from pathlib import Path

    from accel.spec import support_matrix

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("<!-- support-matrix:start -->\n")[1].split("<!-- support-matrix:end -->")[0]
    assert block == support_matrix(), "README.md's support matrix is stale: paste `accel methods --matrix`"


@pytest.mark.parametrize("spec", ["abcache:warmup=1,interval=2", "sortblock:K=2,beta=0.5,start=1000,end=0"])
def test_one_expert_targeted(load, spec):
    """Wan 2.2: `expert=high` accelerates only `transformer` (every block of `transformer_2` runs), `expert=low`
    only `transformer_2`; both together count both stacks; the first call of the low-noise expert (where the
    pipeline switches) is always computed in full."""
    pipe = pipeline(load, "wan22-t2v-builtin")
    kwargs = dict(VARIANTS["wan22-t2v-builtin"][2], num_inference_steps=16, output_type="np")  # 5 low-noise steps
    plain = pipe(prompt="a cat", generator=torch.Generator().manual_seed(0), **kwargs).frames
    computed = {}
    for expert in ("both", "high", "low"):
        seen = []
        start = AccelSession.start

        def start_and_record(session):
            start(session)
            session.add_call_hook(lambda ctx, run: seen.append((ctx.transformer, ctx.step_index)) or run())

        AccelSession.start = start_and_record
        try:
            with accelerate(pipe, f"{spec},expert={expert}") as report:
                out = pipe(prompt="a cat", generator=torch.Generator().manual_seed(0), **kwargs).frames
        finally:
            AccelSession.start = start
        assert np.isfinite(out).all()
        total, done = report.blocks_total, report.blocks_computed
        assert set(total) == {"blocks", "transformer_2.blocks"} and all(total.values())
        computed[expert] = done
        if expert == "high":
            assert done["transformer_2.blocks"] == total["transformer_2.blocks"]
        if expert == "low":
            assert done["blocks"] == total["blocks"]
        if expert == "both":
            assert sum(done.values()) < sum(total.values())
        switch = min(step for name, step in seen if name == "transformer_2")
        assert any(name == "transformer" for name, _ in seen) and switch > 0
    assert computed["both"]["blocks"] == computed["high"]["blocks"]  # state per expert: targeting one changes nothing
    assert computed["both"]["transformer_2.blocks"] == computed["low"]["transformer_2.blocks"]  # ... of the other
    with accelerate(pipe, f"{spec},expert=low"):
        assert not np.array_equal(pipe(prompt="a cat", generator=torch.Generator().manual_seed(0), **kwargs).frames, plain)
