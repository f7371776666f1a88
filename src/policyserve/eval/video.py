"""Evaluation videos: camera images side by side with a text band on top, streamed to an h264 MP4 (PyAV)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

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


class VideoWriter:
    """Streams frames of one size to an MP4 file; use as a context manager or call :meth:`close`."""

    def __init__(self, path: str | Path, fps: int = 20, crf: int = 23) -> None:
        self.path = Path(path)
        self.fps, self.crf = int(fps), crf
        self._container: Any = None
        self._stream: Any = None
        self.frames = 0

    def write(self, frame: np.ndarray) -> None:
        """Append one uint8 (H, W, 3) RGB frame (sizes must match the first frame)."""
        import av

        if self._container is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._container = av.open(str(self.path), mode="w")
            self._stream = self._container.add_stream("h264", rate=self.fps)
            self._stream.height, self._stream.width = frame.shape[:2]
            self._stream.pix_fmt = "yuv420p"
            self._stream.options = {"crf": str(self.crf)}
        if frame.shape[:2] != (self._stream.height, self._stream.width):
            raise ValueError(f"frame size {frame.shape[:2]} differs from the video's "
                             f"{(self._stream.height, self._stream.width)} ({self.path})")
        for packet in self._stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
            self._container.mux(packet)
        self.frames += 1

    def close(self) -> None:
        """Flush and close the file (no file is written when no frame was)."""
        if self._container is not None:
            for packet in self._stream.encode(None):
                self._container.mux(packet)
            self._container.close()
            self._container = None

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
