"""Attention heatmaps drawn over the photo with PIL and numpy (no matplotlib)."""

from __future__ import annotations

import numpy as np
from PIL import Image

# A warm "inferno"-like ramp: (position, RGB) anchors, interpolated linearly.
RAMP = (
    (0.00, (20, 11, 52)),
    (0.35, (120, 28, 109)),
    (0.65, (229, 92, 48)),
    (1.00, (252, 229, 120)),
)


def colormap(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] (any shape) to RGB floats in [0, 1] (shape + (3,))."""
    pos = np.array([p for p, _ in RAMP])
    rgb = np.array([c for _, c in RAMP], dtype=np.float32) / 255.0
    v = np.clip(values, 0.0, 1.0)
    return np.stack([np.interp(v, pos, rgb[:, ch]) for ch in range(3)], axis=-1)


def upsample(weights: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A [gh, gw] attention grid resized smoothly (bicubic) to ``size`` = (width, height),
    scaled to [0, 1] by its maximum."""
    a = np.nan_to_num(np.asarray(weights, dtype=np.float32), nan=0.0)
    a = np.clip(a, 0.0, None)
    peak = float(a.max()) if a.size else 0.0
    if peak <= 0.0:
        return np.zeros((size[1], size[0]), dtype=np.float32)
    grid = Image.fromarray(a / peak, mode="F")
    # bicubic from a coarse grid: go through an intermediate size to avoid ringing blocks
    mid = grid.resize((a.shape[1] * 8, a.shape[0] * 8), Image.Resampling.BILINEAR)
    up = np.asarray(mid.resize(size, Image.Resampling.BICUBIC), dtype=np.float32)
    return np.clip(up, 0.0, 1.0)


def fit(image: Image.Image, max_side: int) -> Image.Image:
    """A new RGB copy of ``image`` no larger than ``max_side`` px (the photo is never copied at
    full size first)."""
    scale = max_side / max(image.size)
    if scale >= 1.0:
        return image.convert("RGB") if image.mode != "RGB" else image.copy()
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    out = image.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)
    return out.convert("RGB") if out.mode != "RGB" else out


def attention_overlay(
    image: Image.Image, weights: np.ndarray, *, max_side: int = 720, strength: float = 0.55
) -> Image.Image:
    """The photo, at most ``max_side`` px, dimmed where the model does not look and tinted
    with a warm colour ramp where it does. Work and memory scale with the output size."""
    photo = fit(image, max_side)
    heat = upsample(weights, photo.size)[..., None]  # [H, W, 1]
    base = np.asarray(photo, dtype=np.float32) / 255.0
    dimmed = base * (0.2 + 0.8 * heat)
    tint = colormap(heat[..., 0])
    alpha = strength * heat
    out = dimmed * (1.0 - alpha) + tint * alpha
    return Image.fromarray(np.clip(out * 255.0 + 0.5, 0, 255).astype(np.uint8))
