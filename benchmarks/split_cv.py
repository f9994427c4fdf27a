"""How the offline head split (reasonalloc's `hindsight` allocator) was chosen: cross-validation on the
calibration sessions only.

The sessions of a `bench.py sessions` results file on calibration data are split into folds (session i is in
fold i mod k). For each fold, the oracle's head split is measured (oracle.split_counts, pooled by
oracle.hindsight_profile, as `oracle.py heads` does) on the other folds' transcripts only, and every candidate
power β of the rule is replayed on the fold's own sessions. So each session is scored under a split that never
saw it. Each candidate's ΔNLL is compared with R-KV's cell of the same results file (paired bootstrap over
sessions), as `bench.py sessions` reports.

    python benchmarks/split_cv.py --references results/sessions_calibration16.json --out results/split_cv.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
os.environ.setdefault("GOMP_SPINCOUNT", "1000")  # before torch loads OpenMP: idle threads soon yield the core

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the project's modules live one folder up

import model as M  # noqa: E402
import reasonalloc as R  # noqa: E402
from bench import paired_bootstrap, read_results, token_metrics  # noqa: E402
from convert import resolve_model_dir  # noqa: E402
from files import check_output, write_atomic  # noqa: E402
from oracle import hindsight_profile, split_counts  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] + " See the module docstring.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--references", required=True,
                   help="a `bench.py sessions` results file on calibration sessions, with R-KV cells at the budgets")
    p.add_argument("--model", help="the model those transcripts are of; default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--budgets", default="64,128", help="budgets B, each measured and replayed on its own")
    p.add_argument("--betas", default="0.5,1", help="candidate powers β of the rule")
    p.add_argument("--folds", type=int, default=4)
    p.add_argument("--interval", type=int, default=128)
    p.add_argument("--out", required=True, help="results JSON (per-session ΔNLL of every candidate)")
    args = p.parse_args(argv)
    try:
        budgets = [int(b) for b in args.budgets.split(",") if b.strip()]
        betas = [float(b) for b in args.betas.split(",") if b.strip()]
        check_output(args.out, "--out", inputs=[args.references])
        data = read_results(Path(args.references))
        if data is None or data.get("settings", {}).get("measurement") != "sessions":
            raise ValueError(f"{args.references} is not a bench.py sessions results file")
        if "heldout" in str(data["settings"].get("sessions")):
            raise ValueError(f"{args.references} holds held-out sessions; a choice is made on calibration data only")
        cells, window = data["cells"], data["settings"]["window"]
        n = sum(k.startswith("reference|") for k in cells)
        missing = [f"session|{i}|R-KV|{b}|{args.interval}" for i in range(n) for b in budgets
                   if f"session|{i}|R-KV|{b}|{args.interval}" not in cells]
        if missing:
            raise ValueError(f"{args.references} lacks R-KV cells such as {missing[0]}; run bench.py sessions with "
                             f"--methods R-KV at these budgets and interval first")
        model = M.load_model(resolve_model_dir(args.model))
        refs = [cells[f"reference|{i}"] for i in range(n)]
        counts = {}  # (session, budget) -> the oracle's counts along R-KV's replay
        for i, ref in enumerate(refs):
            for b in budgets:
                counts[i, b] = split_counts(model, torch.tensor(ref["prompt_ids"], device="cpu"), ref["tokens"], b,
                                            interval=args.interval, window=window)
            print(f"[split_cv] measured session {i + 1}/{n}", file=sys.stderr, flush=True)
        out = {"settings": {**vars(args), "sessions": data["settings"]["sessions"]}, "cells": {}}
        for i, ref in enumerate(refs):
            train = [c for (j, b), cs in counts.items() if j % args.folds != i % args.folds for c in cs]
            profile = hindsight_profile(model.config, train, {})
            ids, tokens = torch.tensor(ref["prompt_ids"], device="cpu"), ref["tokens"]
            scored = torch.tensor(ref["scored"], device="cpu")
            targets = torch.tensor(tokens, device="cpu")[scored]
            full = R.teacher_force(model, ids, tokens, budget=window + 1, policy="full", window=window,
                                   interval=args.interval)[0][scored]
            for b in budgets:
                for beta in betas:
                    logits, _ = R.teacher_force(model, ids, tokens, budget=b, allocator="hindsight", profile=profile,
                                                beta=beta, interval=args.interval, window=window)
                    nll = float(token_metrics(full, logits[scored], targets)[:, 0].mean())
                    out["cells"][f"{i}|{b}|{beta}"] = nll
            print(f"[split_cv] replayed session {i + 1}/{n}", file=sys.stderr, flush=True)
        write_atomic(args.out, json.dumps(out, indent=1))
        print(f"Hindsight-heads ({args.folds}-fold over {n} calibration sessions, Δ = {args.interval}): ΔNLL "
              f"difference to R-KV [95 % paired bootstrap interval]\n\n| B | " + " | ".join(f"β = {b:g}" for b in betas)
              + " |\n|---|" + "---|" * len(betas))
        for b in budgets:
            rkv = [cells[f"session|{i}|R-KV|{b}|{args.interval}"]["nll_increase"] for i in range(n)]
            row = [paired_bootstrap([out["cells"][f"{i}|{b}|{beta}"] - rkv[i] for i in range(n)]) for beta in betas]
            print(f"| {b} | " + " | ".join(f"{m:+.3f} [{lo:+.3f}, {hi:+.3f}]" for m, lo, hi in row) + " |")
    except (ValueError, FileNotFoundError, RuntimeError, KeyboardInterrupt) as e:
        sys.exit(f"error: {str(e) or 'interrupted'}")


if __name__ == "__main__":
    main()
