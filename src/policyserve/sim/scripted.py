"""Scripted experts for the built-in tasks, as a step-wise controller and as a servable policy.

The expert is a proportional controller on the end-effector and cube positions that walks through
pick phases (approach above the cube, descend, close, then lift, or carry and place on the base cube
and release). It reads the env's own observation dict (``eef_pos``, ``gripper_pos`` and the cube
positions) and keeps only its phase between steps.
"""

from __future__ import annotations

import copy
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..policies.base import Action, ActionRequest, BasePolicy, Info, Observation
from ..registry import get_embodiment_spec
from ..types import ModalityConfig, ModalityConfigs, ModalityDims
from .envs import get_task

POS_SCALE = 0.05
"""Metres of end-effector motion per unit of position action (robosuite OSC_POSE default)."""

TRACKING = 0.1
"""Fraction of a commanded position delta the arm covers within one 20 Hz step (measured)."""


@dataclass
class ExpertConfig:
    """Gains and thresholds of the scripted expert (metres, steps)."""

    gain: float = 0.6
    hover: float = 0.06
    xy_tol: float = 0.008
    z_tol: float = 0.008
    grasp_steps: int = 8
    lift_height: float = 0.15
    release_steps: int = 8
    place_gap: float = 0.01
    lost_dist: float = 0.05
    held_width: float = 0.05


@dataclass(frozen=True)
class _Targets:
    """Observation keys of the object to pick and, for stacking, the object to place it on."""

    pick: str
    place_on: str | None = None
    pick_half: float = 0.02
    base_half: float = 0.025


_TARGETS: dict[str, _Targets] = {"lift": _Targets("cube_pos"), "stack": _Targets("cube_a_pos", "cube_b_pos")}

STATE_KEYS: dict[str, list[str]] = {"lift": ["cube_pos"], "stack": ["cube_a_pos", "cube_b_pos"]}
"""Observation keys, beyond the Franka proprioception, the expert reads per task."""


class ScriptedExpert:
    """Phase-based proportional pick(-and-place) controller: ``act(obs) -> float32 (7,)`` action."""

    PHASES = ("approach", "descend", "grasp", "lift", "carry", "lower", "release", "retreat")

    def __init__(self, task: str, config: ExpertConfig | None = None) -> None:
        self.task = get_task(task).name
        self.config = config or ExpertConfig()
        self.targets = _TARGETS[self.task]
        self.reset()

    def reset(self) -> None:
        """Start a new episode from the approach phase."""
        self.phase = "approach"
        self.counter = 0
        self.lift_z: float | None = None

    def _goto(self, eef: np.ndarray, target: np.ndarray, gripper: float) -> np.ndarray:
        action = np.zeros(7, dtype=np.float32)
        action[:3] = np.clip(self.config.gain * (target - eef) / POS_SCALE, -1.0, 1.0)
        action[6] = gripper
        return action

    def _set(self, phase: str) -> None:
        self.phase, self.counter = phase, 0

    def act(self, obs: dict[str, Any]) -> np.ndarray:
        """Action for the current observation; advances the phase."""
        cfg, tg = self.config, self.targets
        eef = np.asarray(obs["eef_pos"], dtype=np.float64)
        cube = np.asarray(obs[tg.pick], dtype=np.float64)
        err = cube - eef
        holding_phases = ("lift", "carry", "lower")
        if self.phase in holding_phases and np.linalg.norm(err) > cfg.lost_dist:
            self._set("approach")  # dropped the cube: start over
        self.counter += 1

        if self.phase == "approach":
            above = cube + np.array([0.0, 0.0, cfg.hover])
            if np.linalg.norm(err[:2]) < cfg.xy_tol and eef[2] < above[2] + 2 * cfg.z_tol:
                self._set("descend")
            else:
                return self._goto(eef, above, -1.0)
        if self.phase == "descend":
            if np.linalg.norm(err[:2]) > 2.5 * cfg.xy_tol:
                self._set("approach")
                return self._goto(eef, cube + np.array([0.0, 0.0, cfg.hover]), -1.0)
            if np.linalg.norm(err) < cfg.z_tol:
                self._set("grasp")
            else:
                return self._goto(eef, cube, -1.0)
        if self.phase == "grasp":
            width = float(np.asarray(obs["gripper_pos"])[0] - np.asarray(obs["gripper_pos"])[1])
            if self.counter <= cfg.grasp_steps or width > cfg.held_width:
                return self._goto(eef, cube, 1.0)
            self.lift_z = float(cube[2] + cfg.lift_height)
            self._set("lift" if tg.place_on is None else "carry")
        if self.phase == "lift":
            assert self.lift_z is not None
            return self._goto(eef, np.array([eef[0], eef[1], self.lift_z]), 1.0)

        base = np.asarray(obs[tg.place_on], dtype=np.float64) if tg.place_on else None
        if self.phase == "carry":
            assert base is not None and self.lift_z is not None
            height = max(self.lift_z, base[2] + tg.base_half + 2 * tg.pick_half + cfg.hover)
            goal = np.array([base[0], base[1], height]) - (cube - eef) * np.array([1.0, 1.0, 0.0])
            if np.linalg.norm((base - cube)[:2]) < cfg.xy_tol and abs(goal[2] - eef[2]) < 2 * cfg.z_tol:
                self._set("lower")
            else:
                return self._goto(eef, goal, 1.0)
        if self.phase == "lower":
            assert base is not None
            place_z = base[2] + tg.base_half + tg.pick_half + cfg.place_gap
            goal = eef + np.array([base[0] - cube[0], base[1] - cube[1], place_z - cube[2]])
            if abs(place_z - cube[2]) < cfg.z_tol:
                self._set("release")
            else:
                return self._goto(eef, goal, 1.0)
        if self.phase == "release":
            if self.counter <= cfg.release_steps:
                return self._goto(eef, eef, -1.0)
            self._set("retreat")
        # retreat: move up with the gripper open
        return self._goto(eef, eef + np.array([0.0, 0.0, POS_SCALE]), -1.0)


def rollout_chunk(
    expert: ScriptedExpert, obs: dict[str, Any], horizon: int, commit_steps: int = 0
) -> tuple[np.ndarray, ScriptedExpert]:
    """Actions (horizon, 7) from running a copy of ``expert`` on an idealised prediction from ``obs``.

    The end-effector is assumed to cover ``TRACKING`` of each commanded delta, a held cube moves with it,
    and the gripper and other objects stay put. Also returns the copy's state after ``commit_steps``
    steps (the expert to use at the next call when that many actions are executed).
    """
    sim = copy.deepcopy(expert)
    committed = sim
    pred = {k: np.array(v, dtype=np.float64) for k, v in obs.items()}
    actions = np.zeros((horizon, 7), dtype=np.float32)
    for t in range(horizon):
        if t == commit_steps:
            committed = copy.deepcopy(sim)
        action = sim.act(pred)
        actions[t] = action
        delta = action[:3].astype(np.float64) * POS_SCALE * TRACKING
        if sim.phase in ("lift", "carry", "lower"):
            pred[sim.targets.pick] = pred[sim.targets.pick] + delta
        pred["eef_pos"] = pred["eef_pos"] + delta
    return actions, (sim if commit_steps >= horizon else committed)


class ScriptedPolicy(BasePolicy):
    """The scripted expert as a :class:`BasePolicy` over the ``franka_panda`` modality config.

    The config is ``franka_panda``'s plus the cube position state keys the expert reads
    (lift: ``cube_pos``; stack: ``cube_a_pos``, ``cube_b_pos``) and no video keys. ``get_action``
    returns ``{"arm": float32 (B, H, 6), "gripper": float32 (B, H, 1)}`` predicted by rolling the expert
    forward on a kinematic model; one expert (phase) is kept per batch index and advanced as if the
    client executed ``n_action_steps`` actions of each chunk (the phases also re-sync from the observed
    positions and gripper opening, so other execution lengths still work, with different timing).
    ``reset({"env_ids": [...]})`` resets only those batch indices; ``reset()`` resets all.

    Served, each client keeps its own experts (keyed by client and batch index), so requests from
    several clients are answered in one call and one client's reset leaves the others' phases alone.
    That state is bounded: at most :attr:`MAX_CLIENTS` clients (the least recently served is forgotten
    first) and a client idle for :attr:`CLIENT_IDLE_S` seconds is forgotten (it restarts from the
    observed state, as after a reset).
    """

    batchable = True
    MAX_CLIENTS = 1024
    """Clients whose experts are kept; serving one more forgets the least recently served."""
    CLIENT_IDLE_S = 600.0
    """A client not served for this long is forgotten."""

    def __init__(self, task: str, action_horizon: int = 16, *, n_action_steps: int = 8, strict: bool = True,
                 config: ExpertConfig | None = None) -> None:
        super().__init__(strict=strict)
        self.task = get_task(task).name
        self.action_horizon = action_horizon
        self.n_action_steps = max(1, min(n_action_steps, action_horizon))
        self.expert_config = config or ExpertConfig()
        # client -> (last served, monotonic; {batch index: expert}), least recently served first
        self._clients: OrderedDict[str, tuple[float, dict[int, ScriptedExpert]]] = OrderedDict()
        spec = get_embodiment_spec("franka_panda")
        base = spec.modality_configs
        self._state_keys = list(base["state"].modality_keys) + STATE_KEYS[self.task]
        action = copy.deepcopy(base["action"])
        action.delta_indices = list(range(action_horizon))
        self._config: ModalityConfigs = {
            "video": ModalityConfig(delta_indices=[0], modality_keys=[]),
            "state": ModalityConfig(delta_indices=list(base["state"].delta_indices), modality_keys=self._state_keys),
            "action": action,
            "language": copy.deepcopy(base["language"]),
        }
        self._dims = ModalityDims(
            state={**spec.dims.state, **{k: 3 for k in STATE_KEYS[self.task]}}, action=dict(spec.dims.action)
        )

    def get_modality_config(self) -> ModalityConfigs:
        return self._config

    def get_modality_dims(self) -> ModalityDims:
        return self._dims

    def reset(self, options: dict | None = None) -> Info:
        return self.serve_reset(options)

    def serve_reset(self, options: dict | None = None, client: str = "") -> Info:
        env_ids = (options or {}).get("env_ids")
        if env_ids is None:
            self._clients.pop(client, None)
        elif client in self._clients:
            experts = self._clients[client][1]
            for i in {int(i) for i in env_ids}:
                experts.pop(i, None)
        return {}

    def _get_action(self, observation: Observation, options: dict | None = None) -> tuple[Action, Info]:
        return self._act(observation, "")

    def serve_batch(self, requests: Sequence[ActionRequest]) -> list[tuple[Action, Info] | Exception]:
        """Every request in one call, each client's envs keeping their own expert (phase)."""
        return [self._outcome(lambda r=r: self._checked(r)) for r in requests]

    def _checked(self, request: ActionRequest) -> tuple[Action, Info]:
        rows = self.check_observation(request.observation) if self.strict else None
        self.check_options(request.options, rows)
        return self._act(request.observation, request.client)

    def _act(self, observation: Observation, client: str) -> tuple[Action, Info]:
        state = observation["state"]
        batch = next(iter(state.values())).shape[0]
        chunks = np.zeros((batch, self.action_horizon, 7), dtype=np.float32)
        phases = []
        experts = self._touch(client)
        for b in range(batch):
            expert = experts.get(b) or ScriptedExpert(self.task, self.expert_config)
            obs = {k: np.asarray(state[k][b, -1], dtype=np.float64) for k in self._state_keys}
            chunks[b], experts[b] = rollout_chunk(expert, obs, self.action_horizon, self.n_action_steps)
            phases.append(experts[b].phase)
        action = {"arm": chunks[:, :, :6].copy(), "gripper": chunks[:, :, 6:].copy()}
        return action, {"phase": phases}


    def _touch(self, client: str) -> dict[int, ScriptedExpert]:
        """``client``'s experts, marked served now; clients idle too long or past :attr:`MAX_CLIENTS` are
        forgotten (least recently served first)."""
        now = time.monotonic()
        experts = self._clients.pop(client, (now, {}))[1]
        while self._clients:
            oldest, (seen, _) = next(iter(self._clients.items()))
            if len(self._clients) < self.MAX_CLIENTS and now - seen < self.CLIENT_IDLE_S:
                break
            del self._clients[oldest]
        self._clients[client] = (now, experts)
        return experts

    @property
    def clients(self) -> int:
        """Clients whose experts are kept."""
        return len(self._clients)

    @property
    def experts(self) -> dict[tuple[str, int], ScriptedExpert]:
        """Every kept expert by (client, batch index)."""
        return {(c, b): e for c, (_, experts) in self._clients.items() for b, e in experts.items()}


def make_scripted_policy(task: str, action_horizon: int = 16, **kwargs: Any) -> ScriptedPolicy:
    """The scripted expert policy for ``task`` ("lift" or "stack"), e.g. for ``--policy scripted:lift``."""
    return ScriptedPolicy(task, action_horizon, **kwargs)
