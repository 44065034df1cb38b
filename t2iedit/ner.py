"""Named entities of source prompts (METHOD.md §4), stored as character spans.

Three backends, each recorded in every row it produces:

- ``hf``: a transformers token-classification pipeline (paper: ``dslim/bert-large-NER``, CoNLL-2003
  labels), entity groups aggregated (``simple`` or ``first``); the pipeline's character offsets are
  the spans.
- ``dataset``: the entity a dataset provides (CAKE's ``entity`` field), located in the source prompt
  case-insensitively.
- ``heuristic``: an offline rule, see :func:`heuristic_entities`.

Entities that are not the edit (:func:`filter_entities`, every backend): the edit changes the whole
source prompt (the subject), so an entity spanning the whole subject ("Harry Potter" in "Harry Potter";
a leading article ignored) is never protected — EATA would pull against the very edit it serves; a
span that swallows the role words ("Prime Minister of Japan", "Canada's Prime Minister") is trimmed to
the entity the role belongs to ("Japan", "Canada"); a span of role words only is dropped. Each dropped
or trimmed entity is recorded with its reason (:data:`FILTER_SCHEMA`).

Spans are tokenizer independent; :func:`entity_token_positions` maps them to the token positions of
any tokenizer (CLIP's at run time) through its offset mapping.

The article convention: CAKE's ground truth includes a preceding lower-case "the" ("The president of
the United States" → "the United States", METHOD.md §4), while CoNLL taggers never tag it. The
heuristic follows CAKE (a lower-case "the" directly before a name belongs to the name; a
sentence-initial function word never does); :func:`entity_recall` reports both the exact-span recall
and a recall that ignores a leading article and case, so both conventions are measured fairly.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import pyarrow as pa

from t2iedit.prompts import span_token_positions

logger = logging.getLogger(__name__)

BACKENDS = ("hf", "dataset", "heuristic")
DEFAULT_HF_MODEL = "dslim/bert-large-NER"

ENTITY_SCHEMA = pa.schema([
    pa.field("edit_id", pa.string(), nullable=False),
    pa.field("source", pa.string(), nullable=False),
    pa.field("start", pa.int32(), nullable=False),   # character span [start, end) in source
    pa.field("end", pa.int32(), nullable=False),
    pa.field("text", pa.string(), nullable=False),   # == source[start:end]
    pa.field("label", pa.string(), nullable=False),  # CoNLL group (PER/ORG/LOC/MISC) or ENT
    pa.field("score", pa.float32(), nullable=True),  # tagger confidence; null for rule/dataset rows
    pa.field("backend", pa.string(), nullable=False),
])


FILTER_SCHEMA = pa.schema([
    pa.field("edit_id", pa.string(), nullable=False),
    pa.field("source", pa.string(), nullable=False),
    pa.field("start", pa.int32(), nullable=False),      # the backend's span
    pa.field("end", pa.int32(), nullable=False),
    pa.field("text", pa.string(), nullable=False),
    pa.field("action", pa.string(), nullable=False),    # dropped | trimmed
    pa.field("reason", pa.string(), nullable=False),    # whole_subject | role_words_only | role_of | role_after_possessive | duplicate
    pa.field("new_start", pa.int32(), nullable=True),   # trimmed: the span kept
    pa.field("new_end", pa.int32(), nullable=True),
    pa.field("new_text", pa.string(), nullable=True),
    pa.field("backend", pa.string(), nullable=False),
])


@dataclass(frozen=True)
class Entity:
    """One named entity of one edit's source prompt."""

    edit_id: str
    source: str
    start: int
    end: int
    label: str
    score: float | None
    backend: str

    @property
    def text(self) -> str:
        return self.source[self.start:self.end]


def entities_table(entities: Iterable[Entity]) -> pa.Table:
    rows = list(entities)
    return pa.table({
        "edit_id": [e.edit_id for e in rows],
        "source": [e.source for e in rows],
        "start": [e.start for e in rows],
        "end": [e.end for e in rows],
        "text": [e.text for e in rows],
        "label": [e.label for e in rows],
        "score": [e.score for e in rows],
        "backend": [e.backend for e in rows],
    }, schema=ENTITY_SCHEMA)


def spans_by_edit(table: pa.Table) -> dict[str, tuple[tuple[int, int], ...]]:
    """``edit_id → ((start, end), ...)`` in source order (what ``EditRequest.entities`` takes)."""
    out: dict[str, list[tuple[int, int]]] = {}
    for row in table.select(["edit_id", "start", "end"]).to_pylist():
        out.setdefault(row["edit_id"], []).append((row["start"], row["end"]))
    return {k: tuple(sorted(v)) for k, v in out.items()}


# --------------------------------------------------------------------------------------------------
# dataset backend
# --------------------------------------------------------------------------------------------------
def dataset_entities(edit_ids: Sequence[str], sources: Sequence[str],
                     entity_texts: Sequence[str | None]) -> list[Entity]:
    """Locate each given entity text in its source prompt (case-insensitive, first occurrence).

    A missing/empty entity gives no row; an entity text absent from its prompt is an error (the
    dataset is inconsistent — better to stop than to silently edit without EATA).
    """
    out = []
    for eid, src, ent in zip(edit_ids, sources, entity_texts, strict=True):
        if not ent:
            continue
        start = src.lower().find(ent.lower())
        if start < 0:
            raise ValueError(f"edit {eid}: entity {ent!r} does not occur in source {src!r}")
        out.append(Entity(eid, src, start, start + len(ent), "ENT", None, "dataset"))
    return out


# --------------------------------------------------------------------------------------------------
# heuristic backend
# --------------------------------------------------------------------------------------------------
# Words that may sit inside a multi-word name ("The Lord of the Rings", "Girl with a Pearl Earring")
# but never start or end one.
_CONNECTORS = frozenset({"of", "the", "and", "with", "a", "an", "in", "on", "de", "du", "von", "van",
                         "der", "la", "le", "da", "di", "y", "&"})
# Capitalised only because they start the prompt ("The president of ...", "A photo of ...").
_INITIAL_FUNCTION_WORDS = frozenset({"the", "a", "an", "this", "that", "these", "those", "my", "his",
                                     "her", "its", "our", "their", "some", "one", "two", "in", "on",
                                     "at", "to", "for", "with", "from", "portrait", "photo", "image",
                                     "picture", "painting"})
_WORD = re.compile(r"\S+")
_LEAD = "\"'(“‘["
_TRAIL = ",;:!?\"')”’]"
# A trailing dot belongs to abbreviations ("Apple Inc.", "U.S.", "Jr."), not to sentence ends.
# "Guns N' Roses": a one-letter elision keeps its apostrophe.
_ELISION = re.compile(r"^[A-Za-z]['’]$")
# Role acronyms are capitalised but are not names; "CEO of Amazon" is a role of the name "Amazon".
_NOT_NAMES = frozenset({"CEO", "CFO", "COO", "CTO", "VP", "MP", "DJ", "TV"})
_ABBREV = re.compile(r"^(?:[A-Z][a-z]{0,3}|(?:[A-Za-z]\.)+[A-Za-z]?)\.$")


def _words(text: str) -> list[tuple[int, int, str]]:
    """Words with their character spans, surrounding punctuation stripped."""
    out = []
    for m in _WORD.finditer(text):
        a, b = m.start(), m.end()
        while a < b and text[a] in _LEAD:
            a += 1
        while b > a and text[b - 1] in _TRAIL and not _ELISION.match(text[a:b]):
            b -= 1
        if b > a and text[b - 1] == "." and not _ABBREV.match(text[a:b]):
            b -= 1
        if b > a:
            out.append((a, b, text[a:b]))
    return out


def _is_name_word(w: str) -> bool:
    """Capitalised ("Tesla"), all-caps ("NASA", "AC/DC"), or letters with digits ("U2")."""
    if w in _NOT_NAMES:
        return False
    first_alpha = next((c for c in w if c.isalpha()), None)
    return first_alpha is not None and first_alpha.isupper()


def _has_inner_caps(w: str) -> bool:
    return sum(c.isupper() for c in w) >= 2


def heuristic_spans(text: str) -> list[tuple[int, int]]:
    """Character spans of name-like word runs (the offline NER of the tiny preset).

    Rules, in order:
    1. a run of capitalised words, joined across connectors ("of", "the", "and", "with", "a", ...)
       only when another capitalised word follows ("The Lord of the Rings", "Pride and Prejudice");
    2. the first word of the prompt counts as a name only if it is not a function word
       ("The", "A", ...) and either another capitalised word follows or it has inner capitals
       ("NASA"): sentence-initial capitalisation says nothing on its own;
    3. a lower-case "the" directly before a run belongs to the entity (CAKE's convention,
       "of the United States" → "the United States").
    4. the complement of a role noun is a name even in lower case: after ``<role word> of``
       ("The prime minister of india", "lead guitarist of the beatles") up to three words, stopping
       at a preposition, a function word or an ``-ing`` word ("... of india eating strawberries").
    Known errors (measured on CAKE: 99/100 entities found, the miss is "1984"): names without
    capitals outside a role complement ("1984"), lower-cased prompts, and two names joined by a
    connector merge into one span ("Tim Cook in the United States"), the price of keeping titles
    like "The Catcher in the Rye". Role words a span swallows are cut by :func:`filter_entities`.
    """
    words = _words(text)
    spans: list[tuple[int, int]] = []
    i = 0
    while i < len(words):
        a, b, w = words[i]
        name = _is_name_word(w)
        if i == 0 and name:
            nxt = words[1][2] if len(words) > 1 else ""
            if w.lower() in _INITIAL_FUNCTION_WORDS or not (_has_inner_caps(w) or _is_name_word(nxt)):
                name = False
        if not name:
            i += 1
            continue
        j = i  # extend the run: names, or connectors followed (eventually) by a name
        k = i + 1
        while k < len(words):
            if _is_name_word(words[k][2]) and _gap_ok(text, words[k - 1][1], words[k][0]):
                j = k
                k += 1
                continue
            m = k
            while m < len(words) and words[m][2].lower() in _CONNECTORS and not _is_name_word(words[m][2]):
                m += 1
            if m > k and m < len(words) and _is_name_word(words[m][2]) and all(
                    _gap_ok(text, words[q - 1][1], words[q][0]) for q in range(k, m + 1)):
                j = m
                k = m + 1
                continue
            break
        start, end = a, words[j][1]
        if i > 0 and words[i - 1][2] == "the" and _gap_ok(text, words[i - 1][1], a):
            start = words[i - 1][0]
        spans.append((start, end))
        i = j + 1
    return _with_role_complements(text, words, spans)


# Role nouns: "<role> of X" and "X's <role>" name X, the entity the role belongs to (RoAD's Role rows,
# CAKE's "The CEO of Amazon"). Deliberately no "lord"/"lady"/"adventures": titles ("The Lord of the
# Rings") are names, not roles.
ROLE_WORDS = frozenset({
    "president", "vice", "prime", "minister", "pm", "chancellor", "premier", "governor", "mayor",
    "senator", "king", "queen", "prince", "princess", "emperor", "empress", "monarch", "pope", "ceo",
    "cfo", "coo", "cto", "founder", "co-founder", "cofounder", "chairman", "chairwoman", "chair",
    "director", "head", "chief", "leader", "lead", "captain", "coach", "manager", "owner", "guitarist",
    "singer", "vocalist", "drummer", "bassist", "frontman", "keyboardist", "member", "star", "actor",
    "actress", "author", "writer", "creator", "painter", "composer", "inventor", "wife", "husband",
    "son", "daughter", "mother", "father", "male", "female", "first", "secretary", "general",
    "mascot", "logo", "symbol", "anthem", "flag", "capital"})
_COMPLEMENT_STOP = frozenset({"in", "on", "at", "with", "from", "to", "for", "by", "and", "or", "as",
                              "is", "was", "who", "while", "during", "near", "under", "over", "a", "an"})


def _with_role_complements(text: str, words: list[tuple[int, int, str]],
                           spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out = list(spans)
    for i in range(1, len(words) - 1):
        if words[i][2].lower() != "of" or words[i - 1][2].lower() not in ROLE_WORDS:
            continue
        k, taken = i + 1, []
        if words[k][2].lower() == "the":
            taken.append(k)
            k += 1
        while (k < len(words) and len(taken) < 4 and words[k][2].lower() not in _COMPLEMENT_STOP
               and not words[k][2].lower().endswith("ing") and _gap_ok(text, words[k - 1][1], words[k][0])):
            taken.append(k)
            k += 1
        if not taken or words[taken[-1]][2].lower() == "the":
            continue
        a, b = words[taken[0]][0], words[taken[-1]][1]
        if not any(x < b and a < y for x, y in out):
            out.append((a, b))
    return sorted(out)


def _gap_ok(text: str, left_end: int, right_start: int) -> bool:
    """Two words belong to one name only if separated by spaces (optionally after ':' or '-')."""
    return re.fullmatch(r"[:\-]?\s+|\s+-\s+", text[left_end:right_start]) is not None


def heuristic_entities(edit_ids: Sequence[str], sources: Sequence[str]) -> list[Entity]:
    return [Entity(eid, src, a, b, "ENT", None, "heuristic")
            for eid, src in zip(edit_ids, sources, strict=True) for a, b in heuristic_spans(src)]


# --------------------------------------------------------------------------------------------------
# entities that are not the edit (every backend)
# --------------------------------------------------------------------------------------------------
_POSSESSIVE = re.compile(r"^(.*\S)['’]s?$")


def _norm_subject(text: str) -> str:
    return " ".join(normalise_entity(text).split())


def _trim_roles(src: str, a: int, b: int) -> tuple[int, int, str] | None:
    """The span ``[a, b)`` with swallowed role words cut, and why; None when nothing is cut. A span
    right after "of" is a role's complement and never role words only ("The lead singer of Queen")."""
    words = [(a + x, a + y, w) for x, y, w in _words(src[a:b])]
    lower = [w.lower() for _, _, w in words]
    body = 1 if lower and lower[0] in ("the", "a", "an") else 0
    complement = re.search(r"\bof\s+$", src[:a], re.IGNORECASE) is not None  # "singer of Queen": a name
    if lower[body:] and all(w in ROLE_WORDS for w in lower[body:]) and not complement:
        return (a, a, "role_words_only")
    if "of" in lower[body + 1:]:  # "Prime Minister of Japan": role words, then "of", then the entity
        j = lower.index("of", body + 1)
        if all(w in ROLE_WORDS for w in lower[body:j]) and j + 1 < len(words):
            return (words[j + 1][0], b, "role_of")
    for j, (x, y, w) in enumerate(words[:-1]):  # "Canada's Prime Minister": the possessor
        m = _POSSESSIVE.match(w)
        if m and w[-2:] in ("'s", "’s", "s'") and all(t in ROLE_WORDS for t in lower[j + 1:]):
            return (a, x + len(m.group(1)), "role_after_possessive")
    return None


def filter_entities(entities: Sequence[Entity]) -> tuple[list[Entity], list[dict]]:
    """Entities EATA may keep, and one record (:data:`FILTER_SCHEMA` row) per dropped/trimmed one.

    In order: role words are trimmed (``role_of``, ``role_after_possessive``) or the entity dropped
    (``role_words_only``); then an entity equal to the whole subject — the source prompt, up to case,
    surrounding punctuation and a leading article — is dropped (``whole_subject``: the edit changes
    it, METHOD.md §4); an entity whose span repeats an earlier kept one is dropped (``duplicate``).
    """
    kept: list[Entity] = []
    records: list[dict] = []

    def record(e: Entity, action: str, reason: str, new: tuple[int, int] | None = None) -> None:
        records.append({"edit_id": e.edit_id, "source": e.source, "start": e.start, "end": e.end,
                        "text": e.text, "action": action, "reason": reason,
                        "new_start": None if new is None else new[0], "new_end": None if new is None else new[1],
                        "new_text": None if new is None else e.source[new[0]:new[1]], "backend": e.backend})

    for e in entities:
        cur = e
        trim = _trim_roles(e.source, e.start, e.end)
        if trim is not None:
            a, b, reason = trim
            if a >= b:
                record(e, "dropped", reason)
                continue
            cur = Entity(e.edit_id, e.source, a, b, e.label, e.score, e.backend)
        if _norm_subject(cur.text) == _norm_subject(cur.source):
            record(e, "dropped", "whole_subject")
            continue
        if any((k.edit_id, k.start, k.end) == (cur.edit_id, cur.start, cur.end) for k in kept):
            record(e, "dropped", "duplicate")
            continue
        if trim is not None:
            record(e, "trimmed", trim[2], (cur.start, cur.end))
        kept.append(cur)
    return kept, records


def filtered_table(records: Iterable[dict]) -> pa.Table:
    rows = list(records)
    return pa.table({f.name: [r[f.name] for r in rows] for f in FILTER_SCHEMA}, schema=FILTER_SCHEMA)


def role_entity_scores(predicted: Sequence[Entity], truth: Mapping[str, tuple[str, str | None]]) -> dict:
    """Scores on hand-labelled sources (``edit_id → (source, entity or None)``):

    ``recall``: labelled entities found (a kept entity equal up to case and a leading article);
    ``subjects_kept``: kept entities that are the whole subject (should be 0);
    ``kept_on_none``: sources labelled "no entity inside" on which something is kept.
    """
    by_edit: dict[str, list[Entity]] = {}
    for e in predicted:
        by_edit.setdefault(e.edit_id, []).append(e)
    n = found = subjects = on_none = 0
    for eid, (src, ent) in truth.items():
        preds = by_edit.get(eid, [])
        subjects += sum(_norm_subject(p.text) == _norm_subject(src) for p in preds)
        if ent:
            n += 1
            found += any(normalise_entity(p.text) == normalise_entity(ent) for p in preds)
        elif preds:
            on_none += 1
    return {"n_sources": len(truth), "n_entities": n, "recall": found / n if n else None,
            "subjects_kept": subjects, "kept_on_none": on_none,
            "n_none": sum(1 for _, e in truth.values() if not e)}


# --------------------------------------------------------------------------------------------------
# hf backend
# --------------------------------------------------------------------------------------------------
def load_hf_tagger(model: str = DEFAULT_HF_MODEL, revision: str | None = None,
                   aggregation: str = "simple", device: str | int = "cpu", batch_size: int = 32):
    """A transformers token-classification pipeline with grouped entities.

    ``aggregation``: ``simple`` (groups consecutive B-/I- tokens of one type, the paper's setting) or
    ``first`` (word-level: each word takes its first sub-token's label).
    """
    from transformers import pipeline

    if aggregation not in ("simple", "first", "average", "max"):
        raise ValueError(f"aggregation must be simple/first/average/max, not {aggregation!r}")
    return pipeline("token-classification", model=str(model), revision=revision,
                    aggregation_strategy=aggregation, device=device, batch_size=batch_size)


def hf_entities(tagger, edit_ids: Sequence[str], sources: Sequence[str],
                min_score: float = 0.0) -> list[Entity]:
    """Run ``tagger`` (see :func:`load_hf_tagger`) over the source prompts.

    Each aggregated group becomes one span ``[start, end)`` from the pipeline's character offsets
    (the offsets of the original text, not the normalised sub-word string in ``word``).
    """
    if len(edit_ids) != len(sources):
        raise ValueError("edit_ids and sources differ in length")
    results = tagger(list(sources)) if sources else []
    out = []
    for eid, src, groups in zip(edit_ids, sources, results, strict=True):
        for g in groups:
            if g.get("start") is None or g.get("end") is None:
                raise ValueError("the NER pipeline returned no character offsets (needs a fast tokenizer)")
            if float(g["score"]) < min_score:
                continue
            label = g.get("entity_group") or g["entity"].split("-")[-1]
            out.append(Entity(eid, src, int(g["start"]), int(g["end"]), str(label),
                              float(g["score"]), "hf"))
    return out


# --------------------------------------------------------------------------------------------------
# evaluation and token positions
# --------------------------------------------------------------------------------------------------
_ARTICLE = re.compile(r"^(?:the|a|an)\s+", re.IGNORECASE)


def normalise_entity(text: str) -> str:
    """Lower-case, leading article and surrounding punctuation removed ("the United States" →
    "united states")."""
    return _ARTICLE.sub("", text.strip().strip(".,;:!?\"'").strip()).lower()


def entity_recall(predicted: pa.Table, truth: Mapping[str, tuple[str, str]]) -> dict[str, float]:
    """Recall of ground-truth entities (``edit_id → (source, entity text)``, e.g. CAKE's field).

    ``exact``: a predicted span equals the ground-truth span (located case-insensitively);
    ``relaxed``: a predicted entity's text equals the ground truth up to case and a leading article.
    """
    by_edit: dict[str, list[tuple[int, int, str]]] = {}
    for r in predicted.select(["edit_id", "start", "end", "text"]).to_pylist():
        by_edit.setdefault(r["edit_id"], []).append((r["start"], r["end"], r["text"]))
    n = exact = relaxed = 0
    for eid, (src, ent) in truth.items():
        if not ent:
            continue
        n += 1
        start = src.lower().find(ent.lower())
        preds = by_edit.get(eid, [])
        exact += any((a, b) == (start, start + len(ent)) for a, b, _ in preds)
        relaxed += any(normalise_entity(t) == normalise_entity(ent) for _, _, t in preds)
    if n == 0:
        raise ValueError("no ground-truth entities to measure recall against")
    return {"n": n, "exact": exact / n, "relaxed": relaxed / n}


def entity_token_positions(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]],
                           shift: int = 0) -> list[list[int]]:
    """Token positions of each entity span, given a tokenizer's offset mapping of the prompt.

    ``shift``: where the source prompt starts inside the tokenized text (a template prefix such as
    "A photo of ", see ``prompts.fill``).
    """
    return [span_token_positions(offsets, a + shift, b + shift) for a, b in spans]
