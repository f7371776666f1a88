"""Policies: the base interface, wrappers and built-in implementations."""

from .base import Action, BasePolicy, Info, Observation, PolicyWrapper
from .constant import ConstantPolicy
from .sim_wrapper import Gr00tSimPolicyWrapper, SimPolicyWrapper

__all__ = [
    "Action", "BasePolicy", "ConstantPolicy", "Gr00tSimPolicyWrapper", "Info", "Observation", "PolicyWrapper",
    "SimPolicyWrapper",
]
