"""MP4 video encoding and decoding with PyAV (h264, yuv420p), frames as uint8 RGB arrays."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import PolicyServeError


class VideoError(PolicyServeError, ValueError):
    """A video cannot be encoded or decoded (missing file, bad frame array, unsupported size)."""


def encode_video(
    frames: np.ndarray, path: str | Path, fps: float, *, codec: str = "h264", pix_fmt: str = "yuv420p", crf: int = 23
) -> None:
    """Write ``frames`` (uint8, (N, H, W, 3) RGB) to an MP4 file at ``path``."""
    import av

    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise VideoError(f"video frames must be uint8 (N, H, W, 3), got dtype={frames.dtype} shape={frames.shape}")
    if frames.shape[0] == 0:
        raise VideoError(f"cannot encode an empty video to {path}")
    height, width = frames.shape[1:3]
    if pix_fmt == "yuv420p" and (height % 2 or width % 2):
        raise VideoError(f"yuv420p needs even image sizes, got {height}x{width} for {path}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rate = int(round(fps))
    if rate <= 0 or abs(rate - fps) > 1e-6:
        raise VideoError(f"video fps must be a positive integer, got {fps}")
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        stream.options = {"crf": str(crf)}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


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
