"""The env -> policy key map: which env observation key (or slice of an env vector) feeds which policy key.

One direction everywhere, as openpi's key map (:mod:`policyserve.wire.openpi_keys`): env key -> policy key.
``{"video": {"table_cam": "ego_view"}, "state": {"joint_pos[0:7]": "left_arm"}, "language": "task"}`` reads the
policy's ``ego_view`` camera from the env's ``table_cam`` and its ``left_arm`` state from the first seven
entries of the env's ``joint_pos`` vector. A policy key no entry names is read from the env key of the same name
(cameras ``ego_view``/``wrist_view`` from policyserve's Franka ``table_cam``/``wrist_cam``). ``instruction``
gives the instruction text for envs that have none. :meth:`KeyMap.resolve` checks a map against a policy's
modality config (every entry must feed a policy key) and :meth:`ResolvedKeyMap.check` against an env observation
(every env key it reads must be there); both list every problem at once. :func:`key_map_template` writes a
ready-to-edit map for an env observation.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, ValidationError
from ..jsonio import read_json_object
from ..types import ModalityConfigs

FRANKA_CAMERAS: dict[str, str] = {"table_cam": "ego_view", "wrist_cam": "wrist_view"}
"""policyserve's Franka env cameras -> the policy video keys they feed when the map names neither."""

DEFAULT_LANGUAGE_KEY = "task"
"""Env key holding the instruction text unless the map says otherwise."""

_SLICE = re.compile(r"^(?P<key>[^\[\]]+)\[(?P<start>-?\d*)(?::(?P<stop>-?\d*))?\]$")
_PAIR_HELP = "expected video.ENV=POLICY, state.ENV=POLICY (ENV may be a slice like joint_pos[0:7]), " \
             "language=ENV or instruction=TEXT"


@dataclass(frozen=True)
class EnvSource:
    """Where one policy key's value comes from: an env key, optionally a slice of its last axis."""

    key: str
    index: slice | None = None
    text: str = ""
    """The map's spelling (``joint_pos[0:7]``)."""

    @classmethod
    def parse(cls, text: str) -> EnvSource:
        """``"joint_pos"``, ``"joint_pos[0:7]"`` or ``"joint_pos[3]"`` (one entry, kept as a 1-vector)."""
        match = _SLICE.match(text)
        if match is None:
            if "[" in text or "]" in text:
                raise ConfigError(f"key map env key {text!r}: expected KEY, KEY[START:STOP] or KEY[I]")
            return cls(text, None, text)
        start, stop = match["start"], match["stop"]
        if stop is None:  # KEY[I]
            if not start:
                raise ConfigError(f"key map env key {text!r}: expected KEY[I] with an integer I")
            i = int(start)
            return cls(match["key"], slice(i, i + 1 if i != -1 else None), text)
        return cls(match["key"], slice(int(start) if start else None, int(stop) if stop else None), text)

    def take(self, value: Any) -> Any:
        """The slice of ``value``'s last axis (``value`` itself without one)."""
        return value if self.index is None else value[..., self.index]


@dataclass
class KeyMap:
    """Which env observation key feeds which policy key (module docstring): env key -> policy key.

    ``video`` and ``state`` map env key (a state env key may be sliced: ``"joint_pos[0:7]"``) -> policy key;
    policy keys no entry names are read from the env key of the same name (Franka cameras: see
    :data:`FRANKA_CAMERAS`). ``language`` is the env key holding the instruction text; ``instruction``, when set,
    is the text sent instead (for envs without one, e.g. IsaacLab's).
    """

    video: dict[str, str] = field(default_factory=dict)
    state: dict[str, str] = field(default_factory=dict)
    language: str = DEFAULT_LANGUAGE_KEY
    instruction: str | None = None

    def __post_init__(self) -> None:
        for group in ("video", "state"):
            table = getattr(self, group)
            if not isinstance(table, Mapping) or not all(isinstance(k, str) and isinstance(v, str)
                                                          for k, v in table.items()):
                raise ConfigError(f"key map {group!r} must map env key -> policy key (str -> str), got {table!r}")
            setattr(self, group, dict(table))
        if self.instruction is not None and not isinstance(self.instruction, str):
            raise ConfigError(f"key map instruction must be a str, got {type(self.instruction).__name__}")

    def env_key(self, modality: str, policy_key: str) -> str:
        """Env observation key (without a slice) that feeds ``modality``/``policy_key``."""
        return self.source(modality, policy_key).key

    def source(self, modality: str, policy_key: str) -> EnvSource:
        """Where ``modality``/``policy_key`` is read from (an entry naming it, else the default)."""
        table = {"video": self.video, "state": self.state}[modality]
        named = [env for env, target in table.items() if target == policy_key]
        if named:
            return EnvSource.parse(named[0])
        if modality == "video":
            default = [env for env, target in FRANKA_CAMERAS.items() if target == policy_key]
            if default:
                return EnvSource.parse(default[0])
        return EnvSource(policy_key, None, policy_key)

    def resolve(self, configs: ModalityConfigs) -> ResolvedKeyMap:
        """This map against a policy's modality configs; :class:`ConfigError` listing every entry that feeds no
        policy key (misspelled, or written policy -> env) and every policy key fed twice."""
        problems = []
        for group in ("video", "state"):
            policy_keys = list(configs[group].modality_keys) if group in configs else []
            fed: dict[str, list[str]] = {}
            for env, target in getattr(self, group).items():
                if group == "video" and EnvSource.parse(env).index is not None:
                    problems.append(f"video.{env} -> {target!r}: only state env keys can be sliced")
                if target not in policy_keys:
                    problems.append(f"{group}.{env} -> {target!r}: the policy has no {group} key {target!r} "
                                    f"(its {group} keys: {policy_keys})")
                fed.setdefault(target, []).append(env)
            problems += [f"{group} key {target!r} is fed by {len(envs)} env keys {envs}; map one"
                         for target, envs in fed.items() if len(envs) > 1]
        if problems:
            raise ConfigError("key map (env key -> policy key) has unused or invalid entries:\n  " + "\n  ".join(problems))
        sources = {(m, k): self.source(m, k) for m in ("video", "state") if m in configs
                   for k in configs[m].modality_keys}
        language_keys = list(configs["language"].modality_keys) if "language" in configs else []
        if len(language_keys) > 1:
            raise ConfigError(f"the driver supports one language key, the policy asks for {language_keys}")
        return ResolvedKeyMap(self, sources, language_keys[0] if language_keys else None)

    # ---- building from files and flags ------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "key map") -> KeyMap:
        """Build from ``{"video": {env: policy}, "state": {...}, "language": "task", "instruction": "..."}``."""
        unknown = set(data) - {"video", "state", "language", "instruction"}
        if unknown:
            raise ConfigError(f"{source}: unknown entries {sorted(unknown)}; expected video, state, language, "
                              "instruction")
        for group in ("video", "state"):
            if group in data and not isinstance(data[group], Mapping):
                raise ConfigError(f"{source}: {group!r} must map env key -> policy key, got {data[group]!r}")
        return cls(video=dict(data.get("video", {})), state=dict(data.get("state", {})),
                   language=str(data.get("language", DEFAULT_LANGUAGE_KEY)), instruction=data.get("instruction"))

    @classmethod
    def from_file(cls, path: str | Path) -> KeyMap:
        """Read a JSON key map file (see :meth:`from_dict`)."""
        return cls.from_dict(read_json_object(path, "key map"), str(path))

    @classmethod
    def from_pairs(cls, pairs: Sequence[str], base: KeyMap | None = None) -> KeyMap:
        """Apply ``video.ENV=POLICY`` / ``state.ENV=POLICY`` / ``language=ENV`` / ``instruction=TEXT`` entries on
        top of ``base``."""
        result = base or cls()
        result = cls(dict(result.video), dict(result.state), result.language, result.instruction)
        for pair in pairs:
            lhs, sep, rhs = pair.partition("=")
            group, dot, key = lhs.partition(".")
            if not sep or not rhs:
                raise ConfigError(f"key map entry {pair!r}: {_PAIR_HELP}")
            if group == "language" and not dot:
                result.language = rhs
            elif group == "instruction" and not dot:
                result.instruction = rhs
            elif group in ("video", "state") and key:
                getattr(result, group)[key] = rhs
            else:
                raise ConfigError(f"key map entry {pair!r}: {_PAIR_HELP}")
        return result

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (:meth:`from_dict`'s input)."""
        data: dict[str, Any] = {"video": dict(self.video), "state": dict(self.state), "language": self.language}
        if self.instruction is not None:
            data["instruction"] = self.instruction
        return data


@dataclass
class ResolvedKeyMap:
    """A :class:`KeyMap` checked against one policy: the env source of every policy key it needs."""

    key_map: KeyMap
    sources: dict[tuple[str, str], EnvSource]
    """(modality, policy key) -> where it is read from."""
    language_key: str | None
    """The policy's language key (None when it takes no text)."""

    def required_env_keys(self) -> dict[str, str]:
        """``"<modality>.<policy key>" -> env key`` (as the map spells it) for every key the policy needs."""
        needed = {f"{m}.{k}": src.text for (m, k), src in self.sources.items()}
        if self.language_key is not None and self.key_map.instruction is None:
            needed[f"language.{self.language_key}"] = self.key_map.language
        return needed

    def env_keys(self) -> list[str]:
        """The env observation keys the policy reads (each once, without slices)."""
        return list(dict.fromkeys(_key_of(text) for text in self.required_env_keys().values()))

    def check(self, obs: Mapping[str, Any]) -> None:
        """:class:`ValidationError` listing every policy key whose env key is missing from ``obs``."""
        missing = [(target, src) for target, src in self.required_env_keys().items() if _key_of(src) not in obs]
        if not missing:
            return
        hint = ""
        if self.language_key is not None and self.key_map.instruction is None and self.key_map.language not in obs:
            hint = " (an env without instruction text needs KeyMap(instruction='...'))"
        modality, _, key = missing[0][0].partition(".")
        every = ", ".join(f"{t} <- {s!r}" for t, s in missing)
        raise ValidationError(
            modality, key, f"env key {missing[0][1]!r} (key map: env key -> policy key); all {len(missing)} "
            f"missing: {every}", f"env keys {sorted(map(str, obs))}{hint}", "missing in the env observation")


def _key_of(text: str) -> str:
    return EnvSource.parse(text).key if "[" in text else text


def _shape(value: Any) -> str:
    if isinstance(value, (str, bytes)):
        return "text"
    if isinstance(value, (list, tuple)):
        return f"list of {len(value)}"
    shape = getattr(value, "shape", None)
    return f"shape {tuple(shape)}" if shape is not None else type(value).__name__


def key_map_template(obs: Mapping[str, Any], configs: ModalityConfigs, key_map: KeyMap | None = None) -> str:
    """A ready-to-edit JSON key map for env observation ``obs`` and a policy's ``configs``, with the env keys.

    Entries the current ``key_map`` resolves to present env keys are kept; the others read ``"?"`` as env key
    (replace each with an env key of the list; slice vectors as ``"joint_pos[0:7]"``).
    """
    key_map = key_map or KeyMap()
    template: dict[str, Any] = {"video": {}, "state": {}}
    unknown = 0
    for modality in ("video", "state"):
        for key in (configs[modality].modality_keys if modality in configs else []):
            src = key_map.source(modality, key)
            env = src.text if src.key in obs else f"?{(unknown := unknown + 1)}"
            template[modality][env] = key
    language_keys = list(configs["language"].modality_keys) if "language" in configs else []
    if language_keys:
        if key_map.instruction is not None or key_map.language not in obs:
            template["instruction"] = key_map.instruction or "describe the task here"
        else:
            template["language"] = key_map.language
    lines = [f"  {k}: {_shape(v)}" for k, v in obs.items()]
    return ("# key map (env key -> policy key); replace every \"?N\" with an env key below\n"
            + json.dumps(template, indent=2) + "\n# env observation keys:\n" + "\n".join(lines))
