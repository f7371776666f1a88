"""Core data types shared by policies, servers and clients (GR00T N1.6 compatible)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class MessageType(Enum):
    START_OF_EPISODE = "start_of_episode"
    END_OF_EPISODE = "end_of_episode"
    EPISODE_STEP = "episode_step"
    IMAGE = "image"
    TEXT = "text"


class ActionRepresentation(Enum):
    RELATIVE = "relative"
    DELTA = "delta"
    ABSOLUTE = "absolute"


class ActionType(Enum):
    EEF = "eef"
    NON_EEF = "non_eef"


class ActionFormat(Enum):
    DEFAULT = "default"
    XYZ_ROT6D = "xyz+rot6d"
    XYZ_ROTVEC = "xyz+rotvec"


def _parse_enum(enum_cls: type[Enum], value: Any) -> Enum:
    """Accept an enum member, its name or its value (case-insensitive)."""
    if isinstance(value, enum_cls):
        return value
    if isinstance(value, str):
        for member in enum_cls:
            if value.lower() in (member.name.lower(), str(member.value).lower()):
                return member
    names = ", ".join(m.name for m in enum_cls)
    raise ValueError(f"{enum_cls.__name__}: unknown value {value!r}; expected one of {names}")


@dataclass
class ActionConfig:
    """How one action key is represented (absolute/relative/delta, eef or joints, rotation format)."""

    rep: ActionRepresentation
    type: ActionType
    format: ActionFormat
    state_key: str | None = None

    def __post_init__(self) -> None:
        self.rep = _parse_enum(ActionRepresentation, self.rep)
        self.type = _parse_enum(ActionType, self.type)
        self.format = _parse_enum(ActionFormat, self.format)


@dataclass
class ModalityConfig:
    """Which keys of one modality a policy uses, and at which time offsets.

    Field names and order match GR00T's ``gr00t.data.types.ModalityConfig`` so that the wire encoding
    (``as_json`` map) is identical.
    """

    delta_indices: list[int]
    modality_keys: list[str]
    sin_cos_embedding_keys: list[str] | None = None
    mean_std_embedding_keys: list[str] | None = None
    action_configs: list[ActionConfig] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.delta_indices, (list, tuple)) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in self.delta_indices
        ):
            raise ValueError(f"ModalityConfig.delta_indices must be a list of ints, got {self.delta_indices!r}")
        if not self.delta_indices:
            raise ValueError("ModalityConfig.delta_indices must not be empty")
        if not isinstance(self.modality_keys, (list, tuple)) or not all(
            isinstance(k, str) for k in self.modality_keys
        ):
            raise ValueError(f"ModalityConfig.modality_keys must be a list of str, got {self.modality_keys!r}")
        self.delta_indices = list(self.delta_indices)
        self.modality_keys = list(self.modality_keys)
        if self.action_configs is not None:
            if len(self.action_configs) != len(self.modality_keys):
                raise ValueError(
                    f"ModalityConfig.action_configs has {len(self.action_configs)} entries but "
                    f"modality_keys has {len(self.modality_keys)}"
                )
            self.action_configs = [
                ac if isinstance(ac, ActionConfig) else ActionConfig(**ac) for ac in self.action_configs
            ]

    @property
    def horizon(self) -> int:
        """Number of time steps the modality samples (``len(delta_indices)``): T of an observation array."""
        return len(self.delta_indices)

    @property
    def span(self) -> int:
        """Number of steps the modality covers, first to last offset (``delta_indices[-1] - delta_indices[0] + 1``):
        the chunk length T of an action reply (``[0, 2, 4]`` spans 5 steps)."""
        return self.delta_indices[-1] - self.delta_indices[0] + 1

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict with enums as their names (GR00T's ``to_json_serializable``)."""
        return to_json_serializable(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModalityConfig:
        if not isinstance(data, dict):
            raise ValueError(f"ModalityConfig must be built from a dict, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"ModalityConfig: unknown fields {sorted(unknown)}; expected {sorted(known)}")
        return cls(**data)


def to_json_serializable(obj: Any) -> Any:
    """Turn dataclasses, enums (by name), numpy scalars and tuples into plain JSON/msgpack values."""
    import numpy as np

    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_json_serializable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Enum):
        return obj.name
    if isinstance(obj, dict):
        return {str(k): to_json_serializable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [to_json_serializable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return str(obj)


class EmbodimentTag(Enum):
    """GR00T N1.6 embodiment tags (names and values as upstream)."""

    ROBOCASA_PANDA_OMRON = "robocasa_panda_omron"
    GR1 = "gr1"
    UNITREE_G1 = "unitree_g1"
    LIBERO_PANDA = "libero_panda"
    OXE_GOOGLE = "oxe_google"
    OXE_WIDOWX = "oxe_widowx"
    OXE_DROID = "oxe_droid"
    BEHAVIOR_R1_PRO = "behavior_r1_pro"
    NEW_EMBODIMENT = "new_embodiment"

    @classmethod
    def resolve(cls, value: str | EmbodimentTag) -> EmbodimentTag:
        """Look a tag up by member name or value, case-insensitively."""
        return _parse_enum(cls, value)  # type: ignore[return-value]

    def __str__(self) -> str:  # upstream banner prints "EmbodimentTag.<NAME>"
        return f"EmbodimentTag.{self.name}"


MODALITIES = ("video", "state", "action", "language")

RTC_SCHEDULES = ("exp", "linear")
"""Soft-mask schedules of a real-time-chunking request (``options["rtc"]["schedule"]``; the first is the default)."""
RTC_GUIDANCES = ("vjp", "identity")
"""How a real-time-chunking request is guided (``options["rtc"]["guidance"]``): the paper's vector-Jacobian
product, or the Jacobian taken as the identity (:mod:`policyserve.model.rtc`); the first is the default."""


@dataclass
class ModalityDims:
    """Per-key sizes a policy declares beyond what ModalityConfig carries.

    ``video`` maps camera key to (height, width); ``state`` and ``action`` map key to dimension D.
    Keys left out are not checked.
    """

    video: dict[str, tuple[int, int]] = field(default_factory=dict)
    state: dict[str, int] = field(default_factory=dict)
    action: dict[str, int] = field(default_factory=dict)

    def action_dim(self, keys: list[str]) -> int:
        missing = [k for k in keys if k not in self.action]
        if missing:
            raise ValueError(f"no declared action dimension for action keys {missing}")
        return sum(self.action[k] for k in keys)


ModalityConfigs = dict[str, ModalityConfig]
"""Modality name ("video", "state", "action", "language") -> ModalityConfig."""
