"""Evaluation video frames: camera images side by side with a text band on top (written by ``data.video.VideoWriter``)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

MIN_PANEL_HEIGHT = 128
TEXT_BAND = 16


def _upscale(image: np.ndarray, height: int) -> np.ndarray:
    """Nearest-neighbour resize of (H, W, 3) to ``height`` rows, keeping the aspect ratio."""
    h, w = image.shape[:2]
    if h == height:
        return image
    width = max(1, round(w * height / h))
    rows = np.minimum((np.arange(height) * h / height).astype(int), h - 1)
    cols = np.minimum((np.arange(width) * w / width).astype(int), w - 1)
    return image[rows][:, cols]


def _draw_text(band: np.ndarray, lines: Sequence[str]) -> np.ndarray:
    from PIL import Image, ImageDraw

    img = Image.fromarray(band)
    draw = ImageDraw.Draw(img)
    for i, line in enumerate(lines):
        draw.text((3, 2 + i * (TEXT_BAND - 2)), line, fill=(255, 255, 255))
    return np.asarray(img)


def compose_frame(images: Sequence[np.ndarray], text: str | Sequence[str] = "",
                  min_height: int = MIN_PANEL_HEIGHT) -> np.ndarray:
    """Images (H, W, 3) uint8 concatenated left to right at a common height, with ``text`` drawn above.

    Small camera images are upscaled (nearest) to ``min_height``; the result has even sides (h264).
    """
    if not images:
        raise ValueError("compose_frame needs at least one image")
    height = max(min_height, *(im.shape[0] for im in images))
    row = np.concatenate([_upscale(np.asarray(im, dtype=np.uint8), height) for im in images], axis=1)
    lines = [text] if isinstance(text, str) else list(text)
    lines = [line for line in lines if line]
    if lines:
        band = np.zeros((TEXT_BAND * len(lines), row.shape[1], 3), dtype=np.uint8)
        row = np.concatenate([_draw_text(band, lines), row], axis=0)
    h, w = row.shape[:2]
    return np.ascontiguousarray(row[: h - h % 2, : w - w % 2])
