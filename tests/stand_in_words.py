"""A stand-in for the host's phrase placement (hosts/words.py `preview`), for the UI tests."""

from __future__ import annotations

import torch


def corner_words(image, latent_size, prompt):
    """The prompt's first phrase placed in the top-left quarter of the picture."""
    mask = torch.zeros(latent_size, dtype=torch.bool)
    mask[: latent_size[0] // 2, : latent_size[1] // 2] = True
    phrase = prompt.split(",")[0].strip()
    return {phrase: mask}, [f"placed {phrase!r} (stand-in)"]
