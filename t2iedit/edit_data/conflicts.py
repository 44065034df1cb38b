"""Large-scale editing hazards (METHOD.md §9): one source with several targets, and specificity
prompts that are themselves another edit's source.

Editing every row at once puts one key (the source's subject token) into the closed-form solve with
several values; the solve returns their least-squares compromise, so none of the targets is fully
written. ``resolve_conflicts`` makes the choice explicit and reports it:

- ``keep_all``: edit every row (the paper's protocol: all 104 TIMED rows at once); only reported;
- ``keep_first``: per source (compared case- and space-insensitively) keep the first row;
- ``drop_conflicting``: drop every row of a source that has more than one target (rows repeating
  the same source and target collapse to the first);
- ``error``: raise ``DatasetError`` listing the conflicting sources.

A specificity prompt equal to another edit's source can never pass once that edit is applied; the
``is_other_source`` column flags them (recomputed after a policy changes the edit set) so metrics can
report specificity with and without them.
"""

from __future__ import annotations

from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc

from t2iedit.edit_data.schema import EditSet, DatasetError, norm_text

ConflictPolicy = Literal["keep_all", "keep_first", "drop_conflicting", "error"]
POLICIES: tuple[str, ...] = ("keep_all", "keep_first", "drop_conflicting", "error")


def flag_other_sources(edit_set: EditSet) -> EditSet:
    """Set ``is_other_source`` on specificity prompts equal to the source of a *different* single edit."""
    edits = edit_set.edits.filter(pc.equal(edit_set.edits.column("kind"), "single"))
    owners: dict[str, set[str]] = {}
    for eid, src in zip(edits.column("edit_id").to_pylist(), edits.column("source").to_pylist()):
        owners.setdefault(norm_text(src), set()).add(eid)
    ep = edit_set.eval_prompts
    flags = [cat == "specificity" and bool(owners.get(norm_text(p), set()) - {eid})
             for eid, cat, p in zip(ep.column("edit_id").to_pylist(), ep.column("category").to_pylist(),
                                    ep.column("prompt").to_pylist())]
    i = ep.schema.get_field_index("is_other_source")
    ep = ep.set_column(i, ep.schema.field(i), pa.array(flags, pa.bool_()))
    return EditSet(edit_set.edits, ep)


def source_groups(edits: pa.Table) -> dict[str, list[dict[str, str]]]:
    """Sources shared by several single edits: normalised source -> [{edit_id, source, target}] in order."""
    groups: dict[str, list[dict[str, str]]] = {}
    for row in edits.select(["edit_id", "kind", "source", "target"]).to_pylist():
        if row["kind"] == "single":
            groups.setdefault(norm_text(row["source"]), []).append(
                {"edit_id": row["edit_id"], "source": row["source"], "target": row["target"]})
    return {k: v for k, v in groups.items() if len(v) > 1}


def resolve_conflicts(edit_set: EditSet, policy: ConflictPolicy) -> tuple[EditSet, dict[str, Any]]:
    """Apply ``policy`` to duplicated sources; return the new edit set and a report of what it did.

    Eval prompts of dropped edits go too, as do composite edits that lost a member.
    """
    if policy not in POLICIES:
        raise DatasetError(f"unknown conflict policy {policy!r} (choose from {POLICIES})")
    groups = source_groups(edit_set.edits)
    conflicting = {k: g for k, g in groups.items() if len({norm_text(r["target"]) for r in g}) > 1}
    if policy == "error" and conflicting:
        lines = [f"{g[0]['source']!r} -> " + ", ".join(f"{r['target']!r} ({r['edit_id']})" for r in g)
                 for g in conflicting.values()]
        raise DatasetError(f"{len(conflicting)} sources have several targets (conflict_policy=error):\n  "
                           + "\n  ".join(lines))
    drop: list[str] = []
    for key, g in groups.items():
        if policy == "keep_first" or (policy == "drop_conflicting" and key not in conflicting):
            drop += [r["edit_id"] for r in g[1:]]
        elif policy == "drop_conflicting":
            drop += [r["edit_id"] for r in g]
    dropped = set(drop)
    for row in edit_set.edits.select(["edit_id", "composite_of"]).to_pylist():
        if row["composite_of"] and dropped & set(row["composite_of"]):
            drop.append(row["edit_id"])
    dropped = set(drop)
    keep_edits = pc.invert(pc.is_in(edit_set.edits.column("edit_id"), pa.array(sorted(dropped), pa.string())))
    keep_prompts = pc.invert(pc.is_in(edit_set.eval_prompts.column("edit_id"), pa.array(sorted(dropped), pa.string())))
    out = flag_other_sources(EditSet(edit_set.edits.filter(keep_edits), edit_set.eval_prompts.filter(keep_prompts)))
    return out, _report(edit_set, out, policy, groups, conflicting, drop)


def _report(before: EditSet, after: EditSet, policy: str, groups: dict, conflicting: dict,
            dropped: list[str]) -> dict[str, Any]:
    ep = after.eval_prompts
    spec = ep.filter(pc.equal(ep.column("category"), "specificity"))
    # a specificity prompt equal to the edit's *own* source contradicts its efficacy prompt
    src = dict(zip(after.edits.column("edit_id").to_pylist(), after.edits.column("source").to_pylist()))
    own = [r["prompt_id"] for r in spec.select(["prompt_id", "edit_id", "prompt"]).to_pylist()
           if norm_text(r["prompt"]) == norm_text(src[r["edit_id"]])]
    kinds = after.edits.column("kind").to_pylist()
    return {
        "policy": policy,
        "edits_in": before.edits.num_rows,
        "edits_out": after.edits.num_rows,
        "single_edits_out": kinds.count("single"),
        "eval_prompts_in": before.eval_prompts.num_rows,
        "eval_prompts_out": ep.num_rows,
        "category_counts": {c: int(n) for c, n in _value_counts(ep.column("category")).items()},
        "distinct_sources": len({norm_text(s) for s, k in zip(before.edits.column("source").to_pylist(),
                                                               before.edits.column("kind").to_pylist()) if k == "single"}),
        "duplicated_sources": len(groups),
        "conflicting_sources": {g[0]["source"]: [f"{r['edit_id']}: {r['target']}" for r in g]
                                for g in conflicting.values()},
        "dropped_edits": dropped,
        "specificity_prompts": spec.num_rows,
        "specificity_other_source": int(pc.sum(spec.column("is_other_source")).as_py() or 0),
        "specificity_own_source": own,
    }


def _value_counts(col: pa.ChunkedArray) -> dict[str, int]:
    return {d["values"]: d["counts"] for d in pc.value_counts(col).to_pylist()}


def report_markdown(report: dict[str, Any], title: str = "Dataset preparation") -> str:
    """A short human-readable version of ``resolve_conflicts``' report."""
    lines = [f"# {title}", "",
             f"- conflict policy: `{report['policy']}`",
             f"- edits: {report['edits_in']} in, {report['edits_out']} out "
             f"({report['single_edits_out']} single); eval prompts: {report['eval_prompts_in']} in, "
             f"{report['eval_prompts_out']} out",
             "- categories: " + ", ".join(f"{k} {v}" for k, v in sorted(report["category_counts"].items())),
             f"- {report['distinct_sources']} distinct sources; {report['duplicated_sources']} shared by several "
             f"edits, {len(report['conflicting_sources'])} of them with different targets",
             f"- dropped edits: {len(report['dropped_edits'])}"
             + (f" ({', '.join(report['dropped_edits'][:20])}{' ...' if len(report['dropped_edits']) > 20 else ''})"
                if report["dropped_edits"] else ""),
             f"- specificity prompts that are another edit's source: {report['specificity_other_source']} "
             f"of {report['specificity_prompts']} (column `is_other_source`)"]
    if report["specificity_own_source"]:
        lines.append(f"- specificity prompts equal to their own edit's source (contradict efficacy): "
                     f"{', '.join(report['specificity_own_source'])}")
    if report["conflicting_sources"]:
        lines += ["", "## Sources with several targets", ""]
        lines += [f"- {src!r}: " + "; ".join(rows) for src, rows in report["conflicting_sources"].items()]
    return "\n".join(lines) + "\n"


def subset(edit_set: EditSet, max_edits: int | None) -> EditSet:
    """The first ``max_edits`` single edits, each composite edit whose first member is among them,
    and that composite's other member (so every kept compo prompt is defined); None keeps all."""
    if max_edits is None:
        return edit_set
    if max_edits < 1:
        raise DatasetError(f"max_edits must be >= 1 or None, not {max_edits}")
    rows = edit_set.edits.select(["edit_id", "kind", "composite_of"]).to_pylist()
    keep = {r["edit_id"] for r in [r for r in rows if r["kind"] == "single"][:max_edits]}
    composites = [r for r in rows if r["kind"] == "composite" and r["composite_of"][0] in keep]
    for r in composites:
        keep |= {r["edit_id"], *r["composite_of"]}
    ids = pa.array(sorted(keep), pa.string())
    return flag_other_sources(EditSet(edit_set.edits.filter(pc.is_in(edit_set.edits.column("edit_id"), ids)),
                                      edit_set.eval_prompts.filter(pc.is_in(edit_set.eval_prompts.column("edit_id"), ids))))
