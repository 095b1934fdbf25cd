"""Patches on single object instances, undone together (never on a class or a module)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


class InstancePatches:
    def __init__(self) -> None:
        self._patched: list[tuple[Any, str]] = []

    def set(self, owner: Any, name: str, function: Callable) -> None:
        owner.__dict__[name] = function  # an instance attribute shadows the class's method
        self._patched.append((owner, name))

    def remove(self) -> None:
        for owner, name in reversed(self._patched):
            owner.__dict__.pop(name, None)
        self._patched.clear()

    def __bool__(self) -> bool:
        return bool(self._patched)


class ScheduleRecorder:
    """Records the full schedule a sampler instance computes for its pass.

    Both hosts compute it inside `sample_img2img` with `sampler.get_sigmas(p, steps)`
    (timestep samplers: `get_timesteps`); recording it there gives exactly the sampler's
    own schedule, whatever the scheduler, step-count options or discarded sigmas.
    """

    def __init__(self, sampler: Any, patches: InstancePatches, to_sigmas: Callable | None = None):
        self.sigmas: torch.Tensor | None = None
        name = "get_sigmas" if hasattr(sampler, "get_sigmas") else "get_timesteps"
        if name == "get_timesteps" and to_sigmas is None:
            return  # no way to compare this sampler's levels: start sigmas stay unknown
        method = getattr(sampler, name)
        convert = to_sigmas or (lambda sigmas: sigmas)

        def recording(p, steps):
            result = method(p, steps)
            self.sigmas = convert(result)
            return result

        patches.set(sampler, name, recording)
