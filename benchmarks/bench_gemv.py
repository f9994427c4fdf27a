"""How fast each weight layout streams a batch-1 product, on the CPU or a GPU: the measurement behind
fast.store_weights.

A decode step is one matrix-vector product per projection, so its speed is the speed at which each weight
is read. For each projection shape of the model (fused q/k/v, o, gate/up, down, the LM
head) this times, in GB/s of weight read:
- rows, F.linear:     the (out, in) row-major weight, as nn.Linear and transformers hold it;
- columns, F.linear:  the same values stored column-major, (in, out) in memory;
- rows / columns, split: fast.split_product, the product cut into one slice per thread (fast.Linear's way);
beside a whole-machine `sum` over 512 MB (about what the memory gives). Each shape is timed over enough copies
of the weight to pass the caches; the best of --repeats is kept. Also the cost of one call through the
operator that torch.compile sees (fast.split_product_op) against the plain function.

On a GPU (--device cuda) the products are replayed from a CUDA graph (no launch gaps), in the --dtype given,
without the splits (a GPU spreads one product over its whole device) and over 2 GB of copies (past the L2).

    python benchmarks/bench_gemv.py      # the default model's shapes, on the CPU
    python benchmarks/bench_gemv.py --device cuda --shapes llama-3.1-8b --dtype bfloat16   # bench_gpu.py's model
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
os.environ.setdefault("GOMP_SPINCOUNT", "1000")  # before torch loads OpenMP: idle threads soon yield the core

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the project's modules live one folder up

import fast  # noqa: E402
import model as M  # noqa: E402


def best_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def cuda_seconds(fn, repeats: int) -> float:
    """Best time of fn() replayed from a CUDA graph, by CUDA events (so launches cost nothing)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture (cuBLAS picks and allocates its workspace)
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return min(times)


def projection_shapes(c: M.ModelConfig) -> dict[str, tuple[int, int]]:
    """(out, in) of each projection of one layer, and of the LM head."""
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    return {"q/k/v": (q + 2 * kv, c.hidden_size), "o": (c.hidden_size, q), "gate/up": (2 * c.intermediate_size, c.hidden_size),
            "down": (c.hidden_size, c.intermediate_size), "LM head": (c.vocab_size, c.hidden_size)}


@torch.inference_mode()
def measure(shapes: dict[str, tuple[int, int]], *, parts: int, repeats: int = 5, min_bytes: int = 64 << 20,
            sum_bytes: int = 512 << 20, device: str = "cpu", dtype: torch.dtype = torch.float32) -> dict:
    """GB/s per shape and layout, the machine's `sum` GB/s, and (CPU) the operator's extra µs per call."""
    cuda = torch.device(device).type == "cuda"
    timed = cuda_seconds if cuda else best_seconds
    parts = 1 if cuda else parts
    size = torch.empty((), dtype=dtype).element_size()
    rows = {}
    for name, (n, k) in shapes.items():
        copies = max(1, -(-min_bytes // (n * k * size)))
        ws = [torch.randn(n, k, device=device, dtype=dtype) for _ in range(copies)]
        cols = [w.t().contiguous().t() for w in ws]  # same values and shape, column-major storage
        x = torch.randn(1, k, device=device, dtype=dtype)
        gb = copies * n * k * size / 1e9
        row = {"rows, F.linear": gb / timed(lambda: [F.linear(x, w) for w in ws], repeats),
               "columns, F.linear": gb / timed(lambda: [F.linear(x, w) for w in cols], repeats)}
        if parts > 1 and n % parts == 0:
            row["rows, split"] = gb / timed(lambda: [fast.split_product(x, w, parts) for w in ws], repeats)
        if parts > 1 and k % parts == 0:
            row["columns, split"] = gb / timed(lambda: [fast.split_product(x, w, parts) for w in cols], repeats)
        rows[name] = row
        del ws, cols
    big = torch.randn(sum_bytes // size, device=device, dtype=dtype)
    sum_gbs = big.numel() * size / 1e9 / timed(big.sum, repeats)
    result = {"rows": rows, "sum_gbs": sum_gbs, "sum_mb": sum_bytes // 10**6, "parts": parts,
              "device": torch.cuda.get_device_name(device) if cuda else "cpu", "dtype": str(dtype).split(".")[-1]}
    if cuda:
        return result
    splittable = [s for s in shapes.values() if s[1] % parts == 0]
    n, k = min(splittable or [(parts, parts)], key=lambda s: s[0] * s[1])  # the smallest column-major split
    w, x, calls = torch.randn(k, n).t(), torch.randn(1, k), 2000
    plain = best_seconds(lambda: [fast.split_product(x, w, parts) for _ in range(calls)], repeats) / calls
    op = best_seconds(lambda: [fast.split_product_op(x, w, parts) for _ in range(calls)], repeats) / calls
    return {**result, "operator_us": (op - plain) * 1e6}


def table(result: dict) -> str:
    names = list(dict.fromkeys(col for row in result["rows"].values() for col in row))
    where = (f"{torch.get_num_threads()} threads, split in {result['parts']}" if result["device"] == "cpu"
             else f"{result['device']}, from a CUDA graph")
    out = [f"\nweight read per second (GB/s), batch-1 product, {result['dtype']}, {where}\n", "| projection | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for proj, row in result["rows"].items():
        out.append(f"| {proj} | " + " | ".join(f"{row[c]:.1f}" if c in row else "—" for c in names) + " |")
    out.append(f"\n`sum` over {result['sum_mb']} MB: {result['sum_gbs']:.1f} GB/s.")
    if "operator_us" in result:
        out[-1] += (f" One call through fast.split_product_op costs {result['operator_us']:.1f} µs more than "
                    "fast.split_product.")
    return "\n".join(out)


def main(args):
    from convert import resolve_model_dir

    if args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    M.check_device(args.device)
    if args.shapes == "llama-3.1-8b":
        from bench_gpu import LLAMA_31_8B

        config = M.ModelConfig.from_hf(LLAMA_31_8B)
    else:
        config = M.ModelConfig.from_hf(resolve_model_dir(args.model))
    cuda = torch.device(args.device).type == "cuda"
    sizes = dict(min_bytes=2 << 30, sum_bytes=2 << 30) if cuda else {}
    result = measure(projection_shapes(config), parts=torch.get_num_threads(), repeats=args.repeats,
                     device=args.device, dtype=M.DTYPES[args.dtype], **sizes)
    print(table(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="GB/s of a batch-1 product per weight layout, for the model's projection "
                                            "shapes (the measurement behind fast.store_weights).")
    p.add_argument("--model", help="Hugging Face model folder; default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--shapes", choices=("model", "llama-3.1-8b"), default="model",
                   help="model: the projection shapes of --model; llama-3.1-8b: those of bench_gpu.py's model")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--dtype", choices=sorted(M.DTYPES), default="float32")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds per cell; the best is kept")
    p.add_argument("--out", help="also write the figures to this JSON file")
    try:
        main(p.parse_args())
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
