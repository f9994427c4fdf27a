"""Token-eviction policies: which tokens a KV head keeps. Pure functions of tensors.

Legend:
    L   layers              Hq  query heads          Hk  key/value heads
    G   Hq // Hk (GQA group) D   head dim             T   tokens in one head's cache
    w   observation window (newest tokens, always kept; default 8)
    B   average budget per KV head, in tokens

Every policy scores the T - w evictable tokens of one KV head (higher = keep):

    score_fn(q_win, k, v, pos, *, window, **options) -> (T - w,)
        q_win: (G, w, D) post-RoPE window queries of the G query heads sharing this KV head
        k, v:  (T, D)    that head's cached keys (post-RoPE) and values, oldest first
        pos:   (T,)      their absolute positions

and one shared selection keeps the top (budget - w) scores, in position order, plus the w newest.
The allocator (reasonalloc.py) decides each head's budget; `compress_layer` applies them. The same
policies batched over the heads of a layer, for the packed fast path, are in fast.py.

References: R-KV (arXiv 2505.24133) and its published code, SnapKV (arXiv 2404.14469),
StreamingLLM (arXiv 2309.17453); where this code follows R-KV's published code rather than its paper,
the docstring says so.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _check(q_win, k, v, pos, window):
    if k.dim() != 2 or v.shape != k.shape:
        raise ValueError(f"k and v must both be (T, D); got {tuple(k.shape)} and {tuple(v.shape)}")
    if pos.shape != (k.shape[0],):
        raise ValueError(f"pos must be (T,) = ({k.shape[0]},), got {tuple(pos.shape)}")
    if q_win.dim() != 3 or q_win.shape[-1] != k.shape[-1]:
        raise ValueError(f"q_win must be (G, w, D) with D = {k.shape[-1]}, got {tuple(q_win.shape)}")
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")


# ----------------------------------------------------------------------------------------------
# Scores


def full_score(q_win, k, v, pos, *, window, **_):
    """FullKV: never evicts (`compress_layer` skips it); the scores are all zero."""
    _check(q_win, k, v, pos, window)
    return torch.zeros(max(k.shape[0] - window, 0), dtype=torch.float32, device=k.device)


def streaming_score(q_win, k, v, pos, *, window, sink: int = 4, **_):
    """StreamingLLM: keep the first `sink` tokens (attention sinks) and the newest. score = position,
    sinks +inf."""
    _check(q_win, k, v, pos, window)
    s = pos[: max(k.shape[0] - window, 0)].to(torch.float32)
    s[:sink] = float("inf")
    return s


def reduce_group(logits: torch.Tensor, gqa_reduce: str, dim: int) -> torch.Tensor:
    """Reduce the G query heads of a GQA group (axis `dim`) on the logits: max (R-KV) or mean (kvpress)."""
    if gqa_reduce == "max":
        return logits.max(dim=dim).values
    if gqa_reduce == "mean":
        return logits.mean(dim=dim)
    raise ValueError(f"gqa_reduce must be 'max' or 'mean', got {gqa_reduce!r}")


def window_attention(q_win, k, *, window, gqa_reduce: str = "max"):
    """(w, T - w): the window queries' attention over the evictable keys, as R-KV's code computes it.

    logits = q_win · kᵀ / sqrt(D) for the G·w queries; reduce the G heads of the group on the logits
    (R-KV: max; kvpress averages: "mean"); softmax over the T - w evictable keys in float32. No causal
    mask is needed: every evictable key is older than every window query."""
    logits = torch.einsum("gwd,td->gwt", q_win, k[: k.shape[0] - window]) / math.sqrt(k.shape[-1])  # (G, w, T-w)
    logits = reduce_group(logits, gqa_reduce, dim=0)  # (w, T-w)
    return torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)  # (w, T-w)


def snapkv_score(q_win, k, v, pos, *, window, gqa_reduce: str = "max", kernel: int = 7, **_):
    """SnapKV as R-KV's codebase runs it at decode time: the window's attention over the evictable
    keys, averaged over the w queries, then 1-D max-pooled (kernel 7, stride 1, same padding) so the
    neighbours of an attended token survive with it."""
    _check(q_win, k, v, pos, window)
    if k.shape[0] <= window:
        return torch.zeros(0, dtype=torch.float32, device=k.device)
    att = window_attention(q_win, k, window=window, gqa_reduce=gqa_reduce).mean(dim=0)  # (T-w,)
    return F.max_pool1d(att[None, None], kernel_size=kernel, stride=1, padding=kernel // 2)[0, 0]


def redundancy(k, *, sim_threshold: float = 0.5, zero_col0_quirk: bool = True):
    """(T,) R-KV's redundancy of each cached key, softmax-normalised over the head.

    C = cosine(k_i, k_j) with the diagonal zeroed. In each row i, the entry of the newest token j
    with C_ij > threshold is zeroed, so for a run of near-duplicates the newest copy collects no
    penalty from the others (its column stays small) while older copies are penalised. Then
    R_j = softmax_j(mean_i C_ij) (the column mean).

    Deviation kept on purpose: R-KV's published code finds "the newest similar j" as the max of
    (j if similar else 0), so in a row with no similar token it zeroes column 0 instead of nothing.
    The paper's baseline ran that code, so it is the default; zero_col0_quirk=False zeroes nothing."""
    T = k.shape[0]
    kn = k / (k.norm(dim=-1, keepdim=True) + 1e-8)  # the epsilon is R-KV's
    cos = kn @ kn.T  # (T, T)
    cos.fill_diagonal_(0.0)
    similar = cos > sim_threshold
    idx = torch.arange(T, device=k.device)
    newest = torch.where(similar, idx[None, :], torch.zeros_like(idx)[None, :]).max(dim=-1).values  # (T,)
    rows = idx if zero_col0_quirk else idx[similar.any(dim=-1)]
    cos[rows, newest[rows]] = 0.0
    return cos.mean(dim=0).softmax(dim=-1)


def rkv_score(q_win, k, v, pos, *, window, lam: float = 0.1, gqa_reduce: str = "max", kernel: int = 7,
              sim_threshold: float = 0.5, zero_col0_quirk: bool = True, **_):
    """R-KV (arXiv 2505.24133): score = λ·I − (1 − λ)·R, with I the SnapKV importance above and R the
    redundancy over all T keys, restricted to the evictable ones. λ = 0.1 is the paper's setting."""
    _check(q_win, k, v, pos, window)
    if k.shape[0] <= window:
        return torch.zeros(0, dtype=torch.float32, device=k.device)
    importance = snapkv_score(q_win, k, v, pos, window=window, gqa_reduce=gqa_reduce, kernel=kernel)
    R = redundancy(k.to(importance.dtype), sim_threshold=sim_threshold, zero_col0_quirk=zero_col0_quirk)
    return lam * importance - (1 - lam) * R[: k.shape[0] - window]


def knorm_score(q_win, k, v, pos, *, window, **_):
    """Key-norm baseline: keep the keys of smallest norm (score = −‖k‖)."""
    _check(q_win, k, v, pos, window)
    return -k[: max(k.shape[0] - window, 0)].float().norm(dim=-1)


def random_score(q_win, k, v, pos, *, window, seed: int = 0, **_):
    """Random baseline (a test aid). Deterministic: seeded by `seed` and the head's newest position."""
    _check(q_win, k, v, pos, window)
    g = torch.Generator().manual_seed(seed * 1_000_003 + (int(pos[-1]) if len(pos) else 0))
    return torch.rand(max(k.shape[0] - window, 0), generator=g).to(k.device)


POLICIES = {
    "full": full_score,
    "streaming": streaming_score,
    "snapkv": snapkv_score,
    "rkv": rkv_score,
    "knorm": knorm_score,
    "random": random_score,
}


def get_policy(name: str):
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}")
    return POLICIES[name]


# ----------------------------------------------------------------------------------------------
# Selection


def keep_indices(scores: torch.Tensor, budget: int, window: int) -> torch.Tensor:
    """Ascending rows to keep from a head of T = len(scores) + window tokens: the top (budget - w)
    scores plus the w newest rows. Nothing is evicted when T <= budget. Ties go to the older token
    (a stable sort), so every backend can reproduce the choice.

    A per-head budget may equal the window (ReasonAlloc's head level floors head budgets at w: such a
    head keeps only its window); the user's average budget B must exceed it, which reasonalloc.py checks."""
    budget, window = int(budget), int(window)
    if budget < window:
        raise ValueError(f"budget {budget} is smaller than the window {window}; a head always keeps its "
                         f"window, so use a budget >= {window}")
    n = scores.shape[0]
    T = n + window
    if T <= budget:
        return torch.arange(T, device=scores.device)
    order = torch.sort(scores, descending=True, stable=True).indices[: budget - window]
    return torch.cat([order.sort().values, torch.arange(n, T, device=scores.device)])


def score_layer(cache, layer: int, policy: str = "rkv", **options) -> list[torch.Tensor]:
    """Per-head scores (T_h - w,) for one layer of a model.KVCache, from its window queries."""
    fn = get_policy(policy)
    return [fn(cache.window_queries(layer, h), head.k, head.v, head.pos, window=cache.window, **options)
            for h, head in enumerate(cache[layer])]


def compress_layer(cache, layer: int, budgets, policy: str = "rkv", *, scores=None, **options):
    """Cut every KV head of `layer` to its budget, in place. budgets: (Hk,) ints.
    `scores` (from `score_layer`) can be passed to reuse them. Returns the kept absolute positions
    of each head (a list of (b_h,) tensors)."""
    Hk = cache.config.num_kv_heads
    if len(budgets) != Hk:
        raise ValueError(f"got {len(budgets)} budgets for {Hk} KV heads in layer {layer}")
    if policy == "full":
        return [h.pos for h in cache[layer]]
    if scores is None:
        scores = score_layer(cache, layer, policy, **options)
    kept = []
    for head, s, b in zip(cache[layer], scores, budgets):
        rows = keep_indices(s, int(b), cache.window)
        head.k, head.v, head.pos = head.k[rows], head.v[rows], head.pos[rows]
        kept.append(head.pos)
    return kept
