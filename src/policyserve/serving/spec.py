"""Build a served policy from a small, picklable description (what ``policyserve serve``'s flags say).

The same :class:`PolicySpec` builds the policy in the server process or inside each Ray replica, so a
replica loads the checkpoint (or dataset) itself.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from ..policies.base import BasePolicy

DEFAULT_EMBODIMENT = "franka_panda"


@dataclass(frozen=True)
class PolicySpec:
    """Which policy to serve. Source, first match wins: ``model_path`` (a trained checkpoint),
    ``dataset_path`` (replay a LeRobot dataset), ``policy="scripted:<task>"`` (the simulation's
    scripted expert), otherwise the constant policy for the modality config."""

    model_path: str | None = None
    """Checkpoint directory (model mode)."""
    device: str = "cpu"
    """Torch device for model mode (cpu, cuda, cuda:0)."""
    dataset_path: str | None = None
    """LeRobot dataset to replay (replay mode)."""
    execution_horizon: int | None = None
    """Replay: steps the cursor advances per get_action (default: the action horizon)."""
    action_horizon: int = 16
    """Replay: action chunk length when the modality config is inferred from the dataset."""
    policy: str | None = None
    """Built-in policy: ``scripted:lift``, ``scripted:stack`` or ``constant``."""
    embodiment_tag: str | None = None
    """Embodiment tag name or value (GR1, NEW_EMBODIMENT, franka_panda, ...)."""
    modality_config_path: str | None = None
    """JSON file of modality configs."""
    strict: bool = True
    """Validate observations and actions against the modality config."""
    sim_wrapper: bool = False
    """Wrap in :class:`~policyserve.policies.sim_wrapper.SimPolicyWrapper` (flat GR00T sim-env keys)."""

    @property
    def mode(self) -> str:
        """"model", "replay", "scripted" or "constant"."""
        if self.model_path:
            return "model"
        if self.dataset_path:
            return "replay"
        if self.policy and self.policy.startswith("scripted"):
            return "scripted"
        return "constant"

    @property
    def stateful(self) -> bool:
        """True when the policy keeps per-client state between calls (replay cursors, the scripted
        expert's phases): all of a client's calls must reach the same policy object."""
        return self.mode in ("replay", "scripted")

    def build(self) -> BasePolicy:
        """The policy this spec describes; :class:`ConfigError` for an unknown ``policy`` name."""
        policy = self._build_inner()
        if self.sim_wrapper:
            from ..policies.sim_wrapper import SimPolicyWrapper

            policy = SimPolicyWrapper(policy, strict=self.strict)
        return policy

    def _build_inner(self) -> BasePolicy:
        mode = self.mode
        if mode == "model":
            from ..model import load_policy

            return load_policy(self.model_path, embodiment_tag=self.embodiment_tag,  # type: ignore[arg-type]
                               device=self.device, strict=self.strict)
        if mode == "replay":
            from ..policies.replay import make_replay_policy

            return make_replay_policy(
                self.dataset_path, self.execution_horizon,  # type: ignore[arg-type]
                embodiment_tag=self.embodiment_tag, modality_config_path=self.modality_config_path,
                action_horizon=self.action_horizon, strict=self.strict,
            )
        if mode == "scripted":
            from ..sim.scripted import make_scripted_policy

            _, _, task = self.policy.partition(":")  # type: ignore[union-attr]
            return make_scripted_policy(task or "lift")
        if self.policy not in (None, "constant"):
            raise ConfigError(f"policy {self.policy!r} is unknown; expected scripted:lift, scripted:stack or constant")
        from ..registry import get_embodiment_spec, load_modality_config_file
        from ..policies.constant import ConstantPolicy

        if self.modality_config_path:
            configs, dims = load_modality_config_file(self.modality_config_path)
        else:
            embodiment = get_embodiment_spec(self.embodiment_tag or DEFAULT_EMBODIMENT)
            configs, dims = embodiment.modality_configs, embodiment.dims
        return ConstantPolicy(configs, dims, strict=self.strict)

