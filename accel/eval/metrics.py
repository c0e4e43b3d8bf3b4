"""Fidelity of an accelerated output against the un-accelerated output of the same request and seed
(the protocol of the caching papers): PSNR and SSIM on pixels (scikit-image), mean absolute latent difference.
Videos are compared frame by frame and averaged."""

from __future__ import annotations

import math

import numpy as np
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity


def _frames(x: np.ndarray) -> np.ndarray:
    """(..., H, W, 3) float in [0, 1] -> (N, H, W, 3)."""
    x = np.asarray(x, dtype=np.float64)
    return x.reshape(-1, *x.shape[-3:])


def psnr(reference: np.ndarray, output: np.ndarray) -> float:
    """Mean PSNR over frames, in dB; identical frames count as 100 dB (instead of infinity) so means stay finite."""
    values = []
    for ref, out in zip(_frames(reference), _frames(output), strict=True):
        if np.array_equal(ref, out):
            values.append(100.0)
        else:
            values.append(min(100.0, float(peak_signal_noise_ratio(ref, out, data_range=1.0))))
    return float(np.mean(values))


def ssim(reference: np.ndarray, output: np.ndarray) -> float:
    """Mean SSIM over frames (Gaussian-weighted, as in Wang et al. 2004)."""
    values = []
    for ref, out in zip(_frames(reference), _frames(output), strict=True):
        size = min(ref.shape[0], ref.shape[1])
        win = min(7, size if size % 2 else size - 1)
        values.append(
            float(
                structural_similarity(
                    ref, out, data_range=1.0, channel_axis=-1, gaussian_weights=True, sigma=1.5,
                    use_sample_covariance=False, win_size=None if win >= 7 else win,
                )
            )
        )
    return float(np.mean(values))


def latent_mad(reference: torch.Tensor | None, output: torch.Tensor | None) -> float:
    """Mean absolute difference of the final latents; NaN when either is missing."""
    if reference is None or output is None:
        return math.nan
    return float((reference.float() - output.float()).abs().mean())


def fidelity(reference_frames: np.ndarray, output_frames: np.ndarray, reference_latents=None, output_latents=None) -> dict:
    return {
        "psnr": psnr(reference_frames, output_frames),
        "ssim": ssim(reference_frames, output_frames),
        "latent_mad": latent_mad(reference_latents, output_latents),
    }
