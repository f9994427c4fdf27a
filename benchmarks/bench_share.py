"""Two decode jobs on one machine's cores: what each costs the other, with libgomp's default wait and with ours.

PyTorch's CPU threads come from OpenMP (libgomp). A thread that runs out of work spins for GOMP_SPINCOUNT
rounds (300,000 by default) before it sleeps, holding its core. Alone that costs nothing; with two jobs of two
threads each on 2 cores, the spinning threads of one job take the cores the other needs, and both slow down far
more than twice. Every CLI of this project sets GOMP_SPINCOUNT=1000 (unless the environment sets it) before
torch loads OpenMP, so a waiting thread yields its core soon.

This measures the decode speed (the fast path, the full cache, greedy) of one process alone and of two at once,
in both settings: 'libgomp' (torch imported before the project's modules, so libgomp's default applies) and
'ours' (the project's modules first, as the CLIs run). The rounds interleave the four runs; each child loads the
model, then decodes --steps tokens when the parent says go, so the two of a pair decode at the same time.
Printed: tokens/s alone and per process in the pair (medians over rounds), and the median per-round ratio
pair/alone (0.5 = each job runs at half speed, what two jobs sharing two cores should cost).

    python benchmarks/bench_share.py [--steps 32] [--rounds 3] [--out results/share_cpu.json]

Run nothing else meanwhile: the point is the two jobs this starts.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle."
MODES = ("libgomp", "ours")


def child(mode: str, steps: int):
    """One decode job: load, say 'ready', wait for a line on stdin, decode `steps` tokens, print tokens/s."""
    if mode == "libgomp":
        import torch  # noqa: F401  (first: OpenMP starts with libgomp's default spin count)
    sys.path.insert(0, str(HERE.parent))
    import fast  # sets GOMP_SPINCOUNT before torch when torch is not loaded yet
    import reasonalloc as R

    model, tokenizer, _ = R.load(load_fn=fast.load_model)
    fast.generate(model, tokenizer, PROMPT, budget=4096, policy="full", max_new_tokens=4)  # warm-up
    print("ready", flush=True)
    sys.stdin.readline()
    t0 = time.perf_counter()
    g = fast.generate(model, tokenizer, PROMPT, budget=4096, policy="full", max_new_tokens=steps)
    print(json.dumps({"tokens": len(g.tokens), "seconds": time.perf_counter() - t0}), flush=True)


def run(mode: str, jobs: int, steps: int) -> list[float]:
    """Start `jobs` children in `mode`, let them decode at once; their tokens/s."""
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    procs = [subprocess.Popen([sys.executable, __file__, "--child", mode, "--steps", str(steps)], env=env,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for _ in range(jobs)]
    try:
        for p in procs:
            if p.stdout.readline().strip() != "ready":
                raise RuntimeError(f"a {mode} decode job failed to start (exit status {p.wait()})")
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        out = [json.loads(p.stdout.readline()) for p in procs]
    finally:
        for p in procs:  # each has printed its speed and is exiting; a failed one is stopped
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
    return [o["tokens"] / o["seconds"] for o in out]


def main(args):
    if args.steps < 1 or args.rounds < 1:
        raise ValueError("--steps and --rounds must be >= 1")
    if args.out:
        sys.path.insert(0, str(HERE.parent))
        from files import check_output

        check_output(args.out, "--out")
    rounds = []
    for r in range(args.rounds):
        cell = {}
        for mode in MODES:
            for jobs in (1, 2):
                speeds = run(mode, jobs, args.steps)
                cell[f"{mode}_{jobs}"] = speeds
                print(f"[share] round {r + 1}/{args.rounds} {mode:<8} {jobs} job(s): "
                      f"{', '.join(f'{s:.1f}' for s in speeds)} tokens/s", file=sys.stderr, flush=True)
        rounds.append(cell)
    print(f"\ndecode tokens/s of the default model (fast path, full cache), {args.steps} steps, "
          f"{os.cpu_count()} cores, median of {args.rounds} rounds")
    print(f"{'wait policy':<28} {'alone':>7} {'each of two':>12} {'two / alone':>12}  (per-round range)")
    summary = {}
    for mode, label in zip(MODES, ("libgomp default (before)", "GOMP_SPINCOUNT=1000 (ours)")):
        alone = [c[f"{mode}_1"][0] for c in rounds]
        pair = [statistics.mean(c[f"{mode}_2"]) for c in rounds]
        ratios = [p / a for p, a in zip(pair, alone)]
        summary[mode] = {"alone": statistics.median(alone), "each_of_two": statistics.median(pair),
                         "ratio": statistics.median(ratios), "ratios": ratios}
        print(f"{label:<28} {summary[mode]['alone']:>7.1f} {summary[mode]['each_of_two']:>12.1f} "
              f"{summary[mode]['ratio']:>12.2f}  ({min(ratios):.2f}-{max(ratios):.2f})")
    ours_alone = [c["ours_1"][0] / c["libgomp_1"][0] for c in rounds]
    print(f"ours alone / libgomp alone: {statistics.median(ours_alone):.2f} "
          f"({min(ours_alone):.2f}-{max(ours_alone):.2f})")
    if args.out:
        from files import write_atomic

        write_atomic(args.out, json.dumps({"settings": {"steps": args.steps, "rounds": args.rounds,
                                                        "cores": os.cpu_count()},
                                           "rounds": rounds, "summary": summary}, indent=1))
        print(f"results in {args.out}")


def parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] + " Decode speed of one process alone "
                                            "and of two at once, interleaved, as ratios (see the module docstring).")
    p.add_argument("--steps", type=int, default=32, help="decoded tokens each job times")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the four runs")
    p.add_argument("--out", help="JSON file for the per-round speeds")
    p.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    return p


if __name__ == "__main__":
    args = parser().parse_args()
    try:
        child(args.child, args.steps) if args.child else main(args)
    except (ValueError, RuntimeError, KeyboardInterrupt) as e:
        sys.exit(f"error: {str(e) or 'interrupted'}")
