"""Offscreen render settings for the built-in robosuite environments."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class RenderSettings:
    """Model-level render options; ``None`` keeps robosuite's value.

    ``reflectance`` sets every material's reflectance (0 turns off the costly floor/table mirror pass);
    ``offscreen_samples`` is the MSAA sample count of the offscreen buffer (0 turns anti-aliasing off).
    """

    reflectance: float | None = None
    offscreen_samples: int | None = None


FAST = RenderSettings(reflectance=0.0, offscreen_samples=0)
DEFAULT = RenderSettings()
PRESETS: dict[str, RenderSettings] = {"fast": FAST, "default": DEFAULT}


def resolve_render_settings(settings: str | RenderSettings) -> RenderSettings:
    """Preset name ("fast" or "default") or a RenderSettings instance -> RenderSettings."""
    if isinstance(settings, RenderSettings):
        return settings
    try:
        return PRESETS[settings]
    except KeyError:
        raise ValueError(f"unknown render settings {settings!r}; expected one of {sorted(PRESETS)}") from None


def render_settings_name(settings: str | RenderSettings) -> str | dict[str, Any]:
    """The preset name of ``settings`` ("fast", "default"), else its fields as a dict (for reports)."""
    settings = resolve_render_settings(settings)
    for name, preset in PRESETS.items():
        if preset == settings:
            return name
    return {"reflectance": settings.reflectance, "offscreen_samples": settings.offscreen_samples}


def apply_render_settings(rs_env: Any, settings: RenderSettings) -> None:
    """Apply ``settings`` to a robosuite env's current model and offscreen context (idempotent).

    Call after every robosuite reset that may have rebuilt the simulation.
    """
    sim = rs_env.sim
    model = sim.model._model
    if settings.reflectance is not None:
        model.mat_reflectance[:] = settings.reflectance
    if settings.offscreen_samples is None:
        return
    model.vis.quality.offsamples = settings.offscreen_samples
    ctx = getattr(sim, "_render_context_offscreen", None)
    if ctx is not None and ctx.con.offSamples != settings.offscreen_samples:
        # The MSAA sample count is fixed when the MuJoCo render context is created: rebuild it.
        ctx.gl_ctx.make_current()
        ctx.con.free()
        ctx._set_mujoco_context_and_buffers()
