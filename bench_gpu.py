"""GPU decode benchmark: FullKV vs ReasonAlloc on a Llama-3.1-8B-shaped model, against the roofline.

The model has Llama-3.1-8B's shapes (32 layers, 32 query / 8 KV heads, head dim 128, hidden 4096, MLP
14336, vocab 128256, llama3 RoPE) and random bfloat16 weights made on the GPU, so nothing is carried
or downloaded. Hugging Face transformers' LlamaForCausalLM on the *same* weight tensors is the peer.
For each context length (tokens already in the sequence when decoding starts) it times batch-1 greedy
decoding of --steps tokens:

  transformers FullKV | this project FullKV (fast path) | ReasonAlloc (fast path, R-KV policy) at each budget

Long prompts are prefilled in chunks (--chunk), and ReasonAlloc compresses after every chunk that leaves
a head over budget, so the cache never holds more than the budget plus a chunk. Decode then compresses
every --interval tokens, as generation does; compression time is inside the decode time.

Roofline: a decode step must at least read every weight once (the embedding table excepted: one row)
and the K/V the heads hold; tokens/s ≤ bandwidth / those bytes. The fraction reported is measured
tokens/s over that bound. Bandwidth: the datasheet figure of the GPU found (H100 SXM 3.35 TB/s,
H200 4.8 TB/s) unless --bandwidth is given.

    python bench_gpu.py                         # contexts 2k, 8k, 32k; budgets 512, 1024
    python bench_gpu.py --profile-steps 20      # also print torch.profiler's top kernels
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

import fast
import model as M
import reasonalloc as R

LLAMA_31_8B = dict(
    model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=128256, hidden_size=4096,
    intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
    max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False,
    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192},
    bos_token_id=128000, eos_token_id=128001, attention_bias=False, mlp_bias=False, hidden_act="silu",
)
BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12}  # bytes/s, datasheet (SXM parts)


def build(config: dict, device, dtype, *, layers: int | None = None):
    """(ours, transformers peer) sharing one set of random weights on `device`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = {**config, **({"num_hidden_layers": layers} if layers else {})}
    hf_cfg = LlamaConfig(**{k: v for k, v in config.items() if k not in ("model_type", "architectures")})
    hf_cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            hf = LlamaForCausalLM(hf_cfg).eval()
    finally:
        torch.set_default_dtype(old)
    cfg = M.ModelConfig.from_hf(config)
    with torch.device("meta"):
        ours = M.Transformer(cfg)
    hf_sd = hf.state_dict()
    ours.load_state_dict({ours_name: hf_sd[hf_name] for hf_name, ours_name in M.weight_map(cfg).items()},
                         strict=False, assign=True)
    ours.inv_freq = M.rope_inv_freq(cfg).to(device)
    for name, p in ours.named_parameters():
        if p.is_meta:
            raise AssertionError(f"{name} was not shared from the peer")
    return ours.eval(), hf, cfg


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@torch.inference_mode()
def run_ours(model, ids, steps, *, budget=None, interval=128, window=8, chunk=2048, profile=None, graph=False,
             compile=False):
    """Prefill `ids` in chunks (compressing after each when over budget), then decode `steps` greedy
    tokens. Returns (decode seconds, mean K/V tokens held while decoding, cache bytes allocated,
    (graph captures, seconds spent capturing and compiling) inside the decode time)."""
    cfg = model.config
    cache = fast.new_cache(model, window, spare=interval if budget else max(steps, chunk))
    layer_b = None
    if budget:
        layer_b = R.layer_budgets("reasonalloc", cfg.num_layers, budget, window=window, profile=profile)
        budgets = layer_b[:, None].expand(-1, cfg.num_kv_heads)
    for s in range(0, ids.numel(), chunk):
        logits = model(ids[s:s + chunk], cache)
        if budget and (cache.lengths() > budgets).any():
            budgets = R.compress(cache, layer_b, "reasonalloc", "rkv")[0]
    token = logits[-1].argmax()
    held = []
    step_fn = fast.GraphDecoder(model, cache, compile=compile) if graph else (lambda t: model(t.view(1), cache))
    sync(ids.device)
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        logits = step_fn(token)
        token = logits[-1].argmax()
        if budget and step % interval == 0 and (cache.lengths() > budgets).any():
            budgets = R.compress(cache, layer_b, "reasonalloc", "rkv")[0]
        held.append(int(cache.n.sum()))
    sync(ids.device)
    captures = (step_fn.captures, step_fn.capture_seconds) if graph else (0, 0.0)
    return time.perf_counter() - t0, statistics.fmean(held), cache.allocated_bytes(), captures


@torch.inference_mode()
def run_transformers(hf, ids, steps):
    out = hf(ids[None], use_cache=True, logits_to_keep=1)
    past = out.past_key_values
    token = out.logits[0, -1].argmax()
    sync(ids.device)
    t0 = time.perf_counter()
    for _ in range(steps):
        out = hf(token.view(1, 1), past_key_values=past, use_cache=True)
        past = out.past_key_values
        token = out.logits[0, -1].argmax()
    sync(ids.device)
    return time.perf_counter() - t0


def weight_bytes(model) -> int:
    """Bytes a decode step must read: every parameter, except the embedding table (one row is read)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    emb = model.embed.weight
    return total - emb.numel() * emb.element_size() + emb.shape[1] * emb.element_size()


def main(args):
    device = args.device
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError("no CUDA device; run with --device cpu --layers 2 for a smoke test")
    dtype = M.DTYPES[args.dtype]
    name = torch.cuda.get_device_name() if torch.device(device).type == "cuda" else "cpu"
    bw = args.bandwidth * 1e9 if args.bandwidth else next((v for k, v in BANDWIDTH.items() if k in name), None)
    model, hf, cfg = build(LLAMA_31_8B, device, dtype, layers=args.layers)
    if args.compile:  # headroom for recompiles across contexts and budgets; past the limit dynamo runs eagerly
        torch._dynamo.config.cache_size_limit = 64
    # A made-up layer-demand wave (high at the first and last layers): a random model has no real one, and
    # the allocator's cost does not depend on its values.
    x = torch.linspace(0, 1, cfg.num_layers)
    profile = {"demand": (0.3 + (x - 0.4).abs()).tolist()}
    wbytes = weight_bytes(model)
    kv_token = 2 * cfg.head_dim * model.embed.weight.element_size()  # K and V of one token in one head
    print(f"bench_gpu: {name}, {cfg.num_layers} layers, {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B params "
          f"({wbytes / 1e9:.2f} GB read per step), bandwidth {bw / 1e12 if bw else float('nan'):.2f} TB/s",
          file=sys.stderr)
    rows = []
    budgets = [int(b) for b in args.budgets.split(",")]
    for ctx in [int(c) for c in args.contexts.split(",")]:
        ids = torch.randint(0, cfg.vocab_size, (ctx,), device=device)
        modes = [(True, False)] + ([(True, True)] if args.compile else [])  # (CUDA graph, compiled step)
        variants = [("transformers FullKV", None, False, False), ("ours FullKV, eager", 0, False, False)]
        variants += [(f"ours FullKV, {'compiled + ' if c else ''}CUDA graph", 0, g, c) for g, c in modes]
        variants += [(f"ours ReasonAlloc B={b}, {'compiled + ' if c else ''}{'CUDA graph' if g else 'eager'}", b, g, c)
                     for b in budgets for g, c in ([(False, False)] if args.eager_too else []) + modes]
        for label, budget, graph, compiled in variants:
            if torch.device(device).type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            run = (lambda n: (run_transformers(hf, ids, n), ctx + n / 2, None, (0, 0.0))) if budget is None else \
                (lambda n: run_ours(model, ids, n, budget=budget, interval=args.interval, chunk=args.chunk,
                                    profile=profile, graph=graph, compile=compiled))
            t_warm = time.perf_counter()
            run(8)  # warm-up (allocator, kernels; compiled: the first layout's compile)
            t_warm = time.perf_counter() - t_warm
            secs, held, alloc, (captures, capture_s) = run(args.steps)
            peak = torch.cuda.max_memory_allocated() if torch.device(device).type == "cuda" else 0
            held_tokens = held * (cfg.num_layers * cfg.num_kv_heads if budget is None else 1)  # the peer: per-head length
            step_bytes = wbytes + held_tokens * kv_token
            tps = args.steps / secs
            row = {"context": ctx, "variant": label, "tokens_per_s": tps, "peak_gib": peak / 2**30,
                   "kv_held_mib": held_tokens * kv_token / 2**20,
                   "cache_alloc_mib": None if alloc is None else alloc / 2**20,
                   "roofline_tokens_per_s": bw / step_bytes if bw else None,
                   "roofline_fraction": tps * step_bytes / bw if bw else None,
                   "warmup_s": t_warm, "captures": captures, "capture_s": capture_s}
            rows.append(row)
            print(f"  ctx {ctx:6d}  {label:26s} {tps:8.1f} tok/s  peak {row['peak_gib']:6.2f} GiB  "
                  f"K/V held {row['kv_held_mib']:8.1f} MiB  roofline {row['roofline_fraction'] or 0:.1%}  "
                  f"warm-up {t_warm:.1f} s, {captures} capture(s) {capture_s:.1f} s",
                  file=sys.stderr, flush=True)
    print(table(rows, name, bw, args))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"gpu": name, "bandwidth": bw, "args": vars(args), "rows": rows}, f, indent=1)
    if args.profile_steps:
        profile_decode(model, args, profile, cfg, device, budgets[-1])


def table(rows, name, bw, args) -> str:
    out = [f"\n{name}, bfloat16, batch 1, {args.steps} decode steps per cell, roofline at {bw / 1e12:.2f} TB/s\n"
           if bw else f"\n{name}\n",
           "| context | implementation | tokens/s | vs transformers | peak GPU memory | K/V held | "
           "roofline tokens/s | fraction of roofline | warm-up (compile) | captures in the timed decode |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for ctx in dict.fromkeys(r["context"] for r in rows):
        group = [r for r in rows if r["context"] == ctx]
        peer = next(r for r in group if r["variant"].startswith("transformers"))
        for r in group:
            out.append(f"| {ctx} | {r['variant']} | {r['tokens_per_s']:.1f} | "
                       f"{r['tokens_per_s'] / peer['tokens_per_s']:.2f}× | {r['peak_gib']:.2f} GiB | "
                       f"{r['kv_held_mib']:.0f} MiB | {r['roofline_tokens_per_s'] or 0:.1f} | "
                       f"{(r['roofline_fraction'] or 0):.1%} |".replace("%", " %")
                       + f" {r['warmup_s']:.1f} s | {r['captures']} ({r['capture_s']:.1f} s) |")
    return "\n".join(out)


def profile_decode(model, args, profile, cfg, device, budget):
    """torch.profiler's top kernels over a few ReasonAlloc decode steps at the shortest context."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    ctx = int(args.contexts.split(",")[0])
    ids = torch.randint(0, cfg.vocab_size, (ctx,), device=device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.device(device).type == "cuda" else [])
    with tprofile(activities=acts) as prof:
        run_ours(model, ids, args.profile_steps, budget=budget, interval=args.interval, chunk=args.chunk,
                 profile=profile, graph=True)
    key = "self_cuda_time_total" if torch.device(device).type == "cuda" else "self_cpu_time_total"
    print(f"\ntorch.profiler, ReasonAlloc B={budget} with CUDA graphs, context {ctx}, {args.profile_steps} decode steps "
          f"(prefill included):\n")
    print(prof.key_averages().table(sort_by=key, row_limit=15))


def parser():
    p = argparse.ArgumentParser(description="GPU decode speed of FullKV and ReasonAlloc vs transformers and the "
                                            "memory-bandwidth roofline, on a random Llama-3.1-8B-shaped model.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--contexts", default="2048,8192,32768", help="comma-separated context lengths")
    p.add_argument("--budgets", default="512,1024", help="comma-separated ReasonAlloc budgets B")
    p.add_argument("--steps", type=int, default=256, help="decode steps timed per cell")
    p.add_argument("--interval", type=int, default=128, help="compression interval Δ")
    p.add_argument("--chunk", type=int, default=2048, help="prefill chunk length")
    p.add_argument("--bandwidth", type=float, default=0, help="GPU memory bandwidth in GB/s (default: datasheet)")
    p.add_argument("--layers", type=int, default=0, help="fewer layers (a smoke test); 0 = the real 32")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", choices=list(M.DTYPES), default="bfloat16")
    p.add_argument("--profile-steps", type=int, default=0, help="also profile this many decode steps")
    p.add_argument("--eager-too", action="store_true", help="also time ReasonAlloc without CUDA graphs")
    p.add_argument("--compile", action="store_true", help="also time the static step compiled with torch.compile "
                                                          "(Inductor) inside the CUDA graph")
    p.add_argument("--out", help="write the rows as JSON")
    return p


if __name__ == "__main__":
    args = parser().parse_args()
    try:
        main(args)
    except ValueError as e:
        sys.exit(f"error: {e}")
