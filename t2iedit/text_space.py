"""Text-space metrics (docs/METHOD.md, "Text-space metrics"): did the edit move the text encoder's
sentence features where it should — without generating a single image?

Every metric compares sentence features ``f(x)`` of the *frozen* (unedited) encoder with ``f'(x)`` of
the *edited* one: the preset's pooling of the final hidden states (``ModelPreset.pooling``: CLIP's
[EOS] state after the final layer norm, MiniLM's attention-masked mean), L2-normalised, compared by
cosine ``cos(a, b) = a · b``. Success rates are in percent; drifts are ``1 − cos(f'(x), f(x))``
averaged over texts (0: unmoved).

- ``efficacy``: per applied (single) edit, ``cos(f'(source), f(target)) > cos(f'(source), f(source))``;
- ``generality`` / ``kgemap`` / ``compo``: per prompt of that category with an evaluation text ``q``
  (CAKE), ``cos(f'(p), f(q)) > cos(f'(p), f(p))``;
- ``specificity``: per specificity prompt ``p`` of edit ``e``, ``cos(f'(p), f(p)) > cos(f'(p), f(target_e))``;
- ``entity_drift``: over the named entities of the sources as standalone prompts (the ner stage's spans);
- ``caption_drift``: over held-out COCO captions (in neither the preserved-key corpus K0 nor the FID head);
- ``binary``: per category, over prompts with the two class texts (TIMED / RoAD): edit categories succeed
  iff ``cos(f'(p), f(class_edited)) > cos(f'(p), f(class_original))``, specificity iff the reverse.

The unedited encoder scores 0 on efficacy / generality / kgemap / compo (``f(p)`` is nearest itself),
100 on specificity and 0 drift: these rows are the floor and ceiling the edit is judged against.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import pandas as pd
import torch
from torch.nn import functional as F

from t2iedit.losses import pooled_feature

#: Categories whose prompt must come nearer its evaluation text (CAKE), in the paper's order.
EVAL_TEXT_CATEGORIES = ("generality", "kgemap", "compo")
#: Which class text must win the binary test, per category (as t2iedit.metrics.EDITED_MUST_WIN).
EDITED_MUST_WIN = {"efficacy": True, "generality": True, "kgemap": True, "compo": True,
                   "specificity": False}
#: Column order of the text-space table.
COLUMNS = ("efficacy", "generality", "kgemap", "compo", "specificity", "entity_drift", "caption_drift")
DISPLAY = {"efficacy": "Efficacy ↑", "generality": "Generality ↑", "kgemap": "KgeMap ↑",
           "compo": "Compo ↑", "specificity": "Specificity ↑", "entity_drift": "Entity drift ↓",
           "caption_drift": "Caption drift ↓"}


@torch.no_grad()
def sentence_features(tokenizer, model: torch.nn.Module, texts: Sequence[str], pooling: str,
                      batch_size: int = 128) -> torch.Tensor:
    """``(n, d)`` float64, unit rows: the pooled final hidden states of ``texts`` (padded to the longest
    text of each batch, with the attention mask; truncated at the tokenizer's length)."""
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(list(texts[i:i + batch_size]), padding="longest", truncation=True,
                        max_length=tokenizer.model_max_length, return_tensors="pt")
        mask = enc["attention_mask"].to(device)
        hidden = model(input_ids=enc["input_ids"].to(device), attention_mask=mask).last_hidden_state
        out.append(F.normalize(pooled_feature(hidden, mask, pooling).double(), dim=-1).cpu())
    if not out:
        return torch.zeros(0, model.config.hidden_size, dtype=torch.float64)
    return torch.cat(out)


class Features:
    """Unit sentence features of a set of texts, looked up by text: ``feats[texts]`` → ``(n, d)``."""

    def __init__(self, texts: Iterable[str], matrix: torch.Tensor):
        self.index = {t: i for i, t in enumerate(texts)}
        if len(self.index) != matrix.shape[0]:
            raise ValueError(f"{len(self.index)} distinct texts but {matrix.shape[0]} feature rows")
        self.matrix = matrix

    @classmethod
    def encode(cls, tokenizer, model, texts: Iterable[str], pooling: str,
               batch_size: int = 128) -> "Features":
        unique = list(dict.fromkeys(texts))
        return cls(unique, sentence_features(tokenizer, model, unique, pooling, batch_size))

    def __getitem__(self, texts: Sequence[str]) -> torch.Tensor:
        missing = [t for t in texts if t not in self.index]
        if missing:
            raise KeyError(f"no features for {len(missing)} texts, e.g. {missing[0]!r}")
        return self.matrix[[self.index[t] for t in texts]].reshape(len(texts), self.matrix.shape[1])


@dataclass(frozen=True)
class TextSpaceData:
    """The texts the metrics read.

    ``edits``: the applied edits (columns edit_id, source, target); ``prompts``: the evaluation prompts
    (edit_id, category, prompt, eval_text, class_original, class_edited; nulls allowed); ``entities``:
    entity texts (edit_id, text); ``captions``: held-out captions.
    """

    edits: pd.DataFrame
    prompts: pd.DataFrame
    entities: pd.DataFrame
    captions: tuple[str, ...]

    def __post_init__(self):
        for name, frame, cols in (("edits", self.edits, ("edit_id", "source", "target")),
                                  ("prompts", self.prompts, ("edit_id", "category", "prompt", "eval_text",
                                                             "class_original", "class_edited")),
                                  ("entities", self.entities, ("edit_id", "text"))):
            missing = [c for c in cols if c not in frame.columns]
            if missing:
                raise ValueError(f"text-space {name}: missing columns {missing}")

    def targets(self) -> dict[str, str]:
        return dict(zip(self.edits["edit_id"], self.edits["target"]))

    def specificity(self) -> pd.DataFrame:
        """Specificity prompts of the applied edits, with their edit's target."""
        spec = self.prompts[self.prompts["category"] == "specificity"]
        spec = spec[spec["edit_id"].isin(set(self.edits["edit_id"]))]
        return spec.assign(target=spec["edit_id"].map(self.targets()))

    def eval_text_prompts(self, category: str) -> pd.DataFrame:
        p = self.prompts
        return p[(p["category"] == category) & p["eval_text"].notna()]

    def binary_prompts(self) -> pd.DataFrame:
        p = self.prompts
        return p[p["class_original"].notna() & p["class_edited"].notna()]

    def edited_texts(self) -> list[str]:
        """Texts whose features the edited encoder must provide."""
        return list(dict.fromkeys([*self.edits["source"], *self.prompts["prompt"], *self.entities["text"],
                                   *self.captions]))

    def frozen_texts(self) -> list[str]:
        """Texts whose features the frozen encoder must provide (a superset of :meth:`edited_texts`)."""
        b = self.binary_prompts()
        return list(dict.fromkeys([*self.edited_texts(), *self.edits["target"],
                                   *self.prompts["eval_text"].dropna(), *b["class_original"],
                                   *b["class_edited"]]))


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(-1)  # unit rows


def _rate(success: torch.Tensor) -> float | None:
    return None if success.numel() == 0 else float(success.double().mean() * 100.0)


def _drift(frozen: Features, edited: Features, texts: Sequence[str]) -> float | None:
    texts = list(texts)
    return None if not texts else float((1.0 - _cos(edited[texts], frozen[texts])).mean())


def text_space_metrics(data: TextSpaceData, frozen: Features, edited: Features) -> dict:
    """The metrics of the module docstring for one edited encoder (``edited``; pass ``frozen`` twice
    for the unedited model). A metric with no texts (e.g. KgeMap outside CAKE) is ``None``."""
    out: dict = {}
    src, tgt = list(data.edits["source"]), list(data.edits["target"])
    e_src = edited[src]
    out["efficacy"] = _rate(_cos(e_src, frozen[tgt]) > _cos(e_src, frozen[src]))
    for cat in EVAL_TEXT_CATEGORIES:
        rows = data.eval_text_prompts(cat)
        p, q = list(rows["prompt"]), list(rows["eval_text"])
        e_p = edited[p]
        out[cat] = _rate(_cos(e_p, frozen[q]) > _cos(e_p, frozen[p]))
    spec = data.specificity()
    p, t = list(spec["prompt"]), list(spec["target"])
    e_p = edited[p]
    out["specificity"] = _rate(_cos(e_p, frozen[p]) > _cos(e_p, frozen[t]))
    out["entity_drift"] = _drift(frozen, edited, data.entities["text"])
    out["caption_drift"] = _drift(frozen, edited, data.captions)
    binary = {}
    b = data.binary_prompts()
    for cat in [c for c in EDITED_MUST_WIN if c in set(b["category"])]:
        rows = b[b["category"] == cat]
        e_p = edited[list(rows["prompt"])]
        d_edit = _cos(e_p, frozen[list(rows["class_edited"])])
        d_orig = _cos(e_p, frozen[list(rows["class_original"])])
        binary[cat] = _rate(d_edit > d_orig if EDITED_MUST_WIN[cat] else d_orig > d_edit)
    out["binary"] = binary
    out["n"] = {"edits": len(src), **{c: int(len(data.eval_text_prompts(c))) for c in EVAL_TEXT_CATEGORIES},
                "specificity": len(p), "entities": int(len(data.entities)), "captions": len(data.captions),
                "binary": int(len(b))}
    return out


def held_out_captions(captions: Sequence[str], corpus: Iterable[str], skip_first: int, n: int) -> list[str]:
    """``n`` captions, in file order, after the first ``skip_first`` (the FID-5K prompts) and not in the
    preserved-key corpus K0 (``corpus``), duplicates dropped: texts the null-space projector never saw."""
    k0 = set(corpus)
    out = list(dict.fromkeys(c for c in captions[skip_first:] if c not in k0))[:n]
    if len(out) < n:
        raise ValueError(f"only {len(out)} held-out captions (after the first {skip_first}, not in K0), "
                         f"{n} asked")
    return out


def markdown_table(results: Mapping[str, Mapping], title: str | None = None) -> str:
    """Methods × text-space metrics (the columns some method has), then the binary test's categories."""
    cols = [c for c in COLUMNS if any(r.get(c) is not None for r in results.values())]
    bcats = [c for c in EDITED_MUST_WIN if any(c in (r.get("binary") or {}) for r in results.values())]

    def cell(v: float | None, col: str) -> str:
        if v is None:
            return "–"
        return f"{max(v, 0.0):.4f}" if col.endswith("drift") else f"{v:.1f}"  # 1 − cos ≥ 0 up to rounding

    head = [DISPLAY[c] for c in cols] + [f"Binary {c} ↑" for c in bcats]
    lines = ([f"### {title}", ""] if title else []) + [
        "| method | " + " | ".join(head) + " |", "|---|" + "---:|" * len(head)]
    for m, r in results.items():
        cells = [cell(r.get(c), c) for c in cols] + [cell((r.get("binary") or {}).get(c), c) for c in bcats]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
