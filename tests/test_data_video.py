"""Video encode/decode (PyAV h264 yuv420p) and stats.json statistics."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest

from policyserve.data.stats import STAT_NAMES, column_stats
from policyserve.data.video import VideoError, VideoWriter, decode_video, encode_video


def test_encode_decode_round_trip(tmp_path: Path) -> None:
    frames = np.zeros((12, 24, 40, 3), np.uint8)
    frames[:, :, :20] = 200
    encode_video(frames, tmp_path / "v.mp4", 20)
    with av.open(str(tmp_path / "v.mp4")) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264" and stream.codec_context.pix_fmt == "yuv420p"
    decoded = decode_video(tmp_path / "v.mp4")
    assert decoded.shape == (12, 24, 40, 3) and decoded.dtype == np.uint8
    assert np.abs(decoded.astype(int) - frames).mean() < 5
    assert len(decode_video(tmp_path / "v.mp4", start_time=0.2, end_time=0.4)) == 4


@pytest.mark.parametrize(
    ("frames", "message"),
    [
        (np.zeros((3, 15, 16, 3), np.uint8), "yuv420p needs even image sizes, got 15x16"),
        (np.zeros((3, 16, 16, 3), np.float32), "must be uint8 \\(N, H, W, 3\\), got dtype=float32"),
        (np.zeros((0, 16, 16, 3), np.uint8), "cannot encode an empty video"),
    ],
)
def test_encode_rejects_bad_frames(tmp_path: Path, frames: np.ndarray, message: str) -> None:
    with pytest.raises(VideoError, match=message):
        encode_video(frames, tmp_path / "v.mp4", 20)


def test_decode_missing_file(tmp_path: Path) -> None:
    with pytest.raises(VideoError, match="video file not found"):
        decode_video(tmp_path / "missing.mp4")


def test_column_stats() -> None:
    values = np.arange(101, dtype=np.float64)[:, None] * np.array([1.0, -2.0])
    stats = column_stats(values)
    assert set(stats) == set(STAT_NAMES)
    assert stats["mean"] == [50.0, -100.0] and stats["min"] == [0.0, -200.0] and stats["max"] == [100.0, 0.0]
    assert stats["q01"] == pytest.approx([1.0, -198.0]) and stats["q99"] == pytest.approx([99.0, -2.0])
    assert column_stats(np.ones(4))["std"] == [0.0]
    with pytest.raises(ValueError, match="empty column"):
        column_stats(np.zeros((0, 3)))


def test_video_writer_appends_batches_and_single_frames(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    first, second = rng.integers(0, 255, (5, 16, 24, 3), np.uint8), rng.integers(0, 255, (16, 24, 3), np.uint8)
    with VideoWriter(tmp_path / "v.mp4", 10) as writer:
        writer.write(first)
        writer.write(second)
        assert writer.num_frames == 6
        with pytest.raises(VideoError, match="frames of 8x24 after frames of 16x24"):
            writer.write(first[:, :8])
    assert writer.num_bytes > 0
    decoded = decode_video(tmp_path / "v.mp4")
    assert decoded.shape == (6, 16, 24, 3)
    assert decode_video(tmp_path / "v.mp4", start_time=0.5).shape == (1, 16, 24, 3)  # frame 5 at t = 0.5 s
