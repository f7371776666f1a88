"""Datasets: LeRobot reader and writer, the recorded-demo HDF5 reader, video I/O, statistics, HDF5 -> LeRobot
conversion."""

from .column_map import ColumnMap
from .demos import DemoFile, DemoFileError
from .hdf5_to_lerobot import ConversionError, ConversionSummary, convert_hdf5_to_lerobot, open_hdf5
from .lerobot import DatasetError, DatasetModality, Episode, LanguageSpec, LeRobotDataset, SliceSpec, VideoSpec
from .lerobot_writer import FORMATS, LeRobotWriter
from .stats import channel_histogram, column_stats, compute_stats, histogram_stats
from .video import VideoError, VideoWriter, decode_video, encode_video

__all__ = [
    "FORMATS",
    "ColumnMap",
    "ConversionError",
    "ConversionSummary",
    "DatasetError",
    "DatasetModality",
    "DemoFile",
    "DemoFileError",
    "Episode",
    "LanguageSpec",
    "LeRobotDataset",
    "LeRobotWriter",
    "SliceSpec",
    "VideoError",
    "VideoSpec",
    "VideoWriter",
    "channel_histogram",
    "column_stats",
    "compute_stats",
    "convert_hdf5_to_lerobot",
    "decode_video",
    "encode_video",
    "histogram_stats",
    "open_hdf5",
]
