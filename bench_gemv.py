"""How fast each weight layout streams a batch-1 product on this CPU: the measurement behind model.store_weights.

A CPU decode step of a small model is one matrix-vector product per projection, so its speed is the speed at
which each weight is read. For each projection shape of the model (fused q/k/v, o, gate/up, down, the LM
head) this times, in GB/s of weight read:
- rows, F.linear:     the (out, in) row-major weight, as nn.Linear and transformers hold it;
- columns, F.linear:  the same values stored column-major, (in, out) in memory;
- rows / columns, split: model.split_product, the product cut into one slice per thread (model.Linear's way);
beside a whole-machine `sum` over 512 MB (about what the memory gives). Each shape is timed over enough copies
of the weight to pass the caches; the best of --repeats is kept. Also the cost of one call through the
operator that torch.compile sees (model.split_product_op) against the plain function.

    python bench_gemv.py                 # the default model's shapes
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

import model as M


def best_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def projection_shapes(c: M.ModelConfig) -> dict[str, tuple[int, int]]:
    """(out, in) of each projection of one layer, and of the LM head."""
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    return {"q/k/v": (q + 2 * kv, c.hidden_size), "o": (c.hidden_size, q), "gate/up": (2 * c.intermediate_size, c.hidden_size),
            "down": (c.hidden_size, c.intermediate_size), "LM head": (c.vocab_size, c.hidden_size)}


@torch.inference_mode()
def measure(shapes: dict[str, tuple[int, int]], *, parts: int, repeats: int = 5, min_bytes: int = 64 << 20,
            sum_bytes: int = 512 << 20) -> dict:
    """GB/s per shape and layout, the machine's `sum` GB/s, and the operator's extra µs per call."""
    rows = {}
    for name, (n, k) in shapes.items():
        copies = max(1, -(-min_bytes // (n * k * 4)))
        ws = [torch.randn(n, k) for _ in range(copies)]
        cols = [w.t().contiguous().t() for w in ws]  # same values and shape, column-major storage
        x = torch.randn(1, k)
        gb = copies * n * k * 4 / 1e9
        row = {"rows, F.linear": gb / best_seconds(lambda: [F.linear(x, w) for w in ws], repeats),
               "columns, F.linear": gb / best_seconds(lambda: [F.linear(x, w) for w in cols], repeats)}
        if parts > 1 and n % parts == 0:
            row["rows, split"] = gb / best_seconds(lambda: [M.split_product(x, w, parts) for w in ws], repeats)
        if parts > 1 and k % parts == 0:
            row["columns, split"] = gb / best_seconds(lambda: [M.split_product(x, w, parts) for w in cols], repeats)
        rows[name] = row
    big = torch.randn(sum_bytes // 4)
    sum_gbs = big.numel() * 4 / 1e9 / best_seconds(big.sum, repeats)
    splittable = [s for s in shapes.values() if s[1] % parts == 0]
    n, k = min(splittable or [(parts, parts)], key=lambda s: s[0] * s[1])  # the smallest column-major split
    w, x, calls = torch.randn(k, n).t(), torch.randn(1, k), 2000
    plain = best_seconds(lambda: [M.split_product(x, w, parts) for _ in range(calls)], repeats) / calls
    op = best_seconds(lambda: [M.split_product_op(x, w, parts) for _ in range(calls)], repeats) / calls
    return {"rows": rows, "sum_gbs": sum_gbs, "sum_mb": sum_bytes // 10**6, "operator_us": (op - plain) * 1e6,
            "parts": parts}


def table(result: dict) -> str:
    names = list(dict.fromkeys(col for row in result["rows"].values() for col in row))
    out = [f"\nweight read per second (GB/s), batch-1 product, float32, {torch.get_num_threads()} threads, "
           f"split in {result['parts']}\n", "| projection | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for proj, row in result["rows"].items():
        out.append(f"| {proj} | " + " | ".join(f"{row[c]:.1f}" if c in row else "—" for c in names) + " |")
    out.append(f"\n`sum` over {result['sum_mb']} MB: {result['sum_gbs']:.1f} GB/s. One call through model.split_product_op costs "
               f"{result['operator_us']:.1f} µs more than model.split_product.")
    return "\n".join(out)


def main(args):
    from convert import resolve_model_dir

    if args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    config = M.ModelConfig.from_hf(resolve_model_dir(args.model))
    print(table(measure(projection_shapes(config), parts=torch.get_num_threads(), repeats=args.repeats)))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="GB/s of a batch-1 product per weight layout, for the model's projection "
                                            "shapes (the measurement behind model.store_weights).")
    p.add_argument("--model", help="Hugging Face model folder; default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds per cell; the best is kept")
    try:
        main(p.parse_args())
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
