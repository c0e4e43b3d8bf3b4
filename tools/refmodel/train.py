"""Train shapes-flux from scratch: the VAE first, then the FLUX transformer with flow matching.

    python -m tools.refmodel.train --stage vae|transformer|all --out DIR [--steps N] [--resume]
        [--device auto|cpu|cuda] [--batch-size B] [--vae-steps N] [--transformer-steps N] ...

Layout of DIR:

- ``DIR/checkpoints/vae.pt``, ``DIR/checkpoints/transformer.pt``: training state (weights, EMA, optimizer, step),
  written every ``--ckpt-every`` steps; ``--resume`` continues from them;
- ``DIR/vae/``: the trained VAE (diffusers format, ``scaling_factor`` / ``shift_factor`` measured), written at the
  end of the VAE stage and read by the transformer stage;
- ``DIR/checkpoints/pool.pt``: the latent pool (latents of training images from the frozen VAE, normalised as the
  pipeline does, plus the frozen text encoders' embeddings of their captions);
- at the end of the transformer stage: a complete diffusers pipeline, ``pipe.save_pretrained(DIR)``
  (``model_index.json``, ``transformer/`` with the EMA weights, ``vae/``, text encoders, tokenizers, scheduler).

Training is seeded: every step draws its batch, noise and noise levels from a generator seeded with
``(seed, stage, step)``, so a resumed run continues exactly as an uninterrupted one would (on the same device).

VAE: L1 + L2 reconstruction plus a small KL term, on random 64x64 crops (at 16-pixel offsets, the VAE's factor) of
128x128 training images (the VAE is convolutional; crops make a step 4x cheaper); then ``shift_factor`` = mean and
``scaling_factor`` = 1 / std of the latents of full 128x128 images, as FLUX's VAE is normalised.

Transformer: rectified flow exactly as FluxPipeline samples: ``x_t = (1 - s) x0 + s noise``, target ``noise - x0``,
the transformer gets ``timestep = s`` (FluxPipeline passes ``t / 1000``), and ``s`` is drawn as the pipeline's own
schedule shifts it: ``s = time_shift(mu, u)``, ``u ~ U(0, 1]``, with ``mu`` computed from the image sequence length
as FluxPipeline does (``calculate_shift`` with the scheduler's base/max shift and sequence lengths). 10% of captions
are replaced by the empty caption. No guidance embedding (``guidance_embeds=False``). AdamW, linear warm-up, cosine
decay to 10%, an EMA of the weights (exported). With ``--train-text-encoder`` the T5 encoder learns too (CLIP stays
frozen): FLUX gives text tokens no position, so binding each colour and shape to its position in a two-shape caption
must come from T5's outputs, which a random frozen T5 does not provide.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time
import zlib
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from tqdm.auto import tqdm

from accel.models.shapes_flux import MAX_SEQUENCE_LENGTH, build_untrained, build_vae
from tools.refmodel.data import ShapesDataset
from tools.refmodel.evaluate import evaluate

__all__ = ["train_vae", "build_pool", "train_transformer", "main"]

IMAGE_SIZE = 128


# --------------------------------------------------------------------------------------------------------- helpers


def _gen(seed: int, stage: str, step: int, device: str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(zlib.crc32(f"{seed}:{stage}:{step}".encode()))


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _images(ds: ShapesDataset, indices: Sequence[int]) -> torch.Tensor:
    """float (B, 3, H, W) in [-1, 1]."""
    arr = np.stack([ds[int(i)][0] for i in indices])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


def _lr(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))


def _save(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _log(out: Path, record: dict[str, Any]) -> None:
    with open(out / "checkpoints" / "log.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


# ------------------------------------------------------------------------------------------------------------- VAE


def train_vae(args: argparse.Namespace, out: Path, device: torch.device) -> Path:
    """Train the VAE; write ``out/vae`` (diffusers) with measured scaling/shift factors."""
    ckpt_path = out / "checkpoints" / "vae.pt"
    vae = build_vae(args.seed).to(device).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    start = 0
    if args.resume and ckpt_path.is_file():
        state = torch.load(ckpt_path, map_location=device, weights_only=False)
        vae.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start = state["step"]
        print(f"resumed VAE training at step {start}")
    ds = ShapesDataset("train", size=IMAGE_SIZE, seed=args.data_seed, length=10**8)
    steps, bs, crop = args.vae_steps, args.vae_batch_size, args.vae_crop
    bar = tqdm(range(start, steps), initial=start, total=steps, desc="vae", dynamic_ncols=True)
    t0 = time.perf_counter()
    for step in bar:
        g = _gen(args.seed, "vae", step)
        idx = torch.randint(0, 10**8 // 2, (bs,), generator=g).tolist()  # first half: VAE images
        x = _images(ds, idx)
        if crop and crop < IMAGE_SIZE:
            n_off = (IMAGE_SIZE - crop) // 16 + 1
            offs = torch.randint(0, n_off, (bs, 2), generator=g) * 16
            x = torch.stack([x[i, :, oy : oy + crop, ox : ox + crop] for i, (oy, ox) in enumerate(offs.tolist())])
        x = x.to(device)
        for group in opt.param_groups:
            group["lr"] = _lr(step, steps, args.vae_lr, warmup=min(50, steps))
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g).to(device)
        rec = vae.decode(z).sample
        l1 = (rec - x).abs().mean()
        l2 = F.mse_loss(rec, x)
        kl = post.kl().mean() / z[0].numel()  # per latent element
        loss = l1 + l2 + args.vae_kl * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        bar.set_postfix(l1=f"{l1.item():.4f}", l2=f"{l2.item():.5f}", kl=f"{kl.item():.2f}")
        done = step + 1
        if done % 50 == 0 or done == steps:
            _log(out, {"stage": "vae", "step": done, "l1": l1.item(), "l2": l2.item(), "kl": kl.item(),
                       "elapsed_s": round(time.perf_counter() - t0, 1)})
        if done % args.ckpt_every == 0 or done == steps:
            _save(ckpt_path, {"model": vae.state_dict(), "opt": opt.state_dict(), "step": done})
    bar.close()

    # latent statistics of full-size images, from images the transformer's pool does not use
    vae.eval()
    with torch.no_grad():
        n_stat = max(args.vae_stat_images, 2)
        zs = []
        for s in range(0, n_stat, 32):
            idx = list(range(10**8 // 2 - n_stat + s, 10**8 // 2 - n_stat + min(s + 32, n_stat)))
            zs.append(vae.encode(_images(ds, idx).to(device)).latent_dist.mean.float().cpu())
        z = torch.cat(zs)
        mean, std = z.mean().item(), z.std().item()
        rec = vae.decode(zs[0].to(device)).sample.clamp(-1, 1).cpu()
        ref = _images(ds, list(range(10**8 // 2 - n_stat, 10**8 // 2 - n_stat + len(zs[0]))))
        rec_l1 = (rec - ref).abs().mean().item()
    vae.register_to_config(shift_factor=round(mean, 6), scaling_factor=round(1.0 / std, 6))
    vae = vae.cpu()
    vae.save_pretrained(out / "vae")
    info = {"stage": "vae", "done": True, "shift_factor": mean, "scaling_factor": 1.0 / std, "heldout_l1": rec_l1,
            "elapsed_s": round(time.perf_counter() - t0, 1)}
    _log(out, info)
    print(f"VAE done: shift_factor={mean:.4f} scaling_factor={1.0 / std:.4f} reconstruction L1={rec_l1:.4f}")
    return out / "vae"


# ---------------------------------------------------------------------------------------------------- latent pool


@torch.no_grad()
def _encode_latents(pipe: Any, args: argparse.Namespace, device: torch.device,
                    split: str = "train") -> tuple[list[torch.Tensor], list[str]]:
    """Latents of the pool's training images (normalised as the pipeline does) and their captions; ``split`` is a
    `ShapesDataset` split (``star``: the star adapter's data, `tools.refmodel.train_lora`)."""
    ds = ShapesDataset(split, size=IMAGE_SIZE, seed=args.data_seed, length=10**8)
    offset = 10**8 // 2  # second half of the index range: images the VAE never saw
    vae = pipe.vae.to(device).eval()
    sf, shf = vae.config.scaling_factor, vae.config.shift_factor
    latents, captions = [], []
    for s in tqdm(range(0, args.pool_size, 64), desc="latent pool", dynamic_ncols=True):
        idx = list(range(offset + s, offset + min(s + 64, args.pool_size)))
        x = _images(ds, idx).to(device)
        latents.append(((vae.encode(x).latent_dist.mean - shf) * sf).float().cpu())
        captions += [ds.scene(i).caption for i in idx]
    return latents, captions


@torch.no_grad()
def build_pool(pipe: Any, args: argparse.Namespace, out: Path, device: torch.device) -> dict[str, torch.Tensor]:
    """Latents (normalised as the pipeline normalises them) of ``--pool-size`` training images, and the frozen
    text encoders' outputs for their captions (index 0: the empty caption)."""
    path = out / "checkpoints" / "pool.pt"
    text_key = [MAX_SEQUENCE_LENGTH, len(pipe.tokenizer_2), len(pipe.tokenizer)]
    pool = torch.load(path, weights_only=False) if path.is_file() else None
    if pool is not None and pool["latents"].shape[0] == args.pool_size and pool.get("seed") == args.data_seed:
        if pool.get("text_key") == text_key and "t5_ids" in pool:
            return pool
        # same images, other text encoders: keep the latents, encode the captions again
        latents = [pool["latents"]]
        captions = [pool["captions"][i] for i in pool["caption_index"].tolist()]
    else:
        latents, captions = _encode_latents(pipe, args, device)
    unique = [""] + sorted(set(captions))
    index = {c: i for i, c in enumerate(unique)}
    embeds, pooled = [], []
    for s in range(0, len(unique), 256):
        pe, pp, _ = pipe.encode_prompt(
            unique[s : s + 256], prompt_2=None, device=torch.device("cpu"), max_sequence_length=MAX_SEQUENCE_LENGTH
        )
        embeds.append(pe.float())
        pooled.append(pp.float())
    pool = {
        "latents": torch.cat(latents),
        "caption_index": torch.tensor([index[c] for c in captions]),
        "captions": unique,
        "prompt_embeds": torch.cat(embeds),
        # T5 inputs exactly as FluxPipeline tokenizes them (for --train-text-encoder)
        "t5_ids": pipe.tokenizer_2(unique, padding="max_length", max_length=MAX_SEQUENCE_LENGTH, truncation=True,
                                   return_tensors="pt").input_ids,
        "pooled": torch.cat(pooled),
        "seed": args.data_seed,
        "text_key": text_key,
    }
    _save(path, pool)
    print(f"latent pool: {len(captions)} images, {len(unique)} distinct captions; latent std "
          f"{pool['latents'].std():.3f} mean {pool['latents'].mean():.3f}")
    return pool


# ---------------------------------------------------------------------------------------------------- transformer


def _sigma_sampler(pipe: Any, image_seq_len: int):
    """u ~ U(0, 1] -> the noise level FluxPipeline's shifted schedule puts at u."""
    cfg = pipe.scheduler.config
    mu = calculate_shift(
        image_seq_len, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
        cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15),
    )

    def sample(u: torch.Tensor) -> torch.Tensor:
        return math.exp(mu) / (math.exp(mu) + (1.0 / u - 1.0))

    return sample, mu


def train_transformer(args: argparse.Namespace, out: Path, device: torch.device) -> Path:
    vae_dir = Path(args.vae) if args.vae else out / "vae"
    if not (vae_dir / "config.json").is_file():
        raise FileNotFoundError(f"no trained VAE in {vae_dir}: run --stage vae first (or pass --vae DIR)")
    vae = AutoencoderKL.from_pretrained(vae_dir, local_files_only=True)
    pipe = build_untrained(args.seed, vae=vae.eval())
    pool = build_pool(pipe, args, out, device)

    transformer = pipe.transformer.to(device).train()
    # With --train-text-encoder the T5 encoder (random at first, like the frozen one) learns with the transformer;
    # a checkpoint written without it (frozen T5) resumes with T5 at its initial weights: a warm start.
    text_encoder = pipe.text_encoder_2.to(device)
    if args.train_text_encoder:
        text_encoder.requires_grad_(True).train()
    n_tr = len(list(transformer.parameters()))  # ema[:n_tr]: transformer, ema[n_tr:]: T5 (when trained)
    trained = list(transformer.parameters()) + (list(text_encoder.parameters()) if args.train_text_encoder else [])
    ema = [p.detach().clone() for p in trained]
    opt = torch.optim.AdamW(transformer.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.99))
    opt_text = torch.optim.AdamW(text_encoder.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.99))
    ckpt_path = out / "checkpoints" / "transformer.pt"
    start = 0
    if args.resume and ckpt_path.is_file():
        state = torch.load(ckpt_path, map_location=device, weights_only=False)
        transformer.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        ema[:n_tr] = [t.to(device) for t in state["ema"]]
        warm_start = args.train_text_encoder and "text_encoder" not in state
        if args.train_text_encoder and not warm_start:
            text_encoder.load_state_dict(state["text_encoder"])
            opt_text.load_state_dict(state["opt_text"])
            ema[n_tr:] = [t.to(device) for t in state["ema_text"]]
        start = state["step"]
        print(f"resumed transformer training at step {start}" + (" (T5 from its initial weights)" if warm_start else ""))

    def checkpoint(done: int) -> None:
        state = {"model": transformer.state_dict(), "opt": opt.state_dict(), "ema": ema[:n_tr], "step": done}
        if args.train_text_encoder:
            state.update(text_encoder=text_encoder.state_dict(), opt_text=opt_text.state_dict(), ema_text=ema[n_tr:])
        _save(ckpt_path, state)

    latents = pool["latents"].to(device)
    cap_index = pool["caption_index"].to(device)
    prompt_embeds, pooled = pool["prompt_embeds"].to(device), pool["pooled"].to(device)
    t5_ids = pool["t5_ids"].to(device)
    n_pool, (c, h, w) = latents.shape[0], latents.shape[1:]
    seq_len = (h // 2) * (w // 2)
    sigma_of, mu = _sigma_sampler(pipe, seq_len)
    img_ids = pipe._prepare_latent_image_ids(1, h // 2, w // 2, device, torch.float32)
    txt_ids = torch.zeros(prompt_embeds.shape[1], 3, device=device)
    steps, bs = args.transformer_steps, args.batch_size
    print(f"transformer: {sum(p.numel() for p in transformer.parameters())/1e6:.2f}M params, {seq_len} image tokens, "
          f"{prompt_embeds.shape[1]} text tokens, mu={mu:.3f}, pool {n_pool}, batch {bs}, {steps} steps")

    bar = tqdm(range(start, steps), initial=start, total=steps, desc="transformer", dynamic_ncols=True)
    t0 = time.perf_counter()
    avg = None
    for step in bar:
        g = _gen(args.seed, "transformer", step)
        idx = torch.randint(0, n_pool, (bs,), generator=g).to(device)
        x0 = latents[idx]
        noise = torch.randn(x0.shape, generator=g).to(device)
        u = 1.0 - torch.rand(bs, generator=g)  # (0, 1]
        sigma = sigma_of(u).to(device)
        drop = (torch.rand(bs, generator=g) < args.empty_caption_prob).to(device)
        ci = torch.where(drop, torch.zeros_like(cap_index[idx]), cap_index[idx])
        s = sigma.view(-1, 1, 1, 1)
        xt = (1.0 - s) * x0 + s * noise
        target = noise - x0
        packed = pipe._pack_latents(xt, bs, c, h, w)
        pred = transformer(
            hidden_states=packed,
            timestep=sigma,
            guidance=None,
            pooled_projections=pooled[ci],
            encoder_hidden_states=text_encoder(t5_ids[ci])[0] if args.train_text_encoder else prompt_embeds[ci],
            txt_ids=txt_ids,
            img_ids=img_ids,
            return_dict=False,
        )[0]
        loss = F.mse_loss(pred, pipe._pack_latents(target, bs, c, h, w))
        optimizers = (opt, opt_text) if args.train_text_encoder else (opt,)
        for o in optimizers:
            for group in o.param_groups:
                group["lr"] = _lr(step, steps, args.lr, warmup=min(args.warmup, steps))
            o.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        for o in optimizers:
            o.step()
        decay = min(args.ema, (1.0 + step) / (10.0 + step))
        with torch.no_grad():
            for e, p in zip(ema, trained):
                e.lerp_(p.detach(), 1.0 - decay)
        avg = loss.item() if avg is None else 0.98 * avg + 0.02 * loss.item()
        bar.set_postfix(loss=f"{avg:.4f}")
        done = step + 1
        if done % 50 == 0 or done == steps:
            _log(out, {"stage": "transformer", "step": done, "loss": avg, "elapsed_s": round(time.perf_counter() - t0, 1)})
        if done % args.ckpt_every == 0 or done == steps:
            checkpoint(done)
        if args.eval_every and (done % args.eval_every == 0 or done == steps):
            _eval(pipe, ema, args, out, done)
        if args.stop_at and done >= args.stop_at and done < steps:
            checkpoint(done)
            bar.close()
            print(f"stopped at step {done} of {steps} (--stop-at); continue with --resume")
            return out
    bar.close()

    _export(pipe, ema, out)
    _log(out, {"stage": "transformer", "done": True, "elapsed_s": round(time.perf_counter() - t0, 1)})
    return out


def _ema_pipe(pipe: Any, ema: list[torch.Tensor]) -> Any:
    """A CPU copy of ``pipe`` in eval mode whose transformer (and T5 encoder, when it was trained) hold the EMA
    weights; ``pipe`` itself is left as it is."""
    ema_pipe = copy.copy(pipe)  # shallow: shares the frozen components
    modules = [("transformer", pipe.transformer)]
    if len(ema) > len(list(pipe.transformer.parameters())):
        modules.append(("text_encoder_2", pipe.text_encoder_2))
    rest = iter(ema)
    for name, module in modules:
        copy_ = copy.deepcopy(module).cpu().eval()
        with torch.no_grad():
            for p in copy_.parameters():
                p.copy_(next(rest).cpu())
        setattr(ema_pipe, name, copy_)
    for comp in (ema_pipe.vae, ema_pipe.text_encoder, ema_pipe.text_encoder_2):
        comp.cpu().eval()
    return ema_pipe


def _eval(pipe: Any, ema: list[torch.Tensor], args: argparse.Namespace, out: Path, step: int) -> None:
    results = evaluate(_ema_pipe(pipe, ema), args.eval_n, steps=28, n_double=args.eval_n, n_train=0, verbose=False)
    msg = {k: round(v["all_correct"], 3) for k, v in results.items()}
    tqdm.write(f"step {step}: adherence (EMA, 28 steps, n={args.eval_n}) {msg}")
    _log(out, {"stage": "transformer", "step": step, "eval": results})


def _export(pipe: Any, ema: list[torch.Tensor], out: Path) -> None:
    _ema_pipe(pipe, ema).save_pretrained(out)
    print(f"pipeline (EMA weights) saved to {out}")


# ------------------------------------------------------------------------------------------------------------ CLI


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=("vae", "transformer", "all"), default="all")
    p.add_argument("--out", required=True, help="output directory (checkpoints and the final diffusers pipeline)")
    p.add_argument("--steps", type=int, default=None,
                   help="steps of the chosen stage (with --stage all: of the transformer stage)")
    p.add_argument("--vae-steps", type=int, default=800)
    p.add_argument("--transformer-steps", type=int, default=2000)
    p.add_argument("--resume", action="store_true", help="continue from DIR/checkpoints")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu or cuda")
    p.add_argument("--batch-size", type=int, default=64, help="transformer batch size")
    p.add_argument("--vae-batch-size", type=int, default=32)
    p.add_argument("--vae-crop", type=int, default=64, help="VAE training crop size (0: full 128x128 images)")
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--vae-kl", type=float, default=1e-4, help="weight of the KL term (per latent element)")
    p.add_argument("--vae-stat-images", type=int, default=512, help="images for the latent statistics")
    p.add_argument("--vae", default=None, help="trained VAE directory for --stage transformer (default DIR/vae)")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--ema", type=float, default=0.998)
    p.add_argument("--train-text-encoder", action="store_true",
                   help="train the T5 encoder with the transformer (it starts from its random initial weights, also "
                        "when resuming a checkpoint written without it)")
    p.add_argument("--empty-caption-prob", type=float, default=0.1)
    p.add_argument("--pool-size", type=int, default=16384)
    p.add_argument("--ckpt-every", type=int, default=200)
    p.add_argument("--stop-at", type=int, default=0,
                   help="checkpoint and stop the transformer stage at this step (the schedule still spans --steps)")
    p.add_argument("--eval-every", type=int, default=0, help="adherence of the EMA weights every N steps (0: off)")
    p.add_argument("--eval-n", type=int, default=18)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args(argv)
    if args.steps is not None:
        if args.stage == "vae":
            args.vae_steps = args.steps
        else:
            args.transformer_steps = args.steps
    return args


def main(argv: Sequence[str] | None = None) -> Path:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = _device(args.device)
    out = Path(args.out)
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    print(f"device {device}, torch threads {torch.get_num_threads()}")
    if args.stage in ("vae", "all"):
        if args.resume and (out / "vae" / "config.json").is_file() and args.stage == "all":
            print("VAE already trained; skipping to the transformer")
        else:
            train_vae(args, out, device)
    if args.stage in ("transformer", "all"):
        train_transformer(args, out, device)
    return out


if __name__ == "__main__":
    main()
