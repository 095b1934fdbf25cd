"""ControlNet tile by tile: every window batch gets its own crop of each unit's inputs.

A1111 (sd-webui-controlnet) computes the control inside each UNet call from its units'
`hint_cond`; Forge computes it from each ControlNet's `cond_hint_original`. Before each
window batch the hints (and region masks) are replaced by the windows' crops, laid out in
the batch's rows; the originals are put back after the call, also when it fails.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from ..control import is_image_map, refusal, window_rows
from ..plan import Window
from ..settings import TITLE

# Preprocessors that correct each model call towards the whole image's latent.
A1111_WHOLE_IMAGE = ("colorfix", "inpaint_only")  # both VAE-encode the hint inside the UNet call
FORGE_WHOLE_IMAGE = ("tile_colorfix",)  # a UNet block modifier holding the whole latent


def _refused(names: list[str], whole_image: tuple[str, ...]) -> ValueError | None:
    """The error for the first unit that cannot run tile by tile, or None."""
    for name in names:
        reason = refusal(name, whole_image)
        if reason:
            return ValueError(f"{TITLE}: {reason}.")
    return None


class A1111Units:
    """sd-webui-controlnet's units (its `ControlParams`) for the pass being sampled.

    Spatial units get their hint cut to the windows; in the hires pass the hires hint, so
    that the unit's own size test (hint nearest to the call's size) still finds that pass.
    Reference units (attention injection) keep their whole image, their latent re-made at
    the call's row count.
    """

    def __init__(self, params: list[Any], latent_size: tuple[int, int], hires: bool):
        self.latent_size, self.hires = latent_size, hires
        self.spatial = []
        self.attention = []
        for param in params:
            kind = getattr(param.control_model_type, "name", "")
            hint = param.hr_hint_cond if hires and torch.is_tensor(param.hr_hint_cond) else param.hint_cond
            if kind == "AttentionInjection":
                self.attention.append(param)
            elif is_image_map(hint, latent_size):
                self.spatial.append((param, hint))
        # A T2I-Adapter repeats its output per row when cond and uncond are weighted apart,
        # which only works with one hint for the whole call: one window per call.
        self.one_window_per_call = any(
            getattr(param.control_model_type, "name", "") == "T2I_Adapter"
            and (param.cfg_injection or param.global_average_pooling)
            for param, _ in self.spatial
        )

    @contextmanager
    def around(self, batch: list[Window], rows: int) -> Iterator[None]:
        saved = [(p, p.hint_cond, p.hr_hint_cond, p.effective_region_mask) for p, _ in self.spatial]
        try:
            for param, hint in self.spatial:
                crop = window_rows(hint, batch, self.latent_size, rows)
                if self.hires:
                    param.hr_hint_cond = crop
                else:
                    param.hint_cond = crop  # its setter drops the hint the unit derived before
                    param.hr_hint_cond = None  # no size test: this is the first pass
                if torch.is_tensor(param.effective_region_mask):
                    param.effective_region_mask = window_rows(
                        param.effective_region_mask, batch, self.latent_size, rows
                    )
                _reset(param.control_model)  # T2I-Adapters keep their first result
            for param in self.attention:
                latent = param.used_hint_cond_latent
                if torch.is_tensor(latent) and latent.shape[0] != rows * len(batch):
                    param.used_hint_cond_latent = None  # re-made (from its VAE cache) for these rows
            yield
        finally:
            for param, hint, hr_hint, mask in saved:
                param.hint_cond, param.hr_hint_cond, param.effective_region_mask = hint, hr_hint, mask
                _reset(param.control_model)


def a1111_units(p: Any, latent_size: tuple[int, int]) -> A1111Units | None:
    """The job's ControlNet units (its script's hook holds them), or None without any."""
    for script in _scripts(p):
        params = getattr(getattr(script, "latest_network", None), "control_params", None)
        if params:
            error = _refused([_a1111_name(param) for param in params], A1111_WHOLE_IMAGE)
            if error:
                release_a1111(p)
                raise error
            return A1111Units(list(params), latent_size, bool(getattr(p, "is_hr_pass", False)))
    return None


def release_a1111(p: Any) -> None:
    """Undo sd-webui-controlnet's UNet hook before the extension fails a job on purpose.

    Its postprocess, which undoes the hook, does not run after a failed job; the next
    ControlNet job of the other tab (txt2img and img2img each have its script) would hook
    on top of the stale one and leave the UNet broken until a restart (seen in A1111 1.10.1).
    """
    for script in _scripts(p):
        network = getattr(script, "latest_network", None)
        if callable(getattr(network, "restore", None)):
            network.restore()
            script.latest_network = None


def _scripts(p: Any) -> list:
    return getattr(getattr(p, "scripts", None), "alwayson_scripts", None) or []


def _a1111_name(param: Any) -> str:
    preprocessor = getattr(param, "preprocessor", None)
    return str(preprocessor.get("name", "")) if isinstance(preprocessor, dict) else ""


def _reset(control_model: Any) -> None:
    reset = getattr(control_model, "reset", None)
    if callable(reset):
        reset()


class ForgeChain:
    """Forge's ControlNets (a linked list via `previous_controlnet`) for one pass.

    Forge would compute their control for the whole latent before the UNet wrapper; the
    wrapper takes the chain out of the conditions instead (see `take_control`) and asks it
    for each window batch, with each hint cut to the batch's windows and rows.
    """

    def __init__(self, head: Any, latent_size: tuple[int, int]):
        self.head, self.latent_size = head, latent_size
        self.nets = []
        net = head
        while net is not None:
            self.nets.append(net)
            net = net.previous_controlnet
        self._full: dict[int, torch.Tensor] = {}

    def control(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict, chunks: int) -> Any:
        """The chain's control for this call, as Forge's sampling function computes it."""
        options = cond.get("transformer_options")
        for net in self.nets:
            net.transformer_options = options  # per-row cond marks for soft weighting
        return self.head.get_control(x, sigma, dict(cond), chunks)

    @contextmanager
    def around(self, batch: list[Window], rows: int, chunks: int) -> Iterator[None]:
        fields = ("cond_hint_original", "cond_hint", "control_input", "advanced_mask_weighting")
        saved = [(net, {f: getattr(net, f) for f in fields if hasattr(net, f)}) for net in self.nets]
        try:
            for net in self.nets:
                # Forge resizes cond_hint_original to the call's size when cond_hint is unset;
                # given the windows' crops at their own size, that is the crops unchanged.
                # (a T2I-Adapter then drops its kept result too)
                net.cond_hint_original = window_rows(self._whole(net), batch, self.latent_size, rows, chunks)
                net.cond_hint = None
                mask = getattr(net, "advanced_mask_weighting", None)
                if torch.is_tensor(mask):
                    net.advanced_mask_weighting = window_rows(mask, batch, self.latent_size, rows, chunks)
            yield
        finally:
            for net, values in saved:
                for name, value in values.items():
                    setattr(net, name, value)

    def _whole(self, net: Any) -> torch.Tensor:
        """The hint at the whole latent's size, as Forge would make it for one call."""
        if id(net) not in self._full:
            from backend.misc.image_resize import adaptive_resize

            height, width = (8 * side for side in self.latent_size)
            hint = net.cond_hint_original
            if tuple(hint.shape[-2:]) != (height, width):
                hint = adaptive_resize(hint, width, height, "nearest-exact", "center")
            self._full[id(net)] = hint
        return self._full[id(net)]


def forge_refusal(p: Any) -> Exception | None:
    """A refused unit of Forge's built-in ControlNet script in this job, as an error."""
    for script in _scripts(p):
        units = getattr(script, "current_params", None)
        if isinstance(units, dict):
            names = [str(getattr(getattr(u, "preprocessor", None), "name", "")) for u in units.values()]
            error = _refused(names, FORGE_WHOLE_IMAGE)
            if error:
                return error
    return None
