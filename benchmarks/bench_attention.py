"""Decode-step attention over ragged heads on a GPU: the layouts and kernels fast.PackedCache.attend could use.

A compressed cache in GraphDecoder's static step holds each layer as (Hk, capacity, D) with a length per KV
head; uniform budgets give every head one length, ReasonAlloc's head split gives each its own (the longest up to
twice the layer's budget). This times, for Llama-3.1-8B's attention shapes (32 query heads over 8 KV heads,
head dim 128, bfloat16), a chain of 32 layers of one attention call each (each layer's query is the last
layer's output plus a fixed vector) under torch.compile with CUDA graphs, as the static step runs:

  one row      one mask row broadcast over every head: only right where all heads hold one length
  query rows   one mask row per query head, (1, Hq, 1, D) queries (before this change: repeat_interleave)
  kv rows      a batch of Hk KV heads, (Hk, G, 1, D) queries, one mask row each (what attend does now)
  varlen       FlashAttention's variable-length kernel, each head its own sequence with `seqused_k`, so it
               reads only the rows each head holds (torch.ops.aten._flash_attention_forward)
  chunks       each head cut into 128-row sequences for the same kernel (balanced work), merged by log-sum-exp
  flex         FlexAttention (its decoding kernel splits each head's rows over blocks), rows past a head's length
               scored -inf
  flex blocks  the same with a block mask made from the lengths each step, so blocks past a head's end are skipped

Cells are interleaved over --repeats; each prints microseconds per layer (CUDA events over the replayed graph,
median over repeats) and, from torch.profiler, the attention kernel's and the mask kernel's own time per layer,
and that of every kernel of the chain.
The kernel columns are the measurement: the events also time the host's launch of each replay, which passes
torch.compile's guards for every compiled chain (all share one function), and on an H100 that made them
host-bound and noisy (results/attention_h100.log: 19-40 µs a layer for 7-15 µs of attention kernel).
Every variant is checked against `query rows` (max abs difference). Needs CUDA:

    python benchmarks/bench_attention.py --out results/attention_h100.json
"""
import argparse
import json
import statistics

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

LAYERS, HQ, HK, D = 32, 32, 8, 128
G = HQ // HK
CHUNK = 128

# (name, capacity, rows each KV head holds): R-KV and ReasonAlloc-like layers at B = 512 and 1024, with
# GraphDecoder's capacity (the longest head plus two 128-token intervals)
CELLS = [
    ("uniform B=512", 768, [512] * HK),
    ("ragged B=512", 1280, [1024, 300, 640, 900, 350, 700, 512, 670]),
    ("uniform B=1024", 1280, [1024] * HK),
    ("ragged B=1024", 2304, [2048, 600, 1200, 1700, 700, 1400, 1000, 1544]),
    # ReasonAlloc's capacities before GraphDecoder rounded them to 16 rows (fast.PackedCache.align): the same
    # ragged layer with its mask rows 1283 elements apart
    ("ragged B=512, capacity 1283", 1283, [1024, 300, 640, 900, 350, 700, 512, 670]),
]


def held_rows(K, n):
    """(Hk, S): row j of head h is held (j < n[h])."""
    return torch.arange(K.shape[1], device=K.device)[None] < n[:, None]


def one_row(q, K, V, n):
    held = held_rows(K, n)
    return F.scaled_dot_product_attention(q.view(1, HQ, 1, D), K[None], V[None], attn_mask=held[:1, None, None, :],
                                          enable_gqa=True).view(HQ, D)


def query_rows(q, K, V, n):
    held = held_rows(K, n)
    mask = held.repeat_interleave(G, dim=0)[None, :, None, :]  # (1, Hq, 1, S)
    return F.scaled_dot_product_attention(q.view(1, HQ, 1, D), K[None], V[None], attn_mask=mask,
                                          enable_gqa=True).view(HQ, D)


def kv_rows(q, K, V, n):
    held = held_rows(K, n)
    return F.scaled_dot_product_attention(q.view(HK, G, 1, D), K[:, None], V[:, None],
                                          attn_mask=held[:, None, None, :], enable_gqa=True).view(HQ, D)


def varlen(q, K, V, n):
    S = K.shape[1]
    cu_q = torch.arange(HK + 1, device=K.device, dtype=torch.int32)  # one query row (G heads) per KV head
    out = torch.ops.aten._flash_attention_forward(q.view(HK, G, D), K.view(HK * S, 1, D), V.view(HK * S, 1, D),
                                                  cu_q, cu_q * S, 1, S, 0.0, False, False,
                                                  seqused_k=n.to(torch.int32))[0]
    return out.reshape(HQ, D)


def chunks(q, K, V, n):
    S = K.shape[1]
    c = -(-S // CHUNK)  # chunks per head, the last one possibly shorter
    j = torch.arange(c, device=K.device, dtype=torch.int32)
    starts = (torch.arange(HK, device=K.device, dtype=torch.int32)[:, None] * S + j * CHUNK).flatten()
    cu_k = torch.cat([starts, starts.new_full((1,), HK * S)])
    used = (n[:, None].to(torch.int32) - j * CHUNK).clamp(0, CHUNK)  # (Hk, c) rows held in each chunk
    cu_q = torch.arange(HK * c + 1, device=K.device, dtype=torch.int32)
    qc = q.view(HK, 1, G, D).expand(HK, c, G, D).reshape(HK * c, G, D)
    out, lse = torch.ops.aten._flash_attention_forward(qc, K.view(HK * S, 1, D), V.view(HK * S, 1, D), cu_q, cu_k,
                                                       1, CHUNK, 0.0, False, False, seqused_k=used.flatten())[:2]
    lse = lse.view(G, HK, c).permute(1, 2, 0).float().masked_fill((used == 0)[..., None], float("-inf"))
    w = torch.softmax(lse, dim=1)  # (Hk, c, G): each chunk's share of its head's softmax
    return (out.view(HK, c, G, D).float() * w[..., None]).sum(1).to(q.dtype).reshape(HQ, D)


def flex(q, K, V, n):
    """FlexAttention (its decoding kernel splits each head's rows over many blocks), rows past a head's length
    scored -inf; one batch of Hk KV heads, as kv rows."""
    from torch.nn.attention.flex_attention import flex_attention

    def held(score, b, h, q_idx, kv_idx):
        return torch.where(kv_idx < n[b], score, float("-inf"))

    return flex_attention(q.view(HK, G, 1, D), K[:, None], V[:, None], score_mod=held,
                          enable_gqa=True).reshape(HQ, D)


def flex_blocks(q, K, V, n):
    """flex with a block mask made from the lengths each step, so blocks past a head's length are not read."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def held(b, h, q_idx, kv_idx):
        return kv_idx < n[b]

    mask = create_block_mask(held, HK, None, 1, K.shape[1], device=K.device)
    return flex_attention(q.view(HK, G, 1, D), K[:, None], V[:, None], block_mask=mask,
                          enable_gqa=True).reshape(HQ, D)


VARIANTS = {"one row": one_row, "query rows": query_rows, "kv rows": kv_rows, "varlen": varlen, "chunks": chunks,
            "flex": flex, "flex blocks": flex_blocks}


def chain(attend, Ks, Vs, n, q0):
    def step():
        x = q0
        for K, V in zip(Ks, Vs):
            x = attend(x, K, V, n) + q0
        return x
    return torch.compile(step, mode="reduce-overhead", fullgraph=True, dynamic=False)


def time_us(f, replays):
    for _ in range(5):
        f()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    a.record()
    for _ in range(replays):
        f()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) * 1e3 / replays / LAYERS


def kernel_us(f, replays):
    """(attention kernels, mask-building kernel, every kernel) microseconds per layer, from the profiler (every kernel:
    the chain's add too, one small kernel a layer)."""
    with profile(activities=[ProfilerActivity.CUDA]) as p:
        for _ in range(replays):
            f()
        torch.cuda.synchronize()
    att = mask = every = 0.0
    for e in p.key_averages():
        name = e.key.lower()
        if e.device_type.name != "CUDA" or e.self_device_time_total <= 0:
            continue
        every += e.self_device_time_total
        if name.startswith("triton_tem") or "flex" in name:  # FlexAttention's kernels (Inductor templates)
            att += e.self_device_time_total
        elif name.startswith("triton") and "attention" in name:
            mask += e.self_device_time_total
        elif any(k in name for k in ("sdpa", "flash", "fmha", "attention")):
            att += e.self_device_time_total
    return att / replays / LAYERS, mask / replays / LAYERS, every / replays / LAYERS


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats of every cell (default 3)")
    p.add_argument("--replays", type=int, default=300, help="graph replays timed per repeat (default 300)")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma-separated, of: {', '.join(VARIANTS)} (default: all)")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args()
    chosen = args.variants.split(",")
    if not set(chosen) <= set(VARIANTS):
        raise SystemExit(f"unknown --variants {sorted(set(chosen) - set(VARIANTS))}; choose of {', '.join(VARIANTS)}")
    if "query rows" not in chosen:  # timed in every run too: the layout each cell's variants are checked against
        chosen.insert(0, "query rows")
    if not torch.cuda.is_available():
        raise SystemExit("bench_attention.py times CUDA kernels (cuDNN and FlashAttention): run it on a CUDA GPU")
    torch._dynamo.config.recompile_limit = 1000
    torch.manual_seed(0)
    dev, dt = "cuda", torch.bfloat16
    print(f"bench_attention: {torch.cuda.get_device_name()}, torch {torch.__version__}, {LAYERS} layers of "
          f"{HQ} query heads over {HK} KV heads, head dim {D}, bfloat16", flush=True)
    results = []
    for name, S, lengths in CELLS:
        Ks = [torch.randn(HK, S, D, device=dev, dtype=dt) for _ in range(LAYERS)]
        Vs = [torch.randn(HK, S, D, device=dev, dtype=dt) for _ in range(LAYERS)]
        n = torch.tensor(lengths, device=dev)
        q0 = torch.randn(HQ, D, device=dev, dtype=dt)
        ref = query_rows(q0, Ks[0], Vs[0], n)
        names = [v for v in chosen if v != "one row" or len(set(lengths)) == 1]
        steps, times = {}, {v: [] for v in names}
        for v in names:
            err = (VARIANTS[v](q0, Ks[0], Vs[0], n).float() - ref.float()).abs().max().item()
            steps[v] = (chain(VARIANTS[v], Ks, Vs, n, q0), err)
        for _ in range(args.repeats):
            for v in names:
                torch.compiler.cudagraph_mark_step_begin()
                times[v].append(time_us(steps[v][0], args.replays))
        print(f"{name}: capacity {S}, rows held {lengths}", flush=True)
        for v in names:
            att, mask, every = kernel_us(steps[v][0], 50)
            row = dict(cell=name, capacity=S, lengths=lengths, variant=v, us_per_layer=statistics.median(times[v]),
                       us_all=times[v], attention_kernel_us=att, mask_kernel_us=mask, all_kernels_us=every,
                       max_abs_diff=steps[v][1])
            results.append(row)
            print(f"  {v:11s} {row['us_per_layer']:6.2f} µs a layer (range {min(times[v]):.2f}-{max(times[v]):.2f}),"
                  f" attention kernel {att:5.2f} µs, mask {mask:4.2f} µs, all kernels {every:5.2f} µs, max |diff| "
                  f"against query rows {steps[v][1]:.1e}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, rows=results), f, indent=1)


if __name__ == "__main__":
    main()
