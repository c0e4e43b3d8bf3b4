"""Train a LoRA adapter for shapes-flux that teaches a word the base model cannot draw: ``star``.

    python -m tools.refmodel.train_lora --out runs/star [--steps 2000] [--rank 16] [--export DIR] [--threads 1]

The defaults are the shipped adapter's recipe: 2,000 steps at batch 16 (12 star + 4 base), lr 3e-3 (20 warm-up
steps, cosine to a tenth), pools of 1,024 images each; about 8 minutes on one CPU thread.

The base model is frozen (transformer, VAE, both text encoders); PEFT's ``LoraConfig`` + ``transformer.add_adapter``
put rank-``--rank`` adapters on the transformer's attention and feed-forward linears, and only those learn. The data
and the loss are ``tools.refmodel.train``'s: latents of rendered scenes from the frozen VAE (normalised as the
pipeline does), the frozen text encoders' outputs of their captions, rectified flow with noise levels drawn from the
pipeline's own shifted schedule, 10% empty captions. Every batch mixes two pools (``--star-fraction`` of it stars):

- ``ShapesDataset("star")``: one star of ``STAR_TRAIN_TRIPLES`` ("a red star on the left"); the 5
  ``STAR_HELDOUT_TRIPLES`` never appear, so the evaluation tests the new word in new combinations. Its stars are
  big (``tools.refmodel.data.STAR_RADIUS_RANGE``, radius 0.19-0.22 of the side): the frozen VAE (8x8 latents)
  turns smaller stars into rounded pentagons, and an adapter trained on those drew blobs the scorer rightly called
  circles or triangles (0.27 on held-out star captions after 2,700 steps, no better on its training captions);
- ``ShapesDataset("train")``: the base training data (half two-shape), so base captions stay right with the
  adapter active.

Why a star and not a new colour (``purple``): the frozen VAE cannot draw purple. It was trained on red, green, blue
and yellow only; a purple disc encodes and decodes as a green one, and optimising a latent to decode to purple gives
blue. A transformer LoRA only moves latents, so no adapter could paint purple; big stars encode and decode cleanly.

Only single-shape captions carry the new word: the T5 tokenizer knows the grammar's words as whole tokens and spells
``star`` in 5 character tokens, so a two-shape caption with it (18 tokens) is longer than the model's 16.

At the end the adapter is evaluated (held-out star captions with and without it, base held-out captions with it) and
saved as a diffusers LoRA file, ``DIR/pytorch_lora_weights.safetensors`` (``FluxPipeline.save_lora_weights``), which
``FluxPipeline.load_lora_weights(DIR, adapter_name="star")`` loads. ``--export`` copies it where the built-in
shapes-flux finds it (``accel/models/weights/shapes-flux-loras/star``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from diffusers import FluxPipeline
from tqdm.auto import tqdm

from accel.eval.shapes_scorer import score_many
from accel.models.shapes_flux import MAX_SEQUENCE_LENGTH, load_shapes_flux
from tools.refmodel.data import STAR_RADIUS_RANGE, heldout_captions, star_captions
from tools.refmodel.evaluate import generate_images
from tools.refmodel.train import _encode_latents, _gen, _log, _lr, _save, _sigma_sampler

__all__ = ["TARGET_MODULES", "add_lora", "build_pools", "evaluate_adapter", "train_lora", "main"]

LORA_FILE = "pytorch_lora_weights.safetensors"
# FLUX's attention and feed-forward linears: dual-stream blocks (image and text streams), single-stream blocks; and
# the blocks' modulation linears (AdaLN), which read the pooled CLIP text vector: the new word changes it
TARGET_MODULES = [
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
    "proj_mlp", "proj_out",
    "norm1.linear", "norm1_context.linear", "norm.linear",
]


def add_lora(transformer: torch.nn.Module, rank: int, alpha: float | None = None, name: str = "star") -> list:
    """Freeze ``transformer`` and add a LoRA adapter (PEFT) on ``TARGET_MODULES``; returns its trainable parameters."""
    from peft import LoraConfig

    transformer.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian", target_modules=TARGET_MODULES)
    transformer.add_adapter(config, adapter_name=name)
    transformer.set_adapter(name)
    params = [p for n, p in transformer.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    return params


@torch.no_grad()
def _text(pipe: Any, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    embeds, pooled = [], []
    for s in range(0, len(captions), 256):
        pe, pp, _ = pipe.encode_prompt(captions[s : s + 256], prompt_2=None, device=torch.device("cpu"),
                                       max_sequence_length=MAX_SEQUENCE_LENGTH)
        embeds.append(pe.float())
        pooled.append(pp.float())
    return torch.cat(embeds), torch.cat(pooled)


def build_pools(pipe: Any, args: argparse.Namespace, out: Path, device: torch.device) -> dict[str, dict]:
    """Two pools (``star`` and ``base``): latents of rendered scenes and the frozen text encoders' outputs of their
    captions (index 0 of each: the empty caption). Cached in ``out/checkpoints/lora_pool.pt``."""
    path = out / "checkpoints" / "lora_pool.pt"
    key = [args.star_pool, args.base_pool, args.data_seed, list(STAR_RADIUS_RANGE)]
    if path.is_file():
        pools = torch.load(path, weights_only=False)
        if pools.get("key") == key:
            return pools
    pools: dict[str, Any] = {"key": key}
    for name, split, size in (("star", "star", args.star_pool), ("base", "train", args.base_pool)):
        latents, captions = _encode_latents(pipe, argparse.Namespace(pool_size=size, data_seed=args.data_seed),
                                            device, split=split)
        unique = [""] + sorted(set(captions))
        index = {c: i for i, c in enumerate(unique)}
        embeds, pooled = _text(pipe, unique)
        pools[name] = {"latents": torch.cat(latents), "caption_index": torch.tensor([index[c] for c in captions]),
                       "captions": unique, "prompt_embeds": embeds, "pooled": pooled}
        print(f"{name} pool: {len(captions)} images, {len(unique) - 1} distinct captions")
    _save(path, pools)
    return pools


@torch.no_grad()
def evaluate_adapter(pipe: Any, n_star: int = 15, n_base: int = 18, steps: int = 28, seed: int = 0,
                     adapter: str = "star") -> dict[str, float]:
    """all-correct fractions: held-out star captions with the adapter and without it, base held-out single captions
    with it (image i seeded ``seed + i``)."""
    stars, base = star_captions("heldout", n_star, seed=seed), heldout_captions("single", n_base, seed=seed)
    results = {}
    pipe.transformer.eval()
    for name, captions, active in (("star_with", stars, True), ("star_without", stars, False),
                                   ("base_with", base, True)):
        if active:
            pipe.transformer.enable_adapters()
            pipe.transformer.set_adapter(adapter)
        else:
            pipe.transformer.disable_adapters()
        images = generate_images(pipe, captions, steps=steps, seed=seed)
        results[name] = round(score_many(images, captions)["all_correct"], 3)
    pipe.transformer.enable_adapters()
    return results


def train_lora(args: argparse.Namespace) -> Path:
    out = Path(args.out)
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    pipe = load_shapes_flux(weights_dir=args.model)
    for module in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.transformer):
        module.requires_grad_(False)
    pools = build_pools(pipe, args, out, device)
    transformer = pipe.transformer.to(device)
    torch.manual_seed(args.seed)  # the adapter's random init (PEFT draws it from the global generator)
    params = add_lora(transformer, args.rank, args.alpha)
    if args.init:  # warm start: continue from a LoRA file written by an earlier run (same rank and targets)
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        state = {k.removeprefix("transformer."): v for k, v in load_file(args.init).items()}
        result = set_peft_model_state_dict(transformer, state, adapter_name="star")
        if getattr(result, "unexpected_keys", None):
            raise SystemExit(f"--init {args.init}: keys the adapter does not have: {result.unexpected_keys[:3]}")
        print(f"warm start from {args.init}")
    transformer.train()
    n_params = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, betas=(0.9, 0.99))

    tensors = {name: {k: v.to(device) if torch.is_tensor(v) else v for k, v in pools[name].items()}
               for name in ("star", "base")}
    c, h, w = tensors["star"]["latents"].shape[1:]
    seq_len = (h // 2) * (w // 2)
    sigma_of, mu = _sigma_sampler(pipe, seq_len)
    img_ids = pipe._prepare_latent_image_ids(1, h // 2, w // 2, device, torch.float32)
    txt_ids = torch.zeros(tensors["star"]["prompt_embeds"].shape[1], 3, device=device)
    steps, bs = args.steps, args.batch_size
    n_star = round(bs * args.star_fraction)
    print(f"LoRA rank {args.rank}: {n_params / 1e3:.0f}k trainable parameters; {steps} steps, batch {bs} "
          f"({n_star} star + {bs - n_star} base), lr {args.lr}")
    t0, avg = time.perf_counter(), None
    bar = tqdm(range(steps), desc="lora", dynamic_ncols=True)
    for step in bar:
        g = _gen(args.seed, "lora", step)
        parts = []
        for name, k in (("star", n_star), ("base", bs - n_star)):
            pool = tensors[name]
            idx = torch.randint(0, pool["latents"].shape[0], (k,), generator=g).to(device)
            drop = (torch.rand(k, generator=g) < args.empty_caption_prob).to(device)
            ci = torch.where(drop, torch.zeros_like(pool["caption_index"][idx]), pool["caption_index"][idx])
            parts.append((pool["latents"][idx], pool["prompt_embeds"][ci], pool["pooled"][ci]))
        x0, embeds, pooled = (torch.cat(t) for t in zip(*parts))
        noise = torch.randn(x0.shape, generator=g).to(device)
        sigma = sigma_of(1.0 - torch.rand(bs, generator=g)).to(device)
        s = sigma.view(-1, 1, 1, 1)
        xt = (1.0 - s) * x0 + s * noise
        pred = transformer(hidden_states=pipe._pack_latents(xt, bs, c, h, w), timestep=sigma, guidance=None,
                           pooled_projections=pooled, encoder_hidden_states=embeds, txt_ids=txt_ids,
                           img_ids=img_ids, return_dict=False)[0]
        loss = F.mse_loss(pred, pipe._pack_latents(noise - x0, bs, c, h, w))
        for group in opt.param_groups:
            group["lr"] = _lr(step, steps, args.lr, warmup=min(args.warmup, steps))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        avg = loss.item() if avg is None else 0.98 * avg + 0.02 * loss.item()
        bar.set_postfix(loss=f"{avg:.4f}")
        if (step + 1) % 50 == 0 or step + 1 == steps:
            _log(out, {"stage": "lora", "step": step + 1, "loss": avg, "elapsed_s": round(time.perf_counter() - t0, 1)})
    bar.close()
    train_s = round(time.perf_counter() - t0, 1)

    transformer.eval()
    from peft.utils import get_peft_model_state_dict

    layers = get_peft_model_state_dict(transformer, adapter_name="star")
    FluxPipeline.save_lora_weights(out, transformer_lora_layers=layers, weight_name=LORA_FILE)
    results = evaluate_adapter(pipe, n_star=args.eval_n, n_base=args.eval_n)
    size = (out / LORA_FILE).stat().st_size
    info = {"stage": "lora", "done": True, "train_s": train_s, "params": n_params, "file_bytes": size,
            "eval": results, "args": {k: v for k, v in vars(args).items() if k != "export"}}
    _log(out, info)
    (out / "lora_info.json").write_text(json.dumps(info, indent=2))
    print(f"trained in {train_s} s; {out / LORA_FILE}: {size / 1e6:.2f} MB; adherence {results}")
    if args.export:
        export = Path(args.export)
        export.mkdir(parents=True, exist_ok=True)
        shutil.copy(out / LORA_FILE, export / LORA_FILE)
        print(f"exported to {export / LORA_FILE}")
    return out / LORA_FILE


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output directory (pools, log, the LoRA file)")
    p.add_argument("--model", default=None, help="base diffusers directory (default: the committed shapes-flux)")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--star-fraction", type=float, default=0.75, help="share of each batch from the star pool")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: the rank, i.e. scale 1)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--empty-caption-prob", type=float, default=0.1)
    p.add_argument("--star-pool", type=int, default=1024, help="star images in the pool")
    p.add_argument("--base-pool", type=int, default=1024, help="base training images in the pool")
    p.add_argument("--eval-n", type=int, default=15, help="captions per evaluation set")
    p.add_argument("--export", default=None, help="copy the LoRA file into this directory")
    p.add_argument("--init", default=None, help="start from this LoRA file (an earlier run's) instead of zeros")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> Path:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    return train_lora(args)


if __name__ == "__main__":
    main()
