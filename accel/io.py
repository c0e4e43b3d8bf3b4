"""Writing outputs: PNG/JPEG/WebP images and MP4 videos (imageio with the ffmpeg binary its wheel ships)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


def to_uint8(frames: np.ndarray) -> np.ndarray:
    return (np.clip(np.asarray(frames), 0.0, 1.0) * 255).round().astype(np.uint8)


def image_bytes(image: np.ndarray, fmt: str = "png", quality: int | None = None) -> bytes:
    """(H, W, 3) float in [0, 1] -> encoded image bytes."""
    buffer = io.BytesIO()
    options = {"quality": quality} if quality is not None and fmt in ("jpeg", "webp") else {}
    Image.fromarray(to_uint8(image)).save(buffer, format=fmt.upper(), **options)
    return buffer.getvalue()


def video_bytes(frames: np.ndarray, fps: int = 8) -> bytes:
    """(F, H, W, 3) float in [0, 1] -> MP4 (H.264, yuv420p) bytes."""
    import imageio.v3 as iio

    frames = to_uint8(frames)
    # H.264 with yuv420p needs even sizes; pad by edge replication when a tiny model makes odd ones
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    return iio.imwrite(
        "<bytes>", frames, extension=".mp4", fps=fps, codec="libx264", plugin="pyav"
    ) if _has_pyav() else _ffmpeg_bytes(frames, fps)


def _has_pyav() -> bool:
    try:
        import av  # noqa: F401

        return True
    except ImportError:
        return False


def _ffmpeg_bytes(frames: np.ndarray, fps: int) -> bytes:
    import tempfile

    import imageio.v2 as imageio

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "video.mp4"
        with imageio.get_writer(path, fps=fps, codec="libx264", macro_block_size=1, pixelformat="yuv420p") as writer:
            for frame in frames:
                writer.append_data(frame)
        return path.read_bytes()


def save_output(frames: np.ndarray, path: str | Path, *, video: bool, fps: int = 8) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if video:
        path.write_bytes(video_bytes(frames, fps=fps))
    else:
        fmt = {".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}.get(path.suffix.lower(), "png")
        path.write_bytes(image_bytes(frames, fmt))
    return path
