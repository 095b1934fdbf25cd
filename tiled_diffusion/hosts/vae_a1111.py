"""AUTOMATIC1111 WebUI 1.10: the tiled VAE for one job.

A1111 reaches the VAE only through `sd_model.decode_first_stage(z)`, which calls
`first_stage_model.decode(z / scale_factor)` = `decoder(post_quant_conv(z))`, and
`encode_first_stage(x)` = `first_stage_model.encode(x)`, which wraps
`quant_conv(encoder(x))` in a DiagonalGaussianDistribution (SDXL's wrapper samples it).
The hook replaces `forward` on the two instances `first_stage_model.encoder` and
`.decoder`, so everything A1111 does around them still happens: --medvram and --lowvram
replace `first_stage_model.encode/decode` on the instance to move the VAE to the GPU
first, the posterior is built and sampled as usual, and the 1x1 quant convolutions
(cheap) run untiled.

`remove` undoes it; the job's Preparation (webui.py) calls it after the job and when A1111
closes the job (`with closing(p)`, on success, exception or interrupt alike).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..vae import ATTENTION_OVERLAP, decoder_steps, should_tile, tiled_decode, tiled_encode


class VaeHook:
    """Tiled VAE encode and decode for images larger than `threshold` x `threshold` px."""

    def __init__(self, vae: Any, tile: int, threshold: int, log: Callable[[str], None] | None = None):
        self.tile, self.threshold, self.log = tile, threshold, log
        self.encoder, self.decoder = vae.encoder, vae.decoder
        self.factor = decoder_steps(self.decoder)[1]  # image px per latent px
        self._restore: list[tuple[Any, str, Any]] = []

    def install(self) -> VaeHook:
        decode, encode = self.decoder.forward, self.encoder.forward

        def decoder_forward(z: torch.Tensor, **kwargs) -> torch.Tensor:
            height, width = z.shape[-2] * self.factor, z.shape[-1] * self.factor
            if kwargs or not should_tile(width, height, self.threshold):
                return decode(z, **kwargs)
            self._note(f"tiled VAE decode, {width} x {height} px")
            return tiled_decode(self.decoder, z, tile=self.tile, attention_overlap=ATTENTION_OVERLAP)

        def encoder_forward(x: torch.Tensor) -> torch.Tensor:
            height, width = x.shape[-2:]
            fits = height % self.factor == 0 and width % self.factor == 0
            if not fits or not should_tile(width, height, self.threshold):
                return encode(x)
            self._note(f"tiled VAE encode, {width} x {height} px")
            return tiled_encode(self.encoder, x, tile=self.tile, attention_overlap=ATTENTION_OVERLAP)

        self._set(self.decoder, "forward", decoder_forward)
        self._set(self.encoder, "forward", encoder_forward)
        return self

    def remove(self) -> None:
        """Restore what the instances had before `install` (safe to call more than once)."""
        while self._restore:
            owner, name, before = self._restore.pop()
            if before is None:
                owner.__dict__.pop(name, None)
            else:
                owner.__dict__[name] = before

    def _set(self, owner: Any, name: str, function: Callable) -> None:
        self._restore.append((owner, name, owner.__dict__.get(name)))
        owner.__dict__[name] = function  # an instance attribute shadows the class's method

    def _note(self, text: str) -> None:
        if self.log:
            self.log(text)
