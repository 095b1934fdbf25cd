"""What each window is told: region prompts and the prompt's phrases, tile by tile.

A window's prompt is the job's prompt changed in two ways, both written as a
`WindowPrompt`: region prompts added (manual `regions`) and phrases left out (automatic
"Words where they are": phrases whose cross-attention lies elsewhere). The empty
`WindowPrompt` is the job's prompt itself, so such windows keep the job's conditioning
bit for bit. The host turns a changed prompt into conditioning with its own prompt
functions, so emphasis, scheduling, AND, BREAK and embeddings keep working.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from .settings import SettingsError, brief_repr

AND = re.compile(r"\bAND\b")  # the WebUI's separator of composable sub-prompts
BREAK = re.compile(r"\s*\bBREAK\b\s*")
# A sub-prompt's trailing weight, "a cat :1.5", as the WebUI reads it (prompt_parser.re_weight).
WEIGHT = re.compile(r"^((?:\s|.)*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$")
NUMBER = r"([^\s,:]+)"
REGION_LINE = re.compile(rf"^\s*{NUMBER}[\s,]+{NUMBER}[\s,]+{NUMBER}[\s,]+{NUMBER}\s*:(.*)$")
EXPECTED_REGION = "'x0 y0 x1 y1: prompt' with 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1"


@dataclass(frozen=True)
class PromptRegion:
    """A rectangle in fractions of the image (0..1) and the words it adds."""

    x0: float
    y0: float
    x1: float
    y1: float
    prompt: str

    def covers(self, x: float, y: float) -> bool:
        """Whether the point (fractions of the image) lies in it; the right and bottom edges
        belong to it only at the image's border, so neighbouring regions never share a point."""
        return self.x0 <= x < self.x1 + (self.x1 >= 1) and self.y0 <= y < self.y1 + (self.y1 >= 1)


def parse_regions(text: str) -> list[PromptRegion]:
    """The regions of the `regions` parameter: one per line, blank lines ignored."""
    regions = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        bad = SettingsError(
            f"regions: line {number} {brief_repr(line.strip())} is not allowed; expected {EXPECTED_REGION}"
        )
        match = REGION_LINE.match(line)
        if not match:
            raise bad
        try:
            x0, y0, x1, y1 = (float(v) for v in match.groups()[:4])
        except ValueError:
            raise bad from None
        prompt = match.group(5).strip()
        if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1) or not prompt:
            raise bad
        if AND.search(prompt):
            raise SettingsError(
                f"regions: line {number} {brief_repr(line.strip())} is not allowed; a region's prompt "
                "cannot hold AND (it is added to every AND part of the job's prompt)"
            )
        regions.append(PromptRegion(x0, y0, x1, y1, prompt))
    return regions


@dataclass(frozen=True)
class WindowPrompt:
    """How a window's prompt differs from the job's: words added, phrases left out."""

    added: tuple[str, ...] = ()  # region prompts, in the order of the regions
    left_out: tuple[str, ...] = ()  # phrases (as `phrase_key` writes them) not over this window

    def __bool__(self) -> bool:
        return bool(self.added or self.left_out)

    def apply(self, prompt: str) -> str:
        """This window's version of one image's prompt (the job's prompt unchanged when empty).

        Each AND part keeps its weight and gets the added words at its end; left-out
        phrases are removed from every part; BREAK stays where it is.
        """
        if not self:
            return prompt
        return " AND ".join(self._apply_part(part) for part in AND.split(prompt))

    def _apply_part(self, part: str) -> str:
        text, weight = WEIGHT.match(part).groups()
        segments = []
        for segment in BREAK.split(text):
            phrases = [p for p in split_phrases(segment) if phrase_key(p) not in self.left_out]
            segments.append(", ".join(phrases))
        text = " BREAK ".join(segments)
        if self.added:
            text = ", ".join([t for t in [text, *self.added] if t])
        return f"{text} :{weight}" if weight is not None else text

    def describe(self) -> str:
        """For the console and the preview: what this window gets beyond or short of the job's prompt."""
        words = [f"+{brief_repr(a)}" for a in self.added] + [f"-{brief_repr(p)}" for p in self.left_out]
        return " ".join(words) if words else "the whole prompt"


def split_phrases(text: str) -> list[str]:
    """The comma-separated phrases of a prompt text, commas inside (), [] or {} kept in
    their phrase; empty phrases dropped."""
    phrases, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth = max(depth - 1, 0)
        elif char == "," and depth == 0:
            phrases.append(text[start:i])
            start = i + 1
    phrases.append(text[start:])
    return [p.strip() for p in phrases if p.strip()]


def phrase_key(phrase: str) -> str:
    """A phrase as it is compared: trimmed, inner whitespace collapsed."""
    return " ".join(phrase.split())


def prompt_phrases(prompt: str) -> list[str]:
    """Every phrase of a prompt (all AND parts and BREAK segments), once each, in order."""
    seen: dict[str, None] = {}
    for part in AND.split(prompt):
        text = WEIGHT.match(part).group(1)
        for segment in BREAK.split(text):
            for phrase in split_phrases(segment):
                seen.setdefault(phrase_key(phrase), None)
    return list(seen)


def plain_words(phrase: str) -> str:
    """A phrase without the WebUI's emphasis syntax: '(red hair:1.2)' -> 'red hair'.

    What the tokenizer sees of it, for finding its tokens in the prompt. Scheduled words
    ([a:b:0.5]) keep their bracket text and are then not found: such a phrase stays in
    every window.
    """
    text = re.sub(r":\s*[-+]?(?:\d+\.?|\d*\.\d+)\s*\)", ")", phrase)  # (word:1.2) -> (word)
    text = re.sub(r"(?<!\\)[()]", " ", text)
    text = re.sub(r"(?<!\\)\[([^\[\]:|]*)\]", r" \1 ", text)  # [word] (de-emphasis), not [a:b:n]
    return " ".join(text.replace("\\(", "(").replace("\\)", ")").split())


def token_positions(phrases: list[str], prompt_tokens: list[int], tokenize) -> dict[str, list[int]]:
    """Where each phrase's tokens sit in the prompt's conditioning.

    prompt_tokens: the token id at each position of the conditioning (chunks of BOS, 75
    tokens or padding, EOS, one after the other, as the host lays them out); tokenize:
    the host's tokenizer, text -> ids without start, end or padding. Phrases are looked
    for in order, each after the previous one found; a phrase that is not found (an
    embedding, scheduled words) has no positions.
    """
    found, cursor = {}, 0
    for phrase in phrases:
        ids = list(tokenize(plain_words(phrase)))
        at = _find(prompt_tokens, ids, cursor) if ids else -1
        if at < 0:
            continue
        found[phrase] = list(range(at, at + len(ids)))
        cursor = at + len(ids)
    return found


def _find(sequence: list[int], part: list[int], start: int) -> int:
    for i in range(start, len(sequence) - len(part) + 1):
        if sequence[i : i + len(part)] == part:
            return i
    return -1


# Automatic placement ("Words where they are"). A phrase's attention map is the share of
# its tokens in the cross-attention of each image position. An evenly attending phrase
# puts about a quarter of its mass into the quarter of the picture where it is highest;
# a phrase is placed when that quarter holds at least twice that, i.e. half of its mass.
PLACED_CONCENTRATION = 0.5
# Where a placed phrase is: the positions whose attention reaches half of its peak (the
# 99th percentile, so that one hot position does not decide).
PLACED_LEVEL = 0.5
# A tile gets a placed phrase when the phrase covers a tenth of the tile, or half of the
# phrase lies in the tile (a small object inside a large tile).
TILE_COVER, PHRASE_SHARE = 0.1, 0.5


def placed_masks(maps: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The phrases whose attention lies in one part of the picture, each with where ([H, W] bool).

    maps: phrase -> attention map [H, W] (non-negative, any scale). Phrases that attend
    to the whole picture (style words, "highly detailed") are left out: they stay in
    every window.
    """
    masks = {}
    for phrase, attention in maps.items():
        a = attention.double().clamp_min(0).flatten()
        total = float(a.sum())
        if total <= 0 or not torch.isfinite(a).all():
            continue
        top = torch.sort(a, descending=True).values[: max(1, a.numel() // 4)]
        if float(top.sum()) / total < PLACED_CONCENTRATION:
            continue
        peak = float(torch.quantile(a, 0.99))
        masks[phrase] = (attention.double() >= PLACED_LEVEL * peak).reshape(attention.shape)
    return masks


def phrases_left_out(masks: dict[str, torch.Tensor], x: int, y: int, w: int, h: int) -> tuple[str, ...]:
    """The placed phrases that do not lie over the tile (x, y, w, h) of the masks' grid."""
    left_out = []
    for phrase, mask in masks.items():
        inside = int(mask[y : y + h, x : x + w].sum())
        if inside < min(TILE_COVER * w * h, PHRASE_SHARE * int(mask.sum())) or inside == 0:
            left_out.append(phrase)
    return tuple(left_out)
