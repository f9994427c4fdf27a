"""GPU decode benchmark: FullKV vs ReasonAlloc on a Llama-3.1-8B-shaped model, against the roofline.

The model has Llama-3.1-8B's shapes (32 layers, 32 query / 8 KV heads, head dim 128, hidden 4096, MLP
14336, vocab 128256, llama3 RoPE) and random bfloat16 weights made on the GPU, so nothing is carried
or downloaded. For each context length (tokens already in the sequence when decoding starts) it times
batch-1 greedy decoding of --steps tokens, for each of (--rows):

  transformers FullKV     Hugging Face LlamaForCausalLM, eager, on the *same* weight tensors
  peer                    a plain compiled FullKV decoder (CompiledFullKV, gpt-fast style) on the same weights
  full                    this project's FullKV (fast path)
  reasonalloc, rkv        ReasonAlloc and uniform R-KV (fast path, R-KV policy) at each budget

and our fast path in each of --modes: eager, the static step in a CUDA graph, or that step compiled by
torch.compile inside the graph. Every cell is warmed up once, through its first decode compression (the
compile time shows there), then timed --repeats times, interleaved over the cells; the table gives the median,
and ReasonAlloc's time per token over R-KV's is printed per repeat.

Long prompts are prefilled in chunks (--chunk), and the compressed methods compress after every chunk that
leaves a head over budget, so the cache never holds more than the budget plus a chunk. Decode then
compresses every --interval tokens, as generation does; compression time is inside the decode time.

Roofline: a decode step must at least read every weight once (the embedding table excepted: one row)
and the K/V the heads hold; tokens/s ≤ bandwidth / those bytes. The fraction reported is measured
tokens/s over that bound. Bandwidth: the datasheet figure of the GPU found (H100 SXM 3.35 TB/s,
H200 4.8 TB/s) unless --bandwidth is given.

    python benchmarks/bench_gpu.py              # contexts 2k, 8k, 32k; budgets 512, 1024
    python benchmarks/bench_gpu.py --profile-steps 130  # also profile each cell of the first context: kernels per step,
                                                # GPU kernel time vs wall time, top kernels (one compression inside)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

# Two settings for the whole run, peer included, made before torch starts CUDA unless the caller set them:
# - Every kernel loaded when CUDA starts (CUDA_MODULE_LOADING=EAGER; PyTorch's default is LAZY, each kernel loaded
#   on its first launch). Some compressions made the host wait for the GPU to drain its whole queue, with no new
#   memory allocated, and the rest of such a compression ran at the host's launch rate, the GPU idle between
#   launches; with every kernel loaded at start, none did so in the scoring (a diagnostic not kept). ReasonAlloc's
#   ragged scoring runs matrix products of new shapes for a while (cuBLAS picks its kernel by shape), so its
#   compressions met such loads in the timed steps where uniform R-KV's, of one shape, had met them in its first
#   compression: a one-time cost per process that the timed steps should not hold (docs/performance.md).
# - The caching allocator grows by mapping more memory into one range instead of new cudaMalloc segments
#   (expandable segments): ReasonAlloc's compression workspace changes size with each head split.
RUN_ENV = {"CUDA_MODULE_LOADING": "EAGER", "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
for _name, _value in RUN_ENV.items():
    os.environ.setdefault(_name, _value)

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the project's modules live one folder up

import fast  # noqa: E402
import model as M  # noqa: E402
import reasonalloc as R  # noqa: E402
from bench import int_list  # noqa: E402

LLAMA_31_8B = dict(
    model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=128256, hidden_size=4096,
    intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
    max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False,
    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192},
    bos_token_id=128000, eos_token_id=128001, attention_bias=False, mlp_bias=False, hidden_act="silu",
)
BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12}  # bytes/s, datasheet (SXM parts)


def build(config: dict, device, dtype, *, layers: int | None = None, layout="auto"):
    """(ours, transformers peer) sharing one set of random weights on `device`, laid out by
    fast.store_weights(ours, layout) (the compiled peer runs our modules, so it reads the same layout)."""
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
    ours.load_state_dict(M.fuse_checkpoint(hf.state_dict(), cfg), strict=False, assign=True)
    ours.inv_freq = M.rope_inv_freq(cfg).to(device)
    for name, p in ours.named_parameters():
        if p.is_meta:
            raise AssertionError(f"{name} was not shared from the peer")
    fast.store_weights(ours, layout)
    # transformers' weights become our tensors again (a column-major one is a new tensor), its q/k/v and gate/up
    # row slices (views) of our fused weights, so one copy is held.
    for i, block in enumerate(ours.blocks):
        layer = hf.model.layers[i]
        for fused, sizes, parts in ((block.attn.wqkv.weight, block.attn.split,
                                     (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj)),
                                    (block.mlp.w_gate_up.weight, (cfg.intermediate_size,) * 2,
                                     (layer.mlp.gate_proj, layer.mlp.up_proj)),
                                    (block.attn.wo.weight, None, (layer.self_attn.o_proj,)),
                                    (block.mlp.w_down.weight, None, (layer.mlp.down_proj,))):
            for linear, rows in zip(parts, fused.split(sizes) if sizes else (fused,)):
                linear.weight = torch.nn.Parameter(rows, requires_grad=False)
    hf.lm_head.weight = torch.nn.Parameter(ours.lm_head.weight, requires_grad=False)
    held = {p.untyped_storage().data_ptr() for p in ours.parameters()}
    if any(p.untyped_storage().data_ptr() not in held for p in hf.parameters()):
        raise AssertionError("transformers holds a weight of its own")
    return ours.eval(), hf, cfg


def made_up_wave(num_layers: int) -> dict:
    """A layer-demand profile high at the first and last layers: a random model has no real one, and the
    allocator's cost does not depend on its values."""
    x = torch.linspace(0, 1, num_layers, device="cpu")
    return {"demand": (0.3 + (x - 0.4).abs()).tolist()}


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@torch.inference_mode()
def run_ours(model, ids, steps, *, budget=None, allocator="reasonalloc", interval=128, window=8, chunk=2048,
             profile=None, graph=False, compile=False, dynamic=None, around=None):
    """Prefill `ids` in chunks (compressing after each when over budget), take one decode step (with graph=True
    that step captures the graph, as the peer's first calls do), then time `steps` greedy decode steps, inside
    the context manager `around` if given (a profiler). FullKV reserves its final length up front, as the peer's
    static cache. Returns (decode seconds, mean K/V tokens held while decoding, cache bytes allocated, (graph
    captures, seconds spent capturing and compiling) inside the timed decode)."""
    cfg = model.config
    cache = fast.new_cache(model, window, spare=interval, queries=bool(budget))  # FullKV is never scored
    layer_b = None
    if budget:
        layer_b = R.layer_budgets(allocator, cfg.num_layers, budget, window=window, profile=profile)
        budgets = layer_b[:, None].expand(-1, cfg.num_kv_heads)
    else:
        cache.reserve(ids.numel() + steps + 3)  # the whole run, plus the graph's warm-up rows
    for s in range(0, ids.numel(), chunk):
        logits = model(ids[s:s + chunk], cache)
        if budget and (cache.lengths() > budgets).any():
            budgets = fast.compress(cache, layer_b, allocator, "rkv", positions=False)[0]
    held = []
    step_fn = fast.GraphDecoder(model, cache, compile=compile, dynamic=dynamic) if graph else \
        (lambda t: model(t.view(1), cache))
    token = step_fn(logits[-1].argmax())[-1].argmax()  # the untimed first step
    first = (step_fn.captures, step_fn.capture_seconds) if graph else (0, 0.0)
    sync(ids.device)
    t0 = time.perf_counter()
    with around or contextlib.nullcontext():
        for step in range(2, steps + 2):
            logits = step_fn(token)
            token = logits[-1].argmax()
            if budget and R.compression_due(step, interval, cache.lengths(), budgets):
                budgets = fast.compress(cache, layer_b, allocator, "rkv", positions=False)[0]
            held.append(int(cache.n.sum()))
        sync(ids.device)
    captures = (step_fn.captures - first[0], step_fn.capture_seconds - first[1]) if graph else (0, 0.0)
    return time.perf_counter() - t0, statistics.fmean(held), cache.allocated_bytes(), captures


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


class CompiledFullKV(torch.nn.Module):
    """The plain compiled FullKV peer, in the style of gpt-fast (written for this project): a static cache of
    `max_len` rows per KV head, the new token written at its position, attention by
    scaled_dot_product_attention over the whole cache with a length mask, and the decode step under
    torch.compile(mode="reduce-overhead") (Inductor's kernels replayed from a CUDA graph). It runs our model's
    weights (q/k/v and gate/up fused) through its own forward pass, without our cache or policies: the
    fastest a FullKV decoder in plain PyTorch gets, to hold ours against."""

    def __init__(self, model: M.Transformer, max_len: int):
        super().__init__()
        c, p = model.config, model.embed.weight
        self.model, self.max_len = model, max_len
        self.caches = torch.nn.ModuleList(torch.nn.Module() for _ in range(c.num_layers))  # one K/V pair per layer
        for cache in self.caches:
            for name in ("k", "v"):
                cache.register_buffer(name, torch.zeros(1, c.num_kv_heads, max_len, c.head_dim, dtype=p.dtype,
                                                        device=p.device))
        self.decode = torch.compile(self.forward, mode="reduce-overhead", fullgraph=True)

    def forward(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """tokens, pos: (T,) -> (T, vocab) float32 logits; rows pos of the cache are written."""
        m, c = self.model, self.model.config
        T, Hq, Hk, D = tokens.shape[0], c.num_heads, c.num_kv_heads, c.head_dim
        x = m.embed(tokens)
        rope = M.rope_cos_sin(pos, m.inv_freq, x.dtype)
        mask = torch.arange(self.max_len, device=pos.device)[None, :] <= pos[:, None]  # (T, max_len): causal
        for i, block in enumerate(m.blocks):
            h = block.attn_norm(x)
            q, k, v = block.attn.wqkv(h).split(block.attn.split, dim=-1)
            q = M.apply_rope(q.view(T, Hq, D), *rope)
            k = M.apply_rope(k.view(T, Hk, D), *rope)
            cache = self.caches[i]
            cache.k[:, :, pos] = k.transpose(0, 1)[None]  # (1, Hk, T, D) written in place at the positions
            cache.v[:, :, pos] = v.view(T, Hk, D).transpose(0, 1)[None]
            y = torch.nn.functional.scaled_dot_product_attention(
                q.transpose(0, 1)[None], cache.k, cache.v, attn_mask=mask[None, None], enable_gqa=True)  # (1, Hq, T, D)
            y = y[0].transpose(0, 1).reshape(T, Hq * D)
            x = x + block.attn.wo(y)
            x = x + block.mlp(block.mlp_norm(x))
        return m.lm_head(m.norm(x)).float()


@torch.inference_mode()
def run_peer(peer: CompiledFullKV, ids, steps, *, chunk=2048, around=None):
    """Prefill eagerly in chunks, take one untimed compiled decode step, then time `steps` more (inside
    `around` if given), as run_ours."""
    dev = ids.device
    for s in range(0, ids.numel(), chunk):
        logits = peer(ids[s:s + chunk], torch.arange(s, min(s + chunk, ids.numel()), device=dev))
    pos = torch.tensor([ids.numel()], device=dev)
    token = peer.decode(logits[-1:].argmax(dim=-1), pos).argmax(dim=-1)
    pos = pos + 1
    sync(dev)
    t0 = time.perf_counter()
    with around or contextlib.nullcontext():
        for _ in range(steps):
            logits = peer.decode(token, pos)
            token = logits.argmax(dim=-1)  # stays on the GPU: no host sync inside the loop
            pos = pos + 1
        sync(dev)
    return time.perf_counter() - t0


def weight_bytes(model) -> int:
    """Bytes a decode step must read: every parameter, except the embedding table (one row is read)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    emb = model.embed.weight
    return total - emb.numel() * emb.element_size() + emb.shape[1] * emb.element_size()


MODES = {"eager": (False, False), "graph": (True, False), "compiled": (True, True)}  # (CUDA graph, torch.compile)
MODE_LABEL = {"eager": "eager", "graph": "CUDA graph", "compiled": "compiled + CUDA graph"}
ROWS = ("transformers", "peer", "full", "reasonalloc", "rkv")


def variants(args, budgets) -> list[dict]:
    """The cells of one context, in table order."""
    rows, modes = args.rows.split(","), args.modes.split(",")
    out = []
    if "transformers" in rows:
        out.append(dict(label="transformers FullKV", kind="transformers", budget=None))
    if "peer" in rows:
        out.append(dict(label="plain compiled FullKV (peer)", kind="peer", budget=None))
    for mode in modes if "full" in rows else []:
        out.append(dict(label=f"ours FullKV, {MODE_LABEL[mode]}", kind="ours", budget=None, mode=mode))
    for b in budgets:
        for name, allocator in (("ReasonAlloc", "reasonalloc"), ("R-KV", "uniform")):
            if allocator == "reasonalloc" and "reasonalloc" in rows or allocator == "uniform" and "rkv" in rows:
                out += [dict(label=f"ours {name} B={b}, {MODE_LABEL[m]}", kind="ours", budget=b, allocator=allocator,
                             mode=m) for m in modes]
    return out


def check_args(args):
    for name, allowed in (("modes", MODES), ("rows", ROWS)):
        bad = [x for x in getattr(args, name).split(",") if x not in allowed]
        if bad or not getattr(args, name):
            raise ValueError(f"--{name} takes a comma-separated list of {', '.join(allowed)}; got {getattr(args, name)!r}")
    for name in ("contexts", "budgets", "batches"):
        positive_list(getattr(args, name), f"--{name}")
    if args.steps < 1 or args.repeats < 1:
        raise ValueError("--steps and --repeats must be >= 1")


def main(args):
    check_args(args)
    device = args.device
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError("no CUDA device; run with --device cpu --layers 2 for a smoke test")
    dtype = M.DTYPES[args.dtype]
    name = torch.cuda.get_device_name() if torch.device(device).type == "cuda" else "cpu"
    bw = args.bandwidth * 1e9 if args.bandwidth else next((v for k, v in BANDWIDTH.items() if k in name), None)
    model, hf, cfg = build(LLAMA_31_8B, device, dtype, layers=args.layers, layout=args.layout)
    # Headroom for recompiles across contexts and budgets; past the limit dynamo runs eagerly.
    torch._dynamo.config.cache_size_limit = 64
    if args.tune:  # gpt-fast's setting, for the peer and ours alike: a one-row matrix product becomes a Triton
        # reduction whose launch shape Inductor tunes by coordinate descent, instead of a cuBLAS call
        torch._inductor.config.coordinate_descent_tuning = True
    profile = made_up_wave(cfg.num_layers)
    wbytes = weight_bytes(model)
    env = {k: os.environ.get(k) for k in RUN_ENV}  # what this run was given (the caller may have set them)
    kv_token = 2 * cfg.head_dim * model.embed.weight.element_size()  # K and V of one token in one head
    print(f"bench_gpu: {name}, {cfg.num_layers} layers, {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B params "
          f"({wbytes / 1e9:.2f} GB read per step), bandwidth {bw / 1e12 if bw else float('nan'):.2f} TB/s, "
          + ", ".join(f"{k}={v}" for k, v in env.items()),
          file=sys.stderr)
    cuda = torch.device(device).type == "cuda"
    rows, ratios, profiled = [], [], False
    budgets = positive_list(args.budgets, "--budgets")
    for ctx in positive_list(args.contexts, "--contexts"):
        ids = torch.randint(0, cfg.vocab_size, (ctx,), device=device)
        cells = variants(args, budgets)
        peer = CompiledFullKV(model, ctx + args.steps + 2) if any(v["kind"] == "peer" for v in cells) else None

        def run(v, n, around=None):
            """(seconds, mean K/V tokens held, cache bytes allocated, (captures, capture seconds)) of n steps."""
            if v["kind"] == "transformers":
                return run_transformers(hf, ids, n), cfg.num_layers * cfg.num_kv_heads * (ctx + n / 2), None, (0, 0.0)
            if v["kind"] == "peer":
                return run_peer(peer, ids, n, chunk=args.chunk, around=around), \
                    cfg.num_layers * cfg.num_kv_heads * (ctx + n / 2), None, (0, 0.0)
            graph, compiled = MODES[v["mode"]]
            return run_ours(model, ids, n, budget=v["budget"], allocator=v.get("allocator", "reasonalloc"),
                            interval=args.interval, chunk=args.chunk, profile=profile, graph=graph, compile=compiled,
                            dynamic=False if args.static_shapes else None, around=around)

        # Warm-up (allocator, kernels; compiled: the first compile of a layout) and peak memory: through one decode
        # compression where the timed steps hold one, so its first run is not timed either.
        warm = min(args.steps, args.interval + 8)
        for v in cells:
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            t = time.perf_counter()
            run(v, warm)
            v["warmup_s"] = time.perf_counter() - t
            v["times"] = []
        for rep in range(args.repeats):  # the timed runs, interleaved over the cells
            for v in cells:
                if cuda:
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                secs, held, alloc, (captures, capture_s) = run(v, args.steps)
                v["times"].append(secs)
                v.update(held=held, alloc=alloc, captures=captures, capture_s=capture_s,
                         peak=max(v.get("peak", 0), torch.cuda.max_memory_allocated() if cuda else 0))
        for v in cells:
            secs = statistics.median(v["times"])
            step_bytes = wbytes + v["held"] * kv_token
            tps = args.steps / secs
            row = {"context": ctx, "variant": v["label"], "tokens_per_s": tps,
                   "tokens_per_s_all": [args.steps / t for t in v["times"]], "peak_gib": v["peak"] / 2**30,
                   "kv_held_mib": v["held"] * kv_token / 2**20,
                   "cache_alloc_mib": None if v["alloc"] is None else v["alloc"] / 2**20,
                   "roofline_tokens_per_s": bw / step_bytes if bw else None,
                   "roofline_fraction": tps * step_bytes / bw if bw else None,
                   "warmup_s": v["warmup_s"], "captures": v["captures"], "capture_s": v["capture_s"]}
            rows.append(row)
            print(f"  ctx {ctx:6d}  {v['label']:42s} {tps:8.1f} tok/s  peak {row['peak_gib']:6.2f} GiB  "
                  f"K/V held {row['kv_held_mib']:8.1f} MiB  roofline {row['roofline_fraction'] or 0:.1%}  "
                  f"warm-up {v['warmup_s']:.1f} s, {v['captures']} capture(s) {v['capture_s']:.1f} s",
                  file=sys.stderr, flush=True)
        for b in budgets:  # ReasonAlloc's time per token over uniform R-KV's, same budget and mode, per repeat
            for mode in args.modes.split(","):
                pair = [next((v for v in cells if v["label"] == f"ours {n} B={b}, {MODE_LABEL[mode]}"), None)
                        for n in ("ReasonAlloc", "R-KV")]
                if None not in pair:
                    r = sorted(a / u for a, u in zip(pair[0]["times"], pair[1]["times"]))
                    ratios.append({"context": ctx, "budget": b, "mode": mode, "ratios": r})
        if args.profile_steps and not profiled:  # the shortest context's cells, one step at a time
            profile_cells(cells, run, args, ctx, cuda)
            profiled = True
        if args.out:  # after every context, so a run cut short keeps what it measured
            with open(args.out, "w") as f:
                json.dump({"gpu": name, "bandwidth": bw, "args": vars(args), "env": env, "rows": rows,
                           "time_ratios": ratios}, f, indent=1)
    print(table(rows, name, bw, args))
    for r in ratios:
        print(f"ReasonAlloc / R-KV time per token, context {r['context']}, B={r['budget']}, {MODE_LABEL[r['mode']]}: "
              f"median {statistics.median(r['ratios']):.3f} (range {r['ratios'][0]:.3f}-{r['ratios'][-1]:.3f} over "
              f"{len(r['ratios'])} interleaved repeats)")


def table(rows, name, bw, args) -> str:
    out = [f"\n{name}, bfloat16, batch 1, {args.steps} decode steps per cell, median of {args.repeats} interleaved "
           f"repeat(s), roofline at {bw / 1e12:.2f} TB/s, weight layout {args.layout}"
           f"{', compiled with coordinate-descent tuning' * args.tune}\n"
           if bw else f"\n{name}\n",
           "| context | implementation | tokens/s | vs transformers | peak GPU memory | K/V held | "
           "roofline tokens/s | fraction of roofline | warm-up (compile) | captures in the timed decode |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for ctx in dict.fromkeys(r["context"] for r in rows):
        group = [r for r in rows if r["context"] == ctx]
        peer = next((r for r in group if r["variant"].startswith("transformers")), None)
        for r in group:
            vs = f"{r['tokens_per_s'] / peer['tokens_per_s']:.2f}×" if peer else "-"
            out.append(f"| {ctx} | {r['variant']} | {r['tokens_per_s']:.1f} | {vs} | {r['peak_gib']:.2f} GiB | "
                       f"{r['kv_held_mib']:.0f} MiB | {r['roofline_tokens_per_s'] or 0:.1f} | "
                       f"{(r['roofline_fraction'] or 0):.1%} |".replace("%", " %")
                       + f" {r['warmup_s']:.1f} s | {r['captures']} ({r['capture_s']:.1f} s) |")
    return "\n".join(out)


def profile_cells(cells, run, args, ctx, cuda):
    """torch.profiler over --profile-steps timed decode steps of every cell of the first context (no
    transformers): GPU kernels per step, their summed time per step against the wall time per step (the
    difference is the GPU waiting for the host), and each cell's top kernels. A compression falls inside when
    --profile-steps reaches --interval."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    n = args.profile_steps
    print(f"\ntorch.profiler, context {ctx}, {n} decode steps per cell (after the same untimed first step):",
          file=sys.stderr)
    lines = ["| implementation | wall ms per step | GPU kernel ms per step | GPU busy | kernels per step |",
             "|---|---|---|---|---|"]
    tables = []
    for v in cells:
        if v["kind"] == "transformers":
            continue
        prof = tprofile(activities=acts)
        secs = run(v, n, around=prof)[0]
        kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
        busy = sum(e.time_range.elapsed_us() for e in kernels) / 1e3 / n
        wall = secs * 1e3 / n
        lines.append(f"| {v['label']} | {wall:.3f} | {busy:.3f} | {busy / wall:.0%} | {len(kernels) / n:.0f} |")
        key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        tables.append(f"\n{v['label']}, top kernels over {n} steps:\n"
                      + prof.key_averages().table(sort_by=key, row_limit=12, max_name_column_width=60))
    print("\n".join(lines + tables))


# ----------------------------------------------------------------------------------------------
# Throughput: many sequences at once (--throughput)


def random_batch_cache(model, n: int, ctx: int, layer_b, *, window: int, spare: int, generator) -> fast.BatchCache:
    """A BatchCache of n sequences, each `ctx` tokens into its text, whose heads hold random keys and values of
    the right sizes: every head of layer l holds layer_b[l] tokens (FullKV: layer_b None, all ctx tokens), at
    the newest positions. Speed does not depend on what the cache holds, and prefilling hundreds of long
    sequences would take longer than the measurement."""
    c = model.config
    p = model.embed.weight
    cache = fast.BatchCache(c, n, window, dtype=p.dtype, device=p.device, spare=spare)
    for l in range(c.num_layers):
        t = ctx if layer_b is None else int(layer_b[l])
        cap = t + spare
        cache.k[l] = torch.randn(n * c.num_kv_heads, cap, c.head_dim, device=p.device, dtype=p.dtype, generator=generator)
        cache.v[l] = torch.randn(n * c.num_kv_heads, cap, c.head_dim, device=p.device, dtype=p.dtype, generator=generator)
        cache.pos[l] = torch.arange(ctx - t, ctx - t + cap, device=p.device).expand(n * c.num_kv_heads, cap).contiguous()
        cache.n[l] = t
        cache.n_dev[l] = torch.full((n * c.num_kv_heads,), t, device=p.device)
        cache.q_win[l] = torch.randn(n * c.num_heads, window, c.head_dim, device=p.device, dtype=p.dtype,
                                     generator=generator)
    cache.seq_pos[:] = ctx
    return cache


def seq_bytes(cfg, ctx: int, layer_b, *, steps: int, interval: int, elem: int, hi: float = 2.0) -> int:
    """Bytes of K/V storage one sequence takes: FullKV its context plus the steps; a compressed cache, per
    layer, its longest head (at most hi·B_l after the head split) plus 2 intervals of spare (what a
    compression under GraphDecoder trims the storage to, PackedCache.band); each plus the rows GraphDecoder may
    add to round a capacity up to a multiple of GraphDecoder.align."""
    per_row = cfg.num_kv_heads * 2 * cfg.head_dim * elem
    rounding = fast.GraphDecoder.align - 1
    if layer_b is None:
        return cfg.num_layers * (ctx + steps + 8 + rounding) * per_row
    return sum(int(hi * int(b)) + 2 * interval + 2 + rounding for b in layer_b) * per_row


@torch.inference_mode()
def run_batch(model, n, ctx, layer_b, allocator, *, steps, interval, window):
    """Decode `steps` tokens of n sequences from random caches, CUDA graph per layout, compressing every
    `interval` steps with the R-KV policy. Returns (seconds, captures)."""
    gen = torch.Generator(device=model.embed.weight.device).manual_seed(n)
    cache = random_batch_cache(model, n, ctx, layer_b, window=window, generator=gen,
                               spare=steps + 8 if layer_b is None else interval)
    step_fn = fast.GraphDecoder(model, cache)
    dev = model.embed.weight.device
    tokens = torch.randint(0, model.config.vocab_size, (n,), device=dev, generator=gen)
    budgets = None if layer_b is None else layer_b[:, None].expand(-1, n * model.config.num_kv_heads)
    sync(dev)
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        tokens = step_fn(tokens).argmax(dim=-1)
        if budgets is not None and R.compression_due(step, interval, cache.lengths(), budgets):
            fast.compress_sequences(cache, layer_b, allocator, "rkv", [True] * n, policy_options={}, head_options={},
                                 positions=False)
    sync(dev)
    return time.perf_counter() - t0, step_fn.captures


def throughput(args):
    """Total decode tokens/s of a batch of sequences at each context: at each batch in --batches and at the
    largest batch that fits in GPU memory, for FullKV, ReasonAlloc and uniform R-KV at each budget."""
    check_args(args)
    device = args.device
    cuda = torch.device(device).type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise ValueError("no CUDA device; run with --device cpu --layers 2 for a smoke test")
    name = torch.cuda.get_device_name() if cuda else "cpu"
    model, hf, cfg = build(LLAMA_31_8B, device, M.DTYPES[args.dtype], layers=args.layers, layout=args.layout)
    del hf  # its tensors are ours; only its container goes
    profile = made_up_wave(cfg.num_layers)
    batches = positive_list(args.batches, "--batches")
    methods = [("FullKV", None, None)] + [(f"{n} B={b}", allocator, b) for b in positive_list(args.budgets, "--budgets")
                                         for n, allocator in (("ReasonAlloc", "reasonalloc"), ("R-KV", "uniform"))]
    elem = model.embed.weight.element_size()
    rows = []
    print(f"bench_gpu --throughput: {name}, {cfg.num_layers} layers, random caches", file=sys.stderr)
    for ctx in positive_list(args.contexts, "--contexts"):
        for label, allocator, budget in methods:
            layer_b = None if budget is None else R.layer_budgets(allocator, cfg.num_layers, budget, window=args.window,
                                                                  profile=profile)
            per_seq = seq_bytes(cfg, ctx, layer_b, steps=args.steps, interval=args.interval, elem=elem)
            if cuda:
                torch.cuda.empty_cache()
                free = torch.cuda.mem_get_info()[0]
            else:
                free = args.cpu_memory_gib * 2**30
            # Headroom for the step's activations and logits and, compressed, the scoring workspace.
            fits = max(0, int((free - args.headroom_gib * 2**30) / per_seq))
            sizes = sorted({b for b in batches if b <= fits} | ({fits} if fits else set()))
            for b in [b for b in batches if b > fits]:
                rows.append({"context": ctx, "method": label, "batch": b, "fits": False, "tokens_per_s": None})
                print(f"  ctx {ctx:6d}  {label:18s} batch {b:5d}: does not fit ({per_seq * b / 2**30:.1f} GiB of K/V "
                      f"needed, {free / 2**30:.1f} GiB free)", file=sys.stderr, flush=True)
            for n in sizes:
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                while True:
                    try:
                        # Warm-up through one compression too, so first-use costs stay out of the timed run.
                        run_batch(model, n, ctx, layer_b, allocator, steps=min(args.interval + 2, args.steps),
                                  interval=args.interval, window=args.window)
                        secs, captures = run_batch(model, n, ctx, layer_b, allocator, steps=args.steps,
                                                   interval=args.interval, window=args.window)
                        break
                    except torch.OutOfMemoryError:
                        if n not in batches and n > 1:  # the estimate was too high: 10 % fewer sequences
                            torch.cuda.empty_cache()
                            n = int(n * 0.9)
                            continue
                        raise ValueError(f"batch {n} at context {ctx} ({label}) does not fit in GPU memory; give "
                                         f"smaller --batches") from None
                peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
                row = {"context": ctx, "method": label, "batch": n, "largest": n not in batches, "fits": True,
                       "tokens_per_s": n * args.steps / secs, "step_ms": secs / args.steps * 1e3,
                       "kv_gib_per_seq": per_seq / 2**30, "peak_gib": peak, "captures": captures}
                rows.append(row)
                print(f"  ctx {ctx:6d}  {label:18s} batch {n:5d}{' (largest)' if row['largest'] else ''}: "
                      f"{row['tokens_per_s']:9.1f} tok/s  {row['step_ms']:7.2f} ms/step  peak {peak:6.2f} GiB  "
                      f"{captures} capture(s)", file=sys.stderr, flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"gpu": name, "args": vars(args), "rows": rows}, f, indent=1)
    print(throughput_table(rows, name, args))


def throughput_table(rows, name, args) -> str:
    out = [f"\n{name}, {args.dtype}, {args.steps} decode steps per cell (compressions every {args.interval} included), "
           f"caches filled with random keys and values of the right sizes (no prefill)\n",
           "| context | method | batch | total tokens/s | ms per step | K/V storage per sequence | peak GPU memory |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        if not r["fits"]:
            out.append(f"| {r['context']} | {r['method']} | {r['batch']} | does not fit | | | |")
            continue
        out.append(f"| {r['context']} | {r['method']} | {r['batch']}{' (largest)' if r['largest'] else ''} | "
                   f"{r['tokens_per_s']:.0f} | {r['step_ms']:.1f} | {r['kv_gib_per_seq'] * 1024:.0f} MiB | "
                   f"{r['peak_gib']:.1f} GiB |")
    largest = {(r["context"], r["method"]): r for r in rows if r["fits"] and r.get("largest")}
    for ctx in dict.fromkeys(r["context"] for r in rows):
        full = largest.get((ctx, "FullKV"))
        for (c, m), r in largest.items():
            if c == ctx and full and m != "FullKV":
                out.append(f"\ncontext {ctx}: {m} at its largest batch, {r['tokens_per_s'] / full['tokens_per_s']:.1f}× "
                           f"FullKV's total tokens/s at its largest batch")
    return "\n".join(out)


def positive_list(text: str, option: str) -> list[int]:
    """bench.int_list, each value at least 1."""
    values = int_list(text, option)
    if any(v < 1 for v in values):
        raise ValueError(f"{option} must be positive, got {text!r}")
    return values


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
    p.add_argument("--layout", choices=("auto", "rows", "columns"), default="auto",
                   help="weight storage (fast.store_weights), for ours and the compiled peer alike: auto = on a GPU the "
                        "o, gate/up, down and LM head weights column-major (fast.GPU_COLUMNS), rows = all as loaded")
    p.add_argument("--profile-steps", type=int, default=0, help="also profile this many decode steps of each cell of the "
                   "first context (reach --interval to include a compression)")
    p.add_argument("--modes", default="graph,compiled",
                   help="how our fast path runs, comma-separated: eager (op by op), graph (the static step in a CUDA "
                        "graph), compiled (the static step through torch.compile, in a CUDA graph)")
    p.add_argument("--tune", action="store_true",
                   help="compile with Inductor's coordinate-descent tuning (as gpt-fast does): each batch-1 matrix "
                        "product becomes a tuned Triton kernel in the peer and in ours; compiles take longer")
    p.add_argument("--static-shapes", action="store_true",
                   help="compile our step for each cache capacity on its own (torch.compile dynamic=False) instead of "
                        "once more with the capacity symbolic; the peer is compiled per context either way")
    p.add_argument("--rows", default=",".join(ROWS),
                   help="which implementations, comma-separated: transformers, peer (plain compiled FullKV), full "
                        "(our FullKV), reasonalloc, rkv (uniform R-KV at the same budgets)")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per cell, interleaved over the cells; the "
                                                          "table gives the median")
    p.add_argument("--throughput", action="store_true",
                   help="measure batched throughput instead: total tokens/s of many sequences at once (random "
                        "caches), at --batches and at the largest batch that fits, for FullKV, ReasonAlloc and R-KV")
    p.add_argument("--batches", default="1,8,32", help="--throughput: batch sizes timed besides the largest")
    p.add_argument("--window", type=int, default=8, help="--throughput: observation window w")
    p.add_argument("--headroom-gib", type=float, default=8.0,
                   help="--throughput: GPU memory left free for activations and compression workspace when "
                        "finding the largest batch")
    p.add_argument("--cpu-memory-gib", type=float, default=1.0, help="--throughput on CPU: memory for caches")
    p.add_argument("--out", help="write the rows as JSON")
    return p


if __name__ == "__main__":
    args = parser().parse_args()
    try:
        throughput(args) if args.throughput else main(args)
    except ValueError as e:
        sys.exit(f"error: {e}")
