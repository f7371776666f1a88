"""MP4 video encoding and decoding with PyAV (h264, yuv420p), frames as uint8 RGB arrays."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import PolicyServeError


class VideoError(PolicyServeError, ValueError):
    """A video cannot be encoded or decoded (missing file, bad frame array, unsupported size)."""


class VideoWriter:
    """Streams uint8 (H, W, 3) RGB frames of one size to an MP4 file; a context manager, or call :meth:`close`.

    The file is opened on the first frame, so no file is written when no frame is.
    """

    def __init__(self, path: str | Path, fps: float = 20, *, codec: str = "h264", pix_fmt: str = "yuv420p",
                 crf: int = 23) -> None:
        rate = int(round(fps))
        if rate <= 0 or abs(rate - fps) > 1e-6:
            raise VideoError(f"video fps must be a positive integer, got {fps}")
        self.path = Path(path)
        self.fps, self.codec, self.pix_fmt, self.crf = rate, codec, pix_fmt, crf
        self._container: Any = None
        self._stream: Any = None
        self.frames = 0

    def write(self, frame: np.ndarray) -> None:
        """Append one frame (its size must match the first frame's)."""
        import av

        frame = np.asarray(frame)
        if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[-1] != 3:
            raise VideoError(f"video frames must be uint8 (H, W, 3), got dtype={frame.dtype} shape={frame.shape}")
        if self._container is None:
            height, width = frame.shape[:2]
            if self.pix_fmt == "yuv420p" and (height % 2 or width % 2):
                raise VideoError(f"yuv420p needs even image sizes, got {height}x{width} for {self.path}")
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._container = av.open(str(self.path), mode="w")
            self._stream = self._container.add_stream(self.codec, rate=self.fps)
            self._stream.width, self._stream.height, self._stream.pix_fmt = width, height, self.pix_fmt
            self._stream.options = {"crf": str(self.crf)}
        if frame.shape[:2] != (self._stream.height, self._stream.width):
            raise VideoError(f"frame size {frame.shape[:2]} differs from the video's "
                             f"{(self._stream.height, self._stream.width)} ({self.path})")
        for packet in self._stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
            self._container.mux(packet)
        self.frames += 1

    def close(self) -> None:
        """Flush and close the file."""
        if self._container is not None:
            for packet in self._stream.encode(None):
                self._container.mux(packet)
            self._container.close()
            self._container = None

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def encode_video(
    frames: np.ndarray, path: str | Path, fps: float, *, codec: str = "h264", pix_fmt: str = "yuv420p", crf: int = 23
) -> None:
    """Write ``frames`` (uint8, (N, H, W, 3) RGB) to an MP4 file at ``path``."""
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise VideoError(f"video frames must be uint8 (N, H, W, 3), got dtype={frames.dtype} shape={frames.shape}")
    if frames.shape[0] == 0:
        raise VideoError(f"cannot encode an empty video to {path}")
    with VideoWriter(path, fps, codec=codec, pix_fmt=pix_fmt, crf=crf) as writer:
        for frame in frames:
            writer.write(frame)


def decode_video(
    path: str | Path, *, start_time: float | None = None, end_time: float | None = None
) -> np.ndarray:
    """All frames of the first video stream of ``path`` as uint8 (N, H, W, 3) RGB.

    With ``start_time``/``end_time`` (seconds) only frames with ``start_time <= t < end_time`` are returned.
    """
    import av

    path = Path(path)
    if not path.is_file():
        raise VideoError(f"video file not found: {path}")
    frames: list[np.ndarray] = []
    eps = 1e-4
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        if start_time:
            container.seek(int(max(start_time - 1.0, 0) / stream.time_base), stream=stream, backward=True)
        for frame in container.decode(stream):
            t = float(frame.time) if frame.time is not None else 0.0
            if start_time is not None and t < start_time - eps:
                continue
            if end_time is not None and t >= end_time - eps:
                break
            frames.append(frame.to_ndarray(format="rgb24"))
    if not frames:
        raise VideoError(f"no frames decoded from {path} (start_time={start_time}, end_time={end_time})")
    return np.stack(frames)
