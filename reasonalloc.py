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
two kinds, and `ALLOCATORS` names each pair; so is `hindsight_heads`, not the paper's, an offline head split.

Sections: 1. robustify, 2. the layer rules, 3. the head rules, 4. ALLOCATORS and METHODS, 5. generation
with compression on the per-head cache, 6. the CLI. Sections 1-4 need nothing but torch, so this file can be
copied into another project by itself; sections 5-6 use the project's model.py and evict.py (and the CLI its
profile.py), and say so in one line when they are missing. The packed fast path (fast.py) plugs into
`generate` from outside: it hands in its own cache and compress function.

Run it:  python reasonalloc.py --prompt "..."        (defaults: policy rkv, allocator reasonalloc)
         python reasonalloc.py --prompt "..." --compare
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable
os.environ.setdefault("GOMP_SPINCOUNT", "1000")  # before torch loads OpenMP: idle threads soon yield the core

import torch

try:  # sections 5-6 only; sections 1-4 work without the project's other modules
    import evict
    import model as M
except ModuleNotFoundError as e:
    if e.name not in ("evict", "model", "tokenizer", "convert"):
        raise
    evict = M = None

# ----------------------------------------------------------------------------------------------
# 1. The robustify operator (shared by both levels)


def round_to_total(x: torch.Tensor, total: int, prefer: torch.Tensor | None = None) -> torch.Tensor:
    """Largest-remainder rounding: base = floor(x + 1e-9), then one more for the `total − Σ base` largest
    remainders x − base. Ties in the remainder go to the larger `prefer` (e.g. the demand), then to the earlier
    entry. docs/rules.md, section 1."""
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

    x = demand ** power (power < 1 flattens the demand, so one noisy estimate cannot take everything),
    then x / max(x) + 1e-12 (a zero demand's share); find the scale s with Σ clip(s·x, low, high) = total,
    m = total / n, low = max(lo·m, floor), high = max(hi·m, lo·m, floor, m) (water-filling: clipped units are
    pinned and the rest rescaled, done here by bisection on s); round by largest remainder. All-zero demand
    gives a uniform split. docs/rules.md, section 2, states every step for a port."""
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
    # Remove the bisection's last sliver (stays within one token of the clips). Summed left to right, as `filled`
    # is: one defined order of additions, so a port in any language (or a batched twin) can give the same bits.
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
    demand = profile["demand"] if isinstance(profile, dict) else profile
    demand = torch.as_tensor(demand, dtype=torch.float64, device="cpu")  # (L,)
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
            rank = torch.empty(len(s), dtype=torch.float64, device=s.device)  # 0 = the head's best token
            order = torch.sort(s, descending=True, stable=True).indices
            rank[order] = torch.arange(len(s), dtype=torch.float64, device=s.device)
            out.append(1 - rank / max(len(s), 1))
        return out
    raise ValueError(f"unknown head utility {utility!r}; choose one of {', '.join(HEAD_UTILITIES)}")


def head_demand(scores: list[torch.Tensor], layer_budget: int, *, window: int = 8, utility: str = "length",
                normalize_heads: bool = False) -> torch.Tensor:
    """(Hk,) r_h: how many of head h's evictable tokens are in the layer's pooled top Hk·(B_l − w) utilities.
    utility: how scores of heads of different lengths are made comparable (see `comparable`; "length" by
    default, chosen on the calibration prompts: docs/evaluation.md).
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


def hindsight_heads(scores: list[torch.Tensor], layer_budget: int, *, window: int = 8, layer: int, head_split,
                    beta: float = 0.5, mu: float = 0.25, hi: float = 2.0, **_) -> torch.Tensor:
    """Not the paper's rule: b_lh = robustify(head_split[l], Hk·B_l, power β, lo μ, floor w), the same at every
    compression (the scores are not read). head_split (L, Hk), a profile's, measured offline with hindsight by
    `benchmarks/oracle.py heads`: each head's mean share of its layer's top tokens by future attention."""
    row = torch.as_tensor(head_split[layer], dtype=torch.float64, device="cpu")  # (Hk,)
    return robustify(row, len(scores) * int(layer_budget), floor=window, power=beta, lo=mu, hi=hi)


# ----------------------------------------------------------------------------------------------
# 4. The allocators compared (same policy, same total budget L·Hk·B): a layer rule and a head rule each


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
    "hindsight": Allocator(uniform_layers, hindsight_heads),  # not the paper's: an offline head split
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
    "Hindsight-heads": ("rkv", "hindsight"),
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
# 5. Decoding with compression, on the per-head cache of model.py


def siblings(what: str):
    """Refuse, in one line, what needs the project's other modules when this file was copied alone."""
    if M is None:
        raise ModuleNotFoundError(f"{what} needs reasonalloc's sibling modules model.py, evict.py, tokenizer.py, "
                                  f"convert.py and profile.py in the same folder; without them only the allocation "
                                  f"functions (robustify, layer_budgets, head_budgets, ALLOCATORS) work")


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


def validate(*, budget, window, interval, temperature, top_p, allocator, policy, max_new_tokens, gamma, beta, mu,
             head_utility, seed=0):
    """Every run setting checked before any work, with a message that says what to change."""
    siblings("validate")
    for name, value in (("budget", budget), ("window", window), ("interval", interval),
                        ("max_new_tokens", max_new_tokens), ("seed", seed)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be a whole number, got {value!r}")
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


def compress(cache, layer_b: torch.Tensor, allocator: str = "reasonalloc", policy: str = "rkv", *,
             policy_options=None, head_options=None, positions: bool = True) -> tuple[torch.Tensor, list | None]:
    """One compression over all layers of a model.KVCache: score every head with the policy, split each
    layer's budget B_l over its heads with the allocator's head rule, cut every head to its budget.
    Returns (head budgets (L, Hk), the kept absolute positions [l][h] (n_lh,), or None with positions=False)."""
    policy_options, head_options = policy_options or {}, head_options or {}
    before = cache.lengths()
    head_rule = get_allocator(allocator).heads
    heads_b, kept = [], []
    for l in range(len(cache)):
        scores = evict.score_layer(cache, l, policy, **policy_options)  # per head (T_h - w,)
        b = head_rule(scores, int(layer_b[l]), window=cache.window, layer=l, **head_options)  # (Hk,)
        kept.append(evict.compress_layer(cache, l, b, policy, scores=scores))
        heads_b.append(b)
    heads_b = torch.stack(heads_b)  # (L, Hk)
    assert (cache.lengths() <= torch.maximum(heads_b, before)).all(), "a head holds more than its budget"
    return heads_b, kept if positions else None


def compression_due(step: int, interval: int, lengths: torch.Tensor, budgets: torch.Tensor) -> bool:
    """The trigger rule: compress after the prompt (step 0) and every Δ decoded tokens (step % Δ == 0), once
    some head holds more than its budget (lengths, budgets: (L, Hk)); every layer is then rescored and cut."""
    return step % interval == 0 and bool((lengths > budgets).any())


def compression_event(step: int, layer_b: torch.Tensor, head_b: torch.Tensor, before: torch.Tensor,
                      after: torch.Tensor, kept: list | None = None) -> dict:
    """The record of one compression, as generate() reports it (and an events file stores it): the step,
    B_l (L,), b_lh (L, Hk), the lengths before and after (L, Hk), and the kept positions [l][h] if given."""
    event = {"step": step, "layer_budgets": layer_b.tolist(), "head_budgets": head_b.tolist(),
             "lengths_before": before.tolist(), "lengths_after": after.tolist()}
    if kept is not None:
        event["kept_positions"] = [[p.tolist() for p in layer] for layer in kept]
    return event


def plan(config, *, budget, allocator, policy, profile, window, gamma, beta, mu, head_utility, layer_options,
         head_options) -> tuple[str, torch.Tensor, dict, dict]:
    """A run's allocator, layer budgets B_l and the options of its layer and head rules."""
    if policy == "full":  # nothing is evicted, so the split does not matter (and needs no profile)
        allocator = "uniform"
    layer_options = {"gamma": gamma, **(layer_options or {})}
    head_options = {"beta": beta, "mu": mu, "utility": head_utility, **(head_options or {})}
    if get_allocator(allocator).heads is hindsight_heads and "head_split" not in head_options:  # from the profile
        if "head_split" not in (profile if isinstance(profile, dict) else {}):
            raise ValueError(f"allocator {allocator!r} needs --profile FILE with a head split (the default model's: "
                             f"profiles/hindsight/; another's: python benchmarks/oracle.py heads --out FILE)")
        head_options["head_split"] = profile["head_split"]
    layer_b = layer_budgets(allocator, config.num_layers, budget, window=window, profile=profile, **layer_options)
    return allocator, layer_b, layer_options, head_options


def prompt_ids(config, tokenizer, prompt, *, chat: bool, max_new_tokens: int) -> torch.Tensor:
    """A prompt as (T,) ids: text rendered with the chat template (chat=True), or ids as given; checked to fit
    the context with max_new_tokens after it."""
    if isinstance(prompt, torch.Tensor):
        M.check_context(config, prompt.numel(), max_new_tokens)
        return prompt.long()
    return M.encode_prompt(tokenizer, config, prompt, chat=chat, max_new_tokens=max_new_tokens)


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
             layer_options=None, head_options=None, policy_options=None, record_positions: bool = False,
             hook=None, cache=None, compress_fn: Callable | None = None) -> Generation:
    """Generate under a KV budget of B = `budget` tokens per KV head on average.

    `prompt` is text (rendered with the chat template when chat=True) or a 1-D LongTensor of ids. The
    research knobs: γ (`gamma`, the layer level's power), β and μ (`beta`, `mu`, the head level's power
    and low clip), how head scores are pooled (`head_utility`, see `comparable`); `layer_options` /
    `head_options` reach the allocator's rules (e.g. {"hi": 3.0}, {"alpha": 0.1}), `policy_options` the
    eviction policy (e.g. {"lam": 0.2}).

    `hook(step, token, logits, cache)` is called once the step's token is in the cache (step 0: the prompt,
    token None), before the compression due at that step; `logits` (vocab,) predict the next token.
    Returning a token id feeds it next instead of a sampled one (teacher forcing; stop tokens are then fed
    too). `cache` (an empty cache; default model.new_cache(window)) and `compress_fn` (default `compress`)
    let another cache run the same loop: fast.generate passes its packed ones. Returns the text, tokens,
    per-step cache sizes, compression events and the settings."""
    siblings("generate")
    validate(budget=budget, window=window, interval=interval, temperature=temperature, top_p=top_p,
             allocator=allocator, policy=policy, max_new_tokens=max_new_tokens, gamma=gamma, beta=beta, mu=mu,
             head_utility=head_utility, seed=seed)
    cfg = model.config
    ids = prompt_ids(cfg, tokenizer, prompt, chat=chat, max_new_tokens=max_new_tokens)
    allocator, layer_b, layer_options, head_options = plan(
        cfg, budget=budget, allocator=allocator, policy=policy, profile=profile, window=window, gamma=gamma,
        beta=beta, mu=mu, head_utility=head_utility, layer_options=layer_options, head_options=head_options)
    cache = model.new_cache(window) if cache is None else cache
    compress_fn = compress if compress_fn is None else compress_fn
    L, Hk = cfg.num_layers, cfg.num_kv_heads
    budgets = layer_b[:, None].expand(-1, Hk).clone()  # (L, Hk) the current b_lh
    generator = torch.Generator().manual_seed(seed)
    events, held, full = [], [], []

    def on_step(step, token, logits, cache):
        nonlocal budgets
        choice = hook(step, token, logits, cache) if hook is not None else None
        lengths = cache.lengths()
        # 3. every Δ steps (and after the prompt, step 0), once any head holds more than its budget
        if policy != "full" and compression_due(step, interval, lengths, budgets):
            budgets, kept = compress_fn(cache, layer_b, allocator, policy, policy_options=policy_options,
                                        head_options=head_options, positions=record_positions)
            before, lengths = lengths, cache.lengths()
            events.append(compression_event(step, layer_b, budgets, before, lengths, kept))
        if step > 0:
            held.append(int(lengths.sum()))
            full.append(L * Hk * cache.next_pos)
        return choice

    t0 = time.perf_counter()
    choose = lambda step, logits: M.sample(logits, temperature, top_p, generator)  # noqa: E731
    out = M.decode(model, ids, cache, max_new_tokens=max_new_tokens, choose=choose,  # 1.-2. prefill, decode
                   stops=M.stop_ids(cfg, tokenizer), on_step=on_step)
    seconds = time.perf_counter() - t0
    elem = model.embed.weight.element_size()
    return Generation(
        text=tokenizer.decode(out) if tokenizer is not None else "", tokens=out, prompt_tokens=int(ids.numel()),
        layer_budgets=layer_b.tolist(), events=events, cache_tokens=held, full_tokens=full,
        held_tokens=int(cache.lengths().sum()), held_full_tokens=L * Hk * cache.next_pos, cache_bytes=cache.nbytes(),
        full_bytes=2 * L * Hk * cache.next_pos * cfg.head_dim * elem, seconds=seconds,
        settings=run_settings(budget=budget, allocator=allocator, policy=policy, interval=interval, window=window,
                              max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                              chat=chat, packed=not isinstance(cache, M.KVCache), layer_options=layer_options,
                              head_options=head_options, policy_options=policy_options, profile=profile),
        prompt_ids=ids.tolist(),
    )


@torch.inference_mode()
def teacher_force(model, ids: torch.Tensor, tokens: list[int], *, budget: int, allocator: str = "reasonalloc",
                  policy: str = "rkv", profile=None, interval: int = 128, window: int = 8, gamma: float = 0.5,
                  beta: float = 0.5, mu: float = 0.25, head_utility: str = "length", layer_options=None,
                  head_options=None, policy_options=None, record_positions: bool = False, cache=None,
                  compress_fn: Callable | None = None) -> tuple[torch.Tensor, list[dict]]:
    """Feed `tokens` after the prompt `ids` under a budget, as generate() does when a hook forces them, and
    return (the (N, vocab) float32 logits that predict each of them, the compression events).

    Not model.decode's one-token loop: each interval's tokens go through the model in one forward pass.
    Between two compressions the cache only grows, and attention is causal by absolute position, so one pass
    over the Δ tokens gives the logits, the window queries and the cache of Δ single-token steps (tested
    equal to generate with the tokens forced). `cache` and `compress_fn`: as in generate."""
    siblings("teacher_force")
    validate(budget=budget, window=window, interval=interval, temperature=0.0, top_p=1.0, allocator=allocator,
             policy=policy, max_new_tokens=len(tokens), gamma=gamma, beta=beta, mu=mu, head_utility=head_utility)
    cfg = model.config
    M.check_context(cfg, ids.numel(), len(tokens))
    allocator, layer_b, _, head_options = plan(
        cfg, budget=budget, allocator=allocator, policy=policy, profile=profile, window=window, gamma=gamma,
        beta=beta, mu=mu, head_utility=head_utility, layer_options=layer_options, head_options=head_options)
    budgets = layer_b[:, None].expand(-1, cfg.num_kv_heads).clone()
    device = model.embed.weight.device
    cache = model.new_cache(window) if cache is None else cache
    compress_fn = compress if compress_fn is None else compress_fn
    logits, events = [model(ids.long().to(device), cache)[-1:]], []
    forced = torch.tensor(tokens, dtype=torch.long, device=device)
    step = 0
    while True:
        before = cache.lengths()
        if policy != "full" and compression_due(step, interval, before, budgets):
            budgets, kept = compress_fn(cache, layer_b, allocator, policy, policy_options=policy_options,
                                        head_options=head_options, positions=record_positions)
            events.append(compression_event(step, layer_b, budgets, before, cache.lengths(), kept))
        if step == len(tokens):
            break
        end = min((step // interval + 1) * interval, len(tokens))  # the next compression step, or the end
        logits.append(model(forced[step:end], cache))  # steps step + 1 .. end in one pass
        step = end
    return torch.cat(logits)[:len(tokens)], events


def load(model_dir=None, *, profile=None, dtype=torch.float32, device="cpu", load_fn: Callable | None = None):
    """The Python API in one call: (model, tokenizer, profile) for a Hugging Face folder of a Llama, Qwen2 or
    Qwen3 model in safetensors (default: the embedded SmolLM2-135M-Instruct, converted on first use).
    profile: a profile file from profile.py; by default the shipped one made for this model, or None when
    there is none. load_fn(path, dtype=, device=): the model loader (default model.load_model)."""
    siblings("load")
    from convert import resolve_model_dir
    from profile import find_profile, load_profile
    from tokenizer import load_tokenizer

    path = resolve_model_dir(model_dir)
    model = (load_fn or M.load_model)(path, dtype=dtype, device=device)
    if profile is not None:
        return model, load_tokenizer(path), load_profile(profile, model.config)
    try:
        return model, load_tokenizer(path), find_profile(model.config)
    except ValueError:  # no shipped profile for this model: the allocators that need one say so when used
        return model, load_tokenizer(path), None


# ----------------------------------------------------------------------------------------------
# 6. CLI


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
                temperature=args.temperature, top_p=args.top_p, seed=args.seed, gamma=args.gamma, beta=args.beta,
                mu=args.mu, head_utility=args.head_utility)


def compare(model, tokenizer, args, profile, generate_fn):
    """Every method of METHODS on one prompt, side by side; the first, FullKV, is the reference."""
    rows, ref = [], None
    generate_fn(model, tokenizer, args.prompt, budget=args.budget, policy="full", max_new_tokens=4)  # warm-up
    for method, (policy, allocator) in METHODS.items():
        print(f"[compare] {allocator} / {policy} ...", file=sys.stderr, flush=True)
        try:
            g = generate_fn(model, tokenizer, args.prompt, allocator=allocator, policy=policy, profile=profile,
                            **run_kwargs(args))
        except ValueError as e:
            print(f"[compare] skipped {method}: {e}", file=sys.stderr)
            continue
        ref = ref or g
        same = next((i for i, (a, b) in enumerate(zip(g.tokens, ref.tokens)) if a != b),
                    min(len(g.tokens), len(ref.tokens)))
        rows.append((allocator if policy != "full" else "FullKV", policy, len(g.tokens), same,
                     g.held_tokens, 100 * g.cache_bytes / max(g.full_bytes, 1),
                     len(g.tokens) / max(g.seconds, 1e-9), g.text))
    print(f"\nbudget {args.budget} per KV head, interval {args.interval}, window {args.window}")
    print(f"{'allocator':<12} {'policy':<7} {'tokens':>6} {'=FullKV':>7} {'cache':>7} {'mem %':>6} {'tok/s':>6}  "
          f"start of text")
    for a, p, n, same, held, mem, tps, text in rows:
        snippet = text.replace("\n", " ")[:48]
        print(f"{a:<12} {p:<7} {n:>6} {same:>7} {held:>7} {mem:>6.1f} {tps:>6.1f}  {snippet}")
    print("\n=FullKV: how many leading tokens are identical to the FullKV run; cache: token slots held at the end.")


def main(args, *, generate_fn: Callable | None = None, load_fn: Callable | None = None,
         after: Callable | None = None):
    """Generate and summarise (or --compare), every setting checked before the weights load. generate_fn and
    load_fn: the generation function and the model loader (default `generate` and model.load_model; fast.py
    passes its own); after(path, model, g): called with the run (conformance.py writes its events file)."""
    from convert import resolve_model_dir
    from tokenizer import TextStream

    if not args.prompt.strip():
        raise ValueError("--prompt is empty; give the user message to answer")
    validate(allocator=args.allocator, policy=args.policy, **run_kwargs(args))
    M.check_device(args.device)
    path = resolve_model_dir(args.model)
    M.check_context(M.ModelConfig.from_hf(path), 1, args.max_new_tokens)  # before the weights, not after
    model, tokenizer, profile = load(path, profile=args.profile, dtype=M.DTYPES[args.dtype], device=args.device,
                                     load_fn=load_fn)  # profile None: the allocators that need one say so
    generate_fn = generate if generate_fn is None else generate_fn
    if args.compare:
        return compare(model, tokenizer, args, profile, generate_fn)
    g = generate_fn(model, tokenizer, args.prompt, allocator=args.allocator, policy=args.policy, profile=profile,
                    hook=TextStream(tokenizer), **run_kwargs(args))
    print("\n\n" + summary(g))
    if after is not None:
        after(path, model, g)


def parser(description: str | None = None) -> argparse.ArgumentParser:
    siblings("the command line")
    p = argparse.ArgumentParser(
        description=description or "Generate under a KV-cache budget with ReasonAlloc (or a baseline allocator) "
                                   "on the per-head reference cache, streaming the text, then summarise what the "
                                   "cache did. The same run on the packed fast path: python fast.py (same flags).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--prompt", required=True, help="user message, rendered with the model's chat template")
    p.add_argument("--model", help="Hugging Face model folder (llama / qwen2 / qwen3, safetensors); default: the "
                                   "embedded SmolLM2-135M-Instruct")
    p.add_argument("--budget", type=int, default=128, help="average KV budget per head, in tokens (B)")
    p.add_argument("--allocator", default="reasonalloc", choices=list(ALLOCATORS),
                   help="how the budget is split over layers and heads (the README's allocator table)")
    p.add_argument("--policy", default="rkv", choices=list(evict.POLICIES), help="which tokens a head keeps")
    p.add_argument("--profile", help="layer-demand profile from profile.py (default: the shipped one for the model)")
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
    p.add_argument("--compare", action="store_true",
                   help="run FullKV, SnapKV, R-KV, Pyramid-RKV, wave, head, ReasonAlloc, Ada-KV (and Hindsight-heads, "
                        "given a profile with a head split) on the prompt and print a side-by-side table")
    p.add_argument("--dtype", choices=list(M.DTYPES), default="float32")
    p.add_argument("--device", default="cpu")
    return p


def cli(main_fn=main, parser_fn=parser, argv=None):
    """Parse, run, and end every error a user can fix in one line (fast.py and conformance.py reuse it)."""
    try:
        main_fn(parser_fn().parse_args(argv))
    except (ValueError, FileNotFoundError, RuntimeError, ImportError, KeyboardInterrupt) as e:  # Ctrl-C: one line
        sys.exit(f"error: {str(e) or 'interrupted'}")


if __name__ == "__main__":
    cli()
