"""The golden reference (conformance.py): events documents, the replay checker, the conformance vectors."""

import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import conformance as C
import fast as Fa
import reasonalloc as R

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def recipe():
    return C.recipe_model(C.TINY_CONFIG, 0)


def document(model, *, packed=False, allocator="reasonalloc", policy="rkv"):
    prompt = torch.tensor([(5 * i + 1) % 96 for i in range(30)])
    g = (Fa.generate if packed else R.generate)(
        model, None, prompt, budget=12, window=4, interval=6, max_new_tokens=30, allocator=allocator, policy=policy,
        profile=[0.3, 0.5, 0.2], record_positions=True)
    return C.events_document(model, g, source={"recipe": "lcg64", "seed": 0, "config": C.TINY_CONFIG})


def check_lines(doc, model):
    lines = []
    return C.check(doc, model, out=lines.append), "\n".join(lines)


def test_vectors_regenerate_byte_for_byte(tmp_path):
    """The committed vectors are what `python conformance.py vectors` writes, to the byte."""
    written = C.write_vectors(tmp_path)
    committed = sorted(p.relative_to(HERE / "vectors") for p in (HERE / "vectors").rglob("*.json"))
    assert sorted(p.relative_to(tmp_path) for p in written) == committed
    for rel in committed:
        assert (tmp_path / rel).read_bytes() == (HERE / "vectors" / rel).read_bytes(), f"vectors/{rel} changed"


def test_vectors_cover_the_adversarial_cases():
    cases = {name: json.loads((HERE / "vectors" / f"{name}.json").read_text())["cases"]
             for name in ("robustify", "layer_budgets", "head_budgets", "keep_indices", "scores")}
    for c in cases["robustify"]:  # exact totals, floors held
        assert sum(c["output"]) == c["inputs"]["total"] and min(c["output"]) >= c["inputs"]["floor"]
    assert {c["inputs"]["allocator"] for c in cases["layer_budgets"]} == set(R.ALLOCATORS)
    kinds = {c["inputs"]["case"] for c in cases["head_budgets"]}
    assert {"ties", "shorter_than_window", "one_head_starved"} <= kinds
    starved = [c for c in cases["head_budgets"] if c["inputs"]["case"] == "one_head_starved"
               and c["inputs"]["rule"] == "head_budgets"]
    assert any(c["output"][0] == 4 for c in starved)  # a head at the floor w = 4 (raw pooling)
    assert {c["inputs"]["policy"] for c in cases["scores"]} == {"rkv", "snapkv"}
    for c in cases["keep_indices"]:  # the window is always kept, and ties go to the older token
        n = len(c["inputs"]["scores"]) + c["inputs"]["window"]
        assert c["output"][-c["inputs"]["window"]:] == list(range(n - c["inputs"]["window"], n))
    tie_case = next(c for c in cases["keep_indices"] if c["inputs"]["scores"] == [1.0, 2.0, 2.0, 1.0, 2.0])
    assert tie_case["output"] == [1, 2, 4, 5, 6, 7]


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("allocator, policy", [("reasonalloc", "rkv"), ("uniform", "snapkv"), ("adakv", "rkv")])
def test_check_passes_on_reference_and_fast_path_events(recipe, tmp_path, packed, allocator, policy):
    doc = document(recipe, packed=packed, allocator=allocator, policy=policy)
    assert doc["settings"]["path"] == ("fast" if packed else "reference") and len(doc["events"]) >= 4
    f = tmp_path / "ev.json"
    f.write_text(json.dumps(doc))
    assert C.read_events(f) == doc
    ok, text = check_lines(doc, recipe)
    assert ok and f"all {len(doc['events'])} compression events agree" in text


def test_committed_event_files_pass_check_from_the_cli():
    for f in sorted((HERE / "vectors" / "events").glob("*.json")):
        r = subprocess.run([sys.executable, "conformance.py", "check", str(f)], capture_output=True, text=True,
                           cwd=HERE, timeout=120)
        assert r.returncode == 0 and "compression events agree" in r.stdout, r.stdout + r.stderr


def test_check_names_a_moved_position_a_budget_and_a_tie(recipe):
    doc = document(recipe)
    # 1. one kept position swapped for one the reference evicted
    bad = copy.deepcopy(doc)
    e = bad["events"][2]
    kept, before = e["kept_positions"][1][0], bad["events"][1]["kept_positions"][1][0]
    held = set(before) | set(range(max(before) + 1, 30 + e["step"]))  # held just before this event
    dropped = min(held - set(kept))  # one the reference evicted here
    kept[0] = dropped  # in place of its oldest kept token (never one of the window's)
    kept.sort()
    ok, text = check_lines(bad, recipe)
    assert not ok and "event 2 (step 12), layer 1, KV head 0: kept positions differ" in text
    assert f"kept only by the backend:   [{dropped}]" in text and "not a tie" in text
    assert "event 1 (step 6): agrees" in text
    # 2. one head budget moved to the other head of its layer (the layer total still holds)
    bad = copy.deepcopy(doc)
    hb = bad["events"][1]["head_budgets"][2]
    theirs, ours = hb[0] + 1, hb[0]
    hb[0], hb[1] = hb[0] + 1, hb[1] - 1
    ok, text = check_lines(bad, recipe)
    assert not ok and f"event 1 (step 6), layer 2, KV head 0: head_budgets {theirs} in the backend, {ours} in the reference" in text
    # 3. a tie broken the other way: SnapKV's max-pooling makes equal scores
    snap = document(recipe, allocator="uniform", policy="snapkv")
    for i, e in enumerate(snap["events"]):
        _, scores = C.replay(recipe, snap, at_step=e["step"], layer=0)
        pos, sc = scores[0]
        kept = e["kept_positions"][0][0]
        pair = next(((a, b) for a, sa in zip(pos, sc) for b, sb in zip(pos, sc)
                     if a in kept and b not in kept and sa == sb), None)
        if pair:
            break
    assert pair, "no tie found to test with"
    bad = copy.deepcopy(snap)
    kept = bad["events"][i]["kept_positions"][0][0]
    kept[kept.index(pair[0])] = pair[1]
    kept.sort()
    ok, text = check_lines(bad, recipe)
    assert not ok and f"event {i} (step {e['step']}), layer 0, KV head 0: kept positions differ" in text
    assert "a tie: these scores are equal within rtol" in text


def test_check_refuses_bad_files_with_one_line(recipe, tmp_path):
    doc = document(recipe)
    cases = {
        "another model": ({**doc, "model": {**doc["model"], "config_hash": "0123456789abcdef"}},
                          "made for another model \\(config_hash"),
        "old": ({k: v for k, v in doc.items() if k not in ("schema", "version")}, "before the format was versioned"),
        "unknown version": ({**doc, "version": 99}, "version 99; this reasonalloc reads version 1 only"),
        "bad sum": (None, "head budgets .* sum to"),
        "bad layer sum": (None, "layer budgets sum to"),
        "schema": ({**doc, "tokens": "abc"}, "\\$.tokens must be array"),
    }
    bad = copy.deepcopy(doc)
    bad["events"][1]["head_budgets"][0][0] += 1
    cases["bad sum"] = (bad, cases["bad sum"][1])
    bad = copy.deepcopy(doc)
    bad["events"][0]["layer_budgets"][0] += 1
    cases["bad layer sum"] = (bad, cases["bad layer sum"][1])
    for name, (d, words) in cases.items():
        f = tmp_path / f"{name}.json"
        f.write_text(json.dumps(d))
        r = subprocess.run([sys.executable, "conformance.py", "check", str(f)], capture_output=True, text=True,
                           cwd=HERE, timeout=120)
        assert r.returncode == 2 and "Traceback" not in r.stderr, (name, r.stderr)
        assert r.stderr.count("\n") == 1 and __import__("re").search(words, r.stderr), (name, r.stderr)
    f = tmp_path / "truncated.json"
    f.write_text(json.dumps(doc)[:500])
    with pytest.raises(ValueError, match="not valid JSON .* truncated"):
        C.read_events(f)
    with pytest.raises(FileNotFoundError, match="no events file"):
        C.read_events(tmp_path / "none.json")


def test_check_keeps_its_exit_contract_on_malformed_settings(recipe, tmp_path):
    """Issue 33, item 4: every malformed file is bad input (exit 2 from the CLI, a ValueError here, one line naming
    the field), never a traceback and never a reported difference: ids outside the vocabulary, an option of the
    wrong type, NaN or a misspelled option, settings generate() refuses, a version that only equals 1 loosely,
    kept positions out of order."""
    doc = document(recipe)

    def edited(change):
        d = copy.deepcopy(doc)
        change(d)
        return d

    def reverse_kept(d):
        d["events"][1]["kept_positions"][0][0].reverse()

    cases = [
        (edited(lambda d: d["tokens"].__setitem__(3, 96)), "tokens holds ids outside the vocabulary of 96"),
        (edited(lambda d: d["prompt_ids"].__setitem__(0, 500)), "prompt_ids holds ids outside the vocabulary"),
        (edited(lambda d: d["settings"]["policy_options"].__setitem__("lam", "x")), "policy_options.lam must be a float"),
        (edited(lambda d: d["settings"]["layer_options"].__setitem__("gamma", float("nan"))), "layer_options.gamma"),
        (edited(lambda d: d["settings"]["policy_options"].__setitem__("lamda", 0.2)), "unknown option 'lamda'"),
        (edited(lambda d: d["settings"]["head_options"].__setitem__("utilty", "raw")), "unknown option 'utilty'"),
        (edited(lambda d: d["settings"]["head_options"].__setitem__("beta", -1.0)), "beta .* must be a number >= 0"),
        (edited(lambda d: d.__setitem__("version", True)), "version True"),
        (edited(lambda d: d.__setitem__("version", 1.0)), "version 1.0"),
        (edited(reverse_kept), "kept positions must be distinct and ascending"),
    ]
    f = tmp_path / "bad.json"
    for d, words in cases:  # the whole reader, as check runs it
        f.write_text(json.dumps(d))
        with pytest.raises(ValueError, match=words):
            C.read_events(f)
    f.write_text(json.dumps(cases[2][0]))  # the CLI: exit status 2 and one line
    r = subprocess.run([sys.executable, "conformance.py", "check", str(f)], capture_output=True, text=True, cwd=HERE,
                       timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "lam must be a float" in r.stderr, r.stderr


def test_cli_events_file_is_versioned_and_passes_check(tiny_dir, tmp_path):
    """`conformance.py record --events` writes the versioned document, with the model's fingerprint, and `check`
    with --model accepts it (and refuses it against other weights)."""
    ev = tmp_path / "ev.json"
    run = [sys.executable, "conformance.py", "record", "--model", str(tiny_dir), "--prompt", "What is 2+3?", "--budget", "12",
           "--window", "4", "--interval", "6", "--max-new-tokens", "30", "--profile", str(tiny_dir / "wave.json"),
           "--events", str(ev)]
    r = subprocess.run(run, capture_output=True, text=True, cwd=HERE, timeout=120)
    assert r.returncode == 0, r.stderr
    doc = C.read_events(ev)
    assert doc["version"] == 1 and "fingerprint" in doc["model"]["source"] and doc["events"]
    assert doc["settings"]["policy_options"]["lam"] == 0.1 and doc["settings"]["head_options"]["mu"] == 0.25
    r = subprocess.run([sys.executable, "conformance.py", "check", str(ev), "--model", str(tiny_dir)],
                       capture_output=True, text=True, cwd=HERE, timeout=120)
    assert r.returncode == 0 and "compression events agree" in r.stdout, r.stdout + r.stderr


@pytest.mark.parametrize("packed", [False, True])
def test_recorded_positions_stream_to_a_spool_not_memory(recipe, tmp_path, packed):
    """Issue 33, item 7: `record` hands generate a compress function that writes each event's kept positions to
    a spool file as it is made, so the run holds none of them; the document joined from the spool equals the one
    of a run that kept them in memory."""
    prompt = torch.tensor([(5 * i + 1) % 96 for i in range(30)])
    gen, compress = (Fa.generate, Fa.compress) if packed else (R.generate, R.compress)
    kw = dict(budget=12, window=4, interval=6, max_new_tokens=30, profile=[0.3, 0.5, 0.2])
    source = {"recipe": "lcg64", "seed": 0, "config": C.TINY_CONFIG}
    with open(tmp_path / "spool", "w+") as spool:
        g = gen(recipe, None, prompt, compress_fn=C.spooled(compress, spool), **kw)
        assert g.events and not any("kept_positions" in e for e in g.events)
        streamed = json.loads("".join(C.document_chunks(C.events_document(recipe, g, source=source), spool)))
    held = C.events_document(recipe, gen(recipe, None, prompt, record_positions=True, **kw), source=source)
    assert streamed == json.loads(json.dumps(held))


def test_lcg_stream_equals_its_definition_across_blocks():
    """Issue 33, item 7: the random-model weights are drawn by jump-ahead in blocks (no Python float per value);
    the values equal lcg_uniform's bit for bit, across block boundaries, and so do the recipe's tensors."""
    stream = C.LCGStream(5, block=7)
    drawn = torch.cat([stream.take(n) for n in (3, 20, 1, 7)])
    assert torch.equal(drawn, torch.tensor(C.lcg_uniform(31, 5), dtype=torch.float64))
    weights, shapes = C.recipe_weights(C.TINY_CONFIG, 3), C.M.checkpoint_shapes(C.M.ModelConfig.from_hf(C.TINY_CONFIG))
    drawn_names = [n for n in sorted(shapes) if not n.endswith("norm.weight")]
    flat = torch.tensor(C.lcg_uniform(sum(math.prod(shapes[n]) for n in drawn_names), 3), dtype=torch.float64)
    start = 0
    for name in drawn_names:
        size = math.prod(shapes[name])
        expected = (flat[start:start + size] / math.sqrt(shapes[name][-1])).float().view(shapes[name])
        assert torch.equal(weights[name], expected), name
        start += size
