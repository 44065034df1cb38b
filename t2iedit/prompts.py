"""Edit requests, prompt templates and the mapping from character spans to token positions.

Entities and subjects are stored as character spans (tokenizer independent, METHOD.md §4); they
become token positions only here, through the tokenizer's offset mapping.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

# EMCID's source-prompt templates for computing keys and target values (METHOD.md §5).
DEFAULT_TEMPLATES: tuple[str, ...] = ("An image of {}", "A photo of {}", "{}")


@dataclass(frozen=True)
class EditRequest:
    """One fact to edit: ``source`` prompt should come to mean ``target``.

    ``entities``: character spans ``(start, end)`` in ``source`` of named entities whose meaning must
    be kept (EATA, paper eq. 5). ``old``: what the source denotes before the edit when that is not the
    source text itself (RoAD's ``Old``, e.g. "justin trudeau" for "Canada's Prime Minister"); ReFACT
    contrasts the target with it. None: the source.
    """

    edit_id: str
    source: str
    target: str
    entities: tuple[tuple[int, int], ...] = field(default_factory=tuple)
    old: str | None = None


def fill(template: str, text: str) -> tuple[str, int]:
    """``template.format(text)`` and the character offset where ``text`` starts in it."""
    if template.count("{}") != 1:
        raise ValueError(f"template {template!r} must contain exactly one '{{}}'")
    start = template.index("{}")
    return template[:start] + text + template[start + 2:], start


def span_token_positions(offsets: Sequence[tuple[int, int]], start: int, end: int) -> list[int]:
    """Token indices whose character range overlaps ``[start, end)``; special tokens (empty range)
    never match. Raises if the span covers no token (e.g. it was truncated away)."""
    pos = [i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start]
    if not pos:
        raise ValueError(f"character span [{start}, {end}) covers no token")
    return pos


def tokenize_with_offsets(tokenizer, texts: Sequence[str], max_length: int | None = None):
    """Batch-tokenize padded to the longest text (not to 77), truncated at the model's length.

    Returns the encoding (``input_ids``, ``attention_mask`` tensors) and per-text offset lists.
    """
    max_length = max_length or tokenizer.model_max_length
    enc = tokenizer(list(texts), padding="longest", truncation=True, max_length=max_length,
                    return_offsets_mapping=True, return_tensors="pt")
    offsets = [[tuple(map(int, o)) for o in row] for row in enc.pop("offset_mapping")]
    return enc, offsets


def subject_last_token(offsets: Sequence[tuple[int, int]], start: int, end: int) -> int:
    """Position of the last token of the subject spanning ``[start, end)`` (the edit token, §5)."""
    return span_token_positions(offsets, start, end)[-1]
