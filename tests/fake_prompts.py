"""Stand-ins for the WebUI's prompt machinery, with the behaviour the hosts rely on.

Written from A1111 1.10.1's modules/prompt_parser.py and sd_hijack_clip.py (Forge 2 has
the same functions): a prompt becomes a schedule of texts ([from:to:when] switches at a
step), AND splits it into weighted sub-prompts (one cond row each, per image), a text is
encoded in chunks of 75 tokens between a start and an end token (77 rows each; BREAK
starts a new chunk), rows of different lengths in one batch are padded by repeating their
last vector, and SDXL's conditioning is a dict with a pooled `vector`. The text encoder
here is a hash of each word and its position, so equal texts give equal rows and any
other text other rows.
"""

from __future__ import annotations

import re
import types
import zlib
from contextlib import nullcontext
from types import SimpleNamespace

import torch

WIDTH = 16  # channels of a token's vector
MARK = 5.0  # channel 0 of a marked word's vectors (a stand-in UNet attends to them in one place)
BOS, EOS = 49406, 49407
CHUNK = 75
SCHEDULED = re.compile(r"\[([^\[\]:]*):([^\[\]:]*):\s*([\d.]+)\s*\]")
AND = re.compile(r"\bAND\b")
WEIGHT = re.compile(r"^((?:\s|.)*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$")


class SdConditioning(list):
    def __init__(self, prompts, is_negative_prompt=False, width=None, height=None, copy_from=None, **extra):
        super().__init__()
        self.extend(prompts)
        copy_from = prompts if copy_from is None else copy_from
        self.is_negative_prompt = is_negative_prompt or getattr(copy_from, "is_negative_prompt", False)
        self.width = width or getattr(copy_from, "width", None)
        self.height = height or getattr(copy_from, "height", None)
        self.extra = extra or getattr(copy_from, "extra", {})


class ScheduledPromptConditioning(SimpleNamespace):
    pass


class ComposableScheduledPromptConditioning:
    def __init__(self, schedules, weight=1.0):
        self.schedules, self.weight = schedules, weight


class MulticondLearnedConditioning:
    def __init__(self, shape, batch):
        self.shape, self.batch = shape, batch


def get_learned_conditioning_prompt_schedules(
    prompts, base_steps, hires_steps=None, use_old_scheduling=False
):
    """[(end_at_step, text), ...] per prompt: one [from:to:when] switch (when < 1: a share of the steps)."""
    steps = hires_steps or base_steps
    schedules = []
    for prompt in prompts:
        match = SCHEDULED.search(prompt)
        if not match:
            schedules.append([[steps, prompt]])
            continue
        when = float(match.group(3))
        at = int(when * steps) if when < 1 else int(when)
        before = prompt[: match.start()] + match.group(1) + prompt[match.end() :]
        after = prompt[: match.start()] + match.group(2) + prompt[match.end() :]
        schedules.append([[at, before], [steps, after]])
    return schedules


def get_learned_conditioning(model, prompts, steps, hires_steps=None, use_old_scheduling=False):
    result = []
    for schedule in get_learned_conditioning_prompt_schedules(prompts, steps, hires_steps):
        texts = SdConditioning([text for _, text in schedule], copy_from=prompts)
        conds = model.get_learned_conditioning(texts)
        entries = []
        for i, (end, _) in enumerate(schedule):
            cond = {k: v[i] for k, v in conds.items()} if isinstance(conds, dict) else conds[i]
            entries.append(ScheduledPromptConditioning(end_at_step=end, cond=cond))
        result.append(entries)
    return result


def get_multicond_learned_conditioning(model, prompts, steps, hires_steps=None, use_old_scheduling=False):
    flat, indexes, batch = SdConditioning([], copy_from=prompts), {}, []
    for prompt in prompts:
        parts = []
        for sub in AND.split(prompt):
            text, weight = WEIGHT.search(sub).groups()
            if text not in indexes:
                indexes[text] = len(flat)
                flat.append(text)
            parts.append((indexes[text], float(weight) if weight is not None else 1.0))
        batch.append(parts)
    learned = get_learned_conditioning(model, flat, steps, hires_steps, use_old_scheduling)
    return MulticondLearnedConditioning(
        (len(prompts),),
        [[ComposableScheduledPromptConditioning(learned[i], w) for i, w in parts] for parts in batch],
    )


def _at(schedules, step):
    return next((entry.cond for entry in schedules if step <= entry.end_at_step), schedules[-1].cond)


def _stack(tensors):
    """Rows of different lengths padded by repeating their last vector (stack_conds)."""
    if tensors[0].ndim == 1:  # pooled vectors
        return torch.stack(tensors)
    length = max(t.shape[0] for t in tensors)
    return torch.stack([torch.cat([t, t[-1:].repeat(length - t.shape[0], 1)]) for t in tensors])


def reconstruct_cond_batch(c, step):
    conds = [_at(schedules, step) for schedules in c]
    if isinstance(conds[0], dict):
        return {k: torch.stack([x[k] for x in conds]) for k in conds[0]}
    return torch.stack(conds)


def reconstruct_multicond_batch(c, step):
    tensors, conds_list = [], []
    for parts in c.batch:
        conds_list.append([])
        for part in parts:
            conds_list[-1].append((len(tensors), part.weight))
            tensors.append(_at(part.schedules, step))
    if isinstance(tensors[0], dict):
        return conds_list, {k: _stack([t[k] for t in tensors]) for k in tensors[0]}
    return conds_list, _stack(tensors)


class TextModel:
    """The model's text side: get_learned_conditioning, and a CLIP engine's tokenize / tokenize_line."""

    def __init__(self, sdxl=False, marked=()):
        self.sdxl, self.encoded = sdxl, []
        self.marked = {zlib.crc32(word.encode()) % 40000 + 1 for word in marked}  # channel 0 = MARK
        self.cond_stage_model = self  # where the WebUI keeps its CLIP engine (SD 1.x)

    def tokenize(self, texts):
        return [[zlib.crc32(word.encode()) % 40000 + 1 for word in _words(text)] for text in texts]

    def tokenize_line(self, line):
        chunks = []
        for part in re.split(r"\s*\bBREAK\b\s*", line):
            ids = self.tokenize([part])[0]
            for start in range(0, max(len(ids), 1), CHUNK):
                body = ids[start : start + CHUNK]
                chunks.append(SimpleNamespace(tokens=[BOS] + body + [EOS] * (CHUNK + 1 - len(body))))
        return chunks, sum(len(self.tokenize([p])[0]) for p in re.split(r"\bBREAK\b", line))

    def get_learned_conditioning(self, texts):
        self.encoded.extend(texts)
        lines = [self.tokenize_line(text)[0] for text in texts]
        count = max(len(chunks) for chunks in lines)  # texts of one call: padded with empty chunks
        rows = []
        for chunks in lines:
            tokens = [t for chunk in chunks for t in chunk.tokens]
            tokens += ([BOS] + [EOS] * (CHUNK + 1)) * (count - len(chunks))
            rows.append(torch.stack([self._vector(t, i % (CHUNK + 2)) for i, t in enumerate(tokens)]))
        crossattn = torch.stack(rows)
        if not self.sdxl:
            return crossattn
        size = torch.tensor([texts.width or 0, texts.height or 0], dtype=torch.float32) / 1000
        vector = torch.cat([crossattn[:, -1, :6], size.expand(len(texts), 2)], dim=1)
        return {"crossattn": crossattn, "vector": vector}

    def _vector(self, token, position):
        vector = _vector(token, position) * 0.1
        if token in self.marked:
            vector[0] = MARK
        return vector


def _words(text):
    text = re.sub(r":\s*[-+]?[\d.]+\s*\)", ")", text)
    return re.findall(r"[\w']+|[^\w\s()\[\]]", text)


def _vector(token, position):
    g = torch.Generator().manual_seed(token * 131 + position)
    return torch.randn(WIDTH, generator=g)


def install(monkeypatch, sdxl=False, marked=()) -> TextModel:
    """modules.prompt_parser, .devices and shared.sd_model / shared.opts as the hosts use them
    (needs the `state` fixture's modules)."""
    import sys

    parser = types.ModuleType("modules.prompt_parser")
    for name in (
        "SdConditioning",
        "get_learned_conditioning_prompt_schedules",
        "get_learned_conditioning",
        "get_multicond_learned_conditioning",
        "reconstruct_cond_batch",
        "reconstruct_multicond_batch",
    ):
        setattr(parser, name, globals()[name])
    devices = types.ModuleType("modules.devices")
    devices.autocast = nullcontext
    model = TextModel(sdxl, marked)
    modules = sys.modules["modules"]
    modules.prompt_parser, modules.devices = parser, devices
    monkeypatch.setitem(sys.modules, "modules.prompt_parser", parser)
    monkeypatch.setitem(sys.modules, "modules.devices", devices)
    monkeypatch.setattr(modules.shared, "sd_model", model, raising=False)
    monkeypatch.setattr(
        modules.shared,
        "opts",
        SimpleNamespace(use_old_scheduling=False, img2img_background_color="#ffffff"),
        raising=False,
    )
    return model


def job_conds(model, prompts, negatives, steps, width, height):
    """The job's own (cond, uncond), as p.setup_conds() makes them."""
    cond = get_multicond_learned_conditioning(
        model, SdConditioning(prompts, width=width, height=height), steps
    )
    uncond = get_learned_conditioning(
        model, SdConditioning(negatives, width=width, height=height, is_negative_prompt=True), steps
    )
    return cond, uncond


class A1111CFG(torch.nn.Module):
    """A1111 1.10's CFGDenoiser.forward with prompts: rows reconstructed at self.step (cond rows,
    one per image and AND part, then uncond rows), one inner call when cond and uncond have
    one length, else the cond rows and then the uncond rows; combined by the parts' weights.

    Records every inner call as (step, first batch row, the call's x rows)."""

    def __init__(self, inner_model, state, sdxl=False):
        super().__init__()
        self.inner_model, self.state, self.sdxl = inner_model, state, sdxl
        self.init_latent, self.step, self.inner_calls = None, 0, []

    def condition(self, text, image_cond):
        if isinstance(text, dict):
            return {**text, "c_concat": [image_cond]}
        return {"c_crossattn": [text], "c_concat": [image_cond]}

    def _inner(self, x, sigma, text, image_cond, first):
        self.inner_calls.append((self.step, first, x.clone()))
        return self.inner_model(x, sigma, cond=self.condition(text, image_cond))

    def forward(self, x, sigma, uncond, cond, cond_scale, image_cond):
        conds_list, tensor = reconstruct_multicond_batch(cond, self.step)
        uncond = reconstruct_cond_batch(uncond, self.step)
        repeats = [len(parts) for parts in conds_list]
        index = torch.repeat_interleave(torch.arange(len(repeats)), torch.tensor(repeats))
        x_in = torch.cat([x[index], x])
        sigma_in = torch.cat([sigma[index], sigma])
        image_in = torch.cat([image_cond[index], image_cond])
        n = len(index)
        t_cross = tensor["crossattn"] if isinstance(tensor, dict) else tensor
        u_cross = uncond["crossattn"] if isinstance(uncond, dict) else uncond
        if t_cross.shape[1] == u_cross.shape[1]:
            both = (
                {k: torch.cat([tensor[k], uncond[k]]) for k in tensor} if isinstance(tensor, dict) else None
            )
            text = both if both is not None else torch.cat([tensor, uncond])
            out = self._inner(x_in, sigma_in, text, image_in, 0)
        else:
            out = torch.cat(
                [
                    self._inner(x_in[:n], sigma_in[:n], tensor, image_in[:n], 0),
                    self._inner(x_in[n:], sigma_in[n:], uncond, image_in[n:], n),
                ]
            )
        denoised_uncond = out[n:]
        result = denoised_uncond.clone()
        for i, parts in enumerate(conds_list):
            for row, weight in parts:
                result[i] += (out[row] - denoised_uncond[i]) * weight * cond_scale
        self.step += 1
        return result


class ForgeCondition:
    """Forge's ConditionCrossAttn / Condition: a tensor that knows how Forge concatenates it."""

    def __init__(self, cond, cross=False):
        self.cond, self.cross = cond, cross


def forge_concat(conditions):
    """backend/sampling/condition.py: crossattn of different lengths repeated to their least
    common multiple, anything else concatenated as it is."""
    import math

    tensors = [c.cond for c in conditions]
    if conditions[0].cross:
        length = math.lcm(*(t.shape[1] for t in tensors))
        tensors = [t.repeat(1, length // t.shape[1], 1) for t in tensors]
    return torch.cat(tensors)


class ForgeCFG:
    """Forge 2's CFG denoiser with prompts (modules/sd_samplers_cfg_denoiser.py and
    backend/sampling/sampling_function.py): rows reconstructed at self.step, one condition
    per AND part (that part of every image) and one for the uncond, the conditioning
    modifiers, then one call of all conditions (uncond first, the parts in reverse order,
    as calc_cond_uncond_batch pops them) or a call each; the model function wrapper is
    called with `c` = {"c_crossattn", "y" (SDXL), "transformer_options"}. Records every
    call as (step, cond_or_uncond, the AND part of each chunk, its x, the model's records
    made during it)."""

    def __init__(self, unet, separate=False):
        self.unet, self.separate, self.step, self.calls = unet, separate, 0, []

    def __call__(self, x, sigma, cond, uncond, scale):
        conds_list, tensor = reconstruct_multicond_batch(cond, self.step)
        uncond_rows = reconstruct_cond_batch(uncond, self.step)
        conditions = []
        for part in range(len(conds_list[0])):
            feed = [parts[part][0] for parts in conds_list]
            conditions.append(_forge_entry({k: v[feed] for k, v in _parts(tensor).items()}))
        unconditions = [_forge_entry(_parts(uncond_rows))]
        unet = self.unet
        for modifier in unet.model_options.get("conditioning_modifiers", []):
            *_, unconditions, conditions, _, _, _ = modifier(
                unet.model, x, sigma, unconditions, conditions, scale, {}, 0
            )
        to_run = [(entry, 0, part) for part, entry in enumerate(conditions)]
        to_run += [(entry, 1, None) for entry in unconditions]
        order = list(reversed(to_run))
        groups = [[entry] for entry in order] if self.separate else [order]
        outputs = {0: [], 1: []}
        for group in groups:
            kinds = [kind for _, kind, _ in group]
            rows = x.shape[0]
            marks = [kind for kind in kinds for _ in range(rows)]
            options = {
                "cond_or_uncond": kinds,
                "cond_mark": torch.tensor(marks, dtype=torch.float32),
                "cond_indices": [i for i, m in enumerate(marks) if m == 0],
                "uncond_indices": [i for i, m in enumerate(marks) if m == 1],
            }
            c = {
                name: forge_concat([entry["model_conds"][name] for entry, _, _ in group])
                for name in group[0][0]["model_conds"]
            }
            c["transformer_options"] = options
            input_x, timestep = torch.cat([x] * len(group)), torch.cat([sigma] * len(group))
            records = getattr(unet.model, "records", [])
            start = len(records)
            wrapper = unet.model_options["model_function_wrapper"]
            result = wrapper(
                unet.model.apply_model,
                {"input": input_x, "timestep": timestep, "c": c, "cond_or_uncond": kinds},
            )
            parts = [part for _, _, part in group]
            self.calls.append((self.step, kinds, parts, input_x.clone(), start, len(records)))
            for kind, out in zip(kinds, result.chunk(len(group))):
                outputs[kind].append(out)
        self.step += 1
        cond_out = sum(outputs[0]) / len(outputs[0])
        return outputs[1][0] + (cond_out - outputs[1][0]) * scale


def _parts(rows):
    return dict(rows) if isinstance(rows, dict) else {"crossattn": rows}


def _forge_entry(parts):
    model_conds = {"c_crossattn": ForgeCondition(parts["crossattn"], cross=True)}
    if "vector" in parts:
        model_conds["y"] = ForgeCondition(parts["vector"])
    return {"model_conds": model_conds}
