"""Exact capture and restore of a robosuite environment's state.

``sim.set_state_from_flattened`` alone drifts: bitwise-identical replay also needs the model XML
(robosuite randomises e.g. the Lift cube size when it builds the model), MuJoCo's constraint-solver
warm start (``qacc_warmstart``: the solver's starting point, so contact forces differ in the last bits
without it), each gripper's integrated command and the OSC controller's nullspace posture. The
controllers' cached kinematics are recomputed from the restored state, as :func:`refresh_controllers`
does after every reset.
"""

from __future__ import annotations

from typing import Any

import numpy as np

STATE_KEYS = ("states", "model_file", "gripper_action", "initial_joint")
"""Required fields of a state dict. Optional: ``warmstart`` (float64, nv; states saved without it
restore with a zero warm start, which can differ from the saving run in the last bits once objects
touch) and ``step`` (elapsed env steps of the episode)."""


def _robot(rs_env: Any) -> Any:
    return rs_env.robots[0]


def _grippers(rs_env: Any) -> list[Any]:
    robot = _robot(rs_env)
    return [robot.gripper[arm] for arm in robot.arms if robot.has_gripper[arm]]


def _arm_controllers(rs_env: Any) -> list[Any]:
    robot = _robot(rs_env)
    return [robot.part_controllers[arm] for arm in robot.arms]


def gripper_action(rs_env: Any) -> np.ndarray:
    """Current integrated gripper commands of all grippers, one value per gripper actuator (float64)."""
    parts = [
        np.broadcast_to(np.asarray(g.current_action, dtype=np.float64), (len(g.actuators),)) for g in _grippers(rs_env)
    ]
    return np.concatenate(parts) if parts else np.zeros(0)


def initial_joint(rs_env: Any) -> np.ndarray:
    """Nullspace posture target of all arm controllers (float64)."""
    return np.concatenate([np.asarray(c.initial_joint, dtype=np.float64) for c in _arm_controllers(rs_env)])


def refresh_controllers(rs_env: Any) -> None:
    """Recompute every part controller's cached kinematics (Jacobians, mass matrix, poses) from the sim.

    robosuite builds the controllers during a reset before it sets the gripper joints, and the first
    step of an episode uses those cached values; refreshing them makes that step a function of the
    simulator state alone, like every later one.
    """
    for controller in _robot(rs_env).part_controllers.values():
        controller.update(force=True)


def capture_state(rs_env: Any, model_xml: str) -> dict[str, Any]:
    """Everything needed to restore ``rs_env`` exactly, as plain numpy arrays and a str.

    ``model_xml`` is the XML the current sim was built from (robosuite's ``env.model.get_xml()``
    at build time, or the XML last restored).
    """
    return {
        "states": np.asarray(rs_env.sim.get_state().flatten(), dtype=np.float64).copy(),
        "model_file": model_xml,
        "gripper_action": gripper_action(rs_env),
        "initial_joint": initial_joint(rs_env),
        "warmstart": np.array(rs_env.sim.data.qacc_warmstart, dtype=np.float64),
    }


def restore_state(rs_env: Any, state: dict[str, Any], current_xml: str | None) -> bool:
    """Restore ``state`` into ``rs_env``; returns True when the model was rebuilt from the state's XML.

    The model is rebuilt only when the state's XML differs from ``current_xml``; otherwise the sim is
    reset in place (fresh MuJoCo data), which is equivalent and much cheaper.
    """
    missing = [k for k in STATE_KEYS if k not in state]
    if missing:
        raise KeyError(f"state dict lacks {missing}; expected keys {list(STATE_KEYS)}")
    xml = state["model_file"]
    if isinstance(xml, bytes):
        xml = xml.decode()
    rebuilt = xml != current_xml
    if rebuilt:
        rs_env.reset_from_xml_string(xml)
    else:
        rs_env.deterministic_reset = True
        try:
            rs_env.reset()
        finally:
            rs_env.deterministic_reset = False
    rs_env.sim.set_state_from_flattened(np.asarray(state["states"], dtype=np.float64))
    rs_env.sim.forward()
    warmstart = state.get("warmstart")
    if warmstart is not None:  # after forward(), which reads it but never writes it
        rs_env.sim.data.qacc_warmstart[:] = np.asarray(warmstart, dtype=np.float64)

    commands = np.asarray(state["gripper_action"], dtype=np.float64).ravel()
    offset = 0
    for g in _grippers(rs_env):
        n = len(g.actuators)
        g.current_action = commands[offset : offset + n].copy()
        offset += n
    posture = np.asarray(state["initial_joint"], dtype=np.float64).ravel()
    offset = 0
    for c in _arm_controllers(rs_env):
        n = len(c.initial_joint)
        c.update_initial_joints(posture[offset : offset + n].copy())
        offset += n
    refresh_controllers(rs_env)
    return rebuilt
