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
    Hk = model.config.num_kv_heads  # hindsight's head split: one layer leaning each way, one even
    split = [[1.0] + [0.2] * (Hk - 1), [1.0] * Hk, [0.2] * (Hk - 1) + [1.0]]
    g = (Fa.generate if packed else R.generate)(
        model, None, prompt, budget=12, window=4, interval=6, max_new_tokens=30, allocator=allocator, policy=policy,
        profile={"demand": [0.3, 0.5, 0.2], "head_split": split}, record_positions=True)
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
@pytest.mark.parametrize("allocator, policy", [("reasonalloc", "rkv"), ("uniform", "snapkv"), ("adakv", "rkv"),
                                               ("hindsight", "rkv")])
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
    assert not ok and f"event 1 (step 6), layer 2, KV head 0: head budget {theirs} in the backend, {ours} in the reference" in text
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
    assert "a tie at float64: these scores are equal within rtol" in text


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


# ----------------------------------------------------------------------------------------------
# Issue 34: the vectors pin every choice. Each mutant is a deliberately wrong one-line variant of a reference
# function (file, the exact text it replaces, the wrong text, what it breaks); the committed vectors must catch
# every one: a vector set that lets a mutant pass is a failing test. Not listed, being equivalent: robustify's
# high clip without its raise to max(lo·m, floor, m) (where the raise matters, only m for every unit reaches
# the total, which the final rescale gives anyway).

MUTANTS = [
    ("reasonalloc.py", "    if prefer is not None:\n", "    if False:\n", "rounding ties by index, not demand"),
    ("reasonalloc.py", "order[torch.sort(rem, descending=True, stable=True).indices]",
     "order[torch.sort(rem.flip(0), descending=True, stable=True).indices.flip(0)]", "rounding ties to the later"),
    ("reasonalloc.py", "low, high = max(lo * m, floor), max(hi * m, lo * m, floor, m)",
     "low, high = lo * m, max(hi * m, lo * m, floor, m)", "low clip ignores the floor"),
    ("reasonalloc.py", "low, high = max(lo * m, floor), max(hi * m, lo * m, floor, m)",
     "low, high = max(0.25 * m, floor), max(hi * m, lo * m, floor, m)", "robustify's lo ignored"),
    ("reasonalloc.py", "low, high = max(lo * m, floor), max(hi * m, lo * m, floor, m)",
     "low, high = max(lo * m, floor), max(2.0 * m, lo * m, floor, m)", "robustify's hi ignored"),
    ("reasonalloc.py", "    x = d.pow(power)\n", "    x = d.pow(0.5)\n", "robustify's power ignored"),
    ("reasonalloc.py", "    x = x / x.max() + 1e-12\n", "    x = x / x.max()\n", "no share for zero demand"),
    ("reasonalloc.py", "torch.ones(n, dtype=torch.float64, device=d.device) if x.sum() <= 0",
     "torch.zeros(n, dtype=torch.float64, device=d.device) if x.sum() <= 0", "all-zero demand not uniform"),
    ("reasonalloc.py", "    lo = bp / beta\n", "    lo = bp / 20.0\n", "pyramid's beta ignored"),
    ("reasonalloc.py", "    if num_layers == 1:\n        return torch.tensor([budget], device=\"cpu\")\n",
     "    if num_layers == 1:\n        return torch.tensor([budget + 1], device=\"cpu\")\n", "a pyramid of one layer"),
    ("reasonalloc.py", "    hi = 2 * bp - lo\n", "    hi = 2 * bp\n", "pyramid's top layer"),
    ("reasonalloc.py", "power=gamma, lo=lo, hi=hi, floor=window)", "power=0.5, lo=lo, hi=hi, floor=window)",
     "wave's gamma ignored"),
    ("reasonalloc.py", "power=gamma, lo=lo, hi=hi, floor=window)", "power=gamma, lo=0.25, hi=2.0, floor=window)",
     "wave's clips ignored"),
    ("reasonalloc.py", "power=gamma, lo=lo, hi=hi, floor=window)", "power=gamma, lo=lo, hi=hi, floor=0)",
     "wave's floor w dropped"),
    ("reasonalloc.py", "[s.double() * (len(s) + window) for s in scores]", "[s.double() * len(s) for s in scores]",
     "length utility without the window"),
    ("reasonalloc.py", "out.append(1 - rank / max(len(s), 1))", "out.append(-rank)", "rank utility not a quantile"),
    ("reasonalloc.py", "    if normalize_heads:\n", "    if False:\n", "normalize_heads ignored"),
    ("reasonalloc.py", "    k = len(scores) * (int(layer_budget) - window)\n", "    k = len(scores) * int(layer_budget)\n",
     "pooled top-k counts the window"),
    ("reasonalloc.py", "top = torch.sort(pooled, descending=True, stable=True).indices[:k]",
     "top = (len(pooled) - 1 - torch.sort(pooled.flip(0), descending=True, stable=True).indices)[:k]",
     "pooled ties to the later head"),
    ("reasonalloc.py", "power=beta, lo=mu, hi=hi, floor=window)", "power=0.5, lo=mu, hi=hi, floor=window)",
     "head level's beta ignored"),
    ("reasonalloc.py", "power=beta, lo=mu, hi=hi, floor=window)", "power=beta, lo=0.25, hi=hi, floor=window)",
     "head level's mu ignored"),
    ("reasonalloc.py", "power=beta, lo=mu, hi=hi, floor=window)", "power=beta, lo=mu, hi=2.0, floor=window)",
     "head level's hi ignored"),
    ("reasonalloc.py", "power=beta, lo=mu, hi=hi, floor=window)", "power=beta, lo=mu, hi=hi, floor=0)",
     "head level's floor w dropped"),
    ("reasonalloc.py", "floor=window, power=beta, lo=mu, hi=hi)", "floor=window, power=1.0, lo=mu, hi=hi)",
     "hindsight's beta ignored"),
    ("reasonalloc.py", "floor=window, power=beta, lo=mu, hi=hi)", "floor=0, power=beta, lo=mu, hi=hi)",
     "hindsight's floor w dropped"),
    ("reasonalloc.py", "torch.as_tensor(head_split[layer],", "torch.as_tensor(head_split[0],", "hindsight reads layer 0"),
    ("reasonalloc.py", "r = head_demand(scores, layer_budget, window=window, utility=utility,",
     "r = head_demand(scores, layer_budget, window=window, utility=\"length\",", "head utility ignored"),
    ("reasonalloc.py", "c = head_demand(scores, layer_budget, window=window, utility=\"raw\").double()",
     "c = head_demand(scores, layer_budget, window=window, utility=\"length\").double()", "Ada-KV pools lengths"),
    ("reasonalloc.py", "round_to_total(c * (1 - alpha) + alpha * bp, Hk * bp)",
     "round_to_total(c * 0.8 + 0.2 * bp, Hk * bp)", "Ada-KV's alpha ignored"),
    ("reasonalloc.py", "        c = c + (Hk * bp - c.sum()) / Hk\n", "        c = c + (Hk * bp - c.sum()) / Hk * 0\n",
     "Ada-KV without its spreading step"),
    ("reasonalloc.py", "return step % interval == 0 and bool((lengths > budgets).any())",
     "return step % interval == 0 and bool((lengths >= budgets).any())", "trigger on a head at its budget"),
    ("reasonalloc.py", "return step % interval == 0 and bool((lengths > budgets).any())",
     "return step > 0 and step % interval == 0 and bool((lengths > budgets).any())", "no compression after the prompt"),
    ("reasonalloc.py", "return step % interval == 0 and bool((lengths > budgets).any())",
     "return step % interval == 0 and bool((lengths > budgets).all())", "trigger only when every head is over"),
    ("evict.py", "logits = reduce_group(logits, gqa_reduce, dim=0)  # (w, T-w)",
     "logits = reduce_group(logits, \"max\", dim=0)  # (w, T-w)", "gqa_reduce ignored"),
    ("evict.py", "logits = reduce_group(logits, gqa_reduce, dim=0)  # (w, T-w)",
     "logits = reduce_group(logits.softmax(-1), gqa_reduce, dim=0).log()  # (w, T-w)", "GQA reduced after softmax"),
    ("evict.py", "att = window_attention(q_win, k, window=window, gqa_reduce=gqa_reduce).mean(dim=0)",
     "att = window_attention(q_win, k, window=window, gqa_reduce=gqa_reduce).max(dim=0).values",
     "max over the window queries, not mean"),
    ("evict.py", "kernel_size=kernel, stride=1, padding=kernel // 2)", "kernel_size=7, stride=1, padding=3)",
     "pooling kernel ignored"),
    ("evict.py", "kernel_size=kernel, stride=1, padding=kernel // 2)", "kernel_size=1, stride=1, padding=0)",
     "no max-pooling"),
    ("evict.py", "return lam * importance - (1 - lam) * R[: k.shape[0] - window]",
     "return 0.1 * importance - 0.9 * R[: k.shape[0] - window]", "lam ignored"),
    ("evict.py", "return lam * importance - (1 - lam) * R[: k.shape[0] - window]",
     "return lam * importance - (1 - lam) * R[window:]", "redundancy of the wrong rows"),
    ("evict.py", "    similar = cos > sim_threshold\n", "    similar = cos > 0.5\n", "sim_threshold ignored"),
    ("evict.py", "    rows = idx if zero_col0_quirk else idx[similar.any(dim=-1)]\n", "    rows = idx\n",
     "zero_col0_quirk ignored"),
    ("evict.py", "    rows = idx if zero_col0_quirk else idx[similar.any(dim=-1)]\n",
     "    rows = idx[similar.any(dim=-1)]\n", "no column-0 quirk by default"),
    ("evict.py", "    cos.fill_diagonal_(0.0)\n", "    pass\n", "diagonal kept"),
    ("evict.py", "    return cos.mean(dim=0).softmax(dim=-1)\n", "    return cos.mean(dim=1).softmax(dim=-1)\n",
     "row mean, not column mean"),
    ("evict.py", "kn = k / (k.norm(dim=-1, keepdim=True) + 1e-8)", "kn = k / k.norm(dim=-1, keepdim=True)",
     "R-KV's normalisation epsilon"),
    ("evict.py", "order = torch.sort(scores, descending=True, stable=True).indices[: budget - window]",
     "order = (n - 1 - torch.sort(scores.flip(0), descending=True, stable=True).indices)[: budget - window]",
     "selection ties to the newer token"),
    ("evict.py", "    return torch.cat([order.sort().values, torch.arange(n, T, device=scores.device)])\n",
     "    return torch.cat([order.sort().values, torch.arange(n + 1, T, device=scores.device)])\n",
     "the window shortened"),
]


def mutated(file: str, old: str, new: str):
    """A copy of reasonalloc.py or evict.py as a fresh module with `old` replaced by `new` (once, exactly)."""
    import types

    source = (HERE / file).read_text()
    assert source.count(old) == 1, f"the mutant's text is not found once in {file}: {old!r}"
    module = types.ModuleType(f"mutant_{Path(file).stem}")
    module.__file__ = str(HERE / file)
    sys.modules[module.__name__] = module  # dataclasses look their module up while the file runs
    try:
        exec(compile(source.replace(old, new), module.__file__, "exec"), module.__dict__)
    finally:
        del sys.modules[module.__name__]
    return module


def caught(modules: dict) -> list[str]:
    """The vector cases the given modules fail (a wrong output or an error), as 'file #index'."""
    failed = []
    for name in ("robustify", "layer_budgets", "head_budgets", "keep_indices", "scores", "trigger"):
        for i, case in enumerate(json.loads((HERE / "vectors" / f"{name}.json").read_text())["cases"]):
            try:
                ok = C.same_output(case["output"], C.run_case(name, case["inputs"], **modules))
            except Exception:  # noqa: BLE001 (a mutant that crashes is caught too)
                ok = False
            if not ok:
                failed.append(f"{name} #{i}")
    return failed


def test_the_reference_passes_every_vector():
    assert caught({}) == []


@pytest.mark.parametrize("file, old, new, what", MUTANTS, ids=[m[3] for m in MUTANTS])
def test_every_mutant_fails_a_committed_vector(file, old, new, what):
    module = mutated(file, old, new)
    assert caught({"evict": module} if file == "evict.py" else {"R": module}), \
        f"no committed vector catches the mutant '{what}'"


def test_mutants_cover_every_option_of_every_vector_function():
    """At least one mutant per option of each function the vectors cover (and the tie rules, listed above)."""
    options = set()
    for fn in (R.robustify, R.wave_layers, R.pyramid_schedule, R.head_budgets, R.adakv_head_budgets,
               C.evict.rkv_score, C.evict.snapkv_score):
        options |= set(C.resolved_options(fn, {}))
    named = {"power", "lo", "hi", "floor", "gamma", "beta", "mu", "utility", "normalize_heads", "alpha", "lam",
             "gqa_reduce", "kernel", "sim_threshold", "zero_col0_quirk"}
    assert options == named  # a new option needs a mutant here
    text = " ".join(m[3] for m in MUTANTS)
    for option in named - {"floor", "utility", "power"}:
        assert option in text, option
    assert all(w in text for w in ("floor", "utility", "power", "ties"))


def test_check_reports_the_three_planted_bugs_by_their_pattern(recipe):
    """Issue 34: a constant shift of every kept position, a protected window one token short, and a head-budget
    split that differs are each named by their pattern, before the generic hint."""
    doc = document(recipe)
    # 1. every kept position of an event shifted by one (a backend counting positions from 1)
    bad = copy.deepcopy(doc)
    e = bad["events"][2]
    e["kept_positions"] = [[[p + 1 for p in head] for head in layer] for layer in e["kept_positions"]]
    ok, text = check_lines(bad, recipe)
    assert not ok and "pattern: every kept position of this event, in every head, is the reference's +1" in text
    assert "not a tie" not in text
    # 2. the window one token short: the newest token of a head evicted for an older one
    bad = copy.deepcopy(doc)
    e = bad["events"][2]
    kept, before = e["kept_positions"][0][1], bad["events"][1]["kept_positions"][0][1]
    held = set(before) | set(range(max(before) + 1, 30 + e["step"]))
    kept[-1] = min(held - set(kept))
    kept.sort()
    ok, text = check_lines(bad, recipe)
    assert not ok and "pattern: protected-window tokens evicted: the backend dropped [" in text
    assert f"among the head's w = {doc['settings']['window']} newest positions" in text
    # 3. a head budget moved within its layer: the layer's whole split and the reference's demand are shown
    bad = copy.deepcopy(doc)
    hb = bad["events"][1]["head_budgets"][2]
    hb[0], hb[1] = hb[0] + 1, hb[1] - 1
    ok, text = check_lines(bad, recipe)
    ours = doc["events"][1]
    assert not ok and f"layer 2's budgets b_lh: {hb} in the backend, {ours['head_budgets'][2]} in the reference" in text
    assert f"tokens each head held before (T_h): {ours['lengths_before'][2]}" in text
    assert "the reference's head demand r_h" in text and "near-tie" in text


def test_check_keeps_json_positions_and_names_the_weights_source(recipe, tmp_path):
    doc = document(recipe)
    bad = tmp_path / "cut.json"
    bad.write_text(json.dumps(doc, indent=1)[:500])
    with pytest.raises(ValueError, match=r"not valid JSON \(.* at line \d+, column \d+\)"):
        C.read_events(bad)
    empty = tmp_path / "empty_source.json"
    empty.write_text(json.dumps({**doc, "model": {**doc["model"], "source": {}}}))
    with pytest.raises(ValueError, match="model.source must name the weights"):
        C.read_events(empty)
    unverified = {**doc, "model": {**doc["model"], "source": {"fingerprint": None}}}
    lines = []
    assert C.check(unverified, recipe, out=lines.append)  # the recipe model given: the run agrees, with a note
    assert lines[0].startswith("note: the file names no weight fingerprint")


def test_near_ties_are_judged_at_the_files_dtype(recipe):
    """Issue 33, item 6: the tolerance under which two scores tie is the file's dtype's rounding."""
    assert C.DTYPE_RTOL["bfloat16"] > C.DTYPE_RTOL["float32"] > C.DTYPE_RTOL["float64"]
    a, b = 1.0, 1.0 + 5e-3  # apart in float32, one rounding step apart in bfloat16 (2^-8 = 3.9e-3)
    assert C.tie(a, b, C.DTYPE_RTOL["bfloat16"]) and not C.tie(a, b, C.DTYPE_RTOL["float32"])
    d = {"event": 0, "step": 0, "field": "kept_positions", "layer": 0, "head": 0, "theirs": [0, 5], "ours": [1, 5]}
    doc = {"settings": {"dtype": "bfloat16", "policy": "rkv", "policy_options": {}},
           "events": [{"kept_positions": [[[0, 5]]]}]}
    lines = C.explain(d, [([0, 1, 5], [a, b])], doc, C.DTYPE_RTOL["bfloat16"], C.ATOL, {"kept_positions": [[[1, 5]]]})
    assert "a tie at bfloat16" in lines[-1]


# ----------------------------------------------------------------------------------------------
# A port written from docs/rules.md alone, in plain Python (no torch, no line of reasonalloc.py or evict.py):
# it must pass every vector, which checks that the document is complete.

def port_round(x, total, prefer=None):
    base = [math.floor(v + 1e-9) for v in x]
    short = total - sum(base)
    assert 0 <= short <= len(x)
    order = list(range(len(x)))
    if prefer is not None:
        order.sort(key=lambda i: -prefer[i])  # Python's sort is stable
    order.sort(key=lambda i: -(x[i] - base[i]))
    for i in order[:short]:
        base[i] += 1
    return base


def port_robustify(demand, total, power=0.5, lo=0.25, hi=2.0, floor=0):
    n = len(demand)
    m = total / n
    low, high = max(lo * m, floor), max(hi * m, lo * m, floor, m)
    x = [d ** power for d in demand]
    if sum(x) <= 0:
        x = [1.0] * n
    elif any(math.isinf(v) for v in x):
        x = [1.0 if math.isinf(v) else 0.0 for v in x]
    top = max(x)
    x = [v / top + 1e-12 for v in x]

    def filled(s):
        total_ = 0.0
        for v in x:
            total_ += min(max(v * s, low), high)
        return total_

    a, b = 0.0, 1.0
    while filled(b) < total and b < 1e300:
        b *= 2
    for _ in range(200):
        mid = (a + b) / 2
        if mid in (a, b):
            break
        a, b = (mid, b) if filled(mid) < total else (a, mid)
    r = [min(max(v * b, low), high) for v in x]
    s = 0.0
    for v in r:
        s += v
    return port_round([v * (total / s) for v in r], total, prefer=demand)


def port_layers(allocator, L, B, w, demand, options):
    if allocator in ("uniform", "head", "adakv", "hindsight"):
        return [B] * L
    if allocator == "pyramid":
        if L == 1:
            return [B]
        bp = B - w
        lo = bp / options["beta"]
        hi = 2 * bp - lo
        return port_round([hi - l * (hi - lo) / (L - 1) + w for l in range(L)], L * B)
    return port_robustify(demand, L * B, options["gamma"], options["lo"], options["hi"], w)


def port_demand(scores, B_l, w, utility, normalize):
    u = []
    for s in scores:
        if utility == "length":
            u.append([v * (len(s) + w) for v in s])
        elif utility == "rank":
            order = sorted(range(len(s)), key=lambda i: -s[i])
            rank = {i: r for r, i in enumerate(order)}
            u.append([1 - rank[i] / len(s) for i in range(len(s))])
        else:
            u.append(list(s))
    if normalize:
        u = [[(v - min(h)) / max(sum(x - min(h) for x in h), 1e-30) for v in h] if h else h for h in u]
    k = len(scores) * (B_l - w)
    pool = [(v, h) for h, head in enumerate(u) for v in head]
    if k <= 0 or not pool:
        return [0] * len(scores)
    if k >= len(pool):
        return [len(s) for s in scores]
    winners = sorted(range(len(pool)), key=lambda i: -pool[i][0])[:k]
    return [sum(1 for i in winners if pool[i][1] == h) for h in range(len(scores))]


def port_heads(rule, scores, B_l, w, o):
    Hk = len(scores)
    if rule == "uniform_heads":
        return [B_l] * Hk
    if rule == "head_budgets":
        r = port_demand(scores, B_l, w, o["utility"], o["normalize_heads"])
        return port_robustify(r, Hk * B_l, o["beta"], o["mu"], o["hi"], w)
    if rule == "hindsight_heads":
        return port_robustify(o["head_split"][o["layer"]], Hk * B_l, o["beta"], o["mu"], o["hi"], w)
    c = port_demand(scores, B_l, w, "raw", False)
    bp = B_l - w
    if sum(c) < Hk * bp:
        c = [v + (Hk * bp - sum(c)) / Hk for v in c]
    return [b + w for b in port_round([v * (1 - o["alpha"]) + o["alpha"] * bp for v in c], Hk * bp)]


def port_keep(scores, budget, w):
    n = len(scores)
    if n + w <= budget:
        return list(range(n + w))
    return sorted(sorted(range(n), key=lambda i: -scores[i])[:budget - w]) + list(range(n, n + w))


def softmax(xs):
    top = max(xs)
    e = [math.exp(v - top) for v in xs]
    return [v / sum(e) for v in e]


def port_scores(policy, q, k, w, o):
    T, D = len(k), len(k[0])
    n = T - w
    if n <= 0:
        return []
    dot = lambda a, b: sum(x * y for x, y in zip(a, b))  # noqa: E731
    att = []
    for i in range(w):
        logits = [[dot(q[g][i], k[j]) / math.sqrt(D) for j in range(n)] for g in range(len(q))]
        red = [max(col) if o["gqa_reduce"] == "max" else sum(col) / len(col) for col in zip(*logits)]
        att.append(softmax(red))
    mean = [sum(a[j] for a in att) / w for j in range(n)]
    half = o["kernel"] // 2
    importance = [max(mean[max(0, j - half):j + half + 1]) for j in range(n)]
    if policy == "snapkv":
        return importance
    kn = [[x / (math.sqrt(dot(r, r)) + 1e-8) for x in r] for r in k]
    C = [[0.0 if i == j else dot(kn[i], kn[j]) for j in range(T)] for i in range(T)]
    for i in range(T):
        similar = [j for j in range(T) if C[i][j] > o["sim_threshold"]]
        if similar or o["zero_col0_quirk"]:
            C[i][max(similar, default=0)] = 0.0
    R = softmax([sum(C[i][j] for i in range(T)) / T for j in range(T)])
    return [o["lam"] * importance[j] - (1 - o["lam"]) * R[j] for j in range(n)]


def port_trigger(P, budgets, interval, N):
    lengths, steps = [[P] * len(row) for row in budgets], []
    for step in range(N + 1):
        if step > 0:
            lengths = [[t + 1 for t in row] for row in lengths]
        if step % interval == 0 and any(t > b for row, brow in zip(lengths, budgets) for t, b in zip(row, brow)):
            steps.append(step)
            lengths = [[min(t, b) for t, b in zip(row, brow)] for row, brow in zip(lengths, budgets)]
    return steps


def port_case(name, x):
    if name == "robustify":
        return port_robustify(x["demand"], x["total"], x["power"], x["lo"], x["hi"], x["floor"])
    if name == "layer_budgets":
        return port_layers(x["allocator"], x["num_layers"], x["budget"], x["window"], x["profile_demand"],
                           x["options"])
    if name == "head_budgets":
        return port_heads(x["rule"], x["scores"], x["layer_budget"], x["window"], x["options"])
    if name == "keep_indices":
        return port_keep(x["scores"], x["budget"], x["window"])
    if name == "scores":
        return port_scores(x["policy"], x["q_win"], x["k"], x["window"], x["options"])
    return port_trigger(x["prompt_length"], x["budgets"], x["interval"], x["max_new_tokens"])


def test_a_port_written_from_the_rules_document_passes_every_vector():
    failed = []
    for name in ("robustify", "layer_budgets", "head_budgets", "keep_indices", "scores", "trigger"):
        for i, case in enumerate(json.loads((HERE / "vectors" / f"{name}.json").read_text())["cases"]):
            if not C.same_output(case["output"], port_case(name, case["inputs"])):
                failed.append(f"{name} #{i}")
    assert failed == []
