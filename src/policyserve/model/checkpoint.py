"""Checkpoint directories: save/load policyserve models, detect GR00T checkpoints, resolve devices.

Layout of a policyserve checkpoint directory::

    config.json          {"format": "policyserve-flow-policy", "format_version": 1, "model_type": ...,
                          "embodiment_tags": [...], "model": ModelConfig, "modality_configs": {tag: {...}},
                          "text_vocab": [...], "training": {...}}
    model.safetensors    network weights
    normalization.json   {"state"|"action": {key: {"mode", "min", "max", "mean", "std"}}}

Detection rule (:func:`detect_checkpoint_kind`): ``config.json`` whose ``format`` is ours -> "policyserve";
``config.json`` whose ``model_type`` starts with "gr00t" or whose ``architectures`` name GR00T, or a
directory with ``processor_config.json`` or ``experiment_cfg/`` -> "gr00t"; anything else is an error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..registry import canonical_tag, parse_modality_configs
from ..types import EmbodimentTag, ModalityConfigs
from .config import ModelConfig
from .normalization import Normalizer
from .text import TextTokenizer

FORMAT = "policyserve-flow-policy"
FORMAT_VERSION = 1
MODEL_TYPE = "policyserve_flow_matching"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
NORMALIZATION_FILE = "normalization.json"
POLICYSERVE, GR00T = "policyserve", "gr00t"


@dataclass
class PolicyBundle:
    """Everything besides the weights that a trained model needs at inference."""

    model_config: ModelConfig
    modality_configs: ModalityConfigs
    normalizer: Normalizer
    tokenizer: TextTokenizer
    embodiment_tag: str = EmbodimentTag.NEW_EMBODIMENT.value
    training: dict[str, Any] = field(default_factory=dict)

    def config_json(self) -> dict[str, Any]:
        """The ``config.json`` document of this bundle."""
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model_type": MODEL_TYPE,
            "embodiment_tags": [self.embodiment_tag],
            "model": self.model_config.to_json(),
            "modality_configs": {self.embodiment_tag: {m: c.to_json() for m, c in self.modality_configs.items()}},
            "text_vocab": self.tokenizer.vocab,
            "text_max_len": self.tokenizer.max_len,
            "training": self.training,
        }


def _read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise ConfigError(f"checkpoint {path.parent} is missing {path.name} ({what})")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"checkpoint file {path} is corrupt (not valid JSON: {exc})") from exc


def _latest_checkpoint_hint(path: Path) -> str:
    steps = sorted((int(p.name[11:]), p) for p in path.glob("checkpoint-*") if p.name[11:].isdigit())
    return f"; did you mean {steps[-1][1]}?" if steps else ""


def detect_checkpoint_kind(path: str | Path) -> str:
    """"policyserve" or "gr00t" from the directory's files (rule in the module docstring)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"model path {path} does not exist")
    if not path.is_dir():
        raise ConfigError(f"model path {path} is not a directory (expected a checkpoint directory)")
    config_path = path / CONFIG_FILE
    if config_path.is_file():
        data = _read_json(config_path, "model config")
        if isinstance(data, dict):
            if data.get("format") == FORMAT:
                return POLICYSERVE
            model_type = str(data.get("model_type", "")).lower()
            archs = " ".join(map(str, data.get("architectures") or [])).lower()
            if model_type.startswith("gr00t") or "gr00t" in archs:
                return GR00T
    if (path / "processor_config.json").is_file() or (path / "experiment_cfg").is_dir():
        return GR00T
    raise ConfigError(
        f"{path} is neither a policyserve checkpoint ({CONFIG_FILE} with \"format\": \"{FORMAT}\" and "
        f"{WEIGHTS_FILE}) nor a GR00T checkpoint (config.json with a gr00t model_type, processor_config.json "
        f"or experiment_cfg/){_latest_checkpoint_hint(path)}"
    )


def resolve_device(device: str | int | None) -> Any:
    """``torch.device`` for "cpu", "cuda", "cuda:N", an int index or "mps"; ConfigError if it does not exist."""
    import torch

    if device is None:
        device = "cpu"
    if isinstance(device, int):
        device = f"cuda:{device}"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device {device!r} requested but CUDA is not available (torch {torch.__version__}); use device='cpu'"
            )
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ConfigError(f"device {device!r} does not exist: {count} CUDA device(s), cuda:0..cuda:{count - 1}")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError(f"device {device!r} requested but MPS is not available; use device='cpu'")
    elif dev.type != "cpu":
        raise ConfigError(f"unsupported device {device!r}; use cpu, cuda or cuda:N")
    return dev


def save_checkpoint(directory: str | Path, model: Any, bundle: PolicyBundle) -> Path:
    """Write config.json, model.safetensors and normalization.json into ``directory``."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": FORMAT})
    (directory / NORMALIZATION_FILE).write_text(json.dumps(bundle.normalizer.to_json()))
    (directory / CONFIG_FILE).write_text(json.dumps(bundle.config_json(), indent=1))
    return directory


def read_bundle(directory: str | Path) -> PolicyBundle:
    """Config, modality configs, tokenizer and normalization statistics of a policyserve checkpoint."""
    directory = Path(directory)
    if detect_checkpoint_kind(directory) != POLICYSERVE:
        raise ConfigError(f"{directory} is a GR00T checkpoint, not a policyserve one")
    data = _read_json(directory / CONFIG_FILE, "model config")
    if data.get("format_version", 0) > FORMAT_VERSION:
        raise ConfigError(f"{directory} has checkpoint format version {data['format_version']}; "
                          f"this policyserve reads up to {FORMAT_VERSION}; upgrade policyserve")
    try:
        tags = list(data["embodiment_tags"])
        model_config = ModelConfig.from_json(data["model"])
        configs = parse_modality_configs(data["modality_configs"][tags[0]], f"{directory / CONFIG_FILE}")
        tokenizer = TextTokenizer(data["text_vocab"], data.get("text_max_len", model_config.text_max_len))
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise ConfigError(f"checkpoint file {directory / CONFIG_FILE} is corrupt or incomplete: {exc!r}") from exc
    normalizer = Normalizer.from_json(_read_json(directory / NORMALIZATION_FILE, "normalization statistics"))
    return PolicyBundle(model_config, configs, normalizer, tokenizer, tags[0], data.get("training", {}))


def load_checkpoint(directory: str | Path, device: Any = "cpu") -> tuple[Any, PolicyBundle]:
    """(network in eval mode on ``device``, bundle) of a policyserve checkpoint directory."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .network import FlowMatchingPolicyNet

    directory = Path(directory)
    bundle = read_bundle(directory)
    device = resolve_device(device)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise ConfigError(f"checkpoint {directory} is missing {WEIGHTS_FILE} (network weights)")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ConfigError(f"checkpoint weights {weights} are corrupt: {exc}") from exc
    model = FlowMatchingPolicyNet(bundle.model_config)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ConfigError(f"checkpoint weights {weights} do not match its config.json: {exc}") from exc
    return model.to(device).eval(), bundle
