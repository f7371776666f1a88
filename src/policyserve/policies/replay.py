"""ReplayPolicy: serve the recorded actions of a LeRobot dataset through the policy API (GR00T semantics).

Each ``get_action`` returns the chunk ``actions[cursor : cursor + H]`` of the current episode (H =
``delta_indices[-1] - delta_indices[0] + 1``), padded with the last recorded action past the end and tiled to the
batch size, then advances the cursor by ``execution_horizon``. ``reset`` selects the episode (or the HDF5 demo,
through the dataset's demo map) and start step; a list of indices replays a different episode in each of B
environments, and ``env_ids`` resets some envs only (the others keep their cursors). Every reply's ``info``
says ``"replay": True`` and the ``execution_horizon``, so clients can follow the cursor (GR00T clients ignore
extra info keys). On a dataset converted from HDF5 demos (``meta/hdf5_demo_map.json``) the info also names the
``demo_source`` file, the ``demo_index`` each env replays and its ``demo_split`` ("train"/"eval"), so a client can check that it replays the demo it
started from (:mod:`policyserve.eval.identity`). Reset options other than :data:`RESET_OPTIONS` are refused.

Served, every client (connection) has its own cursors: one client's ``reset`` and ``get_action`` leave the
others' episodes and steps alone, so several comparisons (e.g. distributed workers) can share one replay
server. A new client starts at the first episode, step 0; a client that reconnects is a new client.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from ..data.lerobot import DatasetError, LeRobotDataset
from ..errors import ConfigError
from ..registry import get_modality_configs, load_modality_config_file, parse_modality_configs
from ..types import EmbodimentTag, ModalityConfigs, ModalityDims
from .base import Action, ActionRequest, BasePolicy, Info, Observation

log = logging.getLogger(__name__)


class ReplayError(DatasetError):
    """A replay request names an episode, step or batch layout the dataset cannot serve."""


RESET_OPTIONS = ("episode_index", "demo_index", "step_index", "env_ids", "seed")
"""The reset options a replay accepts (``seed`` is accepted and ignored: a replay is deterministic)."""


def _as_index(value: Any, what: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ReplayError(f"{what} must be an integer, got {type(value).__name__} {value!r}")
    return int(value)


class ReplayPolicy(BasePolicy):
    """Replays a LeRobot dataset's actions; observations are validated (when strict) but otherwise ignored."""

    MAX_CLIENTS = 4096
    """Served clients whose cursors are kept; the least recently seen one is forgotten beyond this."""

    def __init__(
        self,
        dataset_path: str | Path | LeRobotDataset,
        modality_configs: ModalityConfigs | dict[str, Any],
        execution_horizon: int | None,
        *,
        strict: bool = True,
    ) -> None:
        """``execution_horizon=None`` advances by the whole action horizon per call."""
        super().__init__(strict=strict)
        self.dataset = dataset_path if isinstance(dataset_path, LeRobotDataset) else LeRobotDataset(dataset_path)
        self.modality_configs = parse_modality_configs(modality_configs, "replay modality config")
        self._check_keys_in_dataset()
        self.action_keys = list(self.modality_configs["action"].modality_keys)
        if not self.action_keys:
            raise ConfigError("the action modality config lists no keys; nothing to replay")
        self.action_horizon = self.modality_configs["action"].span
        if execution_horizon is None:
            execution_horizon = self.action_horizon
        if isinstance(execution_horizon, bool) or not isinstance(execution_horizon, int) or execution_horizon < 1:
            raise ConfigError(f"execution_horizon must be a positive integer, got {execution_horizon!r}")
        if execution_horizon > self.action_horizon:
            raise ConfigError(
                f"execution_horizon ({execution_horizon}) must not exceed the action horizon ({self.action_horizon}, "
                "from the action delta_indices): the client would execute actions the server never sent. "
                "Lower execution_horizon or lengthen the action delta_indices."
            )
        self.execution_horizon = execution_horizon
        if not self.dataset.num_episodes:
            raise DatasetError(f"dataset {self.dataset.root} has no episodes to replay")
        self._cache: dict[int, dict[str, np.ndarray]] = {}
        self._episodes = [self.dataset.episode_indices[0]]
        self._steps = [0]
        self._per_env = False
        self._dims = {k: v.shape[1] for k, v in self._actions(self._episodes[0]).items()}
        demo_map = self.dataset.demo_map or {}
        self._demo_of = {episode: int(name[len("demo_"):]) for name, episode in demo_map.items()
                         if name.startswith("demo_") and name[len("demo_"):].isdigit()}
        self._demo_source = self.dataset.demo_source if demo_map else None
        splits = self.dataset.info.get("splits") or {}
        self._split_of = {e: name for name in splits for e in self.dataset.split(name)}
        self._clients: OrderedDict[str, tuple[list[int], list[int], bool]] = OrderedDict()

    # ---- serving: one cursor per client ---------------------------------------------------------------------

    @contextmanager
    def _cursor_of(self, client: str) -> Iterator[None]:
        """Run with ``client``'s cursors in place (a new client's start at the first episode, step 0)."""
        own = (self._episodes, self._steps, self._per_env)
        fresh = ([self.dataset.episode_indices[0]], [0], False)
        self._episodes, self._steps, self._per_env = self._clients.pop(client, fresh)
        try:
            yield
        finally:
            self._clients[client] = (self._episodes, self._steps, self._per_env)
            while len(self._clients) > self.MAX_CLIENTS:
                self._clients.popitem(last=False)
            self._episodes, self._steps, self._per_env = own

    def serve_reset(self, options: dict | None = None, client: str = "") -> Info:
        with self._cursor_of(client):
            return self.reset(options)

    def serve_batch(self, requests: Sequence[ActionRequest]) -> list[tuple[Action, Info] | Exception]:
        outcomes: list[tuple[Action, Info] | Exception] = []
        for request in requests:
            with self._cursor_of(request.client):
                outcomes += super().serve_batch([request])
        return outcomes

    def _check_keys_in_dataset(self) -> None:
        known = {"action": self.dataset.action_keys, "state": self.dataset.state_keys, "video": self.dataset.video_keys}
        for modality, keys in known.items():
            missing = [k for k in self.modality_configs[modality].modality_keys if k not in keys]
            if missing:
                raise ConfigError(
                    f"{modality} key(s) {missing} of the modality config are not in dataset {self.dataset.root}; "
                    f"its {modality} keys are {keys}"
                )

    @property
    def num_episodes(self) -> int:
        return self.dataset.num_episodes

    def get_modality_config(self) -> ModalityConfigs:
        return self.modality_configs

    def get_modality_dims(self) -> ModalityDims:
        return ModalityDims(action=dict(self._dims))

    def _actions(self, episode_index: int) -> dict[str, np.ndarray]:
        if episode_index not in self._cache:
            self._cache[episode_index] = self.dataset.load_actions(episode_index, self.action_keys)
        return self._cache[episode_index]

    def _length(self, episode_index: int) -> int:
        """Number of recorded actions of an episode."""
        return len(next(iter(self._actions(episode_index).values())))

    # ---- get_action -----------------------------------------------------------------------------------------

    def get_action(self, observation: Observation | None, options: dict | None = None) -> tuple[Action, Info]:
        """Next action chunk; with ``observation=None`` the batch size comes from ``options["batch_size"]``."""
        if observation is not None:
            return super().get_action(observation, options)
        batch = (options or {}).get("batch_size", 1)
        batch = _as_index(batch, "options['batch_size']")
        if batch < 1:
            raise ReplayError(f"options['batch_size'] must be >= 1, got {batch}")
        action, info = self._replay(batch)
        if self.strict:
            self.check_action(action, batch)
        return action, info

    def _get_action(self, observation: Observation, options: dict | None = None) -> tuple[Action, Info]:
        return self._replay(self._batch_size(observation, options))

    def _batch_size(self, observation: Observation, options: dict | None) -> int:
        for modality in ("video", "state", "language"):
            group = observation.get(modality) if isinstance(observation, dict) else None
            if isinstance(group, dict):
                for value in group.values():
                    if isinstance(value, np.ndarray) and value.ndim >= 1:
                        return int(value.shape[0])
                    if isinstance(value, (list, tuple)):
                        return len(value)
        return _as_index((options or {}).get("batch_size", 1), "options['batch_size']")

    def _replay(self, batch: int) -> tuple[Action, Info]:
        if self._per_env and batch != len(self._episodes):
            raise ReplayError(
                f"batch size {batch} does not match the {len(self._episodes)} per-env episodes {self._episodes} "
                f"set by reset(); reset with a list of {batch} episode indices or a single episode_index"
            )
        envs = range(len(self._episodes))
        chunks: dict[str, list[np.ndarray]] = {k: [] for k in self.action_keys}
        for env in envs:
            actions = self._actions(self._episodes[env])
            length = self._length(self._episodes[env])
            rows = np.minimum(np.arange(self._steps[env], self._steps[env] + self.action_horizon), length - 1)
            for key in self.action_keys:
                chunks[key].append(actions[key][rows])
        if self._per_env:
            action = {k: np.stack(v) for k, v in chunks.items()}
        else:
            action = {k: np.repeat(v[0][None], batch, axis=0) for k, v in chunks.items()}
        info = self._info(advance=self.execution_horizon)
        self._steps = [s + self.execution_horizon for s in self._steps]
        return action, info

    def describe(self) -> list[str]:
        """Banner lines: where the dataset's keys come from (derived ones named) and what is replayed."""
        lines = [f"  Replay: {self.num_episodes} episodes, action keys {self.action_keys}"]
        lines += [f"  {line}" for line in self.dataset.describe_modality()]
        if self._demo_source is not None:
            lines.append(f"  Converted from: {self._demo_source} ({len(self._demo_of)} demos)")
        return lines

    def _info(self, advance: int) -> Info:
        lengths = [self._length(e) for e in self._episodes]
        done = [s + advance >= n for s, n in zip(self._steps, lengths, strict=True)]
        identity: Info = {}
        if self._demo_source is not None:
            demos = [self._demo_of.get(e) for e in self._episodes]
            split = [self._split_of.get(e) for e in self._episodes]
            identity = {"demo_source": self._demo_source, "demo_index": demos if self._per_env else demos[0],
                        "demo_split": split if self._per_env else split[0]}
        if self._per_env:
            return {
                "replay": True,
                "execution_horizon": self.execution_horizon,
                "current_step": list(self._steps),
                "episode_index": list(self._episodes),
                "episode_length": lengths,
                "num_episodes": self.num_episodes,
                "episode_done": done,
                **identity,
            }
        return {
            "replay": True,
            "execution_horizon": self.execution_horizon,
            "current_step": self._steps[0],
            "episode_index": self._episodes[0],
            "episode_length": lengths[0],
            "num_episodes": self.num_episodes,
            "episode_done": done[0],
            **identity,
        }

    # ---- reset ----------------------------------------------------------------------------------------------

    def reset(self, options: dict | None = None) -> Info:
        """Go to ``options["episode_index"]`` (an int, or a list: one episode per env) at ``options["step_index"]``.

        ``options["demo_index"]`` (an int or a list) instead names HDF5 demos ``demo_N``, found through the
        dataset's ``meta/hdf5_demo_map.json`` (:meth:`LeRobotDataset.episode_for_demo`).
        Without options the current episode(s) restart at step 0. With ``options["env_ids"]`` only those envs
        are reset (lists then hold one entry per listed env; a ``None`` episode keeps the env's episode) and the
        others keep their cursors. Bad indices raise :class:`ReplayError` (or :class:`DatasetError` for unknown
        episodes) and leave the replay position unchanged.
        """
        options = options or {}
        if not isinstance(options, dict):
            raise ReplayError(f"reset options must be a dict, got {type(options).__name__}")
        unknown = sorted(str(k) for k in options if k not in RESET_OPTIONS)
        if unknown:
            raise ReplayError(f"unknown reset option(s) {unknown}; a replay accepts {list(RESET_OPTIONS)}")
        if options.get("episode_index") is not None and options.get("demo_index") is not None:
            raise ReplayError("give either options['episode_index'] or options['demo_index'], not both")
        if options.get("env_ids") is not None:
            return self._reset_envs(options)
        per_env = self._per_env
        episodes = list(self._episodes)
        for name in ("episode_index", "demo_index"):
            if options.get(name) is None:
                continue
            value = options[name]
            per_env = isinstance(value, (list, tuple, np.ndarray))
            values = list(value) if per_env else [value]
            if not values:
                raise ReplayError(f"options[{name!r}] is an empty list; give one index per env")
            episodes = [_as_index(v, f"options[{name!r}]") for v in values]
            if name == "demo_index":
                episodes = [self.dataset.episode_for_demo(d) for d in episodes]
        lengths = [self._length(e) for e in episodes]  # DatasetError names the valid indices
        step_value = options.get("step_index", 0)
        if isinstance(step_value, (list, tuple, np.ndarray)):
            steps = [_as_index(s, "options['step_index']") for s in step_value]
            if len(steps) != len(episodes):
                raise ReplayError(
                    f"options['step_index'] has {len(steps)} entries but there are {len(episodes)} episodes {episodes}"
                )
        else:
            steps = [_as_index(step_value, "options['step_index']")] * len(episodes)
        for episode, step, length in zip(episodes, steps, lengths, strict=True):
            if not 0 <= step < length:
                raise ReplayError(
                    f"step_index {step} is out of range for episode {episode} (length {length}); "
                    f"valid steps are 0..{length - 1}"
                )
        self._episodes, self._steps, self._per_env = episodes, steps, per_env
        return self._info(advance=0)

    def _reset_envs(self, options: dict) -> Info:
        """``reset`` of the envs listed in ``options["env_ids"]`` only."""
        value = options["env_ids"]
        ids = [_as_index(i, "options['env_ids']") for i in (value if isinstance(value, (list, tuple, np.ndarray))
                                                               else [value])]
        if not ids or min(ids) < 0 or len(set(ids)) != len(ids):
            raise ReplayError(f"options['env_ids'] must be distinct env indices >= 0, got {ids}")

        def per_env(key: str, default: Any) -> list[Any]:
            entry = options.get(key, default)
            if isinstance(entry, (list, tuple, np.ndarray)):
                if len(entry) != len(ids):
                    raise ReplayError(f"options[{key!r}] has {len(entry)} entries for {len(ids)} env_ids {ids}")
                return list(entry)
            return [entry] * len(ids)

        n_envs = max(len(self._episodes) if self._per_env else 1, max(ids) + 1)
        episodes = list(self._episodes) + [self._episodes[-1]] * (n_envs - len(self._episodes))
        steps = list(self._steps) + [self._steps[-1]] * (n_envs - len(self._steps))
        demos = per_env("demo_index", None)
        for i, episode, demo, step in zip(ids, per_env("episode_index", None), demos, per_env("step_index", 0),
                                          strict=True):
            if demo is not None:
                episode = self.dataset.episode_for_demo(_as_index(demo, "options['demo_index']"))
            episode = episodes[i] if episode is None else _as_index(episode, "options['episode_index']")
            step = 0 if step is None else _as_index(step, "options['step_index']")
            length = self._length(episode)  # DatasetError names the valid indices
            if not 0 <= step < length:
                raise ReplayError(f"step_index {step} is out of range for episode {episode} (length {length}); "
                                  f"valid steps are 0..{length - 1}")
            episodes[i], steps[i] = episode, step
        self._episodes, self._steps, self._per_env = episodes, steps, True
        return self._info(advance=0)


def make_replay_policy(
    dataset_path: str | Path,
    execution_horizon: int | None,
    *,
    embodiment_tag: str | EmbodimentTag | None = None,
    modality_config_path: str | Path | None = None,
    action_horizon: int = 16,
    strict: bool = True,
) -> ReplayPolicy:
    """A ReplayPolicy whose modality config comes from a JSON file, else the embodiment registry, else the dataset.

    An unregistered ``NEW_EMBODIMENT`` tag falls back to the config inferred from the dataset (every state,
    action and video key, the task-description language key, ``action_horizon`` action steps).
    """
    dataset = LeRobotDataset(dataset_path)
    if modality_config_path is not None:
        configs, _ = load_modality_config_file(modality_config_path)
    elif embodiment_tag is not None and not _is_unregistered_new_embodiment(embodiment_tag):
        configs = get_modality_configs(embodiment_tag)
    else:
        if embodiment_tag is not None:
            log.info("embodiment %s has no registered config; inferring one from %s", embodiment_tag, dataset.root)
        configs = dataset.infer_modality_configs(action_horizon)
    return ReplayPolicy(dataset, configs, execution_horizon, strict=strict)


def _is_unregistered_new_embodiment(tag: str | EmbodimentTag) -> bool:
    try:
        resolved = EmbodimentTag.resolve(tag)
    except ValueError:
        return False
    if resolved is not EmbodimentTag.NEW_EMBODIMENT:
        return False
    try:
        get_modality_configs(resolved)
    except ConfigError:
        return True
    return False
