"""Cross-attention maps of a UNet: how much each image position attends to each text token.

"Words where they are" runs the model once on the init image and reads, in every
cross-attention layer, the softmax of the image queries against the prompt's keys. The
layers are found by their shape, so the same code reads A1111's and Forge's UNets and
diffusers' one: a module named `attn2` (the UNets' cross-attention) with `to_q`, `to_k`
and `heads`. The maps are recomputed from the layer's own projections in a forward hook,
so whatever attention kernel the host installed (sdp, xformers, sub-quadratic) runs
untouched.
"""

from __future__ import annotations

import math

import torch

CONTEXT_NAMES = ("context", "encoder_hidden_states")  # ldm / Forge, diffusers


class CrossAttentionMaps:
    """While active (a `with` block), sums the head-averaged attention probabilities of every
    cross-attention layer of `unet`, resized to `size` (latent pixels): `maps` is
    [rows, tokens, H, W] after the block (None if no layer ran)."""

    def __init__(self, unet: torch.nn.Module, size: tuple[int, int]):
        self.size = size
        self.layers = [
            module
            for name, module in unet.named_modules()
            if name.split(".")[-1] == "attn2" and all(hasattr(module, a) for a in ("to_q", "to_k", "heads"))
        ]
        if not self.layers:
            raise ValueError(f"no cross-attention layers (attn2) found in {type(unet).__name__}")
        self.maps: torch.Tensor | None = None
        self.calls = 0
        self._handles: list = []

    def __enter__(self) -> CrossAttentionMaps:
        for layer in self.layers:
            self._handles.append(layer.register_forward_hook(self._record, with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @torch.no_grad()
    def _record(self, layer, args, kwargs, output) -> None:
        x = args[0] if args else kwargs.get("x", kwargs.get("hidden_states"))
        context = next((kwargs[n] for n in CONTEXT_NAMES if kwargs.get(n) is not None), None)
        if context is None and len(args) > 1:
            context = args[1]
        if x is None or context is None or x.ndim != 3:
            return
        q = layer.to_q(x).float()
        k = layer.to_k(context).float()
        heads = int(layer.heads)
        rows, positions, width = q.shape
        q = q.reshape(rows, positions, heads, width // heads).transpose(1, 2)
        k = k.reshape(k.shape[0], k.shape[1], heads, width // heads).transpose(1, 2)
        if k.shape[0] != rows:
            k = k.expand(rows, *k.shape[1:])
        probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(width // heads), dim=-1).mean(1)
        height, width_ = _grid(positions, self.size)
        grid = probs.transpose(1, 2).reshape(rows, -1, height, width_)
        grid = torch.nn.functional.interpolate(grid, size=self.size, mode="bilinear", align_corners=False)
        self.maps = grid if self.maps is None else self.maps + grid
        self.calls += 1


def _grid(positions: int, size: tuple[int, int]) -> tuple[int, int]:
    """The (height, width) of a layer's `positions` queries on a latent of `size`: the
    latent downsampled by a power of two (rounded up, as the UNets' strided convs do)."""
    height, width = size
    for level in range(8):
        h, w = -(-height // 2**level), -(-width // 2**level)
        if h * w == positions:
            return h, w
    raise ValueError(f"{positions} attention positions do not fit a {width}x{height} latent")


def phrase_maps(maps: torch.Tensor, positions: dict[str, list[tuple[int, int]]]) -> dict[str, torch.Tensor]:
    """Each phrase's attention map [H, W]: the maps of its tokens added; `maps` is
    [rows, tokens, H, W] (a row per sub-prompt), positions are (row, token) pairs."""
    return {
        phrase: sum(maps[row, token] for row, token in where) for phrase, where in positions.items() if where
    }


def native_size(latent_size: tuple[int, int], side: int, multiple: int = 8) -> tuple[int, int]:
    """A latent of about side x side pixels with the aspect ratio of `latent_size`, each side a
    multiple of `multiple` (what the UNet's downsampling needs)."""
    height, width = latent_size
    scale = side / math.sqrt(height * width)
    return tuple(max(multiple, round(v * scale / multiple) * multiple) for v in (height, width))
