"""t2iedit.edit_data: counts, schema, category mapping, thresholds, conflict policies, user-file errors,
checksummed downloads (no network: a file:// mirror and monkeypatched fetches), corpus sampling."""

from __future__ import annotations

import json
import shutil
import sys
import types
import urllib.error
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet  # noqa: F401  (pa.parquet)
import pytest

from t2iedit.edit_data import (
    CATEGORIES, EDITS_SCHEMA, EVAL_PROMPTS_SCHEMA, DatasetError, EditSet, coco_captions, fetch_raw,
    hf_texts, load_benchmark, load_user_edits, read_edit_set, read_manifest, report_markdown,
    resolve_conflicts, timed_tags, verify_raw, write_edit_set,
)
from t2iedit.edit_data.schema import edits_table, eval_prompts_table
from t2iedit.storage import file_sha256

RAW = Path(__file__).resolve().parents[1] / "data" / "raw"
MANIFEST = RAW / "MANIFEST.json"


@pytest.fixture(scope="module")
def sets() -> dict[tuple[str, str], EditSet]:
    keys = [("timed", "test"), ("timed", "test_full"), ("timed", "validation"), ("road", "test"),
            ("road", "validation"), ("cake", "test")]
    return {k: load_benchmark(k[0], RAW, k[1]) for k in keys}


@pytest.fixture(scope="module")
def tokenizer():
    from t2iedit.edit_data import default_tokenizer
    return default_tokenizer()


def categories(es: EditSet) -> Counter:
    return Counter(es.eval_prompts.column("category").to_pylist())


# ---------------------------------------------------------------------------------------------- counts
@pytest.mark.parametrize("key,n_edits,n_prompts,cats", [
    (("timed", "test"), 104, 1144, {"efficacy": 104, "generality": 520, "specificity": 520}),
    (("timed", "test_full"), 147, 1617, {"efficacy": 147, "generality": 735, "specificity": 735}),
    (("timed", "validation"), 8, 88, {"efficacy": 8, "generality": 40, "specificity": 40}),
    (("road", "test"), 90, 990, {"efficacy": 90, "generality": 450, "specificity": 450}),
    (("road", "validation"), 10, 110, {"efficacy": 10, "generality": 50, "specificity": 50}),
    (("cake", "test"), 200, 1500, {"efficacy": 100, "generality": 500, "kgemap": 300, "specificity": 300,
                                   "compo": 300}),
])
def test_counts(sets, key, n_edits, n_prompts, cats):
    es = sets[key]
    assert es.edits.num_rows == n_edits
    assert es.eval_prompts.num_rows == n_prompts
    assert categories(es) == cats
    assert set(categories(es)) <= set(CATEGORIES)


def test_cake_single_and_composite(sets):
    edits = sets[("cake", "test")].edits.to_pylist()
    kinds = Counter(e["kind"] for e in edits)
    assert kinds == {"single": 100, "composite": 100}
    by_id = {e["edit_id"]: e for e in edits}
    compo = by_id["cake-test-compo-000"]
    # composite_edit[0] = (president of the US -> Tim Cook) + (Titanic male lead -> Jeff Bezos)
    first, second = (by_id[i] for i in compo["composite_of"])
    assert first["edit_id"] == "cake-test-000" and first["source"] == "The president of the United States"
    assert second["source"] == "The Titanic male lead" and second["target"] == "Jeff Bezos"
    assert second["kind"] == "single" and second["entity"] == "Titanic" and second["row_type"] == "3"
    assert all(e["entity"] and e["entity"] in e["source"] for e in edits)


def test_road_fields(sets):
    e = sets[("road", "test")].edits.to_pylist()[0]
    assert (e["source"], e["target"], e["oracle"], e["row_type"]) == (
        "Canada's Prime Minister", "Beyonce", "Beyonce as Canada's Prime Minister", "Role")
    assert Counter(r["row_type"] for r in sets[("road", "test")].edits.to_pylist()) == {"Appearance": 49, "Role": 41}
    # trailing spaces of the raw file are stripped
    assert all(s == s.strip() for s in sets[("road", "test")].edits.column("source").to_pylist())
    # validation has no Positive_oracle columns
    val = sets[("road", "validation")].eval_prompts.to_pylist()
    assert all(p["oracle_prompt"] is None for p in val if p["category"] == "generality")


# ------------------------------------------------------------------------------------- category mapping
def _prompt(es: EditSet, prompt_id: str) -> dict:
    rows = [r for r in es.eval_prompts.to_pylist() if r["prompt_id"] == prompt_id]
    assert len(rows) == 1, prompt_id
    return rows[0]


def test_timed_category_mapping(sets):
    es = sets[("timed", "test")]
    p = _prompt(es, "timed-test-000/efficacy/0")
    assert (p["prompt"], p["class_original"], p["class_edited"], p["eval_text"]) == (
        "A banana", "A banana", "A blue banana", "A blue banana")
    p = _prompt(es, "timed-test-000/generality/0")  # positive1 / gt1
    assert (p["prompt"], p["class_edited"], p["oracle_prompt"]) == (
        "A bowl of bananas", "A bowl of blue bananas", "A bowl of blue bananas")
    p = _prompt(es, "timed-test-000/specificity/4")  # negative5 / gn5
    assert (p["prompt"], p["class_original"], p["class_edited"], p["eval_text"]) == (
        "A lemon", "A lemon", "A blue lemon", "A lemon")


def test_road_category_mapping(sets):
    es = sets[("road", "test")]
    p = _prompt(es, "road-test-000/efficacy/0")  # ReFACT: Old vs New
    assert (p["class_original"], p["class_edited"]) == ("Justin Trudeau", "Beyonce")
    p = _prompt(es, "road-test-000/generality/1")
    assert (p["prompt"], p["class_original"], p["class_edited"], p["oracle_prompt"]) == (
        "Canada's prime minister in a meeting", "Justin Trudeau in a meeting", "Beyonce in a meeting",
        "Beyonce as Canada's prime minister in a meeting")
    p = _prompt(es, "road-test-000/specificity/1")
    assert (p["prompt"], p["class_edited"]) == ("A senator", "Beyonce")


def test_cake_category_mapping(sets):
    es = sets[("cake", "test")]
    assert _prompt(es, "cake-test-000/generality/0")["prompt"] == "The president of the United States in a carriage"
    p = _prompt(es, "cake-test-000/kgemap/0")  # generality_b -> KgeMap
    assert (p["prompt"], p["eval_text"]) == ("The leader of the United States running in the street",
                                            "Tim Cook running in the street")
    assert _prompt(es, "cake-test-000/specificity/0")["prompt"] == "flag of the United States"
    p = _prompt(es, "cake-test-compo-000/compo/0")  # compositionality -> Compo
    assert p["edit_id"] == "cake-test-compo-000"
    assert p["eval_text"] == "Tim Cook and Jeff Bezos attending a wedding ceremony"
    assert p["class_original"] is None and p["class_edited"] is None  # CAKE scores against thresholds


# ------------------------------------------------------------------------------------------ thresholds
def test_thresholds_joined(sets):
    for key in [("timed", "test"), ("road", "test"), ("cake", "test")]:
        ep = sets[key].eval_prompts
        for s in ("mean", "1sigma", "2sigma", "3sigma"):
            assert ep.column(f"threshold_{s}").null_count == 0, key
    for key in [("timed", "test_full"), ("timed", "validation"), ("road", "validation")]:
        assert sets[key].eval_prompts.column("threshold_2sigma").null_count == sets[key].eval_prompts.num_rows
    t = json.loads((RAW / "CAKE/eva_clip_thresholds/stable-diffusion-v1-4/CAKE/seed-50.json").read_text())
    p = _prompt(sets[("cake", "test")], "cake-test-000/efficacy/0")
    assert p["threshold_2sigma"] == t["The president of the United States"]["The president of the United States"]["2sigma"]
    p = _prompt(sets[("cake", "test")], "cake-test-compo-000/compo/2")
    assert p["threshold_mean"] == t["composite/The president of the United States"][p["prompt"]]["mean"]
    # duplicated TIMED sources: tags a dog_0 .. a dog_4 in row order; row 13 is the 4th "A dog"
    t = json.loads((RAW / "CAKE/eva_clip_thresholds/stable-diffusion-v1-4/TIMED/seed-50.json").read_text())
    p = _prompt(sets[("timed", "test")], "timed-test-013/generality/0")
    assert p["threshold_1sigma"] == t["a dog_3"][p["prompt"].lower()]["1sigma"]
    assert timed_tags(["A dog", "B", "a dog"]) == ["a dog_0", "b", "a dog_1"]
    mean, s1, s2, s3 = (p[f"threshold_{s}"] for s in ("mean", "1sigma", "2sigma", "3sigma"))
    assert mean > s1 > s2 > s3


# ----------------------------------------------------------------------------------------- round trip
@pytest.mark.parametrize("key", [("timed", "test"), ("cake", "test")])
def test_schema_round_trip(sets, tmp_path, key):
    es = sets[key]
    e, p = write_edit_set(es, tmp_path / "edits.parquet", tmp_path / "eval_prompts.parquet")
    back = read_edit_set(e, p)
    assert back.edits.schema.equals(EDITS_SCHEMA) and back.eval_prompts.schema.equals(EVAL_PROMPTS_SCHEMA)
    assert back.edits.equals(es.edits) and back.eval_prompts.equals(es.eval_prompts)
    assert back.edits.schema.field("entity").metadata[b"description"]


def test_validate_rejects_dangling_edit_id(sets):
    es = sets[("timed", "validation")]
    with pytest.raises(DatasetError, match="not in edits"):
        EditSet(es.edits.slice(1), es.eval_prompts)


# ----------------------------------------------------------------------------------- conflict policies
def test_overlap_flag_counts(sets):
    # METHOD.md §9 counts 218 TIMED / 53 RoAD; we compare as the CLIP tokenizer does (case and
    # surrounding spaces ignored) and exclude a prompt equal to its own edit's source:
    # TIMED 217 + 1 own ("The sun" -> "The green sun" lists "The sun" as a negative), RoAD 56 + 2 own.
    timed, road = sets[("timed", "test")], sets[("road", "test")]
    assert sum(timed.eval_prompts.column("is_other_source").to_pylist()) == 217
    assert sum(road.eval_prompts.column("is_other_source").to_pylist()) == 56
    flagged = [r for r in timed.eval_prompts.to_pylist() if r["is_other_source"]]
    assert {r["category"] for r in flagged} == {"specificity"}
    _, rep = resolve_conflicts(road, "keep_all")
    assert rep["specificity_own_source"] == ["road-test-019/specificity/2", "road-test-049/specificity/0"]


def test_policy_keep_all(sets):
    out, rep = resolve_conflicts(sets[("timed", "test")], "keep_all")
    assert out.edits.num_rows == 104 and out.eval_prompts.num_rows == 1144 and rep["dropped_edits"] == []
    assert len(rep["conflicting_sources"]) == 14 and rep["distinct_sources"] == 82
    assert len(rep["conflicting_sources"]["A dog"]) == 5


def test_policy_keep_first(sets):
    out, rep = resolve_conflicts(sets[("timed", "test")], "keep_first")
    assert out.edits.num_rows == 82 and out.eval_prompts.num_rows == 82 * 11
    dogs = [e for e in out.edits.to_pylist() if e["source"] == "A dog"]
    assert [d["target"] for d in dogs] == ["A Chihuahua dog"]  # the first of the five
    assert len(rep["dropped_edits"]) == 22
    # the flag is recomputed on the remaining edits
    assert sum(out.eval_prompts.column("is_other_source").to_pylist()) == rep["specificity_other_source"] < 217
    assert "keep_first" in report_markdown(rep) and "'A dog'" in report_markdown(rep)


def test_policy_drop_conflicting(sets):
    out, rep = resolve_conflicts(sets[("timed", "test")], "drop_conflicting")
    sources = [e["source"] for e in out.edits.to_pylist()]
    assert "A dog" not in sources and "Ice cream" not in sources
    assert out.edits.num_rows == 104 - sum(len(g) for g in rep["conflicting_sources"].values()) == 68
    assert set(out.eval_prompts.column("edit_id").to_pylist()) == set(out.edits.column("edit_id").to_pylist())


def test_policy_error(sets):
    with pytest.raises(DatasetError, match=r"'A dog' -> 'A Chihuahua dog' \(timed-test-010\)"):
        resolve_conflicts(sets[("timed", "test")], "error")
    out, rep = resolve_conflicts(sets[("cake", "test")], "error")  # CAKE is clean
    assert out.edits.num_rows == 200 and rep["dropped_edits"] == []
    with pytest.raises(DatasetError, match="unknown conflict policy"):
        resolve_conflicts(sets[("cake", "test")], "newest")


def _tiny_set() -> EditSet:
    def edit(i, src, tgt, kind="single", of=None):
        return {"edit_id": f"e{i}", "dataset": "user", "split": "t", "kind": kind, "source": src,
                "target": tgt, "subject": src, "entity": None, "oracle": None, "row_type": None,
                "composite_of": of}

    def prompt(eid, cat, text):
        return {"prompt_id": f"{eid}/{cat}/0", "edit_id": eid, "category": cat, "prompt": text,
                "class_original": None, "class_edited": None, "eval_text": None, "oracle_prompt": None,
                "threshold_mean": None, "threshold_1sigma": None, "threshold_2sigma": None,
                "threshold_3sigma": None, "is_other_source": False}

    edits = [edit(0, "A cat", "A red cat"), edit(1, "a  CAT ", "A red cat"),  # exact duplicate
             edit(2, "A dog", "A blue dog"), edit(3, "A dog", "A green dog"),  # conflict
             edit(4, "A cow", "A pink cow"), edit(5, "A cow", "A pink cow", "composite", ["e4", "e3"])]
    prompts = [prompt("e0", "specificity", "A dog"), prompt("e2", "specificity", "a dog"),
               prompt("e4", "specificity", "A Cat"), prompt("e5", "compo", "A cow and a dog")]
    return EditSet(edits_table(edits), eval_prompts_table(prompts))


def test_policies_on_synthetic_duplicates():
    es = _tiny_set()
    kept = lambda s: s.edits.column("edit_id").to_pylist()  # noqa: E731
    out, rep = resolve_conflicts(es, "keep_all")
    assert kept(out) == ["e0", "e1", "e2", "e3", "e4", "e5"] and list(rep["conflicting_sources"]) == ["A dog"]
    # e0's "A dog" is another edit's source; e2's "a dog" is its own source (and e3's: flagged)
    assert out.eval_prompts.column("is_other_source").to_pylist() == [True, True, True, False]
    out, rep = resolve_conflicts(es, "keep_first")  # the composite lost its member e3
    assert kept(out) == ["e0", "e2", "e4"] and rep["dropped_edits"] == ["e1", "e3", "e5"]
    assert out.eval_prompts.column("is_other_source").to_pylist() == [True, False, True]
    out, rep = resolve_conflicts(es, "drop_conflicting")  # exact duplicates collapse; the composite loses e3
    assert kept(out) == ["e0", "e4"] and rep["dropped_edits"] == ["e1", "e2", "e3", "e5"]
    assert out.eval_prompts.column("edit_id").to_pylist() == ["e0", "e4"]
    assert out.eval_prompts.column("is_other_source").to_pylist() == [False, True]


def test_subset_keeps_composite_partners(sets):
    from t2iedit.edit_data import subset

    cake = subset(sets[("cake", "test")], 10)
    edits = cake.edits.to_pylist()
    singles = {e["edit_id"] for e in edits if e["kind"] == "single"}
    composites = [e for e in edits if e["kind"] == "composite"]
    assert {f"cake-test-{i:03d}" for i in range(10)} <= singles
    assert len(composites) == 10 and all(set(c["composite_of"]) <= singles for c in composites)
    assert set(cake.eval_prompts.column("edit_id").to_pylist()) == {e["edit_id"] for e in edits}
    timed = subset(sets[("timed", "test")], 10)
    assert timed.edits.num_rows == 10 and timed.eval_prompts.num_rows == 110
    assert subset(timed, None) is timed


# ------------------------------------------------------------------------------------------ user files
def _write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def test_user_csv_and_yaml(tmp_path, tokenizer):
    csv_file = _write(tmp_path, "facts.csv", "source,target,entity\nThe CEO of Amazon,Tim Cook,Amazon\nA dog,A cat,\n")
    es = load_user_edits(csv_file, tokenizer)
    rows = es.edits.to_pylist()
    assert [(r["source"], r["target"], r["entity"]) for r in rows] == [
        ("The CEO of Amazon", "Tim Cook", "Amazon"), ("A dog", "A cat", None)]
    assert rows[0]["edit_id"] == "user-facts-000" and rows[0]["dataset"] == "user"
    assert categories(es) == {"efficacy": 2}
    yaml_file = _write(tmp_path, "facts.yaml", "edits:\n  - {source: The CEO of Amazon, target: Tim Cook, entity: Amazon}\n"
                                               "  - {source: A dog, target: A cat}\n")
    ey = load_user_edits(yaml_file, tokenizer)
    assert ey.edits.drop_columns(["edit_id", "split"]).equals(es.edits.drop_columns(["edit_id", "split"]))


@pytest.mark.parametrize("name,text,message", [
    ("a.csv", "source,target\nA dog,A cat\n ,A cow\n", r"a\.csv: line 3 \(row 2\), field 'source': empty"),
    ("b.csv", "source,target\nA dog,A cat\nA cow,\n", r"b\.csv: line 3 \(row 2\), field 'target': empty"),
    ("c.yaml", "- {source: A dog, target: A cat}\n- {source: A cow, target: ''}\n", r"c\.yaml: line 2 \(row 2\), field 'target': empty"),
    ("d.csv", "source,target\nA dog,A cat\nA cow,A pig\na  DOG,A wolf\n",
     r"d\.csv: line 4 \(row 3\), field 'source': 'a  DOG' duplicates line 2 \(row 1\) with a different target 'A cat'"),
    ("e.yaml", "- {source: A dog, target: A cat}\n- {source: A dog, target: A cat}\n",
     r"e\.yaml: line 2 \(row 2\), field 'source': 'A dog' duplicates line 1 \(row 1\) with the same target"),
    ("f.csv", "source,target\nA dog,A " + "very " * 80 + "big cat\n",
     r"f\.csv: line 2 \(row 1\), field 'target': \d+ CLIP tokens, more than 77"),
    ("g.csv", "source,tgt\nA dog,A cat\n", r"g\.csv: header, field 'tgt': unknown field"),
    ("h.csv", "source\nA dog\n", r"h\.csv: header, field 'target': missing"),
    ("i.yaml", "- {source: A dog}\n", r"i\.yaml: line 1 \(row 1\), field 'target': missing"),
    ("j.csv", "source,target,entity\nThe CEO of Amazon,Tim Cook,Google\n",
     r"j\.csv: line 2 \(row 1\), field 'entity': 'Google' does not occur in the source"),
    ("k.txt", "A dog -> A cat\n", r"k\.txt: unsupported edit file type"),
    ("l.csv", "source,target\nA dog,A cat,extra\n", r"l\.csv: line 2 \(row 1\): 1 cells beyond the header"),
    ("m.yaml", "- {source: 12, target: A cat}\n", r"m\.yaml: line 1 \(row 1\), field 'source': expected text, got int"),
])
def test_user_file_errors(tmp_path, tokenizer, name, text, message):
    path = _write(tmp_path, name, text)
    with pytest.raises(DatasetError, match=message) as err:
        load_user_edits(path, tokenizer)
    assert str(path) in str(err.value)


def test_user_token_limit_is_77_with_bos_eos(tmp_path, tokenizer):
    # "a" is one token: 75 words + BOS + EOS = 77 tokens pass, 76 words fail
    ok = _write(tmp_path, "ok.csv", "source,target\nA dog," + " ".join(["a"] * 75) + "\n")
    assert load_user_edits(ok, tokenizer).edits.num_rows == 1
    bad = _write(tmp_path, "bad.csv", "source,target\nA dog," + " ".join(["a"] * 76) + "\n")
    with pytest.raises(DatasetError, match="78 CLIP tokens"):
        load_user_edits(bad, tokenizer)


# ---------------------------------------------------------------------------------------------- download
def test_manifest_covers_raw_files():
    manifest = read_manifest(MANIFEST)
    listed = {f.path for f in manifest}
    on_disk = {p.relative_to(RAW).as_posix() for p in RAW.rglob("*")
               if p.is_file() and p.name not in ("SOURCE.md", "MANIFEST.json")}
    # project-authored files (no upstream, never downloaded): listed with their sha256 apart
    local = {f["path"]: f["sha256"] for f in json.loads(MANIFEST.read_text()).get("local_files", [])}
    assert listed | set(local) == on_disk and not listed & set(local)
    assert all(file_sha256(RAW / p) == h for p, h in local.items())
    assert all(len(f.commit) == 40 and len(f.sha256) == 64 for f in manifest)
    verify_raw(RAW, manifest)


def _small_manifest():
    return [f for f in read_manifest(MANIFEST) if f.path.startswith(("TIMED/TIMED_validation", "RoAD/"))]


def _mirror(tmp_path: Path, manifest, corrupt: str | None = None) -> Path:
    """A local copy of the upstream layout <repo>/<commit>/<path>, served as file:// URLs."""
    root = tmp_path / "mirror"
    for f in manifest:
        p = root / f.repo / f.commit / f.upstream_path
        p.parent.mkdir(parents=True, exist_ok=True)
        data = (RAW / f.path).read_bytes()
        p.write_bytes(data + b"tampered" if f.path == corrupt else data)
    return root


def test_fetch_online_from_mirror(tmp_path):
    manifest = _small_manifest()
    mirror = _mirror(tmp_path, manifest)
    origins = fetch_raw(tmp_path / "out", manifest, mode="online", base_url=mirror.as_uri())
    assert all(o.startswith("file://") for o in origins.values())
    verify_raw(tmp_path / "out", manifest)
    assert manifest[0].url().startswith(f"https://raw.githubusercontent.com/{manifest[0].repo}/{manifest[0].commit}/")


def test_fetch_online_checksum_mismatch_raises(tmp_path):
    manifest = _small_manifest()
    mirror = _mirror(tmp_path, manifest, corrupt="RoAD/RoAD_test.csv")
    for mode in ("online", "auto"):  # a mismatch never falls back to the vendored copy
        with pytest.raises(DatasetError, match="RoAD/RoAD_test.csv: sha256 mismatch"):
            fetch_raw(tmp_path / mode, manifest, mode=mode, vendored=RAW, base_url=mirror.as_uri())


def test_fetch_offline_and_vendored_mismatch(tmp_path):
    manifest = _small_manifest()
    origins = fetch_raw(tmp_path / "out", manifest, mode="offline", vendored=RAW)
    assert all(o.startswith("vendored:") for o in origins.values())
    verify_raw(tmp_path / "out", manifest)
    bad = tmp_path / "vendored"
    shutil.copytree(RAW / "RoAD", bad / "RoAD")
    shutil.copytree(RAW / "TIMED", bad / "TIMED")
    with open(bad / "TIMED/TIMED_validation_set.csv", "a") as f:
        f.write("x")
    with pytest.raises(DatasetError, match="TIMED/TIMED_validation_set.csv: sha256 mismatch"):
        fetch_raw(tmp_path / "out2", manifest, mode="offline", vendored=bad)
    with pytest.raises(DatasetError, match="sha256 mismatch"):
        verify_raw(bad, manifest)


def test_fetch_network_error(tmp_path, caplog):
    manifest = _small_manifest()

    def unreachable(url: str) -> bytes:
        raise urllib.error.URLError("no route to host")

    with pytest.raises(DatasetError, match="cannot fetch"):
        fetch_raw(tmp_path / "a", manifest, mode="online", fetch=unreachable)
    origins = fetch_raw(tmp_path / "b", manifest, mode="auto", vendored=RAW, fetch=unreachable)
    assert all(o.startswith("vendored:") for o in origins.values())
    assert "using the vendored copy" in caplog.text


# ------------------------------------------------------------------------------------------------ corpus
def test_coco_sample():
    path = RAW / "coco/coco_30k.csv"
    a = coco_captions(path, 200, seed=0, holdout_first=5000)
    assert a.num_rows == 200 and a.equals(coco_captions(path, 200, seed=0, holdout_first=5000))
    assert not a.equals(coco_captions(path, 200, seed=1, holdout_first=5000))
    import pandas as pd
    head = set(pd.read_csv(path, dtype=str, keep_default_na=False)["coco_id"][:5000])
    assert not head & set(a.column("source_id").to_pylist())
    assert all("\n" not in t and t for t in a.column("text").to_pylist())
    with pytest.raises(DatasetError, match="corpus size 25001 not in 1..25000"):
        coco_captions(path, 25001, seed=0, holdout_first=5000)


def test_hf_corpus_lazy_import(monkeypatch):
    class FakeSplit:
        column_names = ["text"]

        def __getitem__(self, key):
            return ["", " = Heading = ", "short", "A long enough wikipedia sentence number one.",
                    "Another long enough wikipedia sentence here.", "Third sentence, also long enough."]

    fake = types.SimpleNamespace(load_dataset=lambda name, config, split: FakeSplit())
    monkeypatch.setitem(sys.modules, "datasets", fake)
    t = hf_texts("wikitext", "wikitext-103-raw-v1", "train", "text", size=2, seed=0)
    assert t.num_rows == 2 and set(t.column("source_id").to_pylist()) <= {"3", "4", "5"}
    assert t.column("source")[0].as_py() == "hf:wikitext/wikitext-103-raw-v1/train"
    with pytest.raises(DatasetError, match="no field 'content'"):
        hf_texts("wikitext", None, "train", "content", size=2, seed=0)
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails
    with pytest.raises(DatasetError, match=r"t2iedit\[hf\]"):
        hf_texts("wikitext", None, "train", "text", size=2, seed=0)


# ------------------------------------------------------------------------------ tasks (no Prefect server)
def test_prepare_tasks_write_and_reuse(tmp_path):
    from tasks.edit_data import prepare_corpus, prepare_edit_set, verified_raw

    assert verified_raw.fn(RAW, MANIFEST, "offline", tmp_path / "dl") == RAW
    out = tmp_path / "datasets"
    assert prepare_edit_set.fn(out, "fp1", RAW, "timed", "test", None, "keep_first") == out
    es = read_edit_set(out / "edits.parquet", out / "eval_prompts.parquet")
    assert es.edits.num_rows == 82
    report = json.loads((out / "report.json").read_text())
    assert report["policy"] == "keep_first" and report["over_77_tokens"] == []
    assert "'A dog'" in (out / "report.md").read_text()
    mtime = (out / "edits.parquet").stat().st_mtime_ns
    prepare_edit_set.fn(out, "fp1", RAW, "timed", "test", None, "keep_all")  # same fingerprint: reused
    assert (out / "edits.parquet").stat().st_mtime_ns == mtime
    prepare_edit_set.fn(out, "fp2", RAW, "timed", "test", None, "keep_all")  # new fingerprint: recomputed
    assert read_edit_set(out / "edits.parquet", out / "eval_prompts.parquet").edits.num_rows == 104
    corpus = prepare_corpus.fn(tmp_path / "corpus", "fp", RAW / "coco/coco_30k.csv", "coco", 50, 0, 5000)
    assert pa.parquet.read_table(corpus / "corpus.parquet").num_rows == 50


def test_verified_raw_checks_only_the_listed_files(tmp_path):
    """The corpus stage verifies just the COCO captions: other raw files need not exist, a tampered
    or unlisted one is an error naming it."""
    from tasks.edit_data import verified_raw

    raw = tmp_path / "raw"
    (raw / "coco").mkdir(parents=True)
    shutil.copy2(RAW / "coco/coco_30k.csv", raw / "coco/coco_30k.csv")
    assert verified_raw.fn(raw, MANIFEST, "offline", tmp_path / "dl", only=["coco/coco_30k.csv"]) == raw
    with pytest.raises(DatasetError, match="TIMED"):
        verified_raw.fn(raw, MANIFEST, "offline", tmp_path / "dl")  # everything: the rest is missing
    with pytest.raises(DatasetError, match=r"no entry for \['coco/other.csv'\]"):
        verified_raw.fn(raw, MANIFEST, "offline", tmp_path / "dl", only=["coco/other.csv"])
    with (raw / "coco/coco_30k.csv").open("a") as f:
        f.write("tampered,row\n")
    with pytest.raises(DatasetError, match=r"coco/coco_30k.csv: sha256 mismatch"):
        verified_raw.fn(raw, MANIFEST, "offline", tmp_path / "dl", only=["coco/coco_30k.csv"])


def test_stage_params_validation():
    import yaml
    from flows.prepare_datasets import DatasetsParams

    from flows.prepare_corpus import CorpusParams

    params = yaml.safe_load((RAW.parents[1] / "params.yaml").read_text())
    section = params["datasets"]
    DatasetsParams.model_validate(section)
    assert CorpusParams.model_validate(params["corpus"]).size > 0
    with pytest.raises(ValueError):
        DatasetsParams.model_validate({**section, "corpus": params["corpus"]})  # its own stage now
    with pytest.raises(ValueError, match="user_file"):
        DatasetsParams.model_validate({**section, "name": "user"})
    with pytest.raises(ValueError):
        DatasetsParams.model_validate({**section, "policy": "keep_first"})  # unknown key
    with pytest.raises(ValueError):
        DatasetsParams.model_validate({**section, "conflict_policy": "newest"})
