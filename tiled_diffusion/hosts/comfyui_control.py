"""ComfyUI's ControlNets per window: each window batch gets the control of its own hint crops.

ComfyUI computes a cond's ControlNet control in `_calc_cond_batch`, for the whole latent
of the call, before any model wrapper runs: the tiled model would throw it away, and at
4K it is the memory peak. A CALC_COND_BATCH wrapper takes the ControlNets out of copies
of the conds (`without_control`), and the tiled model asks the chain for each window
batch with every hint cut to the batch's windows (`ComfyChain`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from ..control import window_rows
from ..plan import Window
from ..settings import TITLE

CALC_COND_BATCH = "calc_cond_batch"  # comfy.patcher_extension.WrappersMP.CALC_COND_BATCH


def without_control(conds: list) -> tuple[Any, list]:
    """The ControlNet chain's head that every cond entry carries (None without any), and
    copies of the conds without it.

    ComfyUI batches entries with different ControlNets into separate model calls; the
    tiled model computes one chain's control for all rows of a call, so mixed entries are refused.
    """
    entries = [entry for cond in conds if cond for entry in cond]
    heads = {id(entry.get("control")): entry.get("control") for entry in entries}
    if len(heads) > 1:
        raise RuntimeError(
            f"{TITLE}: this sampler's conditionings carry different ControlNets (or some carry none); "
            "per window that is not supported. Apply the same ControlNet to the positive and negative."
        )
    head = next(iter(heads.values()), None)
    if head is None:
        return None, conds
    stripped = [
        None if cond is None else [{k: v for k, v in entry.items() if k != "control"} for entry in cond]
        for cond in conds
    ]
    return head, stripped


class ComfyChain:
    """ComfyUI's ControlNets of a sampler run (a linked list via `previous_controlnet`).

    `ControlNet.get_control` rebuilds its `cond_hint` from `cond_hint_original` only when
    `cond_hint` is None or of another size, and keeps it: windows of one size would all
    get the first window's hint. So before each window batch every net's original is
    replaced by the windows' crops of its hint at the whole latent's size, and `cond_hint`
    is dropped; ComfyUI then resizes the crops to their own size (no change) and does its
    own preprocessing, VAE encoding, dtype and device.
    """

    def __init__(self, head: Any, latent_size: tuple[int, int]):
        self.head, self.latent_size = head, latent_size
        self.nets = []
        net = head
        while net is not None:
            _check(net)
            self.nets.append(net)
            net = net.previous_controlnet
        self._whole: dict[int, list[torch.Tensor]] = {}  # per net: hint and extra concat maps

    def control(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict, batched_number: int) -> Any:
        """The chain's control for a model call, as `_calc_cond_batch` asks for it."""
        return self.head.get_control(x, sigma, cond, batched_number, cond.get("transformer_options") or {})

    @contextmanager
    def around(self, batch: list[Window], rows: int, chunks: int) -> Iterator[None]:
        """The nets set up with the crops of a window batch (`rows` rows per window), put back after."""
        saved = [(net, net.cond_hint_original, net.cond_hint, net.extra_concat_orig) for net in self.nets]
        try:
            for net in self.nets:
                hint, *extra = self._whole_size(net)
                net.cond_hint_original = window_rows(hint, batch, self.latent_size, rows, chunks)
                net.extra_concat_orig = [window_rows(m, batch, self.latent_size, rows, chunks) for m in extra]
                net.cond_hint = None
            yield
        finally:
            for net, original, hint, extra in saved:
                net.cond_hint_original, net.cond_hint, net.extra_concat_orig = original, hint, extra

    def _whole_size(self, net: Any) -> list[torch.Tensor]:
        """The net's hint and extra concat maps resized to the whole latent, as ComfyUI
        resizes them for a call on the whole latent (center crop, the net's algorithm)."""
        if id(net) not in self._whole:
            from comfy.utils import common_upscale

            vae = getattr(net, "vae", None)  # a hint in latent space is encoded after the resize
            ratio = net.compression_ratio * (vae.spacial_compression_encode() if vae is not None else 1)
            height, width = (ratio * side for side in self.latent_size)
            maps = [net.cond_hint_original, *net.extra_concat_orig]
            self._whole[id(net)] = [
                common_upscale(m, width, height, net.upscale_algorithm, "center") for m in maps
            ]
        return self._whole[id(net)]


def _check(net: Any) -> None:
    """Refuse, by name, a control that cannot be given a window's crops."""
    kind = type(net).__name__
    if not any(cls.__name__ == "ControlNet" for cls in type(net).__mro__):
        raise ValueError(
            f"{TITLE}: '{kind}' cannot run per window; only ComfyUI's ControlNet models (and their kinds, "
            "e.g. ControlLora) are supported. Apply it without the tiled model."
        )
    maps = [net.cond_hint_original, *net.extra_concat_orig]
    if not all(isinstance(m, torch.Tensor) and m.ndim == 4 for m in maps):
        raise ValueError(
            f"{TITLE}: the {kind}'s hint is not an image ([N, C, H, W]), so it cannot be cut to the windows. "
            "Apply it without the tiled model."
        )
