"""Evaluation benchmark: does ReasonAlloc beat uniform R-KV, Pyramid and SnapKV at the same total budget?

Three measurements, each printing a Markdown table and writing JSON (`--out`, default bench_results.json):

  fidelity  For each held-out reasoning prompt, generate a greedy reference continuation of N tokens with
            the full cache, then replay it teacher-forced under every method × budget and compare with
            the full cache step by step: mean NLL increase of the reference tokens, top-1 agreement
            (argmax equal to the full cache's argmax), and mean KL(full ‖ compressed), pooled over steps.
  accuracy  pass@1 on a JSON Lines problems file (`problem` or `question`, and `answer`; MATH-500 and
            GSM8K files work as they are), averaged over k samples, answer taken from the last \\boxed{}
            (or the last number) and compared after normalisation.
  speed     decode tokens/s of every method on one teacher-forced continuation, methods interleaved and
            repeated in one run; per-token cost relative to uniform R-KV; cache tokens and bytes held.
  sessions  long multi-turn transcripts of the model's own replies, every method teacher-forced along them
            and scored against the full cache, with paired bootstrap intervals against R-KV; the oracles
            of benchmarks/oracle.py (Oracle-heads, -layers, -split, -tokens: splits from hindsight) can be
            asked for beside the methods, and then ReasonAlloc's signals are scored against the oracle.

Budgets scale with the continuation length the way the paper's do (its budgets are roughly 1/30 to 1/4 of
a reasoning trace): by default B = N/16, N/8, N/4, and the interval is min(B, N/32) (the paper's Δ = 128
against traces of several thousand tokens). `--budgets` and `--interval` override both.

Long runs print progress with an estimate of the time left, and results are written after every cell, so
a rerun with the same settings skips what is finished. Under `torchrun --nproc-per-node N benchmarks/bench.py ...`
the prompts / problems are split across processes (torch.distributed, gloo on CPU) and rank 0 merges.

    python benchmarks/bench.py fidelity --quick        # a few minutes on 2 CPU cores
    python benchmarks/bench.py all                     # fidelity, accuracy and speed at the default sizes
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import re
import statistics
import sys
import time
from fractions import Fraction
from pathlib import Path
os.environ.setdefault("GOMP_SPINCOUNT", "1000")  # before torch loads OpenMP: idle threads soon yield the core

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the project's modules live one folder up

import fast  # noqa: E402
import model as M  # noqa: E402
import reasonalloc as R  # noqa: E402
from conformance import model_fingerprint  # noqa: E402
from convert import locked, resolve_model_dir  # noqa: E402
from files import check_output, model_files, write_atomic  # noqa: E402
from model import DTYPES, check_context, check_device, encode_prompt, stop_ids  # noqa: E402
from profile import find_profile, load_profile, read_jsonl, read_prompts  # noqa: E402
from oracle import ORACLES, Hindsight, full_replay, oracle_compress, signals  # noqa: E402
from reasonalloc import METHODS  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402

HERE = Path(__file__).resolve().parent.parent  # the project folder (data/, results/)

BUDGET_FRACTIONS = (1 / 16, 1 / 8, 1 / 4)
SYSTEM_HINT = "Please reason step by step, and put your final answer within \\boxed{}."


# ----------------------------------------------------------------------------------------------
# Answers: extraction and normalisation


def last_boxed(text: str) -> str | None:
    """The contents of the last \\boxed{...} (or \\fbox{...}), with nested braces balanced."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        return None
    depth = 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j]
    return None  # unbalanced: the generation stopped inside the box


NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:\s*/\s*\d+)?|-?\.\d+")


def extract_answer(text: str) -> str | None:
    """The model's final answer: the last \\boxed{} if there is one, else the last number in the text."""
    boxed = last_boxed(text)
    if boxed is not None and boxed.strip():  # an empty \boxed{} is the instruction echoed back
        return boxed
    numbers = NUMBER.findall(text)
    return numbers[-1] if numbers else None


UNITS = r"(?:cm|mm|km|m|kg|g|mg|l|ml|s|sec|seconds|min|minutes|h|hours|days|weeks|years|dollars|cents|" \
        r"units|degrees|inches|feet|ft|miles|mph|km/h|pages|apples|eggs|marbles|slices|sheep|pens|books)"


def normalize_answer(s: str) -> str:
    """A canonical string for comparing answers: no $, spaces, \\text{}, units, thousands commas or
    \\left/\\right; \\dfrac/\\tfrac → \\frac; \\frac{a}{b} and \\frac ab → a/b; trailing '.0' dropped."""
    s = str(s).strip()
    if "####" in s:  # GSM8K: the rationale, then '#### answer'
        s = s.split("####")[-1]
    s = s.replace("\\!", "").replace("\\,", "").replace("\\;", "").replace("\\ ", "")
    s = s.replace("$", "").replace("\\left", "").replace("\\right", "")
    s = re.sub(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}", r"\1", s)
    s = s.replace("^\\circ", "").replace("^{\\circ}", "").replace("°", "").replace("\\%", "").replace("%", "")
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    s = re.sub(r"\\frac\{([^{}]*)\}\{([^{}]*)\}", r"(\1)/(\2)", s)
    s = re.sub(r"\\frac(\d)(\d)", r"\1/\2", s)
    s = re.sub(r"\(([-\w.]+)\)", r"\1", s)  # (3)/(4) → 3/4, keeping real groupings like (a+b)
    s = s.strip().rstrip(".").strip()
    s = re.sub(rf"(\d)\s*{UNITS}\b\.?$", r"\1", s, flags=re.IGNORECASE)  # 24 cm → 24
    s = re.sub(r"^[a-zA-Z]\s*=\s*", "", s)  # x = 5 → 5
    s = re.sub(r"(\d),(?=\d{3}\b)", r"\1", s)  # 1,200 → 1200
    s = s.replace(" ", "")
    s = re.sub(r"^(-?\d+)\.0+$", r"\1", s)
    return s


def to_number(s: str) -> Fraction | None:
    """The exact value of a normalised answer that is an integer, decimal or a/b fraction, else None."""
    m = re.fullmatch(r"(-?\d+(?:\.\d+)?|-?\.\d+)(?:/(-?\d+(?:\.\d+)?))?", s)
    if not m:
        return None
    num = Fraction(m.group(1))
    if m.group(2) is None:
        return num
    den = Fraction(m.group(2))
    return None if den == 0 else num / den


def answers_match(pred: str | None, gold: str) -> bool:
    """Equal after normalisation, or equal as numbers (so 0.5 == 1/2 == \\frac{1}{2}, 2,000 == 2000)."""
    if pred is None:
        return False
    a, b = normalize_answer(pred), normalize_answer(gold)
    if a == b:
        return True
    x, y = to_number(a), to_number(b)
    return x is not None and y is not None and abs(float(x - y)) <= 1e-6 * max(1.0, abs(float(y)))


def read_problems(path) -> list[dict]:
    """[{'problem', 'answer'}] from JSON Lines with `problem` (or `question`) and `answer`; errors name the line."""
    problems = []
    for n, obj in read_jsonl(path, "problems"):
        if not isinstance(obj, dict):
            raise ValueError(f"{path}, line {n}: expected a JSON object, got {obj!r:.40}")
        problem = obj.get("problem", obj.get("question"))
        if not isinstance(problem, str) or not problem.strip():
            raise ValueError(f"{path}, line {n}: no 'problem' (or 'question') text field")
        if "answer" not in obj or str(obj["answer"]).strip() == "":
            raise ValueError(f"{path}, line {n}: no 'answer' field; every problem needs its reference answer")
        problems.append({"problem": problem, "answer": str(obj["answer"])})
    return problems


def read_sessions(path) -> list[list[str]]:
    """Sessions from JSON Lines with `turns`, a list of user messages answered one after another."""
    out = []
    for n, obj in read_jsonl(path, "sessions"):
        turns = obj.get("turns") if isinstance(obj, dict) else None
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t.strip() for t in turns):
            raise ValueError(f"{path}, line {n}: expected {{\"turns\": [\"first user message\", ...]}} with non-empty texts")
        out.append(turns)
    return out


# ----------------------------------------------------------------------------------------------
# Fidelity metrics


def token_metrics(full_logits: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor,
                  chunk: int = 256) -> torch.Tensor:
    """(N, 3): per reference token, the NLL increase of the token, top-1 agreement (0/1: argmax equal to the
    full cache's argmax) and KL(full ‖ compressed), in float64, `chunk` rows at a time to bound memory."""
    rows = []
    for i in range(0, len(targets), chunk):
        p = torch.log_softmax(full_logits[i:i + chunk].double(), -1)
        q = torch.log_softmax(logits[i:i + chunk].double(), -1)
        t = targets[i:i + chunk, None].to(p.device)
        nll_inc = (p.gather(1, t) - q.gather(1, t))[:, 0]
        agree = (p.argmax(-1) == q.argmax(-1)).double()
        kl = (p.exp() * (p - q)).sum(-1).clamp_min(0.0)
        rows.append(torch.stack([nll_inc, agree, kl], 1))
    return torch.cat(rows) if rows else torch.zeros(0, 3, dtype=torch.float64, device="cpu")


def default_budgets(new_tokens: int, window: int) -> list[int]:
    return sorted({max(window + 1, round(new_tokens * f)) for f in BUDGET_FRACTIONS})


def interval_for(budget: int, new_tokens: int, interval: int | None) -> int:
    return interval if interval else max(1, min(budget, new_tokens // 32))


# ----------------------------------------------------------------------------------------------
# Results: one JSON file of cells, written after every cell; torchrun ranks write parts, rank 0 merges


def read_results(file: Path) -> dict | None:
    """A results file's contents, checked to be one: a JSON object with 'settings' and 'cells' (None if absent)."""
    if not file.exists():
        return None
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file} is not valid JSON ({getattr(e, 'msg', e)}); choose another --out") from None
    if not (isinstance(data, dict) and isinstance(data.get("settings"), dict) and isinstance(data.get("cells"), dict)):
        raise ValueError(f"{file} is not a results file of bench.py (a JSON object with 'settings' and 'cells'); "
                         f"choose another --out")
    return data


class Store:
    def __init__(self, path: Path, settings: dict, rank: int = 0):
        self.path, self.settings, self.rank = Path(path), settings, rank
        self.cells: dict[str, dict] = {}
        parts: dict[str, dict] = {}  # cells of earlier interrupted runs not yet merged into the main file
        for file in [self.path, *sorted(self.path.parent.glob(self.path.name + ".part*"))]:
            data = read_results(file)
            if data is None:
                continue
            if data.get("settings") != settings:
                diff = sorted(k for k in set(settings) | set(data.get("settings", {}))
                              if settings.get(k) != data.get("settings", {}).get(k))
                raise ValueError(f"{file} holds results made with other settings ({', '.join(diff)}); "
                                 f"rerun with the same options, or choose another --out")
            self.cells.update(data["cells"])
            if file != self.path:
                parts.update(data["cells"])
        # Kept in this rank's part file, which it rewrites: a rerun must not overwrite unmerged cells.
        self.new: dict[str, dict] = parts
        self.added = 0  # cells this process computed in this run

    def __contains__(self, key):
        return key in self.cells

    def add(self, key: str, cell: dict):
        self.cells[key] = self.new[key] = cell
        self.added += 1
        self._write(Path(f"{self.path}.part{self.rank}"), self.new)

    def _write(self, file: Path, cells: dict):
        write_atomic(file, json.dumps({"settings": self.settings, "cells": cells}))

    def merge(self, gathered: list[dict]):
        """Rank 0: fold every rank's new cells into the main file and remove the parts."""
        for cells in gathered:
            self.cells.update(cells)
        self._write(self.path, dict(sorted(self.cells.items())))
        for part in self.path.parent.glob(self.path.name + ".part*"):
            part.unlink()


@contextlib.contextmanager
def one_run_at_a_time(file: Path, rank: int, world: int):
    """A results file is written by one run at a time: rank 0 holds an exclusive lock on `.FILE.lock` from
    reading the file to merging into it, and the other ranks start reading once it holds it. A second run on
    the same --out (another process, another torchrun) waits, then resumes from what the first one wrote: no
    cell is lost, and none computed twice."""
    with contextlib.ExitStack() as stack:
        if rank == 0:
            stack.enter_context(locked(file.with_name(f".{file.name}.lock"),
                                       waiting=f"[bench] another run is writing {file}; waiting for it to finish"))
        if world > 1:
            import torch.distributed as dist

            dist.barrier()
        yield


class Progress:
    """'[fidelity] 12/48 cells · prompt 2 · ReasonAlloc B=32 · 3m10s elapsed · ~9m left' on stderr."""

    def __init__(self, name: str, total: int, rank: int = 0):
        self.name, self.total, self.done, self.rank, self.t0 = name, total, 0, rank, time.perf_counter()
        self.timed = 0

    def step(self, what: str, skipped: bool = False):
        self.done += 1
        self.timed += not skipped
        spent = time.perf_counter() - self.t0
        left = spent / self.timed * (self.total - self.done) if self.timed else float("nan")
        tag = f"[{self.name}{'' if self.rank == 0 else f' rank {self.rank}'}]"
        eta = "" if math.isnan(left) else f" · ~{fmt_time(left)} left"
        print(f"{tag} {self.done}/{self.total} · {what}{' (done before)' if skipped else ''} · "
              f"{fmt_time(spent)} elapsed{eta}", file=sys.stderr, flush=True)


def fmt_time(s: float) -> str:
    return f"{s:.0f}s" if s < 60 else f"{int(s // 60)}m{int(s % 60):02d}s"


# ----------------------------------------------------------------------------------------------
# The three measurements. Each takes its share of the units (prompts or problems) and fills the store.


def encode(model, tok, prompt: str, new_tokens: int) -> torch.Tensor:
    return encode_prompt(tok, model.config, prompt, chat=True, max_new_tokens=new_tokens)


def method_options(method: str, budget: int, args, profile) -> dict:
    """The generate / generate_batch keywords of one method at one budget, from the command line."""
    policy, allocator = METHODS[method]
    return dict(budget=budget, allocator=allocator, policy=policy, profile=profile, window=args.window,
                gamma=args.gamma, beta=args.head_beta, mu=args.head_mu, head_utility=args.head_utility,
                interval=interval_for(budget, args.new_tokens, args.interval))


def path_of(packed: bool):
    """The module whose generate and teacher_force run: the packed fast path (fast.py) or the per-head
    reference (reasonalloc.py)."""
    return fast if packed else R


def run_method(model, tok, ids, method: str, budget: int, args, profile, **kw) -> R.Generation:
    return path_of(args.packed).generate(model, tok, ids, **method_options(method, budget, args, profile), **kw)


def forced_logits(model, ids, tokens, method: str, budget: int, args, profile):
    """(logits (N, vocab) predicting each reference token, compression events) of one method."""
    return path_of(args.packed).teacher_force(model, ids, tokens, **method_options(method, budget, args, profile))


def cache_tokens(config, prompt_tokens: int, steps: int, events: list[dict]) -> tuple[list[int], list[int]]:
    """Tokens held (all layers and heads) after each of `steps` decode steps, and what a full cache would
    hold then, from the compression events: between two events every head grows by one token a step."""
    per_step = config.num_layers * config.num_kv_heads
    by_step = {e["step"]: e for e in events}
    last = by_step.get(0)  # the prompt's compression, if there was one
    held, full = [], []
    for s in range(1, steps + 1):
        last = by_step.get(s, last)
        held_then, at = (sum(map(sum, last["lengths_after"])), last["step"]) if last else (per_step * prompt_tokens, 0)
        held.append(held_then + per_step * (s - at))
        full.append(per_step * (prompt_tokens + s))
    return held, full


def teacher_forced(tokens: list[int], observe=None):
    """A generation hook that feeds `tokens` one by one; observe(i, logits) sees the logits that predict
    tokens[i] (with the cache as it stands before that token is fed)."""
    def hook(step, token, logits, cache):
        if step < len(tokens):
            if observe is not None:
                observe(step, logits)
            return tokens[step]
        return None
    return hook


def fidelity(model, tok, prompts, args, profile, store: Store, rank: int = 0, world: int = 1):
    budgets = args.budgets or default_budgets(args.new_tokens, args.window)
    mine = [i for i in range(len(prompts)) if i % world == rank]
    cells = [(i, m, b) for i in mine for m in args.methods for b in ([0] if m == "FullKV" else budgets)]
    prog = Progress("fidelity", len(cells), rank)
    for i in mine:
        todo = []
        for (j, m, b) in cells:
            if j == i and f"fidelity|{i}|{m}|{b}" in store:
                prog.step(f"prompt {i} {m} B={b}", skipped=True)
            elif j == i:
                todo.append((m, b))
        if not todo:
            continue
        ids = encode(model, tok, prompts[i], args.new_tokens)
        tokens = path_of(args.packed).generate(model, tok, ids, budget=args.window + 1, policy="full",
                                               window=args.window, max_new_tokens=args.new_tokens).tokens
        # Every method, FullKV too, replays the reference through R.teacher_force (each interval in one
        # forward pass, equal to step-by-step decoding), so FullKV's replay is the very same computation.
        full_logits = forced_logits(model, ids, tokens, "FullKV", args.window + 1, args, profile)[0]
        for m, b in todo:
            logits, events = forced_logits(model, ids, tokens, m, max(b, args.window + 1), args, profile)
            sums = token_metrics(full_logits, logits, torch.tensor(tokens, device=full_logits.device)).sum(0).tolist()
            n = max(1, len(tokens))
            held, full = cache_tokens(model.config, int(ids.numel()), len(tokens), events)
            store.add(f"fidelity|{i}|{m}|{b}", {
                "prompt": i, "method": m, "budget": b, "steps": len(tokens), "prompt_tokens": int(ids.numel()),
                "nll_increase": sums[0] / n, "top1_agreement": sums[1] / n, "kl": sums[2] / n,
                "compressions": len(events), "mean_cache_tokens": statistics.fmean(held or [0]),
                "mean_full_tokens": statistics.fmean(full or [0]), "reference": tokens})
            prog.step(f"prompt {i} {m} B={b}")


def accuracy(model, tok, problems, args, profile, store: Store, rank: int = 0, world: int = 1):
    """The samples of one (problem, method, budget) are decoded together in one batch (fast.generate_batch,
    tested equal to separate runs), each with its own seed; only the samples the store lacks are run."""
    budgets = args.budgets or default_budgets(args.new_tokens, args.window)
    mine = [i for i in range(len(problems)) if i % world == rank]
    groups = [(i, m, b) for i in mine for m in args.methods for b in ([0] if m == "FullKV" else budgets)]
    prog = Progress("accuracy", len(groups) * args.samples, rank)
    for i, m, b in groups:
        todo = [s for s in range(args.samples) if f"accuracy|{i}|{m}|{b}|{s}" not in store]
        for s in range(args.samples):
            if s not in todo:
                prog.step(f"problem {i} {m} B={b} sample {s}", skipped=True)
        if not todo:
            continue
        prompt = problems[i]["problem"] + "\n" + SYSTEM_HINT
        ids = encode(model, tok, prompt, args.new_tokens)
        results = fast.generate_batch(model, tok, [ids] * len(todo), seeds=todo,
                                      **method_options(m, max(b, args.window + 1), args, profile),
                                   max_new_tokens=args.new_tokens, temperature=args.temperature, top_p=args.top_p)
        for s, g in zip(todo, results):
            pred = extract_answer(g.text)
            store.add(f"accuracy|{i}|{m}|{b}|{s}", {
                "problem": i, "method": m, "budget": b, "sample": s, "prediction": pred, "text": g.text,
                "answer": problems[i]["answer"], "correct": answers_match(pred, problems[i]["answer"]),
                "new_tokens": len(g.tokens), "compressions": len(g.events)})
            prog.step(f"problem {i} {m} B={b} sample {s}")


# ----------------------------------------------------------------------------------------------
# Long multi-turn sessions: the paper's regime, budgets of 64-256 tokens against transcripts of 1,500+.
# SmolLM2 loops when made to write one long answer, so a long coherent reference is built as a chat: the
# model answers held-out problems one after another, each answer its own greedy reply with the full cache.


def distinct_ngrams(tokens: list[int], n: int = 4) -> float:
    """Distinct n-grams over all n-grams: near 1 for varied text, near 0 for a repetition loop."""
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / max(1, len(grams))


@torch.inference_mode()
def session_reference(model, tok, turns: list[str], *, min_tokens: int, turn_tokens: int, packed: bool = True) -> dict:
    """The model answers `turns` in one chat until the transcript passes `min_tokens`. Returns the first
    turn's prompt ids, every later token (the replies and the chat template's text between them), which of
    those are reply tokens (the scored ones), and the replies' text and distinct 4-gram ratio."""
    cfg = model.config
    stops = stop_ids(cfg, tok)
    cache = fast.new_cache(model, window=8, spare=turn_tokens) if packed else model.new_cache()  # never compressed
    messages, rendered, prompt, tokens, scored, replies = [], "", [], [], [], []
    for turn in turns:
        messages.append({"role": "user", "content": turn})
        text = tok.render_messages(messages)
        if not text.startswith(rendered):
            raise ValueError("the chat template does not render a conversation as an extension of its shorter "
                             "prefix, so a session cannot be built turn by turn with this model")
        new = tok.encode(text[len(rendered):], bos=not prompt)
        if prompt:
            tokens += new
            scored += [False] * len(new)
        else:
            prompt = new
        check_context(cfg, len(prompt) + len(tokens), turn_tokens)
        reply = M.decode(model, torch.tensor(new, device="cpu"), cache, max_new_tokens=turn_tokens, stops=stops)
        tokens += reply
        scored += [True] * len(reply)
        replies.append(reply)
        messages.append({"role": "assistant", "content": tok.decode(reply)})
        rendered = text + messages[-1]["content"]
        if len(prompt) + len(tokens) >= min_tokens:
            break
    else:
        raise ValueError(f"a session's {len(turns)} turns make only {len(prompt) + len(tokens)} tokens, fewer than "
                         f"--session-tokens {min_tokens}; give it more turns or lower --session-tokens")
    return {"prompt_ids": prompt, "tokens": tokens, "scored": scored, "turns": len(replies),
            "distinct_4grams": distinct_ngrams([t for r in replies for t in r]),
            "replies_at_cap": sum(len(r) == turn_tokens for r in replies),
            "replies": [tok.decode(r) for r in replies]}


def split_movement(events: list[dict]) -> float:
    """How much the head split moves between consecutive compressions: the share of each layer's budget
    that changes heads (total-variation distance between the layer's head shares), averaged over layers
    and pairs of events. 0 for a fixed split, 1 when every slot changes head."""
    moves = []
    for a, b in zip(events, events[1:]):
        sa, sb = torch.tensor(a["head_budgets"], dtype=torch.float64, device="cpu"), torch.tensor(b["head_budgets"], dtype=torch.float64, device="cpu")
        sa, sb = sa / sa.sum(1, keepdim=True), sb / sb.sum(1, keepdim=True)
        moves.append(float(0.5 * (sa - sb).abs().sum(1).mean()))
    return statistics.fmean(moves) if moves else 0.0


def replay(model, ids, tokens, packed: bool, compress_fn, **options):
    """reasonalloc.teacher_force with another compress_fn, on the packed cache (packed) or the reference's."""
    cache = None if not packed else fast.new_cache(model, options["window"], spare=min(options["interval"], len(tokens) + 1))
    return R.teacher_force(model, ids, tokens, cache=cache, compress_fn=compress_fn, **options)


def session_cell(i: int, method: str, budget: int, interval: int, full_logits, logits, targets, events) -> dict:
    means = token_metrics(full_logits, logits, targets).mean(0).tolist()
    cell = {"session": i, "method": method, "budget": budget, "interval": interval, "scored_tokens": len(targets),
            "nll_increase": means[0], "top1_agreement": means[1], "kl": means[2],
            "compressions": len(events), "split_movement": split_movement(events)}
    if i == 0:  # one session's budget trajectories, for the picture
        cell["trajectory"] = {"steps": [e["step"] for e in events],
                              "layer_budgets": events[0]["layer_budgets"] if events else [],
                              "head_budgets": [e["head_budgets"] for e in events]}
    return cell


def sessions(model, tok, sessions_turns, args, profile, store: Store, rank: int = 0, world: int = 1):
    """Every method (and oracle) teacher-forced along each session's full-cache transcript at every budget and
    interval; with any oracle asked for, also how well ReasonAlloc's signals predict the oracle ('signals')."""
    mine = [i for i in range(len(sessions_turns)) if i % world == rank]
    methods = [m for m in args.methods if m != "FullKV"]  # FullKV is the reference every method is compared to
    configs = [(m, b, d) for d in args.intervals for b in args.budgets for m in methods]
    if any(m in ORACLES for m in methods):  # ReasonAlloc's replay, watched by the oracle
        configs += [("signals", b, d) for d in args.intervals for b in args.budgets]
    def key(i, m, b, d):  # a method's cell, or ReasonAlloc's signals
        return f"signals|{i}|{b}|{d}" if m == "signals" else f"session|{i}|{m}|{b}|{d}"
    prog = Progress("sessions", len(mine) * (1 + len(configs)), rank)
    for i in mine:
        if f"reference|{i}" in store:
            prog.step(f"session {i} reference", skipped=True)
        else:
            store.add(f"reference|{i}", session_reference(model, tok, sessions_turns[i], min_tokens=args.session_tokens,
                                                          turn_tokens=args.turn_tokens, packed=args.packed))
            prog.step(f"session {i} reference ({len(store.cells[f'reference|{i}']['tokens'])} tokens)")
        ref = store.cells[f"reference|{i}"]
        todo = [c for c in configs if key(i, *c) not in store]
        for m, b, d in configs:
            if (m, b, d) not in todo:
                prog.step(f"session {i} {m} B={b} Δ={d}", skipped=True)
        if not todo:
            continue
        ids, tokens = torch.tensor(ref["prompt_ids"], device="cpu"), ref["tokens"]
        scored = torch.tensor(ref["scored"], device=model.embed.weight.device)
        targets = torch.tensor(tokens, device=scored.device)[scored]
        force = path_of(args.packed).teacher_force
        full_logits = force(model, ids, tokens, budget=args.window + 1, policy="full", window=args.window,
                            interval=max(args.intervals))[0][scored]
        hindsight = any(m in ORACLES or m == "signals" for m, _, _ in todo)
        seen = full_replay(model, ids, tokens, window=args.window) if hindsight else None  # the full cache's q, k
        for m, b, d in todo:
            # an oracle replays R-KV's uniform budgets with its own compression; signals watch ReasonAlloc's
            runs = "ReasonAlloc" if m == "signals" else "R-KV" if m in ORACLES else m
            options = {**method_options(runs, b, args, profile), "interval": d}
            if m == "signals":
                watched = []
                ours = fast.compress if args.packed else R.compress
                replay(model, ids, tokens, args.packed, signals(Hindsight(*seen, d), ours, into=watched), **options)
                store.add(key(i, m, b, d), {"session": i, "budget": b, "interval": d, "signals": watched})
            else:
                if m in ORACLES:
                    compress_fn = oracle_compress(Hindsight(*seen, d), *ORACLES[m])
                    logits, events = replay(model, ids, tokens, args.packed, compress_fn, **options)
                else:
                    logits, events = force(model, ids, tokens, **options)
                store.add(key(i, m, b, d), session_cell(i, m, b, d, full_logits, logits[scored], targets, events))
            prog.step(f"session {i} {m} B={b} Δ={d}")


def paired_bootstrap(diffs: list[float], reps: int = 10_000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of paired differences (one per session) and its 95 % percentile bootstrap interval."""
    d = torch.tensor(diffs, dtype=torch.float64, device="cpu")
    g = torch.Generator().manual_seed(seed)
    means = d[torch.randint(len(d), (reps, len(d)), generator=g, device="cpu")].mean(1)
    return float(d.mean()), float(means.quantile(0.025)), float(means.quantile(0.975))


def sessions_table(cells: dict, methods, budgets, intervals, baseline: str = "R-KV") -> str:
    refs = [c for k, c in cells.items() if k.startswith("reference|")]
    out = [f"\n{len(refs)} sessions of {min(len(r['prompt_ids']) + len(r['tokens']) for r in refs)}-"
           f"{max(len(r['prompt_ids']) + len(r['tokens']) for r in refs)} tokens "
           f"({sum(sum(r['scored']) for r in refs)} scored reply tokens, {sum(r['turns'] for r in refs)} replies, "
           f"{sum(r['replies_at_cap'] for r in refs)} cut at the turn cap); distinct 4-gram ratio of the replies "
           f"{min(r['distinct_4grams'] for r in refs):.2f}-{max(r['distinct_4grams'] for r in refs):.2f}. "
           f"Each entry: mean over sessions, and [95 % paired bootstrap interval] of its difference to {baseline}."]
    methods = [m for m in methods if m != "FullKV"]
    fields = [("nll_increase", "ΔNLL", "{:.3f}", 1), ("top1_agreement", "top-1 %", "{:.1f}", 100), ("kl", "KL", "{:.3f}", 1)]
    for d in intervals:
        for b in budgets:
            out += [f"\nB = {b}, Δ = {d}\n", "| method | " + " | ".join(f"{t} | vs {baseline}" for _, t, _, _ in fields)
                    + " | split moves |", "|---" * (2 * len(fields) + 2) + "|"]
            by = {m: {c["session"]: c for c in cells.values() if c.get("method") == m and c.get("budget") == b
                      and c.get("interval") == d} for m in methods}
            base = by.get(baseline, {})
            for m in methods:
                common = sorted(set(by[m]) & set(base))
                if not by[m]:
                    continue
                row = []
                for field, _, fmt, scale in fields:
                    row.append(fmt.format(scale * statistics.fmean(c[field] for c in by[m].values())))
                    if m == baseline or not common:
                        row.append("—")
                    else:
                        mean, lo, hi = paired_bootstrap([by[m][s][field] - base[s][field] for s in common])
                        row.append((fmt + " [" + fmt + ", " + fmt + "]").format(scale * mean, scale * lo, scale * hi))
                move = statistics.fmean(c["split_movement"] for c in by[m].values())
                out.append(f"| {m} | " + " | ".join(row) + f" | {move:.1%} |".replace("%", " %"))
    return "\n".join(out)


def glance_table(cells: dict, methods, budgets, intervals, baseline: str = "R-KV") -> str:
    """The README's form of sessions_table: one row per (B, Δ), the baseline's ΔNLL, then each method's mean
    difference to it and its 95 % paired bootstrap interval."""
    methods = [m for m in methods if m not in ("FullKV", baseline)]
    out = ["\nΔNLL at a glance: " + baseline + "'s, and each method's difference to it [95 % paired bootstrap interval]\n",
           f"| B, Δ | {baseline} | " + " | ".join(methods) + " |", "|---" * (len(methods) + 2) + "|"]
    for d in intervals:
        for b in budgets:
            by = {m: {c["session"]: c["nll_increase"] for c in cells.values() if c.get("method") == m
                      and c.get("budget") == b and c.get("interval") == d} for m in [baseline, *methods]}
            base = by[baseline]
            if not base:
                continue
            row = [f"{statistics.fmean(base.values()):.3f}"]
            for m in methods:
                common = sorted(set(by[m]) & set(base))
                row.append("—" if not common else "{:+.3f} [{:.3f}, {:.3f}]".format(
                    *paired_bootstrap([by[m][s] - base[s] for s in common])))
            out.append(f"| {b}, {d} | " + " | ".join(row) + " |")
    return "\n".join(out)


def signals_table(cells: dict, budgets, intervals) -> str:
    """How well ReasonAlloc's online signals predict the oracle (benchmarks/oracle.py, `signals`): per budget
    and interval, the rank correlation at a compression, averaged over a session's compressions, then over
    sessions, with a 95 % bootstrap interval over sessions."""
    out = ["\nRank correlation with the oracle along ReasonAlloc's replay (mean over sessions of each session's mean "
           "over compressions, [95 % bootstrap interval over sessions]): head demand r_h vs the oracle's head counts "
           "(per layer, over its KV heads), the wave's layer budgets vs the oracle's layer counts (over the layers).\n",
           "| B | Δ | sessions | compressions | heads | layers |", "|---|---|---|---|---|---|"]
    for d in intervals:
        for b in budgets:
            found = [c for c in cells.values() if "signals" in c and c.get("budget") == b and c.get("interval") == d]
            if not found:
                continue
            row = []
            for what in ("heads", "layers"):
                per = [statistics.fmean(v) for c in found if (v := [e[what] for e in c["signals"] if e[what] is not None])]
                row.append("—" if not per else "{:+.2f} [{:+.2f}, {:+.2f}]".format(*paired_bootstrap(per)))
            n = sum(len(c["signals"]) for c in found)
            out.append(f"| {b} | {d} | {len(found)} | {n} | {row[0]} | {row[1]} |")
    return "\n".join(out)


def trajectory_cell(cells: dict, method: str, budget: int, interval: int) -> dict | None:
    return cells.get(f"session|0|{method}|{budget}|{interval}")


def trajectory_text(cell: dict, columns: int = 16) -> str:
    """Per layer, each head's budget over the compression events as a sparkline (▁ = 0, █ = twice the layer's
    even share), at most `columns` events evenly picked."""
    traj = cell["trajectory"]
    n = len(traj["steps"])
    pick = sorted({round(j * (n - 1) / max(1, columns - 1)) for j in range(min(n, columns))})
    lines = [f"head budgets of {cell['method']} over {n} compressions (session 0, B = {cell['budget']}, "
             f"Δ = {cell['interval']}); per layer one sparkline per KV head, ▁ = 0 … █ = 2 × the even share; "
             f"split moves {cell['split_movement']:.1%} of each layer's budget between consecutive compressions"]
    for layer, bl in enumerate(traj["layer_budgets"]):
        heads = len(traj["head_budgets"][0][layer])  # B_l is a head's even share of the layer
        marks = ["".join("▁▂▃▄▅▆▇█"[min(7, int(4 * traj["head_budgets"][e][layer][h] / bl))] for e in pick)
                 for h in range(heads)]
        lines.append(f"layer {layer:2d} (B_l = {bl:4d})  " + "  ".join(marks))
    return "\n".join(lines)


def trajectory_svg(cell: dict) -> str:
    """A heatmap: one row per (layer, KV head), one column per compression event, colour = the head's budget
    over the layer's even share (blue below, white even, red above; log scale, ×¼ to ×4)."""
    traj = cell["trajectory"]
    n, L = len(traj["steps"]), len(traj["layer_budgets"])
    heads = len(traj["head_budgets"][0][0])
    cw, rh, left, top = max(4, 720 // max(1, n)), 4, 70, 40
    width, height = left + cw * n + 180, top + rh * L * heads + 50  # the legend's 140 px beside the map
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="11">',
           f'<text x="{left}" y="16">{cell["method"]}: head budgets over {n} compressions (session 0, B = {cell["budget"]}, '
           f'Δ = {cell["interval"]}; split moves {cell["split_movement"]:.1%} per compression)</text>']
    for e in range(n):
        for layer in range(L):
            even = traj["layer_budgets"][layer]  # per head
            for h in range(heads):
                r = math.log2(max(traj["head_budgets"][e][layer][h], 1e-9) / even) / 2  # -1 (¼) … 1 (4×)
                r = max(-1.0, min(1.0, r))
                rgb = (255, round(255 * (1 - r)), round(255 * (1 - r))) if r > 0 else (round(255 * (1 + r)), round(255 * (1 + r)), 255)
                out.append(f'<rect x="{left + e * cw}" y="{top + (layer * heads + h) * rh}" width="{cw}" height="{rh}" '
                           f'fill="rgb{rgb}"/>')
    for layer in range(0, L, 5):
        out.append(f'<text x="{left - 6}" y="{top + layer * heads * rh + 8}" text-anchor="end">layer {layer}</text>')
    y = top + L * heads * rh
    out.append(f'<text x="{left}" y="{y + 16}">compression event → (step {traj["steps"][0]} … {traj["steps"][-1]}); '
               f'rows: layers top to bottom, {heads} KV heads each</text>')
    legend = [("¼ × the even share", (0, 0, 255)), ("the even share", (255, 255, 255)), ("4 × the even share", (255, 0, 0))]
    for j, (label, rgb) in enumerate(legend):
        x, y = left + cw * n + 20, top + 20 * j
        out.append(f'<rect x="{x}" y="{y}" width="14" height="14" fill="rgb{rgb}" stroke="#888"/>'
                   f'<text x="{x + 20}" y="{y + 11}">{label}</text>')
    return "\n".join(out + ["</svg>"]) + "\n"


# ----------------------------------------------------------------------------------------------
# Speed


def decode_seconds(fn) -> tuple[float, object]:
    """Run fn(observe) and return the seconds from the end of the prefill to the end, and fn's result.
    fn calls observe(i, logits) before feeding the i-th forced token."""
    first = []
    out = fn(lambda i, logits: first.append(time.perf_counter()) if i == 0 else None)
    return time.perf_counter() - first[0], out


@torch.inference_mode()
def transformers_decode(hf, ids: torch.Tensor, tokens: list[int], observe) -> None:
    """The peer: Hugging Face transformers' own FullKV decode (its default dynamic cache) of the same
    teacher-forced tokens."""
    out = hf(ids[None], use_cache=True)
    past = out.past_key_values
    for i, t in enumerate(tokens):
        observe(i, out.logits[0, -1])
        out = hf(torch.tensor([[t]], device=ids.device), past_key_values=past, use_cache=True)
        past = out.past_key_values


@torch.inference_mode()
def compiled_decode(model, ids, tokens, observe, window: int):
    """FullKV decode of the teacher-forced `tokens` through the fast path's static step compiled by
    torch.compile (fast.GraphDecoder(compile=True); on CPU Inductor writes C++ for it)."""
    device = model.embed.weight.device
    cache = fast.new_cache(model, window, spare=len(tokens) + 2)
    logits = model(ids.to(device), cache)
    step = fast.GraphDecoder(model, cache, compile=True)
    for i, t in enumerate(tokens):
        observe(i, logits[-1])
        logits = step(t)


@torch.inference_mode()
def profile_decode(model, ids, args):
    """torch.profiler's top operators over --profile-steps FullKV decode steps of the chosen path."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    cache = fast.new_cache(model, args.window, spare=args.profile_steps + 1) if args.packed else model.new_cache(args.window)
    device = model.embed.weight.device
    model(ids.to(device), cache)
    model(torch.tensor([0], device=device), cache)  # warm-up
    with tprofile(activities=[ProfilerActivity.CPU]) as prof:
        for t in range(args.profile_steps):
            model(torch.tensor([t], device=device), cache)
    print(f"\ntorch.profiler: {args.profile_steps} FullKV decode steps, {'fast' if args.packed else 'reference'} path\n")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


def speed(model, tok, prompts, args, profile, store: Store, rank: int = 0, world: int = 1):
    """Rank 0 only: timings from processes sharing one machine would not be side by side.

    Two tables from one run, every variant interleaved round by round so drift hits all alike:
    FullKV decode of this project (per-head reference and packed fast path) vs transformers on the same
    weights and tokens; and every method at one budget on the chosen path, relative to uniform R-KV."""
    budget = args.speed_budget or default_budgets(args.new_tokens, args.window)[-1]
    key = f"speed|{budget}"
    if rank != 0 or key in store:
        return
    ids = encode(model, tok, prompts[0], args.new_tokens)
    tokens = path_of(args.packed).generate(model, tok, ids, budget=args.window + 1, policy="full",
                                           window=args.window, max_new_tokens=args.new_tokens).tokens
    variants = {}  # name -> fn(observe) -> Generation or None
    full = lambda packed, m=model: lambda cb: path_of(packed).generate(  # noqa: E731
        m, tok, ids, budget=args.window + 1, policy="full", window=args.window, max_new_tokens=len(tokens),
        hook=teacher_forced(tokens, cb))
    variants["FullKV, reference path"] = full(False)
    variants["FullKV, fast path"] = full(True)
    if args.layouts:  # the same fast path over a second copy of the weights laid out as loaded (fast.store_weights)
        variants["FullKV, fast path, row-major weights"] = full(True, fast.load_model(
            resolve_model_dir(args.model), dtype=model.embed.weight.dtype, device=model.embed.weight.device,
            layout="rows", parts=1))
    if args.compiled:  # the first round (a warm-up) pays the compile
        variants["FullKV, compiled static step"] = lambda cb: compiled_decode(model, ids, tokens, cb, args.window)
    if not args.no_peer:
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(resolve_model_dir(args.model), dtype=model.embed.weight.dtype)
        hf = hf.to(model.embed.weight.device).eval()
        variants["FullKV, transformers"] = lambda cb: transformers_decode(hf, ids.to(hf.device), tokens, cb)
    for m in args.methods:
        if m != "FullKV":
            variants[m] = (lambda m: lambda cb: run_method(model, tok, ids, m, budget, args, profile,
                                                          max_new_tokens=len(tokens),
                                                          hook=teacher_forced(tokens, cb)))(m)
    names = list(variants)
    times = {m: [] for m in names}
    results = {}
    prog = Progress("speed", (args.repeats + 1) * len(names), rank)
    for rep in range(args.repeats + 1):  # round 0 warms up
        order = names[rep % len(names):] + names[:rep % len(names)]
        for m in order:
            seconds, g = decode_seconds(variants[m])
            if rep > 0:
                times[m].append(seconds)
            if g is not None:
                results[m] = g
            prog.step(f"round {rep} {m}")
    rows = {}
    for m in names:
        t = statistics.median(times[m])
        row = {"tokens_per_s": len(tokens) / t, "decode_s": t, "runs": times[m]}
        if m in results:
            g = results[m]
            row.update(cache_tokens=statistics.fmean(g.cache_tokens), full_tokens=statistics.fmean(g.full_tokens),
                       cache_bytes=g.cache_bytes, full_bytes=g.full_bytes, compressions=len(g.events))
        rows[m] = row
    if args.profile_steps:
        profile_decode(model, ids, args)
    store.add(key, {"budget": budget, "steps": len(tokens), "repeats": args.repeats, "threads": torch.get_num_threads(),
                    "interval": interval_for(budget, args.new_tokens, args.interval), "packed": args.packed,
                    "device": str(model.embed.weight.device), "dtype": str(model.embed.weight.dtype), "methods": rows})


# ----------------------------------------------------------------------------------------------
# Tables


def fidelity_table(cells: dict, methods, budgets) -> str:
    """Rows: methods; columns: budgets; each entry pooled over prompts (weighted by steps)."""
    def pooled(m, b, field):
        cs = [c for c in cells.values() if c.get("method") == m and c.get("budget") == b and "kl" in c]
        n = sum(c["steps"] for c in cs)
        return (sum(c[field] * c["steps"] for c in cs) / n, len(cs)) if n else (float("nan"), 0)

    out = []
    for field, title, fmt in [("nll_increase", "mean NLL increase of the reference tokens (nats, lower is better)", "{:.4f}"),
                              ("top1_agreement", "top-1 agreement with the full cache (%, higher is better)", "{:.1%}"),
                              ("kl", "mean KL(full ‖ compressed) (nats, lower is better)", "{:.4f}")]:
        out += [f"\n{title}\n", "| method | " + " | ".join(f"B={b}" for b in budgets) + " |",
                "|---" * (len(budgets) + 1) + "|"]
        for m in methods:
            vals = [pooled(m, 0 if m == "FullKV" else b, field)[0] for b in budgets]
            out.append(f"| {m} | " + " | ".join("—" if math.isnan(v) else fmt.format(v).replace("%", " %") for v in vals) + " |")
    n = len({c["prompt"] for c in cells.values() if "kl" in c})
    steps = sum({c["prompt"]: c["steps"] for c in cells.values() if "kl" in c}.values())  # with or without FullKV
    out.append(f"\n{n} prompts, {steps} reference tokens in all.")
    return "\n".join(out)


def accuracy_table(cells: dict, methods, budgets) -> str:
    out = ["\npass@1 (%), averaged over samples and problems\n",
           "| method | " + " | ".join(f"B={b}" for b in budgets) + " |", "|---" * (len(budgets) + 1) + "|"]
    for m in methods:
        row = []
        for b in budgets:
            cs = [c for c in cells.values() if c.get("method") == m and c.get("budget") == (0 if m == "FullKV" else b)
                  and "correct" in c]
            row.append("—" if not cs else f"{100 * statistics.fmean(c['correct'] for c in cs):.1f}")
        out.append(f"| {m} | " + " | ".join(row) + " |")
    probs = {c["problem"] for c in cells.values() if "correct" in c}
    out.append(f"\n{len(probs)} problems.")
    return "\n".join(out)


def speed_table(cell: dict) -> str:
    rows = cell["methods"]
    head = (f"\n{cell['steps']} teacher-forced decode steps, {cell['device']} {cell['dtype'].replace('torch.', '')}, "
            f"{cell['threads']} threads, median of {cell['repeats']} interleaved rounds")
    out = [head, "\nFullKV decode\n", "| implementation | tokens/s | speed vs transformers | range over the rounds |",
           "|---|---|---|---|"]
    peer = rows.get("FullKV, transformers")
    for m, r in rows.items():
        if m.startswith("FullKV"):
            ratio, spread = "—", "—"
            if peer:  # the i-th run of every variant comes from the same interleaved round
                ratio = f"{peer['decode_s'] / r['decode_s']:.2f}×"
                per_round = [p / t for p, t in zip(peer["runs"], r["runs"])]
                spread = f"{min(per_round):.2f}-{max(per_round):.2f}×"
            out.append(f"| {m.split(', ', 1)[1]} | {r['tokens_per_s']:.1f} | {ratio} | {spread} |")
    base = rows.get("R-KV")
    path = "fast" if cell["packed"] else "reference"
    out += [f"\nmethods at B={cell['budget']}, interval {cell['interval']}, {path} path\n",
            "| method | tokens/s | time per token vs R-KV | compressions | cache tokens held (mean) | "
            "vs full cache | K/V bytes at the end | vs full cache |", "|---|---|---|---|---|---|---|---|"]
    for m, r in rows.items():
        if m.startswith("FullKV") and not m.endswith(path + " path"):
            continue
        rel = f"{r['decode_s'] / base['decode_s']:.3f}×" if base else "—"
        out.append(f"| {m.split(',')[0]} | {r['tokens_per_s']:.1f} | {rel} | {r['compressions']} | "
                   f"{r['cache_tokens']:.0f} | {r['cache_tokens'] / r['full_tokens']:.1%} | "
                   f"{r['cache_bytes'] / 2**20:.2f} MiB | {r['cache_bytes'] / r['full_bytes']:.1%} |".replace("%", " %"))
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------
# CLI


def digest(obj) -> str:
    """What a results file keys its inputs by (prompts, problems, sessions, the profile): sha256 of their JSON."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def settings_of(args, what: str) -> dict:
    keep = ["model_sha256", "new_tokens", "budgets", "interval", "window", "prompts", "problems", "temperature", "top_p",
            "speed_budget", "dtype", "path", "gamma", "head_beta", "head_mu", "head_utility"]
    if what == "sessions":  # its cells are keyed by method, budget and interval, so those may grow on resume
        keep = ["model_sha256", "window", "sessions", "session_tokens", "turn_tokens", "dtype", "path", "gamma",
                "head_beta", "head_mu", "head_utility"]
    if what == "speed":  # one cell per budget: everything that shapes its table is a setting
        keep += ["repeats", "methods", "no_peer", "compiled", "layouts"]
    settings = {"measurement": what, **{k: getattr(args, k) for k in keep}}
    # What the cells were computed from, by content: an edited prompt file or another profile is refused.
    settings["inputs_sha256"] = getattr(args, "inputs_sha256", {}).get(what)
    settings["profile_sha256"] = getattr(args, "profile_sha256", None)
    for k in [k for k in ("prompts", "problems", "sessions") if k in settings]:  # files of this repository by their relative path, so clones can resume
        path = Path(settings[k]).resolve()
        settings[k] = str(path.relative_to(HERE)) if path.is_relative_to(HERE) else str(path)
    return settings


def process_device(device: str, world: int) -> tuple[torch.device, str]:
    """This process's device and the torch.distributed backend. Under torchrun with --device cuda, each
    process takes the GPU of its LOCAL_RANK and the ranks talk over NCCL; when there are more processes
    than GPUs they share them round-robin and talk over gloo (NCCL allows one rank per GPU); on CPU, gloo."""
    device = torch.device(device)
    if device.type != "cuda" or world == 1:
        return device, "gloo"
    local, per_node = int(os.environ.get("LOCAL_RANK", "0")), int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    count = torch.cuda.device_count()
    if device.index is not None:  # --device cuda:N: every process on that GPU
        torch.cuda.set_device(device)
        return device, "gloo"
    device = torch.device("cuda", local % count)
    torch.cuda.set_device(device)
    return device, "nccl" if per_node <= count else "gloo"


def int_list(text: str, option: str) -> list[int]:
    """A comma-separated list of integers from the command line, or a one-line error naming the option."""
    try:
        return [int(x) for x in text.split(",") if x.strip()] or [int("")]
    except ValueError:
        raise ValueError(f"{option} takes comma-separated whole numbers (integers), e.g. 64,128; got {text!r}") from None


def apply_quick(args):
    """--quick: small enough to finish in a few minutes on 2 CPU cores."""
    args.num_prompts = min(args.num_prompts or 2, 2)
    args.num_problems = min(args.num_problems or 4, 4)
    args.new_tokens = min(args.new_tokens, 128)
    if not args.budgets:
        args.budgets = sorted({max(args.window + 1, round(args.new_tokens * f)) for f in BUDGET_FRACTIONS[1:]})
    args.samples = 1
    args.repeats = min(args.repeats, 2)
    if not args.methods_given:
        args.methods = ["FullKV", "R-KV", "Pyramid-RKV", "ReasonAlloc"]


def main(args):
    args.methods_given = args.methods is not None
    args.packed = args.path == "fast"
    if args.methods is not None and not args.methods.strip(","):
        raise ValueError(f"--methods is empty; give a comma-separated subset of: {', '.join(METHODS)}")
    args.methods = [m for m in args.methods.split(",") if m] if args.methods else list(METHODS)
    known = {**METHODS, **(ORACLES if args.measure == "sessions" else {})}
    bad = [m for m in args.methods if m not in known]
    if bad:
        raise ValueError(f"unknown method(s) {', '.join(bad)}; choose from {', '.join(known)}"
                         + ("" if args.measure == "sessions" else f" (the oracles {', '.join(ORACLES)}: sessions only)"))
    if args.measure == "sessions":
        args.budgets = args.budgets or "64,128,256"
        args.intervals = sorted(set(int_list(args.intervals, "--intervals")))
        if any(d < 1 for d in args.intervals):
            raise ValueError(f"--intervals must all be >= 1, got {args.intervals}")
    if args.budgets:
        args.budgets = sorted(set(int_list(args.budgets, "--budgets")))
    # every run setting checked before the model loads, as reasonalloc.py does (bench --window 0 included)
    if args.interval < 0:
        raise ValueError(f"--interval must be >= 1 (or 0: automatic), got {args.interval}")
    R.validate(budget=max(args.budgets or [args.window + 1]), window=args.window, interval=args.interval or 1,
               temperature=args.temperature, top_p=args.top_p, allocator="reasonalloc", policy="rkv", max_new_tokens=0,
               gamma=args.gamma, beta=args.head_beta, mu=args.head_mu, head_utility=args.head_utility)
    for b in args.budgets or []:
        R.check_budget(b, args.window)
    if args.quick:
        apply_quick(args)
    for name in ("new_tokens", "samples", "repeats", "session_tokens", "turn_tokens"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")

    check_device(args.device)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    inputs = [args.prompts, args.problems, args.sessions, args.profile, *model_files(args.model)]
    check_output(args.out, "--out", inputs=inputs)  # before any work, not after it
    read_results(Path(args.out))  # an existing --out must be a results file
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device, backend = process_device(args.device, world)
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group(backend, device_id=device if backend == "nccl" else None)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    path = resolve_model_dir(args.model)
    load = fast.load_model if args.packed else M.load_model  # the fast path's weights laid out for a decode step
    model, tok = load(path, dtype=DTYPES[args.dtype], device=device), load_tokenizer(path)
    args.model_sha256 = model_fingerprint(path)  # results are keyed by the model's contents, not its folder
    profile = None
    if args.profile:
        profile = load_profile(args.profile, model.config)
    elif any(R.get_allocator(METHODS.get(m, METHODS["ReasonAlloc"])[1]).needs_profile for m in args.methods):
        # (an oracle run also replays ReasonAlloc, for its signals)
        profile = find_profile(model.config)
    hindsight = [m for m in args.methods if m in METHODS and METHODS[m][1] == "hindsight"]
    if hindsight and not (isinstance(profile, dict) and "head_split" in profile):  # its split comes with a profile
        if args.methods_given:
            raise ValueError(f"{hindsight[0]} needs --profile with a head split (the default model's: "
                             f"profiles/hindsight/smollm2-135m-instruct.json; python benchmarks/oracle.py heads makes one)")
        args.methods = [m for m in args.methods if m not in hindsight]  # by default, every method that can run
    prompts = read_prompts(args.prompts)[: args.num_prompts or None]
    what = ["fidelity", "accuracy", "speed"] if args.measure == "all" else [args.measure]
    problems = read_problems(args.problems)[: args.num_problems or None] if "accuracy" in what else []
    session_turns = read_sessions(args.sessions)[: args.num_sessions or None] if "sessions" in what else []
    args.profile_sha256 = None if profile is None else digest(profile)
    args.inputs_sha256 = {"fidelity": digest(prompts), "speed": digest(prompts), "accuracy": digest(problems),
                          "sessions": digest(session_turns)}
    out = Path(args.out)
    if rank == 0:
        print(f"bench: {', '.join(what)} on {path.name} ({model.config.num_layers} layers × {model.config.num_kv_heads} "
              f"KV heads), {args.new_tokens} new tokens, budgets "
              f"{args.budgets or default_budgets(args.new_tokens, args.window)}, {world} process(es) → {out}",
              file=sys.stderr)
    results = {}
    for m in what:
        file = out if len(what) == 1 else out.with_name(f"{out.stem}.{m}{out.suffix}")
        with one_run_at_a_time(file, rank, world):
            store = Store(file, settings_of(args, m), rank)
            run = {"fidelity": fidelity, "accuracy": accuracy, "speed": speed, "sessions": sessions}[m]
            units = {"accuracy": problems, "sessions": session_turns}.get(m, prompts)
            run(model, tok, units, args, profile, store, rank, world)
            gathered, shares = [store.new], [(rank, str(device), store.added, time.perf_counter() - t0)]
            if world > 1:
                gathered, shares = [None] * world, shares * world
                dist.all_gather_object(gathered, store.new)
                dist.all_gather_object(shares, shares[0])
            if rank == 0:
                store.merge(gathered)
                results[m] = (store.cells, file)
                if world > 1:  # each process's share of the work
                    for r, dev, n, s in shares:
                        print(f"[{m}] process {r} on {dev} ({backend}): {n} new cells, {s:.1f} s", file=sys.stderr)
    if world > 1:
        dist.barrier()  # nobody tears the group down while another rank is still inside a collective
        dist.destroy_process_group()
    if rank != 0:
        return
    budgets = args.budgets or default_budgets(args.new_tokens, args.window)
    for m, (cells, file) in results.items():
        if m == "fidelity":
            print(fidelity_table(cells, args.methods, budgets))
        elif m == "accuracy":
            print(accuracy_table(cells, args.methods, budgets))
        elif m == "sessions":
            print(sessions_table(cells, args.methods, budgets, args.intervals))
            print(glance_table(cells, args.methods, budgets, args.intervals))
            if any(m in ORACLES for m in args.methods):
                print(signals_table(cells, budgets, args.intervals))
            show_trajectory(cells, args, file)
        else:
            for cell in cells.values():
                print(speed_table(cell))
        print(f"\n({m} results in {file})")


def show_trajectory(cells: dict, args, file: Path):
    """The head-budget trajectory of session 0 for the first method with a head level, at the budget
    nearest 128 and the shortest interval: printed as text and written as an SVG heatmap beside `file`, named
    by its budget and interval (FILE.trajectory.B128.D32.svg), so runs of other intervals keep their own."""
    heads = [m for m in args.methods if m in METHODS and m != "FullKV"
             and R.get_allocator(METHODS[m][1]).heads is not R.uniform_heads]
    if not heads:
        return
    b = min(args.budgets, key=lambda b: abs(b - 128))
    cell = trajectory_cell(cells, heads[-1] if "ReasonAlloc" not in heads else "ReasonAlloc", b, min(args.intervals))
    if cell is None or not cell["trajectory"]["steps"]:
        return
    print("\n" + trajectory_text(cell))
    svg = file.with_suffix(f".trajectory.B{b}.D{min(args.intervals)}.svg")
    write_atomic(svg, trajectory_svg(cell))
    print(f"(budget trajectory picture in {svg})")


def parser():
    p = argparse.ArgumentParser(
        description="Fidelity, accuracy and speed of every allocator at the same total budget (see the module "
                    "docstring). Rerunning with the same options resumes; torchrun splits the work.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("measure", choices=["fidelity", "accuracy", "speed", "sessions", "all"],
                   help="'all' is fidelity, accuracy and speed; 'sessions' (long multi-turn references) runs alone")
    p.add_argument("--model", help="Hugging Face model folder; default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--profile", help="layer-demand profile JSON (found automatically for the default model)")
    p.add_argument("--prompts", default=str(HERE / "data" / "heldout.jsonl"),
                   help="held-out reasoning prompts (JSON Lines with 'prompt') for fidelity and speed")
    p.add_argument("--num-prompts", type=int, default=0, help="use only the first N prompts (0 = all)")
    p.add_argument("--problems", default=str(HERE / "data" / "problems.jsonl"),
                   help="JSON Lines with 'problem' (or 'question') and 'answer', e.g. a MATH-500 or GSM8K file")
    p.add_argument("--num-problems", type=int, default=0, help="use only the first N problems (0 = all)")
    p.add_argument("--sessions", default=str(HERE / "data" / "sessions_heldout.jsonl"),
                   help="sessions: JSON Lines with 'turns', user messages answered one after another in one chat")
    p.add_argument("--num-sessions", type=int, default=0, help="sessions: use only the first N (0 = all)")
    p.add_argument("--session-tokens", type=int, default=1500,
                   help="sessions: answer turns until the transcript passes this many tokens")
    p.add_argument("--turn-tokens", type=int, default=400, help="sessions: longest greedy reply of one turn")
    p.add_argument("--intervals", default="32,128", help="sessions: comma-separated compression intervals Δ")
    p.add_argument("--methods", help=f"comma-separated subset of: {', '.join(METHODS)} (default: all); sessions also "
                                     f"takes the oracles {', '.join(ORACLES)} (benchmarks/oracle.py)")
    p.add_argument("--new-tokens", type=int, default=256,
                   help="reference continuation length N (fidelity, speed) and generation limit (accuracy)")
    p.add_argument("--budgets", help="comma-separated budgets B (default: N/16, N/8, N/4, at least window + 1; "
                                     "sessions: 64,128,256)")
    p.add_argument("--interval", type=int, default=0, help="compression interval Δ (default: min(B, N/32))")
    p.add_argument("--window", type=int, default=8)
    p.add_argument("--samples", type=int, default=1, help="accuracy: samples per problem (pass@1 is their mean)")
    p.add_argument("--temperature", type=float, default=0.6, help="accuracy sampling temperature (0 = greedy)")
    p.add_argument("--top-p", type=float, default=0.95, help="accuracy nucleus sampling")
    p.add_argument("--speed-budget", type=int, default=0, help="speed: the budget B (default: the largest default)")
    p.add_argument("--repeats", type=int, default=3, help="speed: timed rounds per method (after one warm-up)")
    p.add_argument("--gamma", type=float, default=0.5, help="layer level: robustify power γ on the wave")
    p.add_argument("--head-beta", type=float, default=0.5, help="head level: robustify power β")
    p.add_argument("--head-mu", type=float, default=0.25, help="head level: lower clip μ, as a fraction of B_l")
    p.add_argument("--head-utility", choices=R.HEAD_UTILITIES, default="length",
                   help="head level: how scores of heads of different lengths are pooled (reasonalloc.comparable)")
    p.add_argument("--path", choices=["fast", "reference"], default="fast",
                   help="the packed fast path (tested equal to the reference) or the per-head reference cache")
    p.add_argument("--no-peer", action="store_true", help="speed: skip the transformers FullKV peer")
    p.add_argument("--layouts", action="store_true",
                   help="speed: also time the fast path with the weights as loaded (row-major, one thread per product, "
                        "as nn.Linear), beside the default layout of fast.store_weights")
    p.add_argument("--compiled", action="store_true",
                   help="speed: also time FullKV through the static decode step compiled by torch.compile (needs a "
                        "C++ compiler on CPU; the warm-up round pays the compile)")
    p.add_argument("--profile-steps", type=int, default=0,
                   help="speed: also print torch.profiler's top operators over this many FullKV decode steps")
    p.add_argument("--quick", action="store_true", help="2 prompts, 4 problems, 128 tokens, 2 budgets, 4 methods: short runs on 2 cores")
    p.add_argument("--out", default="bench_results.json",
                   help="results JSON; with 'all', one file per measurement (NAME.fidelity.json, ...)")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32")
    p.add_argument("--device", default="cpu")
    return p


if __name__ == "__main__":
    args = parser().parse_args()
    try:
        main(args)
    except (ValueError, FileNotFoundError, RuntimeError, KeyboardInterrupt) as e:  # Ctrl-C: one line too
        sys.exit(f"error: {e}" if str(e) else "interrupted: the finished cells are kept; rerun the command to resume")
