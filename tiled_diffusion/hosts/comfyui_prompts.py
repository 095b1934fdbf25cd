"""ComfyUI: what each window is told. A window whose tiles lie in regions gets the job's
positive conditioning with each region prompt's encoding appended (ComfyUI's "Conditioning
(Concat)", window by window); its negative rows are the job's.

ComfyUI hands the model a positive conditioning already encoded, so a region is added as
conditioning, not as text: the region prompts are encoded once with the job's CLIP.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..prompts import WindowPrompt, parse_regions


def encode_regions(clip: Any, regions: str) -> dict[str, torch.Tensor]:
    """Each region prompt's cross-attention tokens ([1, 77 * k, D]) by its text."""
    encodings = {}
    for region in parse_regions(regions):
        if region.prompt not in encodings:
            encodings[region.prompt] = clip.encode_from_tokens(clip.tokenize(region.prompt))
    return encodings


class RegionConditioning:
    """denoiser.WindowConditioning for ComfyUI: the call's cond chunks (cond_or_uncond 0) get
    the window's region encodings appended; rows of different lengths are repeated to their
    least common multiple, as ComfyUI concatenates conditionings (exact for attention)."""

    def __init__(self, encodings: dict[str, torch.Tensor]):
        self.encodings = encodings

    def __call__(self, prompt: WindowPrompt, cond: dict, rows: int) -> dict:
        chunks = cond["transformer_options"]["cond_or_uncond"]
        crossattn = cond["c_crossattn"]
        per_chunk = rows // len(chunks)
        added = [self.encodings[text] for text in prompt.added]
        pieces = []
        for j, kind in enumerate(chunks):
            piece = crossattn[j * per_chunk : (j + 1) * per_chunk]
            if kind == 0 and added:
                piece = torch.cat([piece, *(a.to(piece).expand(per_chunk, -1, -1) for a in added)], dim=1)
            pieces.append(piece)
        length = math.lcm(*(piece.shape[1] for piece in pieces))
        return {**cond, "c_crossattn": torch.cat([p.repeat(1, length // p.shape[1], 1) for p in pieces])}
