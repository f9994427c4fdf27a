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
The allocator (reasonalloc.py) decides each head's budget; `compress_layer` applies them.
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

    A per-head budget may equal the window (SPEC §3.3 floors head budgets at w: such a head keeps
    only its window); the user's average budget B must exceed it, which reasonalloc.py checks."""
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
    w = cache.window
    if getattr(cache, "packed", False):
        s = score_packed(cache, layer, policy, **options)
        return [s[h, :max(int(t) - w, 0)] for h, t in enumerate(cache.n[layer])]
    return [fn(cache.window_queries(layer, h), head.k, head.v, head.pos, window=w, **options)
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
    if getattr(cache, "packed", False):
        if scores is None:
            s = score_packed(cache, layer, policy, **options)
        else:  # per-head lists (e.g. from score_layer), padded back to (Hk, S)
            S = int(cache.n[layer].max())
            s = torch.full((Hk, S), float("-inf"), device=cache.k[layer].device)
            for h, sc in enumerate(scores):
                s[h, :len(sc)] = sc
        rows, counts = keep_rows_packed(s, cache.n[layer], torch.as_tensor(budgets), cache.window)
        cache.keep(layer, rows, counts)
        return [cache.pos[layer][h, :int(c)] for h, c in enumerate(counts.tolist())]
    if scores is None:
        scores = score_layer(cache, layer, policy, **options)
    kept = []
    for head, s, b in zip(cache[layer], scores, budgets):
        rows = keep_indices(s, int(b), cache.window)
        head.k, head.v, head.pos = head.k[rows], head.v[rows], head.pos[rows]
        kept.append(head.pos)
    return kept


# ----------------------------------------------------------------------------------------------
# The fast path: the same scores and selection, batched over the KV heads of one layer of a
# model.PackedCache (head h holds rows [0, n_h) of padded (Hk, S, D) storage). Every function here is
# tested equal to the per-head functions above; a policy without a batched form falls back to them.


def _window_attention_packed(q_win, k, n_evict, *, gqa_reduce: str = "max"):
    """(Hk, w, S): `window_attention` for every head at once; rows >= n_evict[h] masked out.
    q_win: (Hk, G, w, D), k: (Hk, S, D), n_evict: (Hk,)."""
    logits = torch.einsum("hgwd,htd->hgwt", q_win, k) / math.sqrt(k.shape[-1])  # (Hk, G, w, S)
    logits = reduce_group(logits, gqa_reduce, dim=1)  # (Hk, w, S)
    evictable = torch.arange(k.shape[1], device=k.device)[None, :] < n_evict[:, None]  # (Hk, S)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return torch.softmax(logits.masked_fill(~evictable[:, None, :], float("-inf")), dim=-1)  # (Hk, w, S)


def _snapkv_packed(q_win, k, n, window, *, gqa_reduce="max", kernel=7, **_):
    att = _window_attention_packed(q_win, k, n - window, gqa_reduce=gqa_reduce).mean(dim=1)  # (Hk, S)
    # Masked rows hold 0 after the softmax, and every real score is >= 0, so pooling across the end of a
    # head's evictable rows gives what the per-head pooling (padded with -inf) gives.
    return F.max_pool1d(att.nan_to_num(0.0)[:, None], kernel_size=kernel, stride=1, padding=kernel // 2)[:, 0]


def _redundancy_packed(k, n, *, sim_threshold=0.5, zero_col0_quirk=True, chunk_elems: int = 1 << 26):
    """(Hk, S): `redundancy` of every head, over its n_h rows. The cosine matrix is built in row
    blocks (the newest-similar rule is per row and the column mean a sum over rows), so memory stays
    at about chunk_elems floats however long the heads are."""
    Hk, S, _ = k.shape
    kn = k / (k.norm(dim=-1, keepdim=True) + 1e-8)
    col = torch.arange(S, device=k.device)
    valid = col[None, :] < n[:, None]  # (Hk, S)
    colsum = torch.zeros(Hk, S, dtype=k.dtype, device=k.device)
    step = max(1, chunk_elems // max(1, Hk * S))
    for r0 in range(0, S, step):
        rows = col[r0:r0 + step]  # (r,)
        cos = kn[:, r0:r0 + step] @ kn.transpose(1, 2)  # (Hk, r, S)
        cos = cos.masked_fill(rows[None, :, None] == col[None, None, :], 0.0)  # the diagonal
        pair = valid[:, r0:r0 + step, None] & valid[:, None, :]  # (Hk, r, S)
        cos = cos.masked_fill(~pair, 0.0)
        similar = (cos > sim_threshold) & pair
        newest = torch.where(similar, col, 0).max(dim=-1).values  # (Hk, r)
        hit = torch.zeros_like(similar).scatter_(2, newest[..., None], True)
        if not zero_col0_quirk:
            hit &= similar.any(dim=-1, keepdim=True)
        colsum += cos.masked_fill(hit, 0.0).sum(dim=1)
    mean = colsum / n.clamp(min=1)[:, None].to(k.dtype)
    return torch.softmax(mean.masked_fill(~valid, float("-inf")), dim=-1)  # (Hk, S)


def _rkv_packed(q_win, k, n, window, *, lam=0.1, gqa_reduce="max", kernel=7, sim_threshold=0.5,
                zero_col0_quirk=True, **_):
    importance = _snapkv_packed(q_win, k, n, window, gqa_reduce=gqa_reduce, kernel=kernel)
    R = _redundancy_packed(k.to(importance.dtype), n, sim_threshold=sim_threshold, zero_col0_quirk=zero_col0_quirk)
    return lam * importance - (1 - lam) * R


def _knorm_packed(q_win, k, n, window, **_):
    return -k.float().norm(dim=-1)


def _streaming_packed(q_win, k, n, window, *, pos, sink: int = 4, **_):
    s = pos.to(torch.float32)
    s[:, :sink] = float("inf")
    return s


PACKED = {"snapkv": _snapkv_packed, "rkv": _rkv_packed, "knorm": _knorm_packed, "streaming": _streaming_packed}


def score_packed(cache, layer: int, policy: str = "rkv", **options) -> torch.Tensor:
    """(Hk, S) scores of one layer of a PackedCache, S its longest head; -inf where a row is not
    evictable (the window, or padding)."""
    get_policy(policy)
    n_cpu = cache.n[layer]
    S = int(n_cpu.max())
    n = cache.n_dev[layer]
    k = cache.k[layer][:, :S]
    Hk, G = cache.config.num_kv_heads, cache.config.group_size
    w = cache.window
    if policy == "full":
        s = torch.zeros(Hk, S, dtype=torch.float32, device=k.device)
    elif policy in PACKED:
        q_win = cache.q_win[layer].view(Hk, G, -1, k.shape[-1])  # (Hk, G, w, D)
        s = PACKED[policy](q_win, k, n, w, pos=cache.pos[layer][:, :S], **options)
    else:  # e.g. the seeded random baseline: per head, through the reference function
        s = torch.full((Hk, S), float("-inf"), device=k.device)
        for h, head in enumerate(cache[layer]):
            sc = POLICIES[policy](cache.window_queries(layer, h), head.k, head.v, head.pos, window=w, **options)
            s[h, :len(sc)] = sc
    evictable = torch.arange(S, device=k.device)[None, :] < (n - w)[:, None]
    return s.float().masked_fill(~evictable, float("-inf"))


def keep_rows_packed(scores: torch.Tensor, n: torch.Tensor, budgets: torch.Tensor, window: int):
    """`keep_indices` for every head at once. scores: (Hk, S) (-inf where not evictable), n: (Hk,)
    rows held, budgets: (Hk,). Returns (rows (Hk, m) ascending, padded; counts (Hk,))."""
    Hk, S = scores.shape
    dev = scores.device
    n, budgets = n.to(dev), budgets.to(dev)
    if (budgets < window).any():
        raise ValueError(f"budgets {budgets.tolist()} go below the window {window}; a head always keeps its window")
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices  # ties -> older row, as keep_indices
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(S, device=dev).expand(Hk, S))
    row = torch.arange(S, device=dev)[None, :]
    top = (rank < (budgets - window)[:, None]) & (row < (n - window)[:, None])
    newest = (row >= (n - window)[:, None]) & (row < n[:, None])
    keep = torch.where((n <= budgets)[:, None], row < n[:, None], top | newest)  # (Hk, S)
    counts = keep.sum(dim=1)
    rows = torch.where(keep, row, S).sort(dim=1).values[:, : int(counts.max())]
    return rows.clamp(max=max(S - 1, 0)), counts
