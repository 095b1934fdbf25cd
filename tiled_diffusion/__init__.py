"""Quadtree Tiled Diffusion: host-agnostic core (no WebUI imports here)."""

from .denoiser import TiledDenoiser
from .plan import Leaf, Plan, Window, build_plan
from .settings import PARAMETERS, Param, Settings, SettingsError

__all__ = [
    "PARAMETERS",
    "Leaf",
    "Param",
    "Plan",
    "Settings",
    "SettingsError",
    "TiledDenoiser",
    "Window",
    "build_plan",
]
