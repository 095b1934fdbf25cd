"""The WebUI's own conditioning of each window's prompt (A1111 and Forge alike).

Both hosts compute a job's conditioning in `p.setup_conds()` with
`prompt_parser.get_multicond_learned_conditioning(sd_model, SdConditioning(prompts, ...),
steps, hires_steps, use_old_scheduling)` and pick each step's rows with
`reconstruct_multicond_batch(c, step)`. A window's prompt goes through the very same
functions with the same arguments, so emphasis, [a:b:0.5] scheduling, AND, BREAK,
embeddings and long prompts mean what they mean in the job, and SDXL's pooled vector
(and Flux's guidance) come with the rows. Each distinct prompt is encoded once per pass.
"""

from __future__ import annotations

from typing import Any

import torch

from ..prompts import WindowPrompt


class WindowConds:
    """The conditioning of the windows' prompts in one sampling pass."""

    def __init__(self, p: Any, hires: bool):
        from modules import prompt_parser, shared

        self.parser, self.model, self.opts = prompt_parser, shared.sd_model, shared.opts
        if hires:
            self.prompts = list(p.hr_prompts)
            size = {"width": p.hr_upscale_to_x, "height": p.hr_upscale_to_y}
            distilled = getattr(p, "hr_distilled_cfg", None)
            self.steps, self.hires_steps = (
                p.firstpass_steps,
                _total_steps(p.hr_sampler_name or p.sampler_name, p.hr_second_pass_steps or p.steps),
            )
        else:
            self.prompts = list(p.prompts)
            size = {"width": p.width, "height": p.height}
            distilled = getattr(p, "distilled_cfg_scale", None)
            self.steps, self.hires_steps = getattr(p, "firstpass_steps", p.steps), None
        if distilled is not None:  # Forge: Flux's guidance goes with the prompts
            size["distilled_cfg_scale"] = distilled
        self.size = size
        self._conditioning: dict[WindowPrompt, Any] = {}

    def texts(self, prompt: WindowPrompt) -> list[str]:
        """The window's version of each image's prompt."""
        return [prompt.apply(text) for text in self.prompts]

    def at_step(self, prompt: WindowPrompt, step: int) -> tuple[list, Any]:
        """(conds_list, rows) of the window's prompt at this step, as the host's CFG denoiser
        reconstructs the job's: one row per image and AND part, in the job's row order."""
        if prompt not in self._conditioning:
            from modules import devices

            texts = self.parser.SdConditioning(self.texts(prompt), **self.size)
            with devices.autocast(), torch.no_grad():
                self._conditioning[prompt] = self.parser.get_multicond_learned_conditioning(
                    self.model, texts, self.steps, self.hires_steps, self.opts.use_old_scheduling
                )
        return self.parser.reconstruct_multicond_batch(self._conditioning[prompt], step)


def _total_steps(sampler_name: str, steps: int) -> int:
    """The step count the WebUI schedules prompts over for this sampler (as calculate_hr_conds)."""
    from modules import sd_samplers

    config = sd_samplers.find_sampler_config(sampler_name)
    return config.total_steps(steps) if config else steps


def cond_parts(rows: Any) -> dict[str, torch.Tensor]:
    """A reconstructed cond batch as named tensors: {"crossattn": t} or SDXL's / Flux's dict."""
    return dict(rows) if isinstance(rows, dict) else {"crossattn": rows}
