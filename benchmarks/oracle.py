"""Oracle allocations from hindsight: what could a budget split win, if it knew the future?

`bench.py sessions` replays a long transcript under every method. Here a replay may also look ahead. The
full-cache replay of the transcript is run once, keeping every layer's post-RoPE queries and keys. At each
compression of a compressed replay (the cache holds the tokens before position p, and the next Δ tokens will
be fed at positions p .. p + Δ − 1), each token the cache holds is scored by its *future attention*: the
attention it receives from those Δ queries under the full cache, summed over the queries, the G query heads
of a GQA group reduced on the logits as R-KV reduces them (max, `evict.window_attention`). Every query's
attention sums to one, so the scores of different heads and layers are on one scale and can be pooled.

  Oracle-heads   per layer, pool the candidates (held tokens outside the window) of its Hk heads and keep the
                 top Hk·(B_l − w) by future attention; the counts (+ w) are the head budgets; R-KV picks the
                 tokens within each head. Layers uniform: the ceiling of a head level (Head-only).
  Oracle-layers  pool every layer's candidates and keep the top L·Hk·(B − w); a layer's count / Hk (+ w) is
                 its budget, its heads uniform, R-KV's tokens: the ceiling of a layer level (Wave-only).
  Oracle-split   the global pool's counts per head as budgets, R-KV's tokens: the ceiling of any split.
  Oracle-tokens  the global pool's own tokens: the ceiling of any scorer at this total budget.

`signals` measures how well ReasonAlloc's online signals predict the oracle, along its own replay: at each
compression, the rank correlation between the head demand r_h it computes and the oracle's head counts (per
layer, over its Hk heads), and between the wave's layer budgets and the oracle's layer counts (over L layers).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
os.environ.setdefault("GOMP_SPINCOUNT", "1000")  # before torch loads OpenMP: idle threads soon yield the core

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the project's modules live one folder up

import evict  # noqa: E402
import fast  # noqa: E402
import model as M  # noqa: E402
import reasonalloc as R  # noqa: E402

# name -> (which split the oracle sets: "heads" | "layers" | "both", whose tokens: "rkv" | "oracle")
ORACLES = {"Oracle-heads": ("heads", "rkv"), "Oracle-layers": ("layers", "rkv"),
           "Oracle-split": ("both", "rkv"), "Oracle-tokens": ("both", "oracle")}


class QueryRecorder(M.KVCache):
    """A full model.KVCache that also keeps every query it is given: q[l] (Hq, T, D), post-RoPE."""

    def __init__(self, config, window: int = 8, **kw):
        super().__init__(config, window, **kw)
        self.q = [[] for _ in range(config.num_layers)]

    def append(self, layer, k, v, q, pos):
        super().append(layer, k, v, q, pos)
        self.q[layer].append(q.transpose(0, 1))


@torch.inference_mode()
def full_replay(model, ids: torch.Tensor, tokens: list[int], *, window: int = 8, chunk: int = 512):
    """Queries (L of (Hq, T, D)) and keys (L of (Hk, T, D)) of the full cache over prompt + tokens, fed
    `chunk` tokens at a time (causal attention: the same as one pass, with less memory)."""
    p = model.embed.weight
    cache = QueryRecorder(model.config, window, dtype=p.dtype, device=p.device)
    seq = torch.cat([ids.long().cpu(), torch.tensor(tokens, dtype=torch.long, device="cpu")]).to(p.device)
    for i in range(0, len(seq), chunk):
        model(seq[i:i + chunk], cache)
    queries = [torch.cat(q, dim=1) for q in cache.q]
    keys = [torch.stack([h.k for h in layer]) for layer in cache.layers]
    return queries, keys


def future_attention(q: torch.Tensor, k: torch.Tensor, start: int, interval: int, *,
                     gqa_reduce: str = "max") -> torch.Tensor:
    """(Hk, start) float32: the attention each key before `start` receives from the queries at positions
    start .. start + interval − 1 (fewer at the end) under the full cache, summed over those queries.
    q: (Hq, T, D), k: (Hk, T, D) of one layer. The G query heads of a group are reduced on the logits
    (gqa_reduce, R-KV's "max" by default, so the oracle sees the group as the policy does), then each query
    is softmaxed over every key it sees (positions <= its own)."""
    Hk, T, D = k.shape
    end = min(start + interval, T)
    if end <= start:
        return torch.zeros(Hk, start, dtype=torch.float32, device=k.device)
    qf = q[:, start:end].reshape(Hk, -1, end - start, D)  # (Hk, G, n, D)
    logits = torch.einsum("hgnd,hsd->hgns", qf, k[:, :end]).float() / math.sqrt(D)  # (Hk, G, n, end)
    logits = evict.reduce_group(logits, gqa_reduce, dim=1)  # (Hk, n, end)
    later = torch.arange(end, device=k.device)[None, :] > torch.arange(start, end, device=k.device)[:, None]
    att = torch.softmax(logits.masked_fill(later, float("-inf")), dim=-1)  # (Hk, n, end)
    return att.sum(dim=1)[:, :start]


class Hindsight:
    """The full cache's queries and keys of one transcript, and the compression interval Δ of a replay:
    `scores(cache, layer)` gives each head's candidates (its held tokens outside the window, in row order)
    their future attention, the list evict.score_layer would give."""

    def __init__(self, queries, keys, interval: int, *, gqa_reduce: str = "max"):
        self.queries, self.keys, self.interval, self.gqa_reduce = queries, keys, interval, gqa_reduce

    def scores(self, cache, layer: int) -> list[torch.Tensor]:
        p = cache.next_pos
        att = future_attention(self.queries[layer], self.keys[layer], p, self.interval, gqa_reduce=self.gqa_reduce)
        return [att[h, head.pos[: max(len(head.pos) - cache.window, 0)].to(att.device)]
                for h, head in enumerate(cache[layer])]


def cache_tools(cache):
    """(score_layer, compress_layer) of the cache's kind: the packed fast path's or the per-head reference's."""
    return (fast.score_layer, fast.compress_layer) if isinstance(cache, fast.PackedCache) else \
        (evict.score_layer, evict.compress_layer)


def pooled_counts(scores: list[list[torch.Tensor]], budget: int, window: int) -> torch.Tensor:
    """(L, Hk): how many of each head's candidates are in the top L·Hk·(budget − w) of all layers pooled
    (ties to the earlier layer and head, then the older token); every candidate when there are fewer."""
    flat = [s for layer in scores for s in layer]
    return R.head_demand(flat, budget, window=window, utility="raw").view(len(scores), -1)


def oracle_compress(hindsight: Hindsight, level: str, tokens: str = "rkv"):
    """A compress_fn for reasonalloc.teacher_force (the cache's layer budgets must be uniform, B each) that
    sets the split by hindsight: `level` "heads", "layers" or "both" (see the module docstring); `tokens`
    "rkv" (R-KV picks within each head) or "oracle" (the top future attention within each head)."""
    def compress(cache, layer_b, allocator, policy, *, policy_options=None, head_options=None, positions=True):
        score_layer, compress_layer = cache_tools(cache)
        L, w, before = len(cache), cache.window, cache.lengths()
        future = [hindsight.scores(cache, l) for l in range(L)]
        B = int(layer_b[0])
        if level == "heads":  # pooled within each layer
            budgets = torch.stack([R.head_demand(future[l], int(layer_b[l]), window=w, utility="raw") + w
                                   for l in range(L)])
        else:
            counts = pooled_counts(future, B, w)
            budgets = counts + w
            if level == "layers":  # a layer's share of the pool, spread evenly over its heads
                Hk, total = counts.shape[1], L * (B - w)
                share = counts.sum(1).double() / Hk
                share = share + (total - share.sum()) / L  # fewer candidates than the pool: the rest evenly
                budgets = (R.round_to_total(share, total) + w)[:, None].expand(-1, Hk).clone()
        kept = []
        for l in range(L):
            own = future[l] if tokens == "oracle" else score_layer(cache, l, policy, **(policy_options or {}))
            kept.append(compress_layer(cache, l, budgets[l], policy, scores=own))
        assert (cache.lengths() <= torch.maximum(budgets, before)).all(), "a head holds more than its budget"
        return budgets, kept if positions else None
    return compress


def spearman(a, b) -> float | None:
    """Spearman's rank correlation of two equal-length sequences (ties: average ranks); None if either is
    constant (no ranking to compare)."""
    def ranks(x):
        x = torch.as_tensor(x, dtype=torch.float64, device="cpu").flatten()
        order = torch.sort(x, stable=True).indices
        r = torch.empty_like(x)
        r[order] = torch.arange(len(x), dtype=torch.float64, device="cpu")
        for v in x.unique():  # ties share their mean rank
            r[x == v] = r[x == v].mean()
        return r
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float(ra.norm() * rb.norm())
    return None if den == 0 else float((ra * rb).sum()) / den


def signals(hindsight: Hindsight, compress_fn, *, into: list):
    """Wrap ReasonAlloc's compress_fn: before each compression, append to `into` the mean over layers of the
    rank correlation between ReasonAlloc's head demand r_h and the oracle's per-layer head counts ('heads'),
    and the rank correlation between the layer budgets B_l and the oracle's pooled layer counts ('layers');
    then compress as ReasonAlloc does. The replay is unchanged."""
    def compress(cache, layer_b, allocator, policy, *, policy_options=None, head_options=None, positions=True):
        score_layer, _ = cache_tools(cache)
        window, options = cache.window, head_options or {}
        future = [hindsight.scores(cache, l) for l in range(len(cache))]
        heads = []
        for l in range(len(cache)):
            scores = score_layer(cache, l, policy, **(policy_options or {}))
            demand = R.head_demand(scores, int(layer_b[l]), window=window, utility=options.get("utility", "length"),
                                   normalize_heads=options.get("normalize_heads", False))
            heads.append(spearman(demand, R.head_demand(future[l], int(layer_b[l]), window=window, utility="raw")))
        heads = [h for h in heads if h is not None]
        layer_counts = pooled_counts(future, round(float(layer_b.double().mean())), window).sum(1)
        into.append({"position": cache.next_pos, "heads": sum(heads) / len(heads) if heads else None,
                     "layers": spearman(layer_b, layer_counts)})
        return compress_fn(cache, layer_b, allocator, policy, policy_options=policy_options,
                           head_options=head_options, positions=positions)
    return compress


# ----------------------------------------------------------------------------------------------
# The oracle's head split, measured offline: a profile for reasonalloc's `hindsight` allocator


def split_counts(model, ids: torch.Tensor, tokens: list[int], budget: int, *, interval: int = 128,
                 window: int = 8) -> list[dict]:
    """What the oracle would do at each compression of R-KV's replay of one transcript at `budget`, one dict per
    compression: "heads" (L, Hk), how many of each layer's top Hk·(B − w) candidates by future attention each head
    holds (Oracle-heads), and "layers" (L,), how many of the top L·Hk·(B − w) of all layers' candidates each layer
    holds (Oracle-layers)."""
    hindsight, seen = Hindsight(*full_replay(model, ids, tokens, window=window), interval), []

    def watch(cache, layer_b, allocator, policy, **kw):
        future = [hindsight.scores(cache, l) for l in range(len(cache))]
        heads = torch.stack([R.head_demand(f, budget, window=window, utility="raw") for f in future])
        seen.append({"heads": heads, "layers": pooled_counts(future, budget, window).sum(1)})
        return R.compress(cache, layer_b, allocator, policy, **kw)

    R.teacher_force(model, ids, tokens, budget=budget, allocator="uniform", policy="rkv", interval=interval,
                    window=window, compress_fn=watch)
    return seen


def hindsight_profile(config, counts: list[dict], settings: dict) -> dict:
    """A profile (profile.py's format) whose demand and head split come from the oracle's counts, pooled over
    transcripts, budgets and compressions: each count taken as a share of its layer's (heads) or of all layers'
    (layers) candidates kept, so budgets weigh alike. `head_split` (L, Hk) is what reasonalloc.hindsight_heads
    splits each layer's budget by; `demand` (L,) is a layer wave measured the same way (for `wave`)."""
    from profile import make_profile

    def share(x, dim):
        return x.double() / x.double().sum(dim, keepdim=True).clamp_min(1)

    heads = torch.stack([share(c["heads"], 1) for c in counts]).mean(0)  # (L, Hk)
    layers = torch.stack([share(c["layers"], 0) for c in counts]).mean(0)  # (L,)
    profile = make_profile(config, layers, heads, {**settings, "compressions": len(counts)})
    profile["head_split"] = profile["head_demand"]
    return profile


def main(argv=None):
    from bench import digest, read_results, read_sessions, session_reference
    from convert import resolve_model_dir
    from files import check_output, model_files
    from profile import save_profile
    from tokenizer import load_tokenizer

    here = Path(__file__).resolve().parent.parent
    p = argparse.ArgumentParser(
        description="heads: measure the oracle's head split with hindsight on calibration chats, as a profile for "
                    "the `hindsight` allocator (reasonalloc.hindsight_heads): along R-KV's replay of each session's "
                    "full-cache transcript, the share of each layer's top future-attention tokens that each KV head "
                    "holds, averaged over compressions, budgets and sessions.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("what", choices=["heads"])
    p.add_argument("--model", help="Hugging Face model folder; default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--sessions", default=str(here / "data" / "sessions_calibration.jsonl"),
                   help="calibration sessions (never the held-out ones a table reports)")
    p.add_argument("--budgets", default="64,128", help="comma-separated budgets B the split is measured at")
    p.add_argument("--interval", type=int, default=128, help="compression interval Δ (the future's length)")
    p.add_argument("--window", type=int, default=8)
    p.add_argument("--session-tokens", type=int, default=1500, help="as bench.py sessions")
    p.add_argument("--turn-tokens", type=int, default=400, help="as bench.py sessions")
    p.add_argument("--references", help="a `bench.py sessions` results file of the same sessions and model whose "
                                        "full-cache transcripts are reused instead of decoded again")
    p.add_argument("--out", required=True, help="the profile to write, e.g. profiles/hindsight/MODEL.json")
    args = p.parse_args(argv)
    try:
        budgets = sorted({int(b) for b in args.budgets.split(",") if b.strip()})
        for b in budgets:
            R.check_budget(b, args.window)
        if args.interval < 1:
            raise ValueError(f"--interval must be >= 1, got {args.interval}")
        path = resolve_model_dir(args.model)
        check_output(args.out, "--out", inputs=[args.sessions, *model_files(path)])
        model, tok = M.load_model(path), load_tokenizer(path)
        sessions = read_sessions(args.sessions)
        refs = {}
        if args.references:
            from conformance import model_fingerprint
            data = read_results(Path(args.references)) or {}
            settings = data.get("settings", {})
            same = {"inputs_sha256": digest(sessions), "model_sha256": model_fingerprint(path),
                    "session_tokens": args.session_tokens, "turn_tokens": args.turn_tokens}
            if any(settings.get(k) != v for k, v in same.items()):
                raise ValueError(f"{args.references} holds transcripts of other sessions, lengths or another model; "
                                 f"drop --references to decode them again")
            refs = data["cells"]
        counts = []
        for i, turns in enumerate(sessions):
            ref = refs.get(f"reference|{i}") or session_reference(
                model, tok, turns, min_tokens=args.session_tokens, turn_tokens=args.turn_tokens, packed=False)
            for b in budgets:
                counts += split_counts(model, torch.tensor(ref["prompt_ids"], device="cpu"), ref["tokens"], b,
                                       interval=args.interval, window=args.window)
            print(f"[heads] session {i + 1}/{len(sessions)}: {len(ref['tokens'])} tokens", file=sys.stderr, flush=True)
        settings = {"measure": "oracle head split (benchmarks/oracle.py heads)", "sessions": Path(args.sessions).name,
                    "budgets": budgets, "interval": args.interval, "window": args.window,
                    "session_tokens": args.session_tokens, "turn_tokens": args.turn_tokens}
        save_profile(hindsight_profile(model.config, counts, settings), args.out)
        print(f"wrote {args.out} ({len(sessions)} sessions, {len(counts)} compressions)")
    except (ValueError, FileNotFoundError, RuntimeError, KeyboardInterrupt) as e:
        sys.exit(f"error: {str(e) or 'interrupted'}")


if __name__ == "__main__":
    main()
