"""Known modality configs per embodiment, and loading them from JSON files."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .jsonio import read_json_object
from .types import MODALITIES, EmbodimentTag, ModalityConfig, ModalityConfigs, ModalityDims


@dataclass
class EmbodimentSpec:
    """Modality configs of one embodiment plus the per-key sizes it declares."""

    name: str
    modality_configs: ModalityConfigs
    dims: ModalityDims = field(default_factory=ModalityDims)


class UnknownEmbodimentError(ConfigError):
    """No modality config is registered for the embodiment tag.

    ``summary`` says so without the advice to library callers (a command line gives its own).
    """

    def __init__(self, tag: str, known: list[str]) -> None:
        self.tag, self.known = tag, known
        self.summary = f"no modality config registered for embodiment {tag!r}; known: {', '.join(known)}"
        super().__init__(f"{self.summary}. Load a modality config file (load_modality_config_file) or register one "
                         "with register_modality_config().")


_REGISTRY: dict[str, EmbodimentSpec] = {}


def parse_modality_configs(data: dict[str, Any], source: str = "modality config") -> ModalityConfigs:
    """Build ``{modality: ModalityConfig}`` from a JSON-style dict, with errors that say where."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a JSON object of modalities, got {type(data).__name__}")
    configs: ModalityConfigs = {}
    for modality in MODALITIES:
        if modality not in data:
            raise ConfigError(f"{source}: missing modality {modality!r} (needs {', '.join(MODALITIES)})")
        entry = data[modality]
        if isinstance(entry, ModalityConfig):
            configs[modality] = entry
            continue
        try:
            configs[modality] = ModalityConfig.from_json(entry)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{source}: modality {modality!r}: {exc}") from exc
    return configs


def parse_dims(data: dict[str, Any] | None) -> ModalityDims:
    data = data or {}
    return ModalityDims(
        video={k: tuple(v) for k, v in data.get("video", {}).items()},
        state={k: int(v) for k, v in data.get("state", {}).items()},
        action={k: int(v) for k, v in data.get("action", {}).items()},
    )


def _load_builtin() -> None:
    text = resources.files("policyserve").joinpath("configs/embodiments.json").read_text()
    for name, entry in json.loads(text).items():
        if name.startswith("_"):
            continue
        _REGISTRY[name] = EmbodimentSpec(
            name, parse_modality_configs(entry, f"built-in config {name!r}"), parse_dims(entry.get("dims"))
        )


def canonical_tag(tag: str | EmbodimentTag) -> str:
    """Embodiment tag value (GR00T's tags by name or value; other names lower-cased)."""
    if isinstance(tag, EmbodimentTag):
        return tag.value
    try:
        return EmbodimentTag.resolve(tag).value
    except ValueError:
        return str(tag).strip().lower()


def register_modality_config(
    config: ModalityConfigs,
    embodiment_tag: str | EmbodimentTag = EmbodimentTag.NEW_EMBODIMENT,
    dims: ModalityDims | None = None,
    overwrite: bool = False,
) -> None:
    """Register the modality configs of an embodiment (by tag name or value)."""
    if not _REGISTRY:
        _load_builtin()
    key = canonical_tag(embodiment_tag)
    if key in _REGISTRY and not overwrite:
        raise ConfigError(f"embodiment {key!r} is already registered")
    _REGISTRY[key] = EmbodimentSpec(key, parse_modality_configs(config), dims or ModalityDims())


def registered_embodiments() -> list[str]:
    if not _REGISTRY:
        _load_builtin()
    return sorted(_REGISTRY)


def get_embodiment_spec(tag: str | EmbodimentTag) -> EmbodimentSpec:
    """Registered spec for a tag given by enum, name or value (case-insensitive)."""
    if not _REGISTRY:
        _load_builtin()
    key = canonical_tag(tag)
    if key not in _REGISTRY:
        raise UnknownEmbodimentError(key, sorted(_REGISTRY))
    return _REGISTRY[key]


def get_modality_configs(tag: str | EmbodimentTag) -> ModalityConfigs:
    return get_embodiment_spec(tag).modality_configs


def load_modality_config_file(path: str | Path) -> tuple[ModalityConfigs, ModalityDims]:
    """Read a JSON file ``{video|state|action|language: {delta_indices, modality_keys, ...}, dims?}``."""
    data = read_json_object(path, "modality config")
    return parse_modality_configs(data, str(path)), parse_dims(data.get("dims"))


def save_modality_config_file(path: str | Path, configs: ModalityConfigs, dims: ModalityDims | None = None) -> None:
    data: dict[str, Any] = {m: configs[m].to_json() for m in configs}
    if dims is not None:
        data["dims"] = {"video": {k: list(v) for k, v in dims.video.items()}, "state": dims.state, "action": dims.action}
    Path(path).write_text(json.dumps(data, indent=2))
