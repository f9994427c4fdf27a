"""ReasonAlloc (arXiv 2606.11164): two-level KV-cache budget allocation, compressed generation, the CLI.

Legend:
    L   layers              Hq  query heads          Hk  key/value heads
    G   Hq // Hk (GQA group) D   head dim             T   tokens in one head's cache
    w   observation window (newest tokens, always kept; default 8)
    B   average budget per KV head, in tokens (the user's --budget)
    B_l budget of one KV head of layer l, averaged over its heads (mean over l equals B)
    b_lh budget of KV head h of layer l (mean over h equals B_l)
    Δ   compression interval in decoded tokens (default 128, "buffer" in R-KV)

Level 1 (offline): B_l = robustify(Reasoning-Wave demand d_l, L·B, power γ)            -- `wave_layers`
Level 2 (online, every Δ tokens): b_lh = robustify(pooled demand r_h, Hk·B_l, power β, low clip μ)
                                                                                      -- `head_budgets`
The baselines it is compared with (uniform R-KV / SnapKV, PyramidKV, Ada-KV) are rules of the same
two kinds, and `ALLOCATORS` names each pair.

Standing alone: sections 1-3 (robustify, the layer rules, the head rules, ALLOCATORS, METHODS) need
nothing but torch, so this file can be copied into another project by itself. Sections 4 (generation)
and 5 (the events format and its replay checker) and the CLI import the project's other modules
(model.py, evict.py, fast.py, profile.py) where they are used.

Run it:  python reasonalloc.py --prompt "..."        (defaults: policy rkv, allocator reasonalloc)
         python reasonalloc.py --prompt "..." --compare
         python reasonalloc.py check EVENTS.json [--model DIR]     (section 5: replay another backend's run)
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

# ----------------------------------------------------------------------------------------------
# 1. The robustify operator (shared by both levels)


def round_to_total(x: torch.Tensor, total: int, prefer: torch.Tensor | None = None) -> torch.Tensor:
    """Largest-remainder rounding: integers within one of x that sum exactly to `total`.
    Ties in the remainder go to the larger `prefer` (e.g. the demand), then to the earlier entry."""
    base = torch.floor(x + 1e-9).long()
    short = int(total) - int(base.sum())
    if not 0 <= short <= len(x):
        raise AssertionError(f"cannot round {x.tolist()} to a total of {total}")
    order = torch.arange(len(x), device=x.device)
    if prefer is not None:
        order = torch.sort(prefer, descending=True, stable=True).indices
    rem = (x - base.double())[order]
    order = order[torch.sort(rem, descending=True, stable=True).indices]
    base[order[:short]] += 1
    return base


def robustify(demand, total: int, *, power: float = 0.5, lo: float = 0.25, hi: float = 2.0, floor: int = 0):
    """Integer budgets (n,) for n units from their demand, summing exactly to `total`.

    x = demand ** power (power < 1 flattens the demand, so one noisy estimate cannot take everything);
    find the scale s with Σ clip(s·x, max(lo·m, floor), hi·m) = total, m = total / n (water-filling:
    clipped units are pinned and the rest rescaled, done here by bisection on s); round by largest
    remainder. All-zero demand gives a uniform split."""
    where = demand.device if isinstance(demand, torch.Tensor) else "cpu"  # every tensor names its device
    d = torch.as_tensor(demand, dtype=torch.float64, device=where).flatten()
    n, total = d.numel(), int(total)
    if n == 0:
        raise ValueError("robustify needs at least one unit")
    if torch.isnan(d).any() or (d < 0).any():
        raise ValueError(f"demand must be non-negative numbers, got {d.tolist()}")
    if total < n * floor:
        raise ValueError(f"total {total} cannot give each of {n} units its floor of {floor}")
    m = total / n
    low, high = max(lo * m, floor), max(hi * m, lo * m, floor, m)
    x = d.pow(power)
    if x.sum() <= 0 or torch.isinf(x).any():
        x = torch.ones(n, dtype=torch.float64, device=d.device) if x.sum() <= 0 else torch.isinf(x).double()
    # Zero-demand units sit at the low clip; a vanishing share lets them rise above it only when the
    # others are all at the high clip (otherwise `total` would be out of reach).
    x = x / x.max() + 1e-12

    xs = x.tolist()  # a handful of units: plain Python floats (float64) beat tensor ops ~10x here

    def filled(s):  # Σ clip(s·x, low, high)
        return sum(min(max(v * s, low), high) for v in xs)

    a, b = 0.0, 1.0
    while filled(b) < total and b < 1e300:
        b *= 2
    for _ in range(200):
        mid = (a + b) / 2
        if mid in (a, b):  # converged to the last bit
            break
        a, b = (mid, b) if filled(mid) < total else (a, mid)
    r = x.mul(b).clamp(low, high)
    # Remove the bisection's last sliver (stays within one token of the clips). Summed left to right in Python,
    # as `filled` is, so robustify_rows, which sums column by column, gives the same bits.
    r = r * (total / sum(r.tolist()))
    out = round_to_total(r, total, prefer=d)
    assert int(out.sum()) == total and bool((out >= floor).all())
    return out


# ----------------------------------------------------------------------------------------------
# 2. Level 1, offline: layer rules. Each is rule(num_layers, budget, *, window, profile, **options) -> (L,)
#    per-layer budgets B_l with mean B; options another rule takes are ignored, as evict.py's policies do.


MAX_BUDGET = 10**9  # far beyond any context; the splits' float arithmetic stays exact (totals < 2^53)


def check_budget(budget: int, window: int):
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}: every head keeps its newest tokens as the "
                         f"observation window (default 8)")
    if budget > MAX_BUDGET:
        raise ValueError(f"budget {budget} is beyond any context (at most {MAX_BUDGET:,}); a budget at least the "
                         f"sequence length already keeps every token")
    if budget < window + 1:
        raise ValueError(f"budget {budget} is smaller than the window + 1 ({window + 1}); every head keeps its "
                         f"{window} newest tokens, so use --budget >= {window + 1}")


def uniform_layers(num_layers: int, budget: int, *, window: int = 8, profile=None, **_) -> torch.Tensor:
    """B for every layer (R-KV and SnapKV as published)."""
    return torch.full((num_layers,), int(budget), dtype=torch.long, device="cpu")


def pyramid_schedule(num_layers: int, budget: int, *, window: int = 8, profile=None, beta: float = 20.0,
                     **_) -> torch.Tensor:
    """PyramidKV's schedule (its reference code): with B' = B - w, lo = B'/β, hi = 2B' - lo, layer l
    gets hi - l·(hi - lo)/(L - 1) tokens plus w; decreasing with depth, mean B, exact total."""
    if num_layers == 1:
        return torch.tensor([budget], device="cpu")
    bp = budget - window
    lo = bp / beta
    hi = 2 * bp - lo
    x = torch.tensor([hi - l * (hi - lo) / (num_layers - 1) + window for l in range(num_layers)],
                     dtype=torch.float64, device="cpu")
    return round_to_total(x, num_layers * budget)


def wave_layers(num_layers: int, budget: int, *, window: int = 8, profile=None, gamma: float = 0.5,
                lo: float = 0.25, hi: float = 2.0, **_) -> torch.Tensor:
    """ReasonAlloc's level 1: B_l = robustify(d, L·B, power=γ, lo, hi, floor=w) from the Reasoning Wave d.
    `profile`: the (L,) demand, or a profile dict with a "demand" list (profile.py makes one)."""
    if profile is None:
        raise ValueError("the Reasoning-Wave layer rule needs a layer-demand profile; make one with: "
                         "python profile.py --model DIR --out FILE, and pass --profile FILE")
    demand = torch.as_tensor(profile["demand"] if isinstance(profile, dict) else profile, dtype=torch.float64, device="cpu")
    if demand.numel() != num_layers:
        raise ValueError(f"the profile has {demand.numel()} layers but the model has {num_layers}: it was made "
                         f"for another model; make one with: python profile.py --model DIR --out FILE")
    return robustify(demand, num_layers * budget, power=gamma, lo=lo, hi=hi, floor=window)


# ----------------------------------------------------------------------------------------------
# 3. Level 2, online: head rules. Each is rule(scores, layer_budget, *, window, **options) -> (Hk,) head
#    budgets summing to Hk·B_l, from the per-head scores (T_h - w,) of the active policy.


def uniform_heads(scores: list[torch.Tensor], layer_budget: int, *, window: int = 8, **_) -> torch.Tensor:
    """B_l for every head of the layer."""
    return torch.full((len(scores),), int(layer_budget), dtype=torch.long, device="cpu")


HEAD_UTILITIES = ("length", "rank", "raw")


def comparable(scores: list[torch.Tensor], utility: str, window: int) -> list[torch.Tensor]:
    """Each head's scores on a scale shared by every head of the layer, so that they can be pooled.

    R-KV's two terms (and SnapKV's score) are softmax-normalised within a head, so a head holding T_h
    tokens scores ~1/T_h per token. Pooled as they are ("raw", kept for ablation), a head cut to fewer
    tokens scores lower at every token and is cut again at the next compression: budgets drift to the
    clips and stay there, the starvation loop the head level's floor μ only bounds.
      "length": score × T_h (T_h = evictable + window tokens), undoing the 1/T_h of the softmax.
      "rank":   each token's quantile within its head (1 = the head's best, → 0 = its worst)."""
    if utility == "raw":
        return scores
    if utility == "length":
        return [s.double() * (len(s) + window) for s in scores]
    if utility == "rank":
        out = []
        for s in scores:
            rank = torch.empty(len(s), dtype=torch.float64, device=s.device)
            rank[torch.sort(s, descending=True, stable=True).indices] = torch.arange(len(s), dtype=torch.float64, device=s.device)
            out.append(1 - rank / max(len(s), 1))
        return out
    raise ValueError(f"unknown head utility {utility!r}; choose one of {', '.join(HEAD_UTILITIES)}")


def head_demand(scores: list[torch.Tensor], layer_budget: int, *, window: int = 8, utility: str = "length",
                normalize_heads: bool = False) -> torch.Tensor:
    """(Hk,) r_h: how many of head h's tokens are in the layer's pooled top Hk·(B_l − w) utilities.
    utility: how scores of heads of different lengths are made comparable (see `comparable`; "length" by
    default, chosen on the calibration prompts: README, "Choices").
    normalize_heads: Ada-KV-style, first shift each head's scores to >= 0 and scale them to sum to 1."""
    scores = comparable(scores, utility, window)
    if normalize_heads:
        scores = [(s - s.min()) / (s - s.min()).sum().clamp_min(1e-30) if len(s) else s for s in scores]
    k = len(scores) * (int(layer_budget) - window)
    pooled = torch.cat([s.double() for s in scores])
    if k <= 0 or pooled.numel() == 0:
        return torch.zeros(len(scores), dtype=torch.long, device="cpu")
    if k >= pooled.numel():
        return torch.tensor([len(s) for s in scores], device="cpu")
    # Exactly k winners (Σ r_h = k): ties at the threshold go to the earlier head, then the older token,
    # by a stable sort. Counting every score >= the k-th would let ties (common after SnapKV's max-pooling)
    # push Σ r_h past k, which Ada-KV's rule cannot absorb.
    top = torch.sort(pooled, descending=True, stable=True).indices[:k]
    owner = torch.repeat_interleave(torch.arange(len(scores), device="cpu"),
                                 torch.tensor([len(s) for s in scores], device="cpu"))
    return torch.bincount(owner[top.cpu()], minlength=len(scores))


def head_budgets(scores: list[torch.Tensor], layer_budget: int, *, window: int = 8, beta: float = 0.5,
                 mu: float = 0.25, hi: float = 2.0, utility: str = "length", normalize_heads: bool = False,
                 **_) -> torch.Tensor:
    """ReasonAlloc's head level: b_lh = robustify(r, Hk·B_l, power=β, lo=μ, hi, floor=w). (Hk,)"""
    r = head_demand(scores, layer_budget, window=window, utility=utility, normalize_heads=normalize_heads)
    return robustify(r, len(scores) * int(layer_budget), power=beta, lo=mu, hi=hi, floor=window)


def adakv_head_budgets(scores: list[torch.Tensor], layer_budget: int, *, window: int = 8,
                       alpha: float = 0.2, **_) -> torch.Tensor:
    """Ada-KV's rule: c_h = head h's share of the pooled top Hk·(B − w) scores;
    b_h = round(c_h·(1 − α) + α·(B − w)) + w, rounded by largest remainder so the total is exact.
    Pooled as Ada-KV pools them (its published rule, the baseline as it is): raw scores."""
    c = head_demand(scores, layer_budget, window=window, utility="raw").double()
    Hk, bp = len(scores), int(layer_budget) - window
    if c.sum() < Hk * bp:  # fewer candidates than the budget: spread what is missing uniformly
        c = c + (Hk * bp - c.sum()) / Hk
    return round_to_total(c * (1 - alpha) + alpha * bp, Hk * bp) + window


# ----------------------------------------------------------------------------------------------
# The head rules for many sequences at once (a batch's compression): the same arithmetic row by row, so each
# row equals the rule above on that sequence's heads, bit for bit (tested), without a Python loop over rows.


def to_device(x: torch.Tensor, device) -> torch.Tensor:
    """A host tensor on `device`, without making the host wait: a plain copy to a GPU waits for all the work
    queued before it, a copy from pinned memory is queued behind that work instead (PyTorch keeps the pinned
    block until the copy is done). A compression's few small host-made tensors go this way, so the host can run
    ahead of the GPU (uniform R-KV's compression then never waits for it)."""
    device = torch.device(device)
    if device.type != "cuda" or x.device.type != "cpu":
        return x.to(device)
    return x.pin_memory().to(device, non_blocking=True)


def start_to_host(x: torch.Tensor):
    """Start copying x to the host without waiting: (host tensor, ready), ready() blocking until the copy has
    landed. On a GPU the copy goes into pinned memory behind the work queued so far, so the host can queue more
    (a compression's packing) before it waits, and the GPU still has that work to run while the host reads the
    values. On a CPU: x itself, and ready does nothing."""
    if x.device.type != "cuda":
        return x, lambda: None
    host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
    host.copy_(x, non_blocking=True)
    done = torch.cuda.Event()
    done.record(torch.cuda.current_stream(x.device))
    return host, done.synchronize


def round_rows(x: torch.Tensor, total, prefer: torch.Tensor | None = None) -> torch.Tensor:
    """round_to_total of every row of x (n, k) float64, row i to total[i] (an int: the same for every row), on x's
    device (checked there only on the CPU: a check on a GPU would make the host wait for it)."""
    base = torch.floor(x + 1e-9).long()
    total = torch.as_tensor(total, dtype=torch.long, device=x.device)
    short = total - base.sum(dim=1)  # (n,)
    if x.device.type == "cpu" and ((short < 0) | (short > x.shape[1])).any():
        raise AssertionError(f"cannot round rows of {x.tolist()} to totals {total.tolist()}")
    n, k = x.shape
    order = torch.arange(k, device=x.device).expand(n, k)
    if prefer is not None:
        order = torch.sort(prefer, dim=1, descending=True, stable=True).indices
    rem = torch.gather(x - base.double(), 1, order)
    order = torch.gather(order, 1, torch.sort(rem, dim=1, descending=True, stable=True).indices)
    bump = (torch.arange(k, device=x.device)[None, :] < short[:, None]).long()
    return base.scatter_add(1, order, bump)


def left_sum(t: torch.Tensor) -> torch.Tensor:
    """Σ over the last dim, added from the left as Python's sum adds: the same bits on every device (a GPU's sum
    or cumsum promises no order)."""
    acc = t[..., 0]
    for j in range(1, t.shape[-1]):
        acc = acc + t[..., j]
    return acc


def search_rounds(tries: int) -> int:
    """Rounds robustify_rows' search needs at `tries` candidates a round: the float64 bit patterns it searches
    span less than 2^63, and each round cuts a row's span to at most ceil(span / (tries + 1)) (rows that end
    early stay put). 11 rounds at 63 tries, 6 at 4095."""
    span, rounds = 2 ** 63, 0
    while span > 1:
        span, rounds = -(-span // (tries + 1)), rounds + 1
    return rounds


def search_tries(n: int, k: int, device_type: str) -> int:
    """robustify_rows' default width: 63 candidates a round on the CPU (11 rounds, the least work); elsewhere as
    wide as 4095 (6 rounds: a round is ~25 small kernels, and on a GPU their launches, not the (n, tries, k)
    work, set its time) while that block stays within 2^24 float64s (128 MiB; a BatchCache splits n = layers x
    sequences rows at once)."""
    return 63 if device_type == "cpu" else max(63, min(4095, (1 << 24) // (n * k) - 1))


def robustify_rows(demand: torch.Tensor, total, *, power: float = 0.5, lo: float = 0.25, hi: float = 2.0,
                   floor: int = 0, tries: int | None = None) -> torch.Tensor:
    """robustify of every row of demand (n, k), row i to total[i] (an int: the same for every row), on demand's
    device. The same scale as robustify's bisection, every row at once (found by a search over float64 bit
    patterns, see below), with its sums added from the left as robustify's Python sums: each row gives
    robustify's bits (tested on the CPU; on a GPU too where demand ** power rounds as on the CPU, as the
    default 0.5, a square root, does). A fixed number of rounds of a handful of tensor ops and no value read
    back, so on a GPU the split queues behind the scores and the host never waits for it. Inputs are checked
    on the CPU only. tries: candidates per round of the search; any number finds the same scale (None:
    search_tries)."""
    d = demand.to(torch.float64)
    dev = d.device
    if dev.type == "cpu" and (torch.isnan(d).any() or (d < 0).any()):
        raise ValueError(f"demand must be non-negative numbers, got {d.tolist()}")
    n, k = d.shape
    total = torch.as_tensor(total, dtype=torch.long, device="cpu").expand(n)
    if (total < k * floor).any():
        raise ValueError(f"totals {total.tolist()} cannot give each of {k} units its floor of {floor}")
    tot = to_device(total.double(), dev)  # exact: totals stay far below 2^53 (MAX_BUDGET)
    total = tot.long()
    m = tot / k  # (n,), as robustify's total / n
    low = (lo * m).clamp(min=floor)[:, None]  # max(lo·m, floor)
    high = torch.stack([hi * m, lo * m, m.clamp(min=floor)]).max(dim=0).values[:, None]  # max(hi·m, lo·m, floor, m)
    x = d.pow(power)
    infinite = torch.isinf(x)
    x = torch.where((x.sum(dim=1, keepdim=True) <= 0), torch.ones_like(x),
                    torch.where(infinite.any(dim=1, keepdim=True), infinite.double(), x))
    x = x / x.max(dim=1, keepdim=True).values + 1e-12

    def filled(s):  # (n, c) Σ clip(s·x, low, high) at c scales s (n, c) per row, summed from the left
        return left_sum(torch.clamp(x[:, None, :] * s[:, :, None], low[:, :, None], high[:, :, None]))

    # robustify's bisection, run to the last bit, ends at the smallest float64 b with filled(b) >= total:
    # filled is non-decreasing in s (each s·x rounds monotonically; a clip and a running sum keep the order).
    # Non-negative float64s are ordered as their bit patterns, so the same b is found by searching the patterns
    # `tries` at a time: a few rounds of one (n, tries, k) evaluation instead of ~60 bisection steps.
    tries = search_tries(n, k, dev.type) if tries is None else int(tries)
    if tries < 1:
        raise ValueError(f"tries must be >= 1, got {tries}")
    a = torch.zeros(n, dtype=torch.long, device=dev)  # the bits of 0.0: filled(a) < total (or a == 0)
    # past the clips; made by a fill on the device (torch.tensor(value, device=...) would copy from the host and
    # make it wait for all the GPU's queued work)
    b = torch.full((n,), 2.0 ** 1000, dtype=torch.float64, device=dev).view(torch.long)
    step = torch.arange(1, tries + 1, device=dev)
    for _ in range(search_rounds(tries)):
        q, rem = (b - a) // (tries + 1), (b - a) % (tries + 1)  # (b - a)·j/(tries + 1) without overflow
        cand = a[:, None] + q[:, None] * step + rem[:, None] * step // (tries + 1)  # (n, tries), ascending
        below = (filled(cand.view(torch.float64)) < tot[:, None]).sum(dim=1, keepdim=True)  # a prefix is below
        ends = torch.cat([a[:, None], cand, b[:, None]], dim=1)
        going = b - a > 1  # a row that has ended stays put
        a = torch.where(going, ends.gather(1, below)[:, 0], a)
        b = torch.where(going, ends.gather(1, below + 1)[:, 0], b)
    if dev.type == "cpu":
        assert bool((b - a <= 1).all()), "the bit-pattern search did not finish in its rounds"
    b = b.view(torch.float64)
    r = torch.clamp(x * b[:, None], low, high)
    r = r * (tot / left_sum(r))[:, None]
    out = round_rows(r, total, prefer=d)
    if dev.type == "cpu":
        assert bool((out.sum(dim=1) == total).all()) and bool((out >= floor).all())
    return out


def head_demand_rows(scores: torch.Tensor, held: torch.Tensor, layer_budget, *, window: int = 8,
                     utility: str = "length") -> torch.Tensor:
    """head_demand of every row: scores (n, Hk, S), -inf where a row is not evictable (fast.score_packed's
    layout), held (n, Hk) tokens each head holds, layer_budget an int or (n,) one per row. Returns r (n, Hk) on
    the scores' device (nothing is read back to the host). utility "length" or "raw"."""
    n, Hk, S = scores.shape
    held = held.to(scores.device)
    s = scores.double()
    if utility == "length":  # score × T_h, T_h the tokens the head holds (comparable's rule)
        s = torch.where(torch.isinf(s), s, s * held[:, :, None].double())
    elif utility != "raw":
        raise ValueError(f"head_demand_rows pools 'length' or 'raw' utilities, not {utility!r}")
    evictable = (held - window).clamp(min=0)  # (n, Hk)
    budget = to_device(torch.as_tensor(layer_budget, dtype=torch.long, device="cpu"), s.device)  # without a wait
    k = Hk * (budget.expand(n) - window)  # (n,)
    # A stable sort of the flattened (Hk·S) row orders ties by head, then by row: the order of the pooled lists;
    # each row's first k entries win (none when k <= 0).
    top = torch.sort(s.view(n, Hk * S), dim=1, descending=True, stable=True).indices
    win = (torch.arange(Hk * S, device=s.device)[None, :] < k[:, None]).long()
    r = torch.zeros(n, Hk, dtype=torch.long, device=s.device).scatter_add_(1, top // S, win)
    return torch.where((evictable.sum(dim=1) <= k)[:, None], evictable, r)  # every candidate fits: all of them


def head_budgets_rows(scores, held, layer_budget, *, window=8, beta=0.5, mu=0.25, hi=2.0, utility="length",
                      normalize_heads=False, **_):
    """head_budgets of every row (see head_demand_rows for the layout), on the scores' device."""
    r = head_demand_rows(scores, held, layer_budget, window=window, utility=utility)
    total = held.shape[1] * torch.as_tensor(layer_budget, dtype=torch.long, device="cpu")
    return robustify_rows(r, total, power=beta, lo=mu, hi=hi, floor=window)


def adakv_head_budgets_rows(scores, held, layer_budget, *, window=8, alpha=0.2, **_):
    """adakv_head_budgets of every row."""
    c = head_demand_rows(scores, held, layer_budget, window=window, utility="raw").cpu().double()
    Hk = held.shape[1]
    bp = (torch.as_tensor(layer_budget, dtype=torch.long, device="cpu") - window).expand(c.shape[0])[:, None]  # (n, 1)
    short = (Hk * bp - c.sum(dim=1, keepdim=True)).clamp(min=0)
    c = torch.where(short > 0, c + short / Hk, c)
    return round_rows(c * (1 - alpha) + alpha * bp.double(), Hk * bp[:, 0]) + window


def head_rule_rows(rule, scores: torch.Tensor, held: torch.Tensor, layer_budget, *, window: int,
                   **options) -> torch.Tensor:
    """Head budgets (n, Hk) of every row (a sequence's heads in one layer) by the head rule `rule`, layer_budget
    an int or (n,) one per row: its row-wise twin where there is one, else the rule on each row's per-head
    lists (e.g. utility "rank"). On the host, but on the scores' device from head_budgets_rows (ReasonAlloc's
    rule), which reads nothing back."""
    n, Hk, _ = scores.shape
    budget = torch.as_tensor(layer_budget, dtype=torch.long, device="cpu").expand(n)
    if rule is uniform_heads:
        return budget[:, None].expand(n, Hk).clone()
    if rule is head_budgets and options.get("utility", "length") in ("length", "raw") \
            and not options.get("normalize_heads", False):
        return head_budgets_rows(scores, held, budget, window=window, **options)
    if rule is adakv_head_budgets:
        return adakv_head_budgets_rows(scores, held, budget, window=window, **options)
    counts = (held - window).clamp(min=0).tolist()
    return torch.stack([rule([scores[i, h, :counts[i][h]] for h in range(Hk)], int(budget[i]), window=window,
                             **options) for i in range(n)])


# ----------------------------------------------------------------------------------------------
# The allocators compared (same policy, same total budget L·Hk·B): a layer rule and a head rule each


@dataclass(frozen=True)
class Allocator:
    layers: Callable[..., torch.Tensor]  # level 1
    heads: Callable[..., torch.Tensor]  # level 2, rerun at every compression

    @property
    def needs_profile(self) -> bool:
        return self.layers is wave_layers


ALLOCATORS = {
    "uniform": Allocator(uniform_layers, uniform_heads),  # R-KV / SnapKV as published
    "pyramid": Allocator(pyramid_schedule, uniform_heads),  # Pyramid-RKV
    "wave": Allocator(wave_layers, uniform_heads),  # ablation: layer level only
    "head": Allocator(uniform_layers, head_budgets),  # ablation: head level only
    "reasonalloc": Allocator(wave_layers, head_budgets),
    "adakv": Allocator(uniform_layers, adakv_head_budgets),  # Ada-KV (arXiv 2407.11550)
}

# The rows of every comparison (`--compare`, bench.py): method -> (eviction policy, allocator).
METHODS = {
    "FullKV": ("full", "uniform"),
    "SnapKV": ("snapkv", "uniform"),
    "R-KV": ("rkv", "uniform"),
    "Pyramid-RKV": ("rkv", "pyramid"),
    "Wave-only": ("rkv", "wave"),
    "Head-only": ("rkv", "head"),
    "ReasonAlloc": ("rkv", "reasonalloc"),
    "Ada-KV": ("rkv", "adakv"),
}


def get_allocator(name: str) -> Allocator:
    if name not in ALLOCATORS:
        raise ValueError(f"unknown allocator {name!r}; choose one of {', '.join(ALLOCATORS)}")
    return ALLOCATORS[name]


def layer_budgets(allocator: str, num_layers: int, budget: int, *, window: int = 8, profile=None,
                  **options) -> torch.Tensor:
    """(L,) per-layer budgets B_l (per KV head) of a named allocator, mean B, exact total L·B."""
    check_budget(budget, window)
    rule = get_allocator(allocator).layers
    if rule is wave_layers and profile is None:
        raise ValueError(f"allocator {allocator!r} needs a layer-demand profile (the Reasoning Wave); make one "
                         f"with: python profile.py --model DIR --out FILE, and pass --profile FILE")
    return rule(num_layers, budget, window=window, profile=profile, **options)


# ----------------------------------------------------------------------------------------------
# 4. Decoding with compression. The project's other modules are imported inside the functions that use
#    them, so that sections 1-3 above run from this file alone.


@dataclass
class Generation:
    text: str
    tokens: list[int]
    prompt_tokens: int
    layer_budgets: list[int]
    events: list[dict] = field(default_factory=list)  # one per compression
    cache_tokens: list[int] = field(default_factory=list)  # tokens held after each decode step
    full_tokens: list[int] = field(default_factory=list)  # what a full cache would hold then
    held_tokens: int = 0  # token slots held at the end (all layers and KV heads), the prompt's included
    held_full_tokens: int = 0  # ... and what a full cache would hold then
    cache_bytes: int = 0  # K and V bytes held at the end
    full_bytes: int = 0  # ... and what a full cache would hold
    seconds: float = 0.0
    settings: dict = field(default_factory=dict)  # every knob of the run, so the events say how they were made
    prompt_ids: list[int] = field(default_factory=list)  # the prompt as the model saw it

    def to_json(self) -> dict:
        return asdict(self)


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator) -> int:
    """Greedy when temperature == 0; otherwise temperature then nucleus (top-p) sampling."""
    if temperature == 0:
        return int(logits.argmax())
    logits = logits.double()
    # Shifted so the largest is 0: a tiny temperature then sends the rest to -inf (greedy), not inf - inf.
    probs = torch.softmax((logits - logits.max()) / temperature, dim=-1)
    p, idx = torch.sort(probs, descending=True)
    keep = p.cumsum(0) - p < top_p  # the smallest prefix whose mass reaches top_p
    p = p * keep
    return int(idx[torch.multinomial(p / p.sum(), 1, generator=generator)])


def validate(*, budget, window, interval, temperature, top_p, allocator, policy, max_new_tokens, gamma, beta, mu,
             head_utility, seed=0):
    """Every run setting checked before any work, with a message that says what to change."""
    import evict

    check_budget(budget, window)
    if interval < 1:
        raise ValueError(f"interval must be >= 1 decoded token, got {interval}")
    if not temperature >= 0 or math.isinf(temperature):
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if not 0 <= seed < 2**63:
        raise ValueError(f"seed must be in [0, 2^63), got {seed}")
    for name, value in (("gamma", gamma), ("beta", beta)):
        if not 0 <= value < math.inf:
            raise ValueError(f"{name} (a robustify power) must be a number >= 0, got {value}")
    if not 0 <= mu <= 1:
        raise ValueError(f"mu (the head level's low clip, a fraction of B_l) must be in [0, 1], got {mu}")
    if head_utility not in HEAD_UTILITIES:
        raise ValueError(f"unknown head utility {head_utility!r}; choose one of {', '.join(HEAD_UTILITIES)}")
    get_allocator(allocator)
    evict.get_policy(policy)


def compress_sequences(cache, layer_b: torch.Tensor, allocator: str, policy: str, due: list[bool], *,
                       policy_options, head_options, positions: bool = True) -> tuple[list, list]:
    """`compress` of the sequences of a fast.BatchCache (or the one of a fast.PackedCache: `compress` on the fast
    path) that are due (the others keep every token), so each sequence is cut exactly as in its own run.
    The layers go in groups (fast.layer_groups: all of them, for one sequence at small budgets), and each
    group is one batch: scored in one call (fast.score_layers), its head budgets split by the allocator's head
    rule in one call (the row-wise twin, head_rule_rows: one row per layer and sequence), and its rows
    selected in one sort (fast.keep_rows), before each layer's storage is packed. A batch-1 step on a GPU is
    bound by the host launching kernels, so this keeps a compression to a few hundred launches and at most one
    wait for the device per group (ReasonAlloc's head budgets, read back after they are split on the device;
    uniform heads need none), and that wait comes after the group's scoring, split and packing are queued.
    Returns, per due sequence (None for the others), its head budgets (L, Hk) and
    (positions=True) its kept positions [l][h]."""
    import fast

    L, Hk, n = len(cache), cache.model_config.num_kv_heads, cache.batch
    H = n * Hk  # heads of one layer, all sequences
    head_rule = get_allocator(allocator).heads
    rows = torch.tensor([i for i in range(n) if due[i]], dtype=torch.long, device="cpu")
    budgets = cache.n.view(L, n, Hk).clone()  # (L, n, Hk); not due: a budget of what a head holds keeps every token
    dev = cache.k[0].device
    dev_rows, r = (slice(None) if len(rows) == n else to_device(rows, dev)), len(rows)  # all due: no index
    for layers in fast.layer_groups(cache):
        g = slice(layers[0], layers[-1] + 1)
        s = fast.score_layers(cache, layers, policy, **(policy_options or {}))  # (len(layers)·H, S)
        S = s.shape[1]
        held_dev = torch.stack(cache.n_dev[g]).view(-1, n, Hk)  # read on the device: a copy would wait for it
        pending = None  # the group's head budgets, still on the device (ReasonAlloc's split runs there)
        if r:
            b = head_rule_rows(head_rule, s.view(-1, n, Hk, S)[:, dev_rows].reshape(-1, Hk, S),
                               held_dev[:, dev_rows].reshape(-1, Hk),
                               layer_b[g, None].long().expand(-1, r).reshape(-1), window=cache.window,
                               **(head_options or {}))
            if b.device == dev:  # split on the device (on a CPU always: the GPU's path, tested): read back later
                pending = to_device(budgets[g].clone(), dev)  # (layers, n, Hk), the due sequences' rows replaced
                pending[:, dev_rows] = b.view(-1, r, Hk)
                # Its copy to the host starts now, behind the split and ahead of the packing: when the host has
                # it, the GPU still has the packing to run, and meanwhile the host settles the lengths and
                # launches the next step (rather than the GPU waiting, idle, for the host to do that).
                fetched, ready = start_to_host(pending)
            else:
                budgets[g, rows] = b.view(-1, r, Hk)
        if policy != "full":  # "full" never evicts (as evict.compress_layer)
            # Selected and packed from the budgets on the device (uniform heads: sent from pinned memory), so
            # both kinds of split take one path and only ReasonAlloc's waits, below, for its budgets.
            b_dev = pending.reshape(-1) if pending is not None else to_device(budgets[g].reshape(-1), dev)
            keep = fast.keep_rows(s, cache.n[g].reshape(-1), None, cache.window,
                                  on_device=(held_dev.reshape(-1), b_dev))[0]
            counts_dev = torch.minimum(held_dev.reshape(-1), b_dev)
            for i, l in enumerate(layers):  # each layer's rows, up to its longest head (within its storage)
                w, h = int(cache.n[l].max()), slice(i * H, (i + 1) * H)
                cache.pack(l, keep[h, :w].clamp(max=max(w - 1, 0)), counts_dev[h])
        if pending is not None:  # the one wait for the device, once the packing is queued behind the split
            ready()
            budgets[g] = fetched
        if r:
            assert bool((budgets[g, rows].sum(dim=2) == Hk * layer_b[g, None].long()).all()), "budgets sum to Hk·B_l"
        if policy != "full":  # the host's lengths: a head keeps min(held, budget) rows
            counts = torch.minimum(cache.n[g].reshape(-1), budgets[g].reshape(-1))
            for i, l in enumerate(layers):
                cache.settle(l, counts[i * H:(i + 1) * H])
    kept = [[] if d and positions else None for d in due]
    if positions:
        for l in range(L):
            counts = cache.n[l].tolist()
            for i in rows.tolist():
                kept[i].append([cache.pos[l][h, :counts[h]] for h in range(i * Hk, (i + 1) * Hk)])
    return [budgets[:, i] if due[i] else None for i in range(n)], kept


def compress(cache, layer_b: torch.Tensor, allocator: str = "reasonalloc", policy: str = "rkv", *,
             policy_options=None, head_options=None, positions: bool = True) -> tuple[torch.Tensor, list | None]:
    """One compression over all layers: score every head with the policy, split each layer's budget over
    its heads with the allocator's head rule, cut every head to its budget.
    Returns (head budgets (L, Hk), the kept absolute positions [l][h] (n_lh,), or None with positions=False:
    a decode loop that does not record them skips building L·Hk views, host time that on a GPU comes right
    after the compression's one wait)."""
    import evict
    import fast

    policy_options, head_options = policy_options or {}, head_options or {}
    before = cache.lengths()
    if isinstance(cache, fast.PackedCache):  # the fast path: padded scores and the row-wise head rules
        budgets, kept = compress_sequences(cache, layer_b, allocator, policy, [True], policy_options=policy_options,
                                           head_options=head_options, positions=positions)
        assert (cache.lengths() <= torch.maximum(budgets[0], before)).all(), "a head holds more than its budget"
        return budgets[0], kept[0]
    path = evict  # the per-head reference
    head_rule = get_allocator(allocator).heads
    heads_b, kept = [], []
    for l in range(len(cache)):
        scores = path.score_layer(cache, l, policy, **policy_options)
        b = head_rule(scores, int(layer_b[l]), window=cache.window, **head_options)
        kept.append(path.compress_layer(cache, l, b, policy, scores=scores))
        heads_b.append(b)
    heads_b = torch.stack(heads_b)
    assert (cache.lengths() <= torch.maximum(heads_b, before)).all(), "a head holds more than its budget"
    return heads_b, kept if positions else None


def compress_event(cache, step: int, layer_b: torch.Tensor, allocator: str, policy: str, *, policy_options,
                   head_options, record_positions: bool) -> tuple[torch.Tensor, dict]:
    """`compress`, and the record of it: (head budgets (L, Hk), the event as generate() reports it)."""
    before = cache.lengths()
    budgets, kept = compress(cache, layer_b, allocator, policy, policy_options=policy_options,
                             head_options=head_options, positions=record_positions)
    event = {"step": step, "layer_budgets": layer_b.tolist(), "head_budgets": budgets.tolist(),
             "lengths_before": before.tolist(), "lengths_after": cache.lengths().tolist()}
    if record_positions:
        event["kept_positions"] = [[p.tolist() for p in layer] for layer in kept]
    return budgets, event


def plan(config, *, budget, allocator, policy, profile, window, gamma, beta, mu, head_utility, layer_options,
         head_options) -> tuple[str, torch.Tensor, dict, dict]:
    """A run's allocator, layer budgets B_l and the options of its layer and head rules."""
    if policy == "full":  # nothing is evicted, so the split does not matter (and needs no profile)
        allocator = "uniform"
    layer_options = {"gamma": gamma, **(layer_options or {})}
    head_options = {"beta": beta, "mu": mu, "utility": head_utility, **(head_options or {})}
    layer_b = layer_budgets(allocator, config.num_layers, budget, window=window, profile=profile, **layer_options)
    return allocator, layer_b, layer_options, head_options


def prompt_ids(config, tokenizer, prompt, *, chat: bool, max_new_tokens: int) -> torch.Tensor:
    """A prompt as (T,) ids: text rendered with the chat template (chat=True), or ids as given; checked to fit
    the context with max_new_tokens after it."""
    from model import check_context, encode_prompt

    if isinstance(prompt, torch.Tensor):
        check_context(config, prompt.numel(), max_new_tokens)
        return prompt.long()
    return encode_prompt(tokenizer, config, prompt, chat=chat, max_new_tokens=max_new_tokens)


def run_settings(*, profile, policy_options, **knobs) -> dict:
    """A run's settings as a Generation records them: every knob, then the policy's options and the profile's
    layer demand (so the events say how they were made)."""
    demand = profile["demand"] if isinstance(profile, dict) else profile
    return dict(**knobs, policy_options=policy_options or {},
                profile_demand=None if demand is None else [float(x) for x in demand])


@torch.inference_mode()
def generate(model, tokenizer, prompt, *, budget: int, allocator: str = "reasonalloc", policy: str = "rkv",
             profile=None, interval: int = 128, window: int = 8, max_new_tokens: int = 512,
             temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, chat: bool = True,
             gamma: float = 0.5, beta: float = 0.5, mu: float = 0.25, head_utility: str = "length",
             layer_options=None, head_options=None, policy_options=None, record_positions: bool = False, packed: bool = False, hook=None) -> Generation:
    """Generate under a KV budget of B = `budget` tokens per KV head on average.

    `prompt` is text (rendered with the chat template when chat=True) or a 1-D LongTensor of ids. The
    research knobs: γ (`gamma`, the layer level's power), β and μ (`beta`, `mu`, the head level's power
    and low clip), how head scores are pooled (`head_utility`, see `comparable`); `layer_options` / `head_options` reach the allocator's rules (e.g. {"hi": 3.0},
    {"alpha": 0.1}), `policy_options` the eviction policy (e.g. {"lam": 0.2}). packed=True runs the fast
    path (fast.py), tested equal to the per-head reference cache.

    `hook(step, token, logits, cache)` is called once the step's token is in the cache (step 0: the prompt,
    token None), before the compression due at that step; `logits` (vocab,) predict the next token.
    Returning a token id feeds it next instead of a sampled one (teacher forcing; stop tokens are then fed
    too). Returns the text, tokens, per-step cache sizes, compression events and the settings."""
    import fast
    from model import stop_ids

    validate(budget=budget, window=window, interval=interval, temperature=temperature, top_p=top_p,
             allocator=allocator, policy=policy, max_new_tokens=max_new_tokens, gamma=gamma, beta=beta, mu=mu,
             head_utility=head_utility, seed=seed)
    cfg = model.config
    ids = prompt_ids(cfg, tokenizer, prompt, chat=chat, max_new_tokens=max_new_tokens)
    allocator, layer_b, layer_options, head_options = plan(
        cfg, budget=budget, allocator=allocator, policy=policy, profile=profile, window=window, gamma=gamma,
        beta=beta, mu=mu, head_utility=head_utility, layer_options=layer_options, head_options=head_options)
    budgets = layer_b[:, None].expand(-1, cfg.num_kv_heads).clone()  # (L, Hk) the current b_lh
    generator = torch.Generator().manual_seed(seed)
    stops = stop_ids(cfg, tokenizer)
    device = model.embed.weight.device

    t0 = time.perf_counter()
    # Spare rows: the tokens one interval adds, but never more than the run can add (memory follows holdings).
    spare = min(interval, max_new_tokens + 1)
    cache = fast.new_cache(model, window, spare=spare) if packed else model.new_cache(window)
    logits = model(ids.to(device), cache)  # 1. the prompt, with the full cache
    token, out, events, held, full = None, [], [], [], []
    for step in range(max_new_tokens + 1):
        choice = hook(step, token, logits[-1], cache) if hook is not None else None
        lengths = cache.lengths()
        # 3. every Δ steps (and after the prompt, step 0), once any head holds more than its budget
        if policy != "full" and step % interval == 0 and (lengths > budgets).any():
            budgets, event = compress_event(cache, step, layer_b, allocator, policy, policy_options=policy_options,
                                            head_options=head_options, record_positions=record_positions)
            events.append(event)
            lengths = cache.lengths()
        if step > 0:
            held.append(int(lengths.sum()))
            full.append(cfg.num_layers * cfg.num_kv_heads * cache.next_pos)
        if step == max_new_tokens:
            break
        token = choice if choice is not None else sample(logits[-1], temperature, top_p, generator)
        if choice is None and token in stops:
            break
        out.append(token)
        logits = model(torch.tensor([token], device=device), cache)  # 2. decode one token
    seconds = time.perf_counter() - t0
    elem = model.embed.weight.element_size()
    return Generation(
        text=tokenizer.decode(out) if tokenizer is not None else "", tokens=out, prompt_tokens=int(ids.numel()),
        layer_budgets=layer_b.tolist(), events=events, cache_tokens=held, full_tokens=full,
        held_tokens=int(cache.lengths().sum()), held_full_tokens=cfg.num_layers * cfg.num_kv_heads * cache.next_pos,
        cache_bytes=cache.nbytes(),
        full_bytes=2 * cfg.num_layers * cfg.num_kv_heads * cache.next_pos * cfg.head_dim * elem,
        seconds=seconds,
        settings=run_settings(budget=budget, allocator=allocator, policy=policy, interval=interval, window=window,
                              max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed, chat=chat,
                              packed=packed, layer_options=layer_options, head_options=head_options,
                              policy_options=policy_options, profile=profile),
        prompt_ids=ids.tolist(),
    )


@torch.inference_mode()
def generate_batch(model, tokenizer, prompts: list, *, seeds: list[int] | None = None, budget: int,
                   allocator: str = "reasonalloc", policy: str = "rkv", profile=None, interval: int = 128,
                   window: int = 8, max_new_tokens: int = 512, temperature: float = 0.0, top_p: float = 1.0,
                   chat: bool = True, gamma: float = 0.5, beta: float = 0.5, mu: float = 0.25,
                   head_utility: str = "length", layer_options=None, head_options=None, policy_options=None,
                   record_positions: bool = False, graph: bool = False, on_logits=None) -> list[Generation]:
    """`generate` for n prompts at once on the fast path: equal to n separate runs of
    generate(..., packed=True, seed=seeds[i]) (the same tokens and compression events; logits within float
    tolerance), which the parity tests check for every allocator. Each prompt (text or ids) is prefilled on
    its own; then every step decodes one token of every sequence in one forward pass over a fast.BatchCache,
    where each (sequence, layer, KV head) keeps its own ragged cache, budgets and compressions. Prompts may
    differ in length (each sequence sits at its own position; memory is padded to the longest head of a
    layer). A sequence that stops is removed from the batch, freeing its memory. `seeds` default to
    0..n-1 (n samples of one prompt: give it n times). graph=True runs the step through fast.GraphDecoder
    (a CUDA graph on a GPU). on_logits(i, step, logits) sees sequence i's (vocab,) logits before each
    choice. `seconds` of each result is the batch's wall time."""
    import fast
    from model import stop_ids

    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("generate_batch needs a non-empty list of prompts")
    seeds = list(range(len(prompts))) if seeds is None else list(seeds)
    if len(seeds) != len(prompts):
        raise ValueError(f"got {len(seeds)} seeds for {len(prompts)} prompts; give one seed per prompt")
    for seed in seeds:
        validate(budget=budget, window=window, interval=interval, temperature=temperature, top_p=top_p,
                 allocator=allocator, policy=policy, max_new_tokens=max_new_tokens, gamma=gamma, beta=beta, mu=mu,
                 head_utility=head_utility, seed=seed)
    cfg, device = model.config, model.embed.weight.device
    ids = [prompt_ids(cfg, tokenizer, p, chat=chat, max_new_tokens=max_new_tokens) for p in prompts]
    allocator, layer_b, layer_options, head_options = plan(
        cfg, budget=budget, allocator=allocator, policy=policy, profile=profile, window=window, gamma=gamma,
        beta=beta, mu=mu, head_utility=head_utility, layer_options=layer_options, head_options=head_options)
    n, L, Hk = len(prompts), cfg.num_layers, cfg.num_kv_heads
    stops = stop_ids(cfg, tokenizer)
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    budgets = [layer_b[:, None].expand(-1, Hk).clone() for _ in range(n)]  # (L, Hk) each sequence's b_lh
    out, events, held, full = [[] for _ in range(n)], [[] for _ in range(n)], [[] for _ in range(n)], [[] for _ in range(n)]
    final = [None] * n  # (tokens held, next position) when a sequence ends

    t0 = time.perf_counter()
    spare = min(interval, max_new_tokens + 1)
    caches, last = [], []
    for x in ids:  # 1. each prompt on its own, with the full cache
        c = fast.new_cache(model, window, spare=spare)
        last.append(model(x.to(device), c)[-1])
        caches.append(c)
    cache = fast.BatchCache.stack(caches)
    del caches
    logits = torch.stack(last)  # (n, vocab)
    active = list(range(n))  # the sequence in each slot of the batch
    step_fn = fast.GraphDecoder(model, cache) if graph else (lambda t: fast.decode_batch(model, t, cache))
    for step in range(max_new_tokens + 1):
        lengths = cache.lengths()  # (L, slots·Hk)
        # 3. every Δ steps (and after the prompt, step 0), for each sequence with a head over its budget
        due = [policy != "full" and step % interval == 0 and bool((lengths[:, cache.seq_heads(j)] > budgets[i]).any())
               for j, i in enumerate(active)]
        if any(due):
            new_b, kept = compress_sequences(cache, layer_b, allocator, policy, due, policy_options=policy_options,
                                             head_options=head_options, positions=record_positions)
            after = cache.lengths()
            for j, i in enumerate(active):
                if due[j]:
                    budgets[i] = new_b[j]
                    heads = cache.seq_heads(j)
                    event = {"step": step, "layer_budgets": layer_b.tolist(), "head_budgets": new_b[j].tolist(),
                             "lengths_before": lengths[:, heads].tolist(), "lengths_after": after[:, heads].tolist()}
                    if record_positions:
                        event["kept_positions"] = [[p.tolist() for p in layer] for layer in kept[j]]
                    events[i].append(event)
            lengths = after
        pos = cache.positions()
        if step > 0:
            for j, i in enumerate(active):
                held[i].append(int(lengths[:, cache.seq_heads(j)].sum()))
                full[i].append(L * Hk * int(pos[j]))
        if step == max_new_tokens:
            for j, i in enumerate(active):
                final[i] = (int(lengths[:, cache.seq_heads(j)].sum()), int(pos[j]))
            break
        greedy = logits.argmax(dim=-1).tolist() if temperature == 0 else None
        tokens, keep = [], []
        for j, i in enumerate(active):
            if on_logits is not None:
                on_logits(i, step, logits[j])
            token = greedy[j] if greedy is not None else sample(logits[j], temperature, top_p, generators[i])
            if token in stops:
                final[i] = (int(lengths[:, cache.seq_heads(j)].sum()), int(pos[j]))
                continue
            out[i].append(token)
            tokens.append(token)
            keep.append(j)
        if not keep:
            break
        if len(keep) < len(active):  # free the slots of the sequences that stopped
            cache.select(keep)
            active = [active[j] for j in keep]
        logits = step_fn(torch.tensor(tokens, device=device))  # 2. decode one token of every sequence
    seconds = time.perf_counter() - t0
    elem = model.embed.weight.element_size()
    results = []
    for i in range(n):
        held_tokens, next_pos = final[i]
        results.append(Generation(
            text=tokenizer.decode(out[i]) if tokenizer is not None else "", tokens=out[i],
            prompt_tokens=int(ids[i].numel()), layer_budgets=layer_b.tolist(), events=events[i],
            cache_tokens=held[i], full_tokens=full[i], held_tokens=held_tokens, held_full_tokens=L * Hk * next_pos,
            cache_bytes=held_tokens * 2 * cfg.head_dim * elem, full_bytes=2 * L * Hk * next_pos * cfg.head_dim * elem,
            seconds=seconds,
            settings=run_settings(budget=budget, allocator=allocator, policy=policy, interval=interval,
                                  window=window, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                  seed=seeds[i], chat=chat, packed=True, layer_options=layer_options,
                                  head_options=head_options, policy_options=policy_options, profile=profile),
            prompt_ids=ids[i].tolist()))
    return results


@torch.inference_mode()
def teacher_force(model, ids: torch.Tensor, tokens: list[int], *, budget: int, allocator: str = "reasonalloc",
                  policy: str = "rkv", profile=None, interval: int = 128, window: int = 8, gamma: float = 0.5,
                  beta: float = 0.5, mu: float = 0.25, head_utility: str = "length", layer_options=None,
                  head_options=None, policy_options=None, record_positions: bool = False,
                  packed: bool = False) -> tuple[torch.Tensor, list[dict]]:
    """Feed `tokens` after the prompt `ids` under a budget, as generate() does when a hook forces them, and
    return (the (N, vocab) float32 logits that predict each of them, the compression events).

    Each interval's tokens go through the model in one forward pass instead of one by one: between two
    compressions the cache only grows, and attention is causal by absolute position, so one pass over the
    Δ tokens gives the logits, the window queries and the cache of Δ single-token steps (tested equal)."""
    import fast
    from model import check_context

    validate(budget=budget, window=window, interval=interval, temperature=0.0, top_p=1.0, allocator=allocator,
             policy=policy, max_new_tokens=len(tokens), gamma=gamma, beta=beta, mu=mu, head_utility=head_utility)
    cfg = model.config
    check_context(cfg, ids.numel(), len(tokens))
    allocator, layer_b, _, head_options = plan(
        cfg, budget=budget, allocator=allocator, policy=policy, profile=profile, window=window, gamma=gamma,
        beta=beta, mu=mu, head_utility=head_utility, layer_options=layer_options, head_options=head_options)
    budgets = layer_b[:, None].expand(-1, cfg.num_kv_heads).clone()
    device = model.embed.weight.device
    spare = min(interval, len(tokens) + 1)
    cache = fast.new_cache(model, window, spare=spare) if packed else model.new_cache(window)
    logits, events = [model(ids.long().to(device), cache)[-1:]], []
    forced = torch.tensor(tokens, dtype=torch.long, device=device)
    step = 0
    while True:
        if policy != "full" and step % interval == 0 and (cache.lengths() > budgets).any():
            budgets, event = compress_event(cache, step, layer_b, allocator, policy, policy_options=policy_options,
                                            head_options=head_options, record_positions=record_positions)
            events.append(event)
        if step == len(tokens):
            break
        end = min((step // interval + 1) * interval, len(tokens))  # the next compression step, or the end
        logits.append(model(forced[step:end], cache))  # steps step + 1 .. end in one pass
        step = end
    return torch.cat(logits)[:len(tokens)], events


# ----------------------------------------------------------------------------------------------
# 5. The events document and the replay checker: the golden reference for other backends.
#
# A backend (vLLM, SGLang, a custom kernel) that implements these allocators writes, for one run, what it
# decided at each compression in the versioned format of events.schema.json: B_l, b_lh, the lengths before
# and after, and the absolute positions each head kept. `python reasonalloc.py check EVENTS.json` replays
# the run on the per-head reference path with the same tokens forced and reports the first difference,
# with the reference's scores of the tokens involved. Budgets and kept positions must be equal; scores
# only explain a difference: two within rtol·max(|a|, |b|) + atol are a tie (or float noise), and the
# reference breaks ties toward the older token (a stable sort). conformance.py writes test vectors.

SCHEMA_NAME, SCHEMA_VERSION = "reasonalloc-events", 1
SCHEMA_FILE = Path(__file__).resolve().parent / "events.schema.json"
RTOL, ATOL = 1e-3, 1e-6  # scores this close are a tie when a difference is explained (bfloat16 keeps ~3 digits)


def resolved_options(fn, given: dict | None, skip=("window", "profile")) -> dict:
    """Every keyword option `fn` takes, with its default unless `given` sets it: the complete record."""
    params = inspect.signature(fn).parameters.values()
    out = {p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY and p.name not in skip}
    return out | {k: v for k, v in (given or {}).items() if k in out}


def model_identity(c, *, source: dict) -> dict:
    """What an events document says about its model (`c`: a model.ModelConfig)."""
    return {"architecture": c.model_type, "num_layers": c.num_layers, "num_heads": c.num_heads,
            "num_kv_heads": c.num_kv_heads, "head_dim": c.head_dim, "vocab_size": c.vocab_size,
            "config_hash": c.config_hash, "source": source}


def events_document(model, g: Generation, *, source: dict) -> dict:
    """One run as a versioned events document. `source`: where the weights come from, {"fingerprint": ...}
    of a model folder (`model.model_fingerprint`) or {"recipe": "lcg64", "seed": s, "config": {...}}."""
    import evict

    s = g.settings
    alloc = get_allocator(s["allocator"])
    settings = {
        "budget": s["budget"], "allocator": s["allocator"], "policy": s["policy"], "interval": s["interval"],
        "window": s["window"],
        "layer_options": resolved_options(alloc.layers, s["layer_options"]),
        "head_options": resolved_options(alloc.heads, s["head_options"]),
        "policy_options": resolved_options(evict.get_policy(s["policy"]), s["policy_options"]),
        "profile_demand": s["profile_demand"], "max_new_tokens": s["max_new_tokens"],
        "temperature": s["temperature"], "top_p": s["top_p"], "seed": s["seed"], "chat": s["chat"],
        "dtype": str(model.embed.weight.dtype).removeprefix("torch."), "path": "fast" if s["packed"] else "reference",
    }
    events = [{k: e[k] for k in ("step", "layer_budgets", "head_budgets", "lengths_before", "lengths_after",
                                 "kept_positions")} for e in g.events]
    return {"schema": SCHEMA_NAME, "version": SCHEMA_VERSION, "model": model_identity(model.config, source=source),
            "settings": settings, "prompt_ids": g.prompt_ids, "tokens": g.tokens, "events": events}


def schema_errors(value, schema: dict, where: str = "$") -> list[str]:
    """The subset of JSON Schema that events.schema.json uses (type, const, enum, minimum, required,
    properties, additionalProperties, items), so no validator package is needed."""
    types = schema.get("type")
    if types is not None:
        ok = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}
        names = types if isinstance(types, list) else [types]
        good = any(isinstance(value, ok[t]) if t in ok else
                   (isinstance(value, int) and not isinstance(value, bool)) if t == "integer" else
                   (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value))
                   for t in names)
        if not good:
            return [f"{where} must be {' or '.join(names)}, got {json.dumps(value)[:40]}"]
    if "const" in schema and value != schema["const"]:
        return [f"{where} must be {json.dumps(schema['const'])}, got {json.dumps(value)[:40]}"]
    if "enum" in schema and value not in schema["enum"]:
        return [f"{where} must be one of {', '.join(map(str, schema['enum']))}, got {json.dumps(value)[:40]}"]
    if "minimum" in schema and value < schema["minimum"]:
        return [f"{where} must be >= {schema['minimum']}, got {value}"]
    errors = []
    if isinstance(value, dict):
        errors += [f"{where} lacks {k!r}" for k in schema.get("required", []) if k not in value]
        props = schema.get("properties", {})
        for k, v in value.items():
            if k in props:
                errors += schema_errors(v, props[k], f"{where}.{k}")
            elif schema.get("additionalProperties") is False:
                errors.append(f"{where} has an unknown key {k!r}")
    if isinstance(value, list) and "items" in schema:
        for i, v in enumerate(value):
            errors += schema_errors(v, schema["items"], f"{where}[{i}]")
            if len(errors) > 5:
                break
    return errors


def check_totals(doc: dict, path) -> None:
    """Shapes and totals: Σ B_l = L·B, Σ_h b_lh = Hk·B_l, each head keeps lengths_after[l][h] positions."""
    L, Hk, B = doc["model"]["num_layers"], doc["model"]["num_kv_heads"], doc["settings"]["budget"]
    for e in doc["events"]:
        at = f"{path}: event at step {e['step']}"
        lb, hb = e["layer_budgets"], e["head_budgets"]
        shapes = [len(lb) == L, len(hb) == L and all(len(r) == Hk for r in hb),
                  all(len(e[k]) == L and all(len(r) == Hk for r in e[k]) for k in ("lengths_before", "lengths_after")),
                  len(e["kept_positions"]) == L and all(len(r) == Hk for r in e["kept_positions"])]
        if not all(shapes):
            raise ValueError(f"{at}: every per-layer list needs {L} entries of {Hk} heads (the model's L and Hk)")
        if sum(lb) != L * B:
            raise ValueError(f"{at}: the layer budgets sum to {sum(lb)}, not L·B = {L}·{B} = {L * B}")
        for l in range(L):
            if sum(hb[l]) != Hk * lb[l]:
                raise ValueError(f"{at}: layer {l}'s head budgets {hb[l]} sum to {sum(hb[l])}, not Hk·B_l = "
                                 f"{Hk}·{lb[l]} = {Hk * lb[l]}")
            for h in range(Hk):
                if len(e["kept_positions"][l][h]) != e["lengths_after"][l][h]:
                    raise ValueError(f"{at}: layer {l} head {h} keeps {len(e['kept_positions'][l][h])} positions "
                                     f"but lengths_after says {e['lengths_after'][l][h]}")


def read_events(path) -> dict:
    """An events file, checked: JSON, the format and its version, the schema, and every budget's total."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no events file {path}")
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({getattr(e, 'msg', e)}); is it truncated? Write it again") from None
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA_NAME:
        old = isinstance(doc, dict) and "events" in doc and "version" not in doc
        raise ValueError(f"{path} is not a {SCHEMA_NAME} file" + (
            ": it is an events file from before the format was versioned (no 'version'); write it again with "
            "python reasonalloc.py --events FILE" if old else ""))
    if doc.get("version") != SCHEMA_VERSION:
        raise ValueError(f"{path} has {SCHEMA_NAME} version {doc.get('version')!r}; this reasonalloc reads version "
                         f"{SCHEMA_VERSION} only (see events.schema.json): write the file again in version "
                         f"{SCHEMA_VERSION}")
    errors = schema_errors(doc, json.loads(SCHEMA_FILE.read_text()))
    if errors:
        raise ValueError(f"{path} does not follow events.schema.json: " + "; ".join(errors[:5]))
    check_totals(doc, path)
    return doc


def load_for(doc: dict, model_dir=None, device="cpu"):
    """The model an events document names: its recipe, or a model folder (default: the embedded model)."""
    from convert import resolve_model_dir
    from model import ModelConfig, load_model, model_fingerprint, recipe_model

    src, dtype = doc["model"]["source"], getattr(torch, doc["settings"]["dtype"])
    recipe = "recipe" in src and model_dir is None
    if recipe and src["recipe"] != "lcg64":
        raise ValueError(f"unknown weight recipe {src['recipe']!r}; this reasonalloc knows 'lcg64'")
    path = None if recipe else resolve_model_dir(model_dir)
    config = ModelConfig.from_hf(src["config"] if recipe else path)
    ident = model_identity(config, source=src)  # checked before any weights are read
    diff = [k for k in ident if k != "source" and ident[k] != doc["model"].get(k)]
    if diff:
        there = doc["model"]
        what = ", ".join(f"{k} {there.get(k)!r} in the file, {ident[k]!r} here" for k in diff)
        raise ValueError(f"the events file was made for another model ({what}); pass the model it was made "
                         f"with as --model DIR")
    if recipe:
        return recipe_model(src["config"], src["seed"], dtype)
    fp = model_fingerprint(path)
    if src.get("fingerprint") not in (None, fp):
        raise ValueError(f"the events were made with other weights (fingerprint {src['fingerprint']}) than "
                         f"{path} (fingerprint {fp}); pass the model they were made with as --model DIR")
    return load_model(path, dtype=dtype, device=device)


def replay(model, doc: dict, *, at_step=None, layer=None):
    """Rerun the document's run on the per-head reference path with its tokens forced. With `at_step`, also
    return the scores every head of `layer` had just before the compression at that step:
    [(positions the head holds, the scores of its evictable rows: all but the last w)] per head."""
    import evict

    s, tokens = doc["settings"], doc["tokens"]
    seen = {}

    def hook(step, token, logits, cache):
        if step == at_step:
            scores = evict.score_layer(cache, layer, s["policy"], **s["policy_options"])
            seen["scores"] = [(cache[layer][h].pos.tolist(), sc.double().tolist()) for h, sc in enumerate(scores)]
        return tokens[step] if step < len(tokens) else None

    g = generate(model, None, torch.tensor(doc["prompt_ids"], dtype=torch.long, device="cpu"),
                   budget=s["budget"], allocator=s["allocator"], policy=s["policy"], interval=s["interval"],
                   window=s["window"], max_new_tokens=len(tokens), profile=s["profile_demand"],
                   layer_options=s["layer_options"], head_options=s["head_options"],
                   policy_options=s["policy_options"], record_positions=True, hook=hook)
    return g, seen.get("scores")


def first_difference(theirs: list[dict], ours: list[dict]) -> dict | None:
    """The first (event, field, layer, head) where the two event lists differ, or None."""
    for i, (a, b) in enumerate(zip(theirs, ours)):
        for key in ("step", "layer_budgets", "lengths_before", "head_budgets", "lengths_after", "kept_positions"):
            x, y = a[key], b[key]
            if x == y:
                continue
            found = {"event": i, "step": b["step"], "field": key, "theirs": x, "ours": y, "layer": None, "head": None}
            if key == "layer_budgets":
                found["layer"] = next(l for l in range(len(x)) if x[l] != y[l])
            elif key != "step":
                found["layer"], found["head"] = next((l, h) for l in range(len(x)) for h in range(len(x[l]))
                                                     if x[l][h] != y[l][h])
                found["theirs"], found["ours"] = x[found["layer"]][found["head"]], y[found["layer"]][found["head"]]
            return found
    if len(theirs) != len(ours):
        i = min(len(theirs), len(ours))
        step = (theirs if len(theirs) > i else ours)[i]["step"]
        return {"event": i, "step": step, "field": "count", "theirs": len(theirs), "ours": len(ours),
                "layer": None, "head": None}
    return None


def tie(a: float, b: float, rtol: float = RTOL, atol: float = ATOL) -> bool:
    return abs(a - b) <= atol + rtol * max(abs(a), abs(b))


def explain(d: dict, scores, policy: str, policy_options: dict, rtol: float = RTOL, atol: float = ATOL) -> list[str]:
    """Lines that say what differs at the first difference `d`, with the reference's scores."""
    where = f"event {d['event']} (step {d['step']})"
    if d["field"] == "count":
        return [f"{where}: the backend has {d['theirs']} compression events, the reference {d['ours']}"]
    if d["field"] == "kept_positions":
        head = f"{where}, layer {d['layer']}, KV head {d['head']}"
        pos, sc = scores[d["head"]]
        score_of = dict(zip(pos, sc))  # the evictable rows; the last w rows are the window

        def label(p):
            return round(score_of[p], 8) if p in score_of else "window" if p in pos else "not held (evicted before)"

        only_theirs = sorted(set(d["theirs"]) - set(d["ours"]))
        only_ours = sorted(set(d["ours"]) - set(d["theirs"]))
        lines = [f"{head}: kept positions differ",
                 f"  kept only by the backend:   {only_theirs} (reference scores {[label(p) for p in only_theirs]})",
                 f"  kept only by the reference: {only_ours} (reference scores {[label(p) for p in only_ours]})"]
        pairs = [(score_of.get(a), score_of.get(b)) for a in only_theirs for b in only_ours]
        if pairs and all(a is not None and b is not None and tie(a, b, rtol, atol) for a, b in pairs):
            lines.append(f"  a tie: these scores are equal within rtol {rtol:g}, atol {atol:g}. The reference "
                         f"keeps the older token among equal scores (stable sort); check the backend's tie rule "
                         f"or its score precision")
        else:
            lines.append(f"  not a tie: the backend kept tokens the reference scores lower or does not hold; check "
                         f"the score function ({policy} with {policy_options}) or the selection")
        return lines
    if d["head"] is not None:
        return [f"{where}, layer {d['layer']}, KV head {d['head']}: {d['field']} {d['theirs']} in the backend, "
                f"{d['ours']} in the reference"]
    if d["layer"] is not None:
        return [f"{where}, layer {d['layer']}: layer budget {d['theirs'][d['layer']]} in the backend, "
                f"{d['ours'][d['layer']]} in the reference (layer budgets {d['theirs']} vs {d['ours']})"]
    return [f"{where}: {d['field']} {d['theirs']} in the backend, {d['ours']} in the reference"]


def check(doc: dict, model, *, rtol: float = RTOL, atol: float = ATOL, out=print) -> bool:
    """Replay `doc` and compare it event by event; print agreement or the first difference. True if all agree."""
    g, _ = replay(model, doc)
    theirs, ours = doc["events"], g.events
    d = first_difference(theirs, ours)
    agree = len(theirs) if d is None else d["event"]
    for i in range(agree):
        out(f"event {i} (step {ours[i]['step']}): agrees ({sum(map(sum, ours[i]['lengths_after']))} tokens kept)")
    if d is None:
        out(f"all {len(ours)} compression events agree: budgets and kept positions are equal")
        return True
    scores = None
    if d["field"] == "kept_positions":
        _, scores = replay(model, doc, at_step=d["step"], layer=d["layer"])
    for line in explain(d, scores, doc["settings"]["policy"], doc["settings"]["policy_options"], rtol, atol):
        out(line)
    return False


def check_main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="reasonalloc.py check",
        description="Replay an events file on the per-head reference path with the same tokens forced and compare "
                    "every compression event: layer and head budgets, lengths and kept positions must be equal. "
                    "On the first difference it prints the event, layer and head, and the reference's scores of "
                    "the tokens that differ. Exit status 0 only when every event agrees.")
    p.add_argument("events", help=f"an events file ({SCHEMA_NAME} version {SCHEMA_VERSION}, events.schema.json)")
    p.add_argument("--model", help="the model folder the events were made with (default: the weight recipe named in "
                                   "the file, or else the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--rtol", type=float, default=RTOL, help="relative tolerance under which two scores are a tie")
    p.add_argument("--atol", type=float, default=ATOL, help="absolute tolerance under which two scores are a tie")
    args = p.parse_args(argv)
    try:
        doc = read_events(args.events)
        model = load_for(doc, args.model)
        return 0 if check(doc, model, rtol=args.rtol, atol=args.atol) else 1
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


# ----------------------------------------------------------------------------------------------
# CLI


def sparkline(values) -> str:
    """One character per layer, ▁ (smallest) to █ (largest)."""
    lo, hi = min(values), max(values)
    return "".join("▁▂▃▄▅▆▇█"[0 if hi == lo else round(7 * (v - lo) / (hi - lo))] for v in values)


def summary(g: Generation) -> str:
    held, full = g.held_tokens, g.held_full_tokens
    peak = max(g.cache_tokens, default=held)
    lines = [
        f"generated {len(g.tokens)} tokens after a {g.prompt_tokens}-token prompt in {g.seconds:.1f} s "
        f"({len(g.tokens) / max(g.seconds, 1e-9):.1f} tokens/s); {len(g.events)} compression(s)",
        f"cache at the end: {held} token slots (all layers and KV heads) vs {full} for the full cache "
        f"({100 * held / max(full, 1):.1f} %); peak {peak}",
        f"K/V memory: {g.cache_bytes / 2**20:.2f} MiB vs {g.full_bytes / 2**20:.2f} MiB full "
        f"(saved {100 * (1 - g.cache_bytes / max(g.full_bytes, 1)):.1f} %)",
        f"layer budgets, tokens per KV head (layer 0 → {len(g.layer_budgets) - 1}; mean "
        f"{sum(g.layer_budgets) / len(g.layer_budgets):.0f}, min {min(g.layer_budgets)}, max {max(g.layer_budgets)}):",
        f"  {sparkline(g.layer_budgets)}",
    ]
    return "\n".join(lines)


def run_kwargs(args) -> dict:
    """The generate() settings the CLI's flags give."""
    return dict(budget=args.budget, interval=args.interval, window=args.window, max_new_tokens=args.max_new_tokens,
                temperature=args.temperature, top_p=args.top_p, seed=args.seed, packed=args.fast,
                gamma=args.gamma, beta=args.beta, mu=args.mu, head_utility=args.head_utility)


def compare(model, tokenizer, args, profile):
    """Every method of METHODS on one prompt, side by side; the first, FullKV, is the reference."""
    rows, ref = [], None
    generate(model, tokenizer, args.prompt, budget=args.budget, policy="full", max_new_tokens=4)  # warm-up
    for method, (policy, allocator) in METHODS.items():
        print(f"[compare] {allocator} / {policy} ...", file=sys.stderr, flush=True)
        try:
            g = generate(model, tokenizer, args.prompt, allocator=allocator, policy=policy, profile=profile,
                         **run_kwargs(args))
        except ValueError as e:
            print(f"[compare] skipped {method}: {e}", file=sys.stderr)
            continue
        ref = ref or g
        same = next((i for i, (a, b) in enumerate(zip(g.tokens, ref.tokens)) if a != b), min(len(g.tokens), len(ref.tokens)))
        rows.append((allocator if policy != "full" else "FullKV", policy, len(g.tokens), same,
                     g.held_tokens, 100 * g.cache_bytes / max(g.full_bytes, 1),
                     len(g.tokens) / max(g.seconds, 1e-9), g.text))
    print(f"\nbudget {args.budget} per KV head, interval {args.interval}, window {args.window}")
    print(f"{'allocator':<12} {'policy':<7} {'tokens':>6} {'=FullKV':>7} {'cache':>7} {'mem %':>6} {'tok/s':>6}  start of text")
    for a, p, n, same, held, mem, tps, text in rows:
        snippet = text.replace("\n", " ")[:48]
        print(f"{a:<12} {p:<7} {n:>6} {same:>7} {held:>7} {mem:>6.1f} {tps:>6.1f}  {snippet}")
    print("\n=FullKV: how many leading tokens are identical to the FullKV run; cache: token slots held at the end.")


def main(args):
    from convert import resolve_model_dir
    from model import DTYPES, check_device, check_output, load_model, write_atomic
    from profile import find_profile, load_profile
    from tokenizer import TextStream, load_tokenizer

    if args.compare and args.events:
        raise ValueError("--events records one run; --compare makes eight. Drop one of the two")
    if args.events:
        check_output(args.events, "--events")
    if not args.prompt.strip():
        raise ValueError("--prompt is empty; give the user message to answer")
    validate(allocator=args.allocator, policy=args.policy, **{k: v for k, v in run_kwargs(args).items() if k != "packed"})
    check_device(args.device)
    path = resolve_model_dir(args.model)
    model, tokenizer = load_model(path, dtype=DTYPES[args.dtype], device=args.device), load_tokenizer(path)
    profile = None
    if args.profile:
        profile = load_profile(args.profile, model.config)
    elif args.compare or get_allocator(args.allocator).needs_profile:
        try:  # the shipped profile of the default model
            profile = find_profile(model.config)
        except ValueError:
            if not args.compare:  # --compare skips the allocators that need one
                raise
    if args.compare:
        return compare(model, tokenizer, args, profile)
    g = generate(model, tokenizer, args.prompt, allocator=args.allocator, policy=args.policy, profile=profile,
                 record_positions=bool(args.events), hook=TextStream(tokenizer), **run_kwargs(args))
    print("\n\n" + summary(g))
    if args.events:  # the versioned events document (conformance.py, events.schema.json)
        from model import model_fingerprint

        doc = events_document(model, g, source={"fingerprint": model_fingerprint(path)})
        write_atomic(args.events, json.dumps({**doc, "text": g.text}))
        print(f"events written to {args.events} (check a backend's with: python reasonalloc.py check FILE)")


def parser():
    from evict import POLICIES
    from model import DTYPES

    p = argparse.ArgumentParser(
        description="Generate under a KV-cache budget with ReasonAlloc (or a baseline allocator), streaming the "
                    "text, then summarise what the cache did. `python reasonalloc.py check EVENTS.json` replays an "
                    "events file instead (check --help).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--prompt", required=True, help="user message, rendered with the model's chat template")
    p.add_argument("--model", help="Hugging Face model folder (llama / qwen2 / qwen3, safetensors); default: the "
                                   "embedded SmolLM2-135M-Instruct")
    p.add_argument("--budget", type=int, default=128, help="average KV budget per head, in tokens (B)")
    p.add_argument("--allocator", default="reasonalloc", choices=list(ALLOCATORS),
                   help="how the budget is split over layers and heads (see the README's table)")
    p.add_argument("--policy", default="rkv", choices=list(POLICIES), help="which tokens a head keeps")
    p.add_argument("--profile", help="layer-demand profile JSON from profile.py (found automatically for the "
                                     "default model)")
    p.add_argument("--interval", type=int, default=128, help="compress every this many decoded tokens (Δ)")
    p.add_argument("--window", type=int, default=8, help="observation window w: newest tokens, always kept")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gamma", type=float, default=0.5, help="layer level: robustify power γ on the wave")
    p.add_argument("--beta", type=float, default=0.5, help="head level: robustify power β on the head demand")
    p.add_argument("--mu", type=float, default=0.25, help="head level: low clip μ, as a fraction of B_l")
    p.add_argument("--head-utility", choices=HEAD_UTILITIES, default="length",
                   help="head level: how scores of heads of different lengths are made comparable before pooling")
    p.add_argument("--events", help="write the result and compression events (with kept positions) to this JSON file")
    p.add_argument("--compare", action="store_true",
                   help="run FullKV, SnapKV, R-KV, Pyramid-RKV, wave, head, ReasonAlloc and Ada-KV on the prompt "
                        "and print a side-by-side table")
    p.add_argument("--fast", action="store_true",
                   help="use the packed fast path (batched over heads; tested equal to the per-head reference)")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32")
    p.add_argument("--device", default="cpu")
    return p


if __name__ == "__main__":
    if sys.argv[1:2] == ["check"]:  # python reasonalloc.py check EVENTS.json: the replay checker (section 5)
        sys.exit(check_main(sys.argv[2:]))
    args = parser().parse_args()
    try:
        main(args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        sys.exit(f"error: {e}")
