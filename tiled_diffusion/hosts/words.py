""" "Words where they are": place the prompt's phrases by the model's own cross-attention.

Before sampling, the model runs once on the clean original at its own size (about 512 px
for SD 1.x and 2.x, 1024 px for SDXL) at a middle noise level, with the job's own
conditioning of the first image's prompt at the middle step; `attention.CrossAttentionMaps`
reads every cross-attention layer. Each phrase's map is the sum over its tokens (found in
the host's own tokenization of the prompt), and `prompts.placed_masks` decides which
phrases lie in one part of the picture. Nothing here touches the global random generator:
the noise comes from a generator of its own, so the job's seeds mean what they meant.
"""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

import torch

from ..attention import CrossAttentionMaps, native_size, phrase_maps
from ..prompts import AND, WEIGHT, WindowPrompt, placed_masks, prompt_phrases, token_positions
from .prompts import WindowConds, cond_parts

MIDDLE_TIMESTEP = 500  # of the 1000 training timesteps: the picture's layout is set, its detail not
NOISE_SEED = 0


def place(
    p: Any, latent: torch.Tensor, native_side: int, hires: bool, size: tuple[int, int] | None = None
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(phrase -> where it lies on the latent grid, [H, W] bool; lines for the console).

    latent: the clean original of the pass, [B, C, H, W] (its first image is used).
    native_side: the side in px the model was trained at (families.Family.native_side).
    size: the latent grid of the masks (default: the latent's own).
    """
    conds = WindowConds(p, hires)
    prompt = conds.prompts[0]
    step = max(conds.steps // 2 - 1, 0)
    conds_list, rows = conds.at_step(WindowPrompt(), step)
    own = [index for index, _ in conds_list[0]]  # the first image's rows, one per AND part
    parts = {name: tensor[own] for name, tensor in cond_parts(rows).items()}
    positions = _phrase_positions(prompt, conds, step)
    if not positions:
        return {}, [f"no phrase of the prompt was found in its tokens ({prompt[:60]!r})"]
    native = native_size(tuple(latent.shape[-2:]), native_side // 8)
    small = torch.nn.functional.interpolate(latent[:1].float(), size=native, mode="area")
    start = time.perf_counter()
    recorder = _run_model(p, small, parts, len(own))
    seconds = time.perf_counter() - start
    size = size or tuple(latent.shape[-2:])
    maps = torch.nn.functional.interpolate(recorder.maps.cpu(), size=size, mode="bilinear")
    by_phrase = phrase_maps(maps, positions)
    placed = placed_masks(by_phrase)
    lines = [
        f"read {recorder.calls} cross-attention layers at {native[1] * 8}x{native[0] * 8} px "
        f"in {seconds:.2f} s; "
        f"placed {len(placed)} of {len(by_phrase)} phrases: "
        + (", ".join(repr(phrase) for phrase in placed) or "none, every window gets the whole prompt")
    ]
    return placed, lines


def _phrase_positions(prompt: str, conds: WindowConds, step: int) -> dict[str, list[tuple[int, int]]]:
    """Each phrase's (row, token) positions in the conditioning of the prompt's AND parts."""
    engine = _text_engine(conds.model)
    tokenize = lambda text: engine.tokenize([text])[0]  # noqa: E731 - the host's ids, no start/end
    positions: dict[str, list[tuple[int, int]]] = {}
    for row, part in enumerate(AND.split(prompt)):
        text = WEIGHT.match(part).group(1)
        # The text the host encodes at this step: scheduled words resolved.
        schedule = conds.parser.get_learned_conditioning_prompt_schedules(
            [text], conds.steps, conds.hires_steps, conds.opts.use_old_scheduling
        )[0]
        encoded = next((words for end, words in schedule if step <= end), schedule[-1][1])
        chunks, _ = engine.tokenize_line(encoded)
        tokens = [token for chunk in chunks for token in chunk.tokens]
        for phrase, where in token_positions(prompt_phrases(text), tokens, tokenize).items():
            positions.setdefault(phrase, []).extend((row, index) for index in where)
    return positions


def _text_engine(model: Any) -> Any:
    """The host's CLIP text engine (tokenize_line and tokenize), for SD 1.x, 2.x and SDXL."""
    names = ("cond_stage_model", "text_processing_engine", "text_processing_engine_l")
    candidates = [getattr(model, name, None) for name in names]
    candidates += list(getattr(getattr(model, "conditioner", None), "embedders", None) or [])
    for engine in candidates:
        if hasattr(engine, "tokenize_line") and hasattr(engine, "tokenize"):
            return engine
    raise ValueError(f"no CLIP text engine found on {type(model).__name__}")


def _run_model(p: Any, x0: torch.Tensor, parts: dict[str, torch.Tensor], rows: int) -> CrossAttentionMaps:
    """The model once on x0 at the middle timestep, its cross-attention recorded."""
    model = p.sd_model
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(NOISE_SEED))
    x0 = x0.expand(rows, *x0.shape[1:])
    noise = noise.expand_as(x0)
    if hasattr(model, "forge_objects"):
        return _run_forge(model, x0, noise, parts)
    return _run_a1111(model, x0, noise, parts)


def _run_a1111(model: Any, x0: torch.Tensor, noise: torch.Tensor, parts: dict) -> CrossAttentionMaps:
    from modules import devices

    unet = model.model.diffusion_model
    device = x0.device  # the job's latent lives where the model runs
    alpha = model.alphas_cumprod[MIDDLE_TIMESTEP].float().to(device)
    x_t = alpha.sqrt() * x0 + (1 - alpha).sqrt() * noise.to(device)
    t = torch.full((x_t.shape[0],), MIDDLE_TIMESTEP, device=device, dtype=torch.long)
    if set(parts) == {"crossattn"}:
        cond = {"c_crossattn": [parts["crossattn"]]}
    else:
        cond = dict(parts)
    concat = _repaint_all(unet, x_t)
    if concat is not None:
        cond["c_concat"] = [concat]
    recorder = CrossAttentionMaps(unet, tuple(x_t.shape[-2:]))
    with recorder, devices.autocast(), torch.no_grad():
        model.apply_model(x_t, t, cond)
    return recorder


def _run_forge(model: Any, x0: torch.Tensor, noise: torch.Tensor, parts: dict) -> CrossAttentionMaps:
    from backend import memory_management

    patcher = model.forge_objects.unet
    memory_management.load_model_gpu(patcher)
    kmodel = patcher.model
    device = memory_management.get_torch_device()
    sigma = kmodel.predictor.sigma(torch.tensor([MIDDLE_TIMESTEP], device=device)).float()
    sigma = sigma.expand(x0.shape[0])
    x = x0.to(device) + sigma.view(-1, 1, 1, 1) * noise.to(device)
    extra = {"y": parts["vector"].to(device)} if "vector" in parts else {}
    concat = _repaint_all(kmodel.diffusion_model, x)
    if concat is not None:
        extra["c_concat"] = concat
    recorder = CrossAttentionMaps(kmodel.diffusion_model, tuple(x.shape[-2:]))
    with recorder, torch.no_grad():
        kmodel.apply_model(
            x, sigma, c_crossattn=parts["crossattn"].to(device), transformer_options={}, **extra
        )
    return recorder


def _repaint_all(unet: Any, x: torch.Tensor) -> torch.Tensor | None:
    """An inpainting model's extra input channels (mask, masked image) for "repaint
    everything" (mask 1, nothing kept), or None for a model without them."""
    extra = int(getattr(unet, "in_channels", x.shape[1])) - x.shape[1]
    if extra <= 0:
        return None
    concat = torch.zeros(x.shape[0], extra, *x.shape[2:], device=x.device, dtype=x.dtype)
    concat[:, 0] = 1
    return concat


def preview(
    image: Any, latent_size: tuple[int, int], prompt: str
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Preview tiles: place the prompt's phrases on this image with the loaded model, as a
    job would (the image VAE-encoded at the model's size; 20 steps for scheduled words)."""
    import numpy as np
    from modules import call_queue, devices, shared

    from .families import of_job

    model = shared.sd_model
    family = of_job(SimpleNamespace(sd_model=model))
    if not family.cross_attention:
        return {}, [f"{family.name} has no cross-attention maps: every window gets the whole prompt"]
    native = native_size(latent_size, family.native_side // 8)
    small = image.convert("RGB").resize((native[1] * 8, native[0] * 8))
    pixels = torch.from_numpy(np.asarray(small, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    height, width = (side * 8 for side in latent_size)
    p = SimpleNamespace(
        sd_model=model, prompts=[prompt], width=width, height=height, steps=20, firstpass_steps=20
    )
    with call_queue.queue_lock, torch.no_grad():  # not beside a running job
        with devices.autocast():
            latent = model.get_first_stage_encoding(
                model.encode_first_stage(pixels.to(devices.device, devices.dtype_vae))
            )
        return place(p, latent.float(), family.native_side, False, latent_size)
