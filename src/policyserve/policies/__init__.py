"""Policies: the base interface, wrappers and built-in implementations."""

from .base import Action, BasePolicy, Info, Observation, PolicyWrapper

__all__ = ["Action", "BasePolicy", "Info", "Observation", "PolicyWrapper"]
