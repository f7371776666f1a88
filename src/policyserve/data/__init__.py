"""Datasets: LeRobot reader and writer, video I/O, statistics, HDF5 -> LeRobot conversion."""

from .column_map import ColumnMap
from .hdf5_to_lerobot import ConversionError, ConversionSummary, convert_hdf5_to_lerobot
from .lerobot import DatasetError, DatasetModality, Episode, LanguageSpec, LeRobotDataset, SliceSpec, VideoSpec
from .lerobot_writer import LeRobotWriter
from .stats import column_stats, compute_stats
from .video import VideoError, VideoWriter, decode_video, encode_video

__all__ = [
    "ColumnMap",
    "ConversionError",
    "ConversionSummary",
    "DatasetError",
    "DatasetModality",
    "Episode",
    "LanguageSpec",
    "LeRobotDataset",
    "LeRobotWriter",
    "SliceSpec",
    "VideoError",
    "VideoSpec",
    "VideoWriter",
    "column_stats",
    "compute_stats",
    "convert_hdf5_to_lerobot",
    "decode_video",
    "encode_video",
]
