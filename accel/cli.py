"""The `accel` command line: generate, bench, make-model, and listings of models and accelerators."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EXAMPLES = """examples:
  accel generate --prompt "a red circle on the left" --out red.png          # shapes-flux, the default model
  accel generate --prompt "a blue square at the top" --accel fast --out fast.png
  accel generate --prompt "a red star on the left" --lora star=1.0 --out star.png   # shapes-flux's LoRA adapter
  accel generate --prompt "a blue square at the top" --accel target:psnr=35 --report --out t.png  # a fidelity target
  accel calibrate --model tiny-flux --out tiny-flux.profile.json     # speed/fidelity profile (resumable)
  accel generate --model tiny-wan --prompt "a ball" --frames 5 --out ball.mp4
  accel generate --model tiny-flux-kontext --image in.png --prompt "make it blue" --out edited.png
  accel bench --model bench-flux --accel fbcache:threshold=0.1 --accel taylorseer --steps 20 --seeds 2 --out out/bench
  accel make-model tiny-flux ./tiny-flux-dir      # a standard diffusers directory
  accel methods                                   # accelerators, their knobs and presets
  accel prune calibrate --model bench-flux --prompts prompts.txt --out plan.json
  accel generate --model bench-flux --prune-plan plan.json --prune-ratio 0.2 --prompt "a red circle" --out p.png
  accel serve --port 8000                         # the HTTP server (= accel-server; needs the server extra)
"""


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="shapes-flux",
                        help="built-in name (see `accel models`), local diffusers dir, or hub id (default: shapes-flux)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if present, else cpu)")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: bf16 on cuda, fp32 on cpu)")
    parser.add_argument("--compile", action="store_true", help="compile each transformer block (torch.compile)")
    parser.add_argument("--attention-backend", default=None, help="diffusers attention backend (default: native SDPA)")
    parser.add_argument("--load-lora", action="append", default=[], metavar="NAME=PATH",
                        help="load a LoRA adapter (diffusers/PEFT file or directory) under NAME; repeatable")


def _add_prune_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prune-plan", default=None, help="plan file from `accel prune calibrate`: remove blocks at load")
    parser.add_argument("--prune-ratio", type=float, default=0.0, help="with --prune-plan: fraction of blocks removed")


def _add_generation_args(parser: argparse.ArgumentParser, *, prompt_required: bool) -> None:
    parser.add_argument("--prompt", required=prompt_required, help="text prompt")
    parser.add_argument("--negative-prompt", default=None, help="negative prompt (enables CFG where the model has it)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    parser.add_argument("--height", type=int, default=None, help="output height in pixels (default: the model's)")
    parser.add_argument("--width", type=int, default=None, help="output width in pixels (default: the model's)")
    parser.add_argument("--frames", type=int, default=None, help="video frames (video models only)")
    parser.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the model's)")
    parser.add_argument("--true-cfg", type=float, default=None, help="FLUX only: real CFG scale with --negative-prompt")
    parser.add_argument("--lora", action="append", default=[], metavar="NAME[=SCALE]",
                        help="activate a LoRA adapter of the model (see `accel models`) at SCALE in [-2, 2] "
                             "(default 1); repeatable")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="accel",
        description="Training-free acceleration of diffusers pipelines: generate, benchmark, make models.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = sub.add_parser("generate", help="generate one image (PNG) or video (MP4)", epilog=EXAMPLES,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_args(gen)
    _add_prune_args(gen)
    _add_generation_args(gen, prompt_required=True)
    gen.add_argument("--seed", type=int, default=0, help="random seed (same seed, same output)")
    gen.add_argument("--accel", default=None,
                     help="accelerator spec: preset (off|quality|balanced|fast), method:key=value,..., JSON; join with ';'")
    gen.add_argument("--image", action="append", default=[], metavar="FILE",
                     help="input image (edit and image-to-video models); repeat for reference images")
    gen.add_argument("--mask", default=None, metavar="FILE", help="mask image (models that take a mask)")
    gen.add_argument("--out", required=True, help="output file: .png/.jpg/.webp for images, .mp4 for videos")
    gen.add_argument("--report", action="store_true", help="print what the accelerators did, as JSON")
    gen.add_argument("--profile", default=None, metavar="FILE",
                     help="calibrated profile (`accel calibrate`) for fidelity targets (built-in models ship one)")

    bench = sub.add_parser("bench", help="compare specs with the baseline: speed ratio, work, PSNR/SSIM",
                           formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES)
    _add_model_args(bench)
    _add_prune_args(bench)
    _add_generation_args(bench, prompt_required=False)
    bench.add_argument("--accel", action="append", default=[], required=True,
                       help="a spec to compare (repeat the flag for several)")
    bench.add_argument("--prompts", default=None, help="file with one prompt per line")
    bench.add_argument("--seeds", type=int, default=1, help="number of seeds per prompt (0..K-1)")
    bench.add_argument("--repeats", type=int, default=1, help="timed repeats per case (median is reported)")
    bench.add_argument("--out", required=True, help="output directory for report.json, report.md, grid.png")

    make = sub.add_parser("make-model", help="write a built-in model as a diffusers directory")
    make.add_argument("name", help="built-in model name (see `accel models`)")
    make.add_argument("dir", help="target directory")

    # `accel serve ARGS` is forwarded to `accel-server ARGS` before parsing (see `main`); listed here for --help
    sub.add_parser("serve", help="run the HTTP server, the same as `accel-server` (see `accel serve --help`)")

    prune = sub.add_parser("prune", help="block pruning: calibrate a plan (block scores and removal order)")
    prune_sub = prune.add_subparsers(dest="prune_command", required=True, metavar="SUBCOMMAND")
    cal = prune_sub.add_parser("calibrate", help="score every transformer block; write a plan file (JSON)")
    _add_model_args(cal)
    cal.add_argument("--prompts", required=True, help="file with one calibration prompt per line")
    cal.add_argument("--out", required=True, help="plan file to write (JSON)")
    cal.add_argument("--steps", type=int, default=8, help="denoising steps per calibration run (default 8)")
    cal.add_argument("--seeds", type=int, default=1, help="seeds per prompt (default 1)")
    cal.add_argument("--height", type=int, default=None, help="image height (default: the model's)")
    cal.add_argument("--width", type=int, default=None, help="image width (default: the model's)")
    cal.add_argument("--no-drop-one", action="store_true", help="skip the drop-one score (one run per block)")

    calib = sub.add_parser("calibrate", help="measure every cache setting's speed and fidelity: a profile for "
                           "fidelity targets (JSON; resumable: rerun the same command after Ctrl-C)")
    _add_model_args(calib)
    calib.add_argument("--prompts", default=None, help="file with one calibration prompt per line (default: 8 "
                       "training captions for shapes-flux, 2 generic prompts otherwise)")
    calib.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    calib.add_argument("--seed", type=int, default=0, help="seed of every run (default 0)")
    calib.add_argument("--spec", action="append", default=[], metavar="SPEC",
                       help="an extra setting to measure, e.g. a stack 'abcache_adaptive;sparse_attention' (repeatable)")
    calib.add_argument("--only", default=None, metavar="REGEX", help="keep only the sweep's lines matching REGEX")
    calib.add_argument("--plain-every", type=int, default=6, help="a plain run for timing every N settings")
    calib.add_argument("--lora", action="append", default=[], metavar="NAME[=SCALE]",
                       help="calibrate with this LoRA adapter of the model active (repeatable): requests with exactly "
                            "this adapter set use the profile; others fall back to the base model's")
    calib.add_argument("--out", required=True, help="profile file to write (JSON)")

    sub.add_parser("models", help="list the built-in models")
    methods = sub.add_parser("methods", help="list accelerators (with their knobs) and presets")
    methods.add_argument("--matrix", action="store_true", help="print family x method support as a markdown table")
    return parser


def _load(args):
    from accel.loading import load_pipeline

    return load_pipeline(args.model, device=args.device, dtype=args.dtype, compile=args.compile,
                         attention_backend=args.attention_backend, progress=True,
                         prune_plan=getattr(args, "prune_plan", None), prune_ratio=getattr(args, "prune_ratio", 0.0),
                         profile=getattr(args, "profile", None),
                         loras=_pairs(args.load_lora, "--load-lora", str) or None)


def _pairs(items: list[str], option: str, convert, default=None) -> dict:
    """NAME=VALUE items as {name: value}; a bare NAME takes `default` when there is one."""
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not name or (not sep and default is None) or name in out:
            raise SystemExit(f"error: {option} {item!r}: expected NAME=VALUE, each NAME once")
        try:
            out[name] = convert(value) if sep else default
        except ValueError:
            raise SystemExit(f"error: {option} {item!r}: {value!r} is not a number") from None
    return out


def _lora(args) -> list[dict] | None:
    pairs = _pairs(getattr(args, "lora", []), "--lora", float, default=1.0)
    return [{"name": name, "scale": scale} for name, scale in pairs.items()] or None


def _params(args, **extra) -> dict:
    return {
        "negative_prompt": args.negative_prompt,
        "num_inference_steps": args.steps,
        "height": args.height,
        "width": args.width,
        "num_frames": args.frames,
        "guidance_scale": args.guidance,
        "true_cfg_scale": args.true_cfg,
        "lora": _lora(args),
        **extra,
    }


def _read_image(path: str, option: str):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except (OSError, UnidentifiedImageError) as exc:
        raise SystemExit(f"error: {option} {path}: {exc}") from None


def cmd_generate(args) -> int:
    from accel.generate import GenerationParams, generate, model_info
    from accel.io import save_output
    from accel.spec import parse_spec

    spec = parse_spec(args.accel)  # fail on a bad spec before loading the model
    inputs = {"images": [_read_image(path, "--image") for path in args.image],
              "mask": _read_image(args.mask, "--mask") if args.mask else None}
    params = GenerationParams.parse(prompt=args.prompt, seed=args.seed, **_params(args), **inputs)
    pipe = _load(args)
    result = generate(pipe, params, spec)
    fps = model_info(pipe).fps
    frames = result.videos[0] if result.is_video else result.images[0]
    out = Path(args.out)
    if result.is_video and out.suffix.lower() != ".mp4":
        raise SystemExit("error: --out: a video model writes .mp4")
    save_output(frames, out, video=result.is_video, fps=fps)
    print(f"wrote {out} ({result.seconds:.2f} s)")
    if args.report:
        print(json.dumps(result.report, indent=2))
    return 0


def cmd_bench(args) -> int:
    from accel.eval.bench import BenchCase, markdown_table, run_bench
    from accel.generate import GenerationParams
    from accel.spec import parse_spec

    for spec in args.accel:
        parse_spec(spec)
    if args.prompts:
        prompts = [line.strip() for line in Path(args.prompts).read_text().splitlines() if line.strip()]
    elif args.prompt:
        prompts = [args.prompt]
    else:
        raise SystemExit("error: give --prompt or --prompts FILE")
    if args.seeds < 1 or args.repeats < 1:
        raise SystemExit("error: --seeds and --repeats must be at least 1")
    params = {k: v for k, v in _params(args).items() if v is not None}
    GenerationParams.parse(prompt=prompts[0], **params)  # validate before loading
    pipe = _load(args)
    pipe.set_progress_bar_config(disable=True)
    cases = [BenchCase(prompt, seed) for prompt in prompts for seed in range(args.seeds)]
    report = run_bench(pipe, args.accel, cases, params=params, repeats=args.repeats, out_dir=args.out,
                       model_name=args.model, adherence=_adherence_scorer(prompts))
    print(markdown_table(report))
    print(f"wrote {args.out}/report.json, report.md, grid.png")
    return 0


def _adherence_scorer(prompts: list[str]):
    """The shapes adherence score (fraction of captions fully right) when every prompt is in its grammar."""
    from accel.eval.shapes_captions import parse_caption
    from accel.eval.shapes_scorer import score

    try:
        for prompt in prompts:
            parse_caption(prompt)
    except ValueError:
        return None
    return lambda frame, prompt: float(score(frame, prompt).all_correct)


def cmd_make_model(args) -> int:
    from accel.loading import make_model

    path = make_model(args.name, args.dir)
    print(f"wrote {path}")
    return 0


SERVER_MODULES = ("fastapi", "uvicorn", "prometheus_client", "pydantic_settings")  # the `server` extra


def cmd_serve(argv: list[str]) -> int:
    """`accel serve`, kept for users, runs `accel-server`: the library imports the server only here."""
    import importlib.util

    missing = [name for name in SERVER_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        print(f"error: the HTTP server needs the `server` extra ({', '.join(missing)} missing): "
              "pip install 'diffusion-accel[server]'", file=sys.stderr)
        return 2
    from server.__main__ import main as server_main

    return server_main(argv, prog="accel serve")


def cmd_prune(args) -> int:
    from accel.pruning.importance import calibrate

    prompts = [line.strip() for line in Path(args.prompts).read_text().splitlines() if line.strip()]
    if not prompts or args.steps < 1 or args.seeds < 1:
        raise SystemExit("error: need at least one prompt in --prompts, --steps >= 1 and --seeds >= 1")
    pipe = _load(args)
    pipe.set_progress_bar_config(disable=True)
    size = {k: v for k, v in (("height", args.height), ("width", args.width)) if v is not None}
    try:
        plan = calibrate(pipe, prompts, steps=args.steps, seeds=args.seeds, drop_one=not args.no_drop_one, **size)
    except KeyboardInterrupt:
        print("interrupted: no plan written", file=sys.stderr)
        return 130
    path = plan.save(args.out)
    order = plan.to_dict()["order"]
    print(f"wrote {path} (recommended order by {plan.recommended}: {', '.join(order)})")
    return 0


def cmd_calibrate(args) -> int:
    import re

    from accel.calibration.calibrate import calibrate, default_sweep, state_path

    prompts = None
    if args.prompts:
        prompts = [line.strip() for line in Path(args.prompts).read_text().splitlines() if line.strip()]
        if not prompts:
            raise SystemExit(f"error: --prompts {args.prompts}: no prompt in the file")
    pipe = _load(args)
    sweep = [(line, spec) for line, spec in default_sweep(pipe) if not args.only or re.search(args.only, line)]
    sweep += [("extra", spec) for spec in args.spec]
    if not sweep:
        raise SystemExit("error: --only left no setting to measure")
    options = [("--prompts", args.prompts), ("--steps", args.steps), ("--seed", args.seed or None),
               ("--only", args.only), *(("--spec", spec) for spec in args.spec),
               *(("--lora", item) for item in args.lora)]
    command = f"accel calibrate --model {args.model} " + "".join(f"{k} {v!r} " if k in ("--only", "--spec") else
                                                          f"{k} {v} " for k, v in options if v) + f"--out {args.out}"
    try:
        profile = calibrate(pipe, args.out, model=args.model, prompts=prompts, steps=args.steps, seed=args.seed,
                            sweep=sweep, plain_every=args.plain_every, command=command, lora=_lora(args))
    except KeyboardInterrupt:
        print(f"interrupted: no profile written; progress kept in {state_path(args.out)} (run the same command "
              "again to resume)", file=sys.stderr)
        return 130
    bucket = profile.buckets[0]
    print(f"wrote {args.out}: {len(bucket.settings)} settings at {bucket.describe()}, {len(bucket.front)} on the front")
    for spec in bucket.front:
        s = bucket.setting(spec)
        print(f"  {spec:40s} work {100 * s.work:5.1f}%  speedup {s.speedup:5.2f}x  PSNR median {s.psnr_median:6.2f} "
              f"p10 {s.psnr_p10:6.2f} dB")
    return 0


def cmd_models(args) -> int:
    from accel.loading import builtin_models

    for name, model in builtin_models().items():
        loras = f" [LoRA: {', '.join(model.loras)}]" if model.loras else ""
        print(f"{name:14s} {model.task:14s} {model.description}{loras}")
    return 0


def cmd_methods(args) -> int:
    from accel.methods import METHODS
    from accel.presets import PRESET_DESCRIPTIONS, PRESETS
    from accel.spec import support_matrix

    if args.matrix:
        print(support_matrix(), end="")
        return 0

    for name, method in METHODS.items():
        print(f"{name}: {method.summary}")
        scope = ", ".join(method.families) if method.families else "every family"
        batching = "batch-invariant" if method.batch_invariant else "decides from the batch's data: not batched by the server"
        print(f"    [{scope}; {batching}]")
        for field, info in method.config_cls.model_fields.items():
            if field != "method":
                print(f"    {field} (default {info.default!r}): {info.description or ''}")
    print("\npresets:")
    for name, specs in PRESETS.items():
        print(f"  {name:9s} {PRESET_DESCRIPTIONS.get(name, '')}: {json.dumps(specs)}")
    return 0


COMMANDS = {
    "generate": cmd_generate,
    "bench": cmd_bench,
    "make-model": cmd_make_model,
    "prune": cmd_prune,
    "calibrate": cmd_calibrate,
    "models": cmd_models,
    "methods": cmd_methods,
}


def main(argv: list[str] | None = None) -> int:
    from accel.errors import AccelError

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["serve"]:  # the server parses its own options
        return cmd_serve(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except AccelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
