"""The packed fast path: the twin of the spec modules, tested equal to them, piece by piece.

Legend:
    L   layers              Hq  query heads          Hk  key/value heads
    G   Hq // Hk (GQA group) D   head dim             T   tokens in one head's cache
    w   observation window (newest tokens, always kept)
    S   rows of a layer's padded storage that hold tokens (its longest head)

The spec (model.py, evict.py, reasonalloc.py) is written per KV head; this file computes the same numbers
batched over the heads of a layer, and over many sequences. It imports the spec and never the reverse, and
each piece's docstring names the reference function or class it equals; the parity tests (test_fast.py) hold
it there. In the order of the spec:

1. model.py's twin: weights laid out for a one-row product (`store_weights`, `load_model`); `PackedCache`,
   the per-head cache packed per layer into padded storage; `BatchCache`, many sequences in one;
   `GraphDecoder`, a static decode step replayed from a CUDA graph.
2. evict.py's twin: the policies and the selection for every head of a layer at once.
3. reasonalloc.py's twin: the head rules row by row (`head_rule_rows`), the batched compression
   (`compress_sequences`, `compress`), and `generate` / `teacher_force` / `generate_batch` on this path.
4. The CLI: python fast.py --prompt "..." runs the main job on this path (the same flags as reasonalloc.py).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
os.environ.setdefault("GOMP_SPINCOUNT", "1000")  # before torch loads OpenMP: idle threads soon yield the core

import torch
import torch.nn as nn
import torch.nn.functional as F

import evict
import model as M
import reasonalloc as R
from model import HeadCache, ModelConfig, Transformer, check_context

# ----------------------------------------------------------------------------------------------
# 1. model.py's twin. Weights for a one-row product: the CPU split across threads, the layouts


def split_product(x: torch.Tensor, w: torch.Tensor, parts: int) -> torch.Tensor:
    """x (1, in) @ w.T as `parts` slices run by one torch.bmm, which runs each slice on its own thread (see
    Linear). Every slice is a view of w as `store_weights` laid it out."""
    n, k = w.shape
    if w.stride(0) == 1:  # column-major: (parts, k/p, n) slices of the (in, out) storage, partial sums added
        return torch.bmm(x.reshape(parts, 1, k // parts), w.t().view(parts, k // parts, n)).sum(0)
    # row-major: each thread takes n/p output rows
    return torch.bmm(x.expand(parts, 1, k), w.view(parts, n // parts, k).transpose(1, 2)).reshape(1, n)


@torch.library.custom_op("reasonalloc::split_product", mutates_args=())
def split_product_op(x: torch.Tensor, w: torch.Tensor, parts: int) -> torch.Tensor:
    """split_product as an operator of its own, for torch.compile to call as it is: Inductor would otherwise
    fuse the bmm and its sum into a C++ loop of its own, much slower than MKL's (the compiled CPU step went
    from 23 to 37 tokens/s with the operator, `bench.py speed --compiled`). Eager code calls split_product
    directly: going through the operator costs about 14 µs a call (`bench_gemv.py`)."""
    return split_product(x, w, parts)


@split_product_op.register_fake
def _(x, w, parts):
    return x.new_empty(1, w.shape[0])


class Linear(nn.Linear):
    """nn.Linear whose one-row product (a batch-1 decode step) can be split across the CPU's threads.

    MKL computes a matrix-vector product on one thread, which streams about as fast as one core can read; a
    batched product over `parts` slices of the weight (`torch.bmm`) runs the slices on `parts` threads at
    once. How it slices follows how `store_weights` laid the weight out, so every slice is a free view:
    column-major (in, out storage) slices the input dimension and sums the `parts` partial products;
    row-major slices the output rows. parts == 1 (the default), several rows, or a GPU: F.linear."""

    parts = 1

    def forward(self, x):
        p, w = self.parts, self.weight
        if p == 1 or x.dim() != 2 or x.shape[0] != 1 or x.device.type != "cpu":  # a GPU spreads one product itself
            return F.linear(x, w, self.bias)
        y = split_product_op(x, w, p) if torch.compiler.is_compiling() else split_product(x, w, p)
        return y if self.bias is None else y + self.bias


# Which projections "auto" stores column-major on a GPU: measured with bf16 Llama-3.1-8B shapes on one H100
# (`python benchmarks/bench_gemv.py --device cuda --shapes llama-3.1-8b --dtype bfloat16`, docs/performance.md):
# cuBLAS picks another kernel for (in, out) storage and reads the o weight 19 % faster, gate/up and
# down 3-4 %, the LM head 7 %; the fused q/k/v 5 % slower, so it stays row-major.
GPU_COLUMNS = frozenset({"o", "gate/up", "down", "LM head"})


def projections(model: Transformer) -> dict[str, list[nn.Linear]]:
    """Each kind of projection's Linear modules, under the names bench_gemv.py reports them by."""
    blocks = model.blocks
    return {"q/k/v": [b.attn.wqkv for b in blocks], "o": [b.attn.wo for b in blocks],
            "gate/up": [b.mlp.w_gate_up for b in blocks], "down": [b.mlp.w_down for b in blocks],
            "LM head": [model.lm_head]}


def store_weights(model: Transformer, layout="auto", parts: int | None = None) -> Transformer:
    """Lay out the projection weights for a batch-1 decode step and say how many threads share each product
    (the values and shapes stay; only the storage order and `Linear.parts` change; each projection's
    nn.Linear becomes this file's `Linear`, the same module with the split forward).

    A decode step is one matrix-vector product per projection, so its speed is the speed at which each
    weight is streamed. On the CPU, MKL's product with a row-major (out, in) weight, which is what
    `nn.Linear` and transformers use, reads about 15 GB/s on this project's 2-core machine, on one thread.
    The same product over (in, out) storage (the weight column-major) reads up to 28 GB/s when the output is
    wider than the input (fused q/k/v, gate/up, the LM head), the same when it is square, and less when it
    is narrower (the down projection: 15 against 21 GB/s). Split over the 2 threads (`Linear`), the chosen
    layouts read 23-40 GB/s. On an H100, cuBLAS picks its kernel by layout too (GPU_COLUMNS).
    `python benchmarks/bench_gemv.py [--device cuda]` measures this per shape; `bench.py speed --layouts` times whole
    decode steps on the CPU, `bench_gpu.py --layout` on the GPU.

    layout: "auto" = "columns" on the CPU and GPU_COLUMNS elsewhere; "columns" = column-major for every
    projection with out >= in (the wide ones, by the CPU measurement above); "rows" = every weight row-major
    (contiguous), as loaded; or a collection of projection names (`projections`) to store column-major, the
    rest row-major. A tied LM head moves with the embedding (one tensor; the embedding then gathers a token's
    strided row, once a token).
    parts: threads per product (default: torch.get_num_threads() on the CPU, 1 on the GPU, where one product
    is spread over the whole device already); a weight whose sliced dimension `parts` does not divide keeps 1."""
    groups = projections(model)
    cpu = model.embed.weight.device.type == "cpu"
    wide = {name for name, linears in groups.items() if linears[0].out_features >= linears[0].in_features}
    if isinstance(layout, str):  # each named layout is a set of the projections stored column-major
        named = {"auto": wide if cpu else GPU_COLUMNS, "columns": wide, "rows": set()}
        if layout not in named:
            raise ValueError(f"layout must be auto, columns, rows or a set of projection names, got {layout!r}")
        layout = named[layout]
    layout = frozenset(layout)
    if unknown := layout - groups.keys():
        raise ValueError(f"unknown projection name(s) {sorted(unknown)} in layout; known: {', '.join(groups)}")
    if parts is None:
        parts = torch.get_num_threads() if cpu else 1
    if parts < 1:
        raise ValueError(f"parts must be >= 1, got {parts}")
    for name, linears in groups.items():
        columns = name in layout
        for lin in linears:
            lin.__class__ = Linear  # the same module (same parameters), with the split forward
            w = lin.weight
            out_features, in_features = w.shape
            stored = w.t().contiguous().t() if columns else w.contiguous()
            if stored is not w:
                lin.weight = nn.Parameter(stored, requires_grad=w.requires_grad)
            sliced = in_features if columns else out_features
            lin.parts = parts if sliced % parts == 0 else 1
    if model.config.tie_word_embeddings:
        model.embed.weight = model.lm_head.weight
    return model


def load_model(path, dtype=torch.float32, device="cpu", layout="auto", parts=None) -> Transformer:
    """model.load_model, its weights laid out for decoding by `store_weights(model, layout, parts)`."""
    return store_weights(M.load_model(path, dtype=dtype, device=device), layout, parts)


# ----------------------------------------------------------------------------------------------
# The packed cache (model.KVCache's twin)


class PackedCache:
    """Equals model.KVCache: the same per-head caches, packed per layer into padded storage.

    k[l], v[l]: (Hk, capacity, D); pos[l]: (Hk, capacity). Head h of layer l holds rows [0, n[l, h]),
    oldest first: the same rows in the same order as KVCache's cache[l][h], so policies and selection give
    the same answer on both (the parity tests check it). Appends write in place into spare capacity;
    when it runs out, the storage grows to the needed length plus `spare` rows (set it to the compression
    interval and a compressed cache never reallocates between compressions). Compression packs the kept
    rows to the front and trims the capacity to the longest head plus 1.5 `spare` (reusing the storage
    while it stays between 1 and 2 `spare` above the longest head; under GraphDecoder, `band`, 2 and 1 to 3),
    so the memory held is the budgeted tokens plus 1 to 2 (3) intervals, padded to the longest head of each
    layer. The spare used is never more than the rows held (or 64), so however large `spare` is, the storage
    grows geometrically and stays within about 2.5 times what the heads hold plus 96 rows (under
    GraphDecoder 4 times plus 192)."""

    static = False  # GraphDecoder's mode: fixed shapes, lengths only on the device (see there)
    even = ()  # in static mode, per layer: every head at one length (GraphDecoder sets it before a capture)
    batch = 1  # sequences held (BatchCache holds several)
    # Spares of reuse beyond the one kept for appends (see keep). GraphDecoder widens it to 2: there a new storage
    # costs a new CUDA graph, and ReasonAlloc's longest head moves by more than half a spare between compressions
    # (it left the band of 1 once in 256 steps at 8k, B = 1024, on the GPU); the padding is a few MiB of
    # attention reads against GiBs of weights per token.
    band = 1
    # Capacities are rounded up to a multiple of `align` rows. GraphDecoder sets its own (16): its ragged layers
    # give the fused attention one mask row per KV head, rows `capacity` elements apart, and on an H100 cuDNN's
    # kernel is slower when that stride is not a multiple of 16 (bench_attention.py: 9.27 against 7.65 µs a layer
    # at capacity 1283 against 1280; docs/performance.md). 1 elsewhere: the eager path's masks are built per call.
    align = 1

    def __init__(self, config: ModelConfig, window: int = 8, *, dtype=torch.float32, device="cpu",
                 spare: int = 128, queries: bool = True):
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.config, self.window, self.spare = config, window, max(int(spare), 1)
        # queries=False: the w newest queries are not kept. Only the policies read them, so a cache that is never
        # compressed (FullKV) has no use for them, and keeping them costs a copy per layer per step (on the GPU,
        # 32 of a step's ~500 kernels at Llama-3.1-8B's shapes).
        self.queries = queries
        L, Hk, D = config.num_layers, config.num_kv_heads, config.head_dim
        self.k = [torch.empty(Hk, 0, D, dtype=dtype, device=device) for _ in range(L)]
        self.v = [torch.empty(Hk, 0, D, dtype=dtype, device=device) for _ in range(L)]
        self.pos = [torch.empty(Hk, 0, dtype=torch.long, device=device) for _ in range(L)]
        self.n = torch.zeros(L, Hk, dtype=torch.long, device="cpu")  # tokens held, on the CPU (no device sync to read)
        self.n_dev = [torch.zeros(Hk, dtype=torch.long, device=device) for _ in range(L)]  # the same, on device
        self.q_win = [torch.empty(config.num_heads, 0, D, dtype=dtype, device=device) for _ in range(L)]
        # In static mode the w window queries are a ring (see append): q_slot (on the device) is the slot the next
        # query overwrites, the oldest; q_shift (on the host) the same number, static steps since they were in order.
        self.q_slot = torch.zeros(1, dtype=torch.long, device=device)
        self.q_shift = 0
        self.next_pos = 0
        self.heads = torch.arange(Hk, device=device)  # (Hk,) for the per-head scatter of an append

    def __len__(self) -> int:
        return self.config.num_layers

    def lengths(self) -> torch.Tensor:
        """(L, Hk) number of tokens each head holds, as KVCache.lengths()."""
        return self.n.clone()

    @property
    def model_config(self) -> ModelConfig:
        """The model's config (a BatchCache's `config` has the heads of all its sequences)."""
        return self.config

    def seq_heads(self, i: int) -> slice:
        """The KV heads of sequence i (here the one sequence: all of them)."""
        return slice(0, self.config.num_kv_heads)

    def positions(self) -> torch.Tensor:
        """(batch,) the position of each sequence's next token, on the CPU."""
        return torch.tensor([self.next_pos], device="cpu")

    def advance(self):
        """Count one decoded token in every sequence."""
        self.next_pos += 1

    def ragged(self, layer: int) -> bool:
        n = self.n[layer]
        return bool((n != n[0]).any())

    def head(self, layer: int, h: int) -> HeadCache:
        """A view of one head's rows, as the reference cache holds them."""
        t = int(self.n[layer, h])
        return HeadCache(self.k[layer][h, :t], self.v[layer][h, :t], self.pos[layer][h, :t])

    def __getitem__(self, layer: int) -> list[HeadCache]:
        return [self.head(layer, h) for h in range(self.config.num_kv_heads)]

    def window_queries(self, layer: int, kv_head: int) -> torch.Tensor:
        self.order_queries()
        G = self.config.group_size
        return self.q_win[layer][kv_head * G:(kv_head + 1) * G]

    def order_queries(self):
        """Put every layer's window queries back in order, oldest first, in place (after static steps they are a
        ring; see append). Everything but the static step reads them through this, so it also refuses a cache
        that keeps none."""
        if not self.queries:
            raise ValueError("this cache keeps no window queries (made with queries=False, for a run that never "
                             "compresses), so its heads cannot be scored; make it with queries=True")
        if self.q_shift:
            for qw in self.q_win:
                qw.copy_(torch.roll(qw, -self.q_shift, dims=1))
            self.q_slot.zero_()
            self.q_shift = 0

    def _spare(self, rows: int) -> int:
        """Spare rows beside `rows` held: `spare`, but at most max(rows, 64), so memory follows holdings."""
        return min(self.spare, max(rows, 64))

    def reserve(self, rows: int):
        """Storage for `rows` tokens per head in every layer, now: a run that knows its final length (FullKV
        with a fixed number of new tokens) then never reallocates, as a static cache."""
        for layer in range(len(self)):
            self._reserve(layer, rows, exact=True)

    def _aligned(self, rows: int) -> int:
        return -(-rows // self.align) * self.align

    def _reserve(self, layer: int, rows: int, *, exact: bool = False):
        cap = self.k[layer].shape[1]
        if rows <= cap:
            return
        new = rows if exact else self._aligned(rows + self._spare(rows))
        for name in ("k", "v", "pos"):
            old = getattr(self, name)[layer]
            buf = old.new_zeros(old.shape[0], new, *old.shape[2:])
            buf[:, :cap] = old
            getattr(self, name)[layer] = buf

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor, q: torch.Tensor, pos: torch.Tensor):
        """Append T new tokens to every head of `layer`. k, v: (T, Hk, D); q: (T, Hq, D); pos: (T,), or (Hk, T)
        when the heads' positions differ (BatchCache: each sequence at its own position)."""
        K, V, P = self.k[layer], self.v[layer], self.pos[layer]
        T = k.shape[0]
        pos = pos.expand(K.shape[0], T) if pos.dim() == 1 else pos  # (Hk, T)
        if self.static:  # one token, scattered at each head's length; nothing read back to the host
            heads, rows = self.heads, self.n_dev[layer]
            K[heads, rows], V[heads, rows], P[heads, rows] = k[0], v[0], pos[:, 0]
            self.n_dev[layer] += 1
            if self.queries:  # the new query overwrites the oldest, at q_slot: a ring, so a write of one row (which
                # Inductor can fuse into the query's RoPE) instead of a copy of all w rows per layer
                self.q_win[layer][:, self.q_slot] = q.transpose(0, 1)
                if layer == len(self) - 1:  # the step's last layer: the next step writes the next slot
                    self.q_slot.copy_((self.q_slot + 1) % self.window)
            return
        n = self.n[layer]
        self._reserve(layer, int(n.max()) + T)
        K, V, P = self.k[layer], self.v[layer], self.pos[layer]
        if not self.ragged(layer):  # every head at the same length: one slice write
            t = int(n[0])
            K[:, t:t + T], V[:, t:t + T], P[:, t:t + T] = k.transpose(0, 1), v.transpose(0, 1), pos
        elif T == 1:  # decode after head-wise compression: one scatter at each head's own end
            heads, rows = self.heads, self.n_dev[layer]
            K[heads, rows], V[heads, rows], P[heads, rows] = k[0], v[0], pos[:, 0]
        else:
            for h in range(K.shape[0]):
                t = int(n[h])
                K[h, t:t + T], V[h, t:t + T], P[h, t:t + T] = k[:, h], v[:, h], pos[h]
        self.n[layer] += T
        self.n_dev[layer] += T
        if self.queries:
            self.order_queries()
            self.q_win[layer] = torch.cat([self.q_win[layer], q.transpose(0, 1)], dim=1)[:, -self.window:]

    def attend(self, layer: int, q: torch.Tensor, q_pos: torch.Tensor) -> torch.Tensor:
        """(T, Hq, D): all heads of `layer` in one fused attention call (scaled_dot_product_attention, softmax
        in float32 inside), padding and the future masked out. No (Hk, G·T, S) score block is made: at a 32k
        context that block alone was 8 GiB in a prefill, and in a decode step the fused kernel reads K and V
        once per KV head."""
        T, Hq, D = q.shape
        Hk = self.config.num_kv_heads
        G = Hq // Hk
        S = self.k[layer].shape[1] if self.static else int(self.n[layer].max())
        K, V = self.k[layer][:, None, :S], self.v[layer][:, None, :S]  # (Hk, 1, S, D)
        padded = self.static or self.ragged(layer)  # rows past a head's length are padding
        held = (torch.arange(S, device=K.device)[None, :] < self.n_dev[layer][:, None]) if padded else None  # (Hk, S)
        if T == 1:  # a decode step: one batch of Hq query heads over Hk KV heads (GQA inside the kernel)
            # This layout, not (Hk, 1, G, D) with G query rows per KV head, is what lets the fused kernel spread
            # one long cache over many blocks (measured on an H100: our compiled FullKV at 32k went from 30 % to 68 % of
            # the roofline with it and the fused projections).
            even = self.static and layer < len(self.even) and self.even[layer]  # every head at one length
            if held is not None and not even:  # ragged heads: a batch of Hk, each one KV head and its G queries,
                # so that one mask row per KV head broadcasts over its queries (the same numbers as a row per
                # query head, without repeating the mask; the same kernel times on an H100: bench_attention.py)
                y = F.scaled_dot_product_attention(q.reshape(Hk, G, 1, D), K, V, attn_mask=held[:, None, None, :],
                                                   enable_gqa=True)  # (Hk, G, 1, D)
                return y.view(1, Hq, D)
            mask = None if held is None else held[:1, None, None, :]  # (1, 1, 1, S): one row for every head
            y = F.scaled_dot_product_attention(q.transpose(0, 1)[None], K.transpose(0, 1), V.transpose(0, 1),
                                               attn_mask=mask, enable_gqa=True)  # (1, Hq, 1, D)
            return y.view(1, Hq, D)
        # A prefill or a teacher-forced chunk: causal by absolute position, as the reference. Batch Hk, the G
        # heads of a group sharing one (expanded, not copied) K and V.
        visible = self.pos[layer][:, None, :S] <= q_pos[None, :, None]  # (Hk, T, S)
        if held is not None:
            visible &= held[:, None, :]
        qg = q.view(T, Hk, G, D).permute(1, 2, 0, 3)  # (Hk, G, T, D)
        y = F.scaled_dot_product_attention(qg, K.expand(Hk, G, S, D), V.expand(Hk, G, S, D),
                                           attn_mask=visible[:, None])  # (Hk, G, T, D)
        return y.permute(2, 0, 1, 3).reshape(T, Hq, D)

    def keep(self, layer: int, rows: torch.Tensor, counts: torch.Tensor, counts_dev: torch.Tensor | None = None):
        """Compress `layer` in place: rows (Hk, m) ascending row indices (padded past counts[h]),
        counts (Hk,) how many each head keeps (counts_dev: the same on the device, if the caller has it).
        Packs them to the front and trims the capacity: pack, then settle."""
        self.pack(layer, rows, counts if counts_dev is None else counts_dev)
        self.settle(layer, counts)

    def pack(self, layer: int, rows: torch.Tensor, counts_dev: torch.Tensor):
        """keep's first half, on the device with nothing read back: the rows (Hk, m) (m at most the capacity)
        moved to the front of the storage in place, and the device lengths set to counts_dev (Hk,). The host's
        lengths are those from before until settle, so a caller can queue every layer's packing before it waits
        for counts it does not know yet (ReasonAlloc's head budgets, split on the device)."""
        m = rows.shape[1]
        idx = rows.to(self.k[layer].device)
        D = self.k[layer].shape[2]
        k = torch.gather(self.k[layer], 1, idx[:, :, None].expand(-1, -1, D))
        v = torch.gather(self.v[layer], 1, idx[:, :, None].expand(-1, -1, D))
        p = torch.gather(self.pos[layer], 1, idx)
        self.k[layer][:, :m], self.v[layer][:, :m], self.pos[layer][:, :m] = k, v, p
        self.n_dev[layer].copy_(counts_dev)

    def settle(self, layer: int, counts: torch.Tensor):
        """keep's second half, on the host: the host's lengths set to counts (Hk,), and the capacity trimmed."""
        m, cap = int(counts.max()), self.k[layer].shape[1]
        spare = self._spare(m)
        # The storage is reused while it holds the kept rows plus one `spare` (the appends until the next
        # compression) and at most `band` spares more (see the class attribute).
        if not m + spare <= cap <= self._aligned(m + (1 + self.band) * spare):
            # Trim (or grow) to the kept rows plus `spare`, plus half a band of slack so the next
            # compression, whose longest head may differ by some rows, can reuse the storage.
            cap = self._aligned(m + spare + self.band * spare // 2)
            for name in ("k", "v", "pos"):
                old = getattr(self, name)[layer]
                new = old.new_zeros(old.shape[0], cap, *old.shape[2:])
                new[:, :m] = old[:, :m]
                getattr(self, name)[layer] = new
        # else: already within one spare of that size, so reuse the storage in place; its address stays,
        # and a captured CUDA graph (GraphDecoder) stays valid across the compression.
        self.n[layer] = counts.cpu()

    def nbytes(self) -> int:
        """K and V bytes held by the heads (padding excluded, to compare with KVCache.nbytes())."""
        return int(self.n.sum()) * 2 * self.config.head_dim * self.k[0].element_size()

    def allocated_bytes(self) -> int:
        """K and V bytes of the storage, padding and spare capacity included."""
        return sum(k.nbytes + v.nbytes for k, v in zip(self.k, self.v))


def new_cache(model: Transformer, window: int = 8, *, spare: int = 128, queries: bool = True) -> PackedCache:
    """An empty PackedCache in the model's dtype and device (equals model.new_cache(window)); queries=False for
    a cache that is never compressed (see PackedCache)."""
    p = model.embed.weight
    return PackedCache(model.config, window, dtype=p.dtype, device=p.device, spare=spare, queries=queries)


# ----------------------------------------------------------------------------------------------
# Many sequences at once


class BatchCache(PackedCache):
    """n sequences decoded together, one token each per step: a PackedCache over n·Hk heads per layer, where
    sequence i owns KV heads [i·Hk, (i+1)·Hk) and query heads [i·Hq, (i+1)·Hq). Every (sequence, layer, KV
    head) is its own ragged head, so budgets and compressions are per sequence exactly as in n separate
    runs; `config` is the model's with the head counts multiplied by n (what the packed functions read), and
    `model_config` the model's own. A decode step's n tokens are appended as one token of n·Hk heads, each
    at its own sequence's position."""

    def __init__(self, config: ModelConfig, n: int, window: int = 8, *, dtype=torch.float32, device="cpu",
                 spare: int = 128):
        if n < 1:
            raise ValueError(f"a batch needs at least one sequence, got {n}")
        self._model_config, self.batch = config, n
        super().__init__(self._wide(n), window, dtype=dtype, device=device, spare=spare)
        self.seq_pos = torch.zeros(n, dtype=torch.long, device="cpu")  # each sequence's next position

    @property
    def model_config(self) -> ModelConfig:
        return self._model_config

    def _wide(self, n: int) -> ModelConfig:
        c = self.model_config
        return dataclasses.replace(c, num_heads=n * c.num_heads, num_kv_heads=n * c.num_kv_heads)

    @classmethod
    def stack(cls, caches: list[PackedCache]) -> "BatchCache":
        """One BatchCache holding the sequences of batch-1 PackedCaches (e.g. each after its own prefill),
        in order; every head keeps its rows, positions and window queries."""
        if not caches:
            raise ValueError("no sequences to batch")
        c0 = caches[0]
        config, Hk, D = c0.config, c0.config.num_kv_heads, c0.config.head_dim
        for c in caches:
            c.order_queries()
        short = [i for i, c in enumerate(caches) if c.q_win[0].shape[1] < c.window]
        if short:
            raise ValueError(f"sequence(s) {short} hold fewer than window = {c0.window} tokens; a batched step "
                             f"needs every sequence's observation window full (give longer prompts or a smaller "
                             f"window)")
        dev = c0.k[0].device
        b = cls(config, len(caches), c0.window, dtype=c0.k[0].dtype, device=dev, spare=c0.spare)
        for l in range(config.num_layers):
            S = max(int(c.n[l].max()) for c in caches)
            cap = S + b._spare(S)
            b.k[l] = c0.k[l].new_zeros(len(caches) * Hk, cap, D)
            b.v[l] = c0.v[l].new_zeros(len(caches) * Hk, cap, D)
            b.pos[l] = c0.pos[l].new_zeros(len(caches) * Hk, cap)
            for i, c in enumerate(caches):
                t = int(c.n[l].max())
                heads = slice(i * Hk, (i + 1) * Hk)
                b.k[l][heads, :t], b.v[l][heads, :t] = c.k[l][:, :t], c.v[l][:, :t]
                b.pos[l][heads, :t] = c.pos[l][:, :t]
            b.n[l] = torch.cat([c.n[l] for c in caches])
            b.n_dev[l] = torch.cat([c.n_dev[l] for c in caches])
            b.q_win[l] = torch.cat([c.q_win[l] for c in caches])
        b.seq_pos = torch.tensor([c.next_pos for c in caches], dtype=torch.long, device="cpu")
        return b

    def positions(self) -> torch.Tensor:
        return self.seq_pos.clone()

    def advance(self):
        self.seq_pos += 1

    def seq_heads(self, i: int) -> slice:
        """The KV heads of sequence i (a slice of lengths()' columns)."""
        Hk = self.model_config.num_kv_heads
        return slice(i * Hk, (i + 1) * Hk)

    def select(self, seqs: list[int]):
        """Keep only sequences `seqs` (in that order), freeing the others' memory, e.g. once they stopped."""
        if not seqs:
            raise ValueError("select needs at least one sequence to keep")
        c = self.model_config
        idx = torch.tensor(seqs, dtype=torch.long, device="cpu")
        kv = (idx[:, None] * c.num_kv_heads + torch.arange(c.num_kv_heads)).flatten()
        qh = (idx[:, None] * c.num_heads + torch.arange(c.num_heads)).flatten()
        dev = self.k[0].device
        for l in range(c.num_layers):
            S = int(self.n[l, kv].max())
            cap = self._aligned(S + self._spare(S) + self._spare(S) // 2)
            for name in ("k", "v", "pos"):
                getattr(self, name)[l] = getattr(self, name)[l][kv.to(dev), :cap].contiguous()
            self.q_win[l] = self.q_win[l][qh.to(dev)]
            self.n_dev[l] = self.n_dev[l][kv.to(dev)]
        self.n = self.n[:, kv]
        self.seq_pos = self.seq_pos[idx]
        self.batch = len(seqs)
        self.config = self._wide(self.batch)
        self.heads = torch.arange(self.config.num_kv_heads, device=dev)

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor, q: torch.Tensor, pos: torch.Tensor):
        """One token of every sequence: k, v (n, Hk, D); q (n, Hq, D); pos (n,)."""
        n, Hk, D = k.shape
        super().append(layer, k.reshape(1, n * Hk, D), v.reshape(1, n * Hk, D), q.reshape(1, -1, D),
                       pos.repeat_interleave(Hk)[:, None])

    def attend(self, layer: int, q: torch.Tensor, q_pos: torch.Tensor) -> torch.Tensor:
        """(n, Hq, D): each sequence's one query token over its own heads."""
        n, Hq, D = q.shape
        return super().attend(layer, q.reshape(1, n * Hq, D), q_pos[:1]).view(n, Hq, D)


@torch.no_grad()
def decode_batch(model: Transformer, tokens: torch.Tensor, cache: BatchCache) -> torch.Tensor:
    """One decode step of every sequence: tokens (n,) -> (n, vocab) float32 logits, each sequence at its own
    position (GraphDecoder does the same step from a CUDA graph)."""
    if tokens.shape != (cache.batch,):
        raise ValueError(f"expected {cache.batch} tokens (one per sequence), got shape {tuple(tokens.shape)}")
    check_context(cache.model_config, int(cache.seq_pos.max()) + 1)
    logits = model.run(tokens, cache.seq_pos.to(tokens.device), cache)
    cache.advance()
    return logits


# ----------------------------------------------------------------------------------------------
# The static decode step, captured as a CUDA graph


class GraphDecoder:
    """Equals one Transformer.forward decode step over a PackedCache, replayed from a CUDA graph.

    Eager decode of a batch-1 model is bound by the host launching ~45 small kernels per layer, not
    by the GPU. Here the step runs in the cache's static mode: attention spans the whole capacity with
    the length mask, the new token is scattered at each head's length, and the new query overwrites the
    oldest of the window queries (a ring, put back in order before anything else reads them), so every
    tensor keeps its shape and address from step to step and the step can be captured
    once and replayed. A compression (or a capacity growth) moves the storage and triggers a new
    capture. On CPU there are no graphs: the same static step runs eagerly (which is what the parity
    test checks)."""

    align = 16  # the cache's capacities in multiples of this many rows, so its mask rows lie that far apart

    def __init__(self, model: Transformer, cache: PackedCache, *, compile: bool = False, dynamic: bool | None = None):
        if not isinstance(cache, PackedCache):
            raise ValueError("GraphDecoder needs a PackedCache: fast.new_cache(model, window)")
        dev = model.embed.weight.device
        self.model, self.cache = model, cache
        cache.band = 2  # a new storage costs a capture: reuse it longer (PackedCache.band)
        cache.align = self.align  # storage made before now is widened to that
        for layer in range(len(cache)):
            cache._reserve(layer, cache._aligned(cache.k[layer].shape[1]), exact=True)
        self.token = torch.zeros(cache.batch, dtype=torch.long, device=dev)  # one per sequence (a BatchCache: n)
        self.pos = torch.zeros(cache.batch, dtype=torch.long, device=dev)
        self.host_pos = None  # what self.pos holds (read without asking the device)
        self.use_graph = dev.type == "cuda"
        self.graph, self.layout, self.logits, self.captures = None, None, None, 0
        self.capture_seconds = 0.0  # spent in captures (and, compiled, in compiling each new layout)
        # compile=True: the static step through torch.compile (Inductor fuses the ~45 small kernels of a
        # layer), then captured as before. Shapes are fixed between compressions; when a compression moves
        # the storage to a new capacity, PyTorch's automatic dynamic shapes compile once more with the
        # capacity symbolic, and later capacities reuse that code (only the graph is captured again).
        # dynamic=False compiles every capacity on its own instead (torch.compile's own keyword): kernels
        # specialised to each shape, at one compile per capacity.
        self.run = torch.compile(model.run, dynamic=dynamic) if compile else model.run

    def _step(self) -> torch.Tensor:
        self.cache.static = True
        try:
            return self.run(self.token, self.pos, self.cache)
        finally:
            self.cache.static = False

    def _capture(self):
        t0 = time.perf_counter()
        c = self.cache
        saved_n, saved_q, saved_slot = [n.clone() for n in c.n_dev], [q.clone() for q in c.q_win], c.q_slot.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up on a side stream before capturing, as CUDA graphs require
            for _ in range(2):
                self._step()
        torch.cuda.current_stream().wait_stream(side)
        for n, old in zip(c.n_dev, saved_n):  # undo the warm-up steps (their rows lie past the lengths)
            n.copy_(old)
        for q, old in zip(c.q_win, saved_q):
            q.copy_(old)
        c.q_slot.copy_(saved_slot)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._step()
        self.captures += 1
        self.capture_seconds += time.perf_counter() - t0

    @torch.no_grad()
    def __call__(self, token) -> torch.Tensor:
        """Append `token` (an int or a 1-element tensor; a BatchCache: n tokens, one per sequence) and return
        the (n, vocab) float32 logits."""
        c = self.cache
        check_context(self.model.config, int(c.positions().max()) + 1)
        if c.queries and c.q_win[0].shape[1] < c.window:
            raise ValueError(f"GraphDecoder needs at least window = {c.window} tokens in the cache first")
        longest, shortest = c.n.amax(dim=1), c.n.amin(dim=1)  # (L,) each, on the host
        for layer, t in enumerate(longest.tolist()):
            c._reserve(layer, t + 2)  # room for this step (and a warm-up step)
        if self.token.numel() != c.batch:  # a BatchCache dropped sequences: new buffers, so a new capture
            self.token, self.pos, self.host_pos = self.token.new_zeros(c.batch), self.pos.new_zeros(c.batch), None
        self.token.copy_(torch.as_tensor(token, device=self.token.device).view(c.batch))
        want = c.positions()
        if self.host_pos is not None and self.host_pos.shape == want.shape and torch.equal(want, self.host_pos + 1):
            self.pos += 1  # on the device: a copy from the host would make the host wait for the last step
        else:
            self.pos.copy_(want)
        self.host_pos = want
        # Layers whose heads all hold one length (one mask row in attend). Every step: a compression that reuses the
        # storage, so keeps the layout, can still change it.
        c.even = tuple((longest == shortest).tolist())
        if self.use_graph:
            layout = tuple(t.data_ptr() for t in (*c.k, *c.v, *c.pos, *c.n_dev, *c.q_win, c.q_slot, self.token,
                                                  self.pos)) + c.even
            if layout != self.layout:
                self._capture()
                self.layout = layout
            self.graph.replay()
            logits = self.logits
        else:
            logits = self._step()
        c.n += 1
        if c.queries:
            c.q_shift = (c.q_shift + 1) % c.window
        c.advance()
        return logits
# ----------------------------------------------------------------------------------------------
# 2. evict.py's twin. Scores and selection, batched over the heads of a layer
#    (head h holds rows [0, n_h) of (Hk, S, D))


def window_attention(q_win, k, n_evict, *, gqa_reduce: str = "max"):
    """Equals evict.window_attention for every head at once: (Hk, w, S); rows >= n_evict[h] masked out.
    q_win: (Hk, G, w, D), k: (Hk, S, D), n_evict: (Hk,)."""
    logits = torch.einsum("hgwd,htd->hgwt", q_win, k) / math.sqrt(k.shape[-1])  # (Hk, G, w, S)
    logits = evict.reduce_group(logits, gqa_reduce, dim=1)  # (Hk, w, S)
    evictable = torch.arange(k.shape[1], device=k.device)[None, :] < n_evict[:, None]  # (Hk, S)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return torch.softmax(logits.masked_fill(~evictable[:, None, :], float("-inf")), dim=-1)  # (Hk, w, S)


def snapkv_score(q_win, k, n, window, *, gqa_reduce="max", kernel=7, **_):
    """Equals evict.snapkv_score for every head at once: (Hk, S)."""
    att = window_attention(q_win, k, n - window, gqa_reduce=gqa_reduce).mean(dim=1)  # (Hk, S)
    # Masked rows hold 0 after the softmax, and every real score is >= 0, so pooling across the end of a
    # head's evictable rows gives what the per-head pooling (padded with -inf) gives.
    return F.max_pool1d(att.nan_to_num(0.0)[:, None], kernel_size=kernel, stride=1, padding=kernel // 2)[:, 0]


def length_groups(lengths: list[int], ratio: float = 0.75) -> list[tuple[list[int], int]]:
    """The heads (by index) in groups of similar length, longest first, each with its longest head: a head
    joins the current group while it holds at least `ratio` of the group's longest (0 holds none: left out).
    Redundancy costs S² per head at the padded length S, so scoring each group at its own length does about
    the work of the heads' own T_h² (ReasonAlloc's heads span 1/4 to 2 times their layer's budget, and its
    layers differ again) at a few groups; uniform heads make one group. 3/4 wastes at most 44 % of a
    group's area."""
    groups = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if lengths[i] <= 0:
            break
        if not groups or lengths[i] < ratio * groups[-1][1]:
            groups.append(([], lengths[i]))
        groups[-1][0].append(i)
    return groups


def redundancy(k, n, *, sim_threshold=0.5, zero_col0_quirk=True, chunk_elems: int = 1 << 26, lengths=None):
    """Equals evict.redundancy of every head, over its n_h rows: (Hk, S), 0 past n_h. lengths: n on the host,
    if the caller has it: the heads are then scored in groups of similar length (length_groups), each at its
    own length, instead of all at the longest."""
    if lengths is None:
        return _redundancy(k, n, sim_threshold, zero_col0_quirk, chunk_elems)
    out = torch.zeros(k.shape[:2], dtype=k.dtype, device=k.device)
    groups = length_groups(lengths.tolist())
    if len(groups) == 1 and len(groups[0][0]) == k.shape[0]:  # one group of every head: no gather
        S = groups[0][1]
        out[:, :S] = _redundancy(k[:, :S], n, sim_threshold, zero_col0_quirk, chunk_elems)
        return out
    # The heads longest first, as length_groups orders them (a stable sort on both sides), sorted on the device:
    # each group is then a slice of `order`, with no index list sent from the host.
    order = torch.sort(n, descending=True, stable=True).indices
    start = 0
    for heads, S in groups:
        idx = order[start:start + len(heads)]
        start += len(heads)
        out[idx, :S] = _redundancy(k[idx, :S], n[idx], sim_threshold, zero_col0_quirk, chunk_elems)
    return out


def _redundancy(k, n, sim_threshold, zero_col0_quirk, chunk_elems):
    """redundancy of heads (Hk, S, D) padded to S. The cosine matrix is built in row blocks (the newest-similar
    rule is per row and the column mean a sum over rows), so memory stays at about chunk_elems floats however
    long the heads are. Padding rows are zero vectors, so their cosines are 0 without a mask (and never
    similar while the threshold is >= 0), and the newest similar entry of each row is zeroed in place: a
    handful of passes over each block."""
    Hk, S, _ = k.shape
    col = torch.arange(S, device=k.device)
    valid = col[None, :] < n[:, None]  # (Hk, S)
    kn = (k / (k.norm(dim=-1, keepdim=True) + 1e-8)).masked_fill(~valid[:, :, None], 0.0)
    colsum = torch.zeros(Hk, S, dtype=k.dtype, device=k.device)
    step = max(1, chunk_elems // max(1, Hk * S))
    for r0 in range(0, S, step):
        cos = kn[:, r0:r0 + step] @ kn.transpose(1, 2)  # (Hk, r, S)
        cos.diagonal(offset=r0, dim1=1, dim2=2).zero_()  # a key is not its own duplicate
        similar = cos > sim_threshold
        if sim_threshold < 0:  # padding's zero cosines would pass
            similar &= valid[:, r0:r0 + step, None] & valid[:, None, :]
        # The newest similar column of each row: the first hit from the right (R-KV: max(j if similar else 0)).
        hit, last = similar.view(torch.uint8).flip(-1).max(dim=-1)  # (Hk, r)
        found = hit.bool()
        newest = torch.where(found, S - 1 - last, 0)[..., None]  # (Hk, r, 1); 0 where none (R-KV's quirk)
        zero = torch.zeros((), dtype=cos.dtype, device=cos.device)
        # Quirk off: a row without a hit keeps its entry (its own value written back).
        cos.scatter_(2, newest, zero.expand(newest.shape) if zero_col0_quirk else
                     torch.where(found[..., None], zero, cos.gather(2, newest)))
        colsum += cos.sum(dim=1)
    mean = colsum / n.clamp(min=1)[:, None].to(k.dtype)
    return torch.softmax(mean.masked_fill(~valid, float("-inf")), dim=-1)  # (Hk, S)


def rkv_score(q_win, k, n, window, *, lam=0.1, gqa_reduce="max", kernel=7, sim_threshold=0.5,
              zero_col0_quirk=True, lengths=None, **_):
    """Equals evict.rkv_score for every head at once: (Hk, S)."""
    importance = snapkv_score(q_win, k, n, window, gqa_reduce=gqa_reduce, kernel=kernel)
    R = redundancy(k.to(importance.dtype), n, sim_threshold=sim_threshold, zero_col0_quirk=zero_col0_quirk,
                   lengths=lengths)
    return lam * importance - (1 - lam) * R


def knorm_score(q_win, k, n, window, **_):
    """Equals evict.knorm_score for every head at once."""
    return -k.float().norm(dim=-1)


def streaming_score(q_win, k, n, window, *, pos, sink: int = 4, **_):
    """Equals evict.streaming_score for every head at once."""
    s = pos.to(torch.float32)
    s[:, :sink] = float("inf")
    return s


# The batched policies; a policy without one (e.g. the seeded random baseline) runs per head through evict.POLICIES.
PACKED = {"snapkv": snapkv_score, "rkv": rkv_score, "knorm": knorm_score, "streaming": streaming_score}


def score_packed(cache: PackedCache, layer: int, policy: str = "rkv", **options) -> torch.Tensor:
    """(Hk, S) scores of one layer, S its longest head; -inf where a row is not evictable (the window, or
    padding). Row h, cut at n_h - w, equals evict.score_layer's h-th tensor."""
    return score_layers(cache, [layer], policy, **options)


def score_layers(cache: PackedCache, layers: list[int], policy: str = "rkv", **options) -> torch.Tensor:
    """score_packed of several layers in one batched call: their heads stacked, layer by layer, into one padded
    (len(layers)·Hk, S) block, S the longest head of them all (-inf past each head's evictable rows). A
    compression then launches one set of kernels per group of layers instead of one per layer: batch-1 decoding
    on a GPU waits on the host's launches, not on this arithmetic. Rows equal score_packed's, up to the
    rounding of sums over the longer padding."""
    evict.get_policy(policy)
    cache.order_queries()
    S = max(int(cache.n[l].max()) for l in layers)
    Hk, G, w = cache.config.num_kv_heads, cache.config.group_size, cache.window
    n = torch.cat([cache.n_dev[l] for l in layers])
    dev = cache.k[layers[0]].device
    if policy == "full":
        s = torch.zeros(len(layers) * Hk, S, dtype=torch.float32, device=dev)
    elif policy in PACKED:
        k = _stack([cache.k[l] for l in layers], S)  # (len(layers)·Hk, S, D)
        pos = _stack([cache.pos[l] for l in layers], S) if policy == "streaming" else None
        q_win = torch.cat([cache.q_win[l] for l in layers]).view(len(layers) * Hk, G, -1, k.shape[-1])  # (·, G, w, D)
        s = PACKED[policy](q_win, k, n, w, pos=pos, lengths=torch.cat([cache.n[l] for l in layers]), **options)
    else:  # e.g. the seeded random baseline: per head, through the reference function
        s = torch.full((len(layers) * Hk, S), float("-inf"), device=dev)
        for i, l in enumerate(layers):
            for h, head in enumerate(cache[l]):
                sc = evict.POLICIES[policy](cache.window_queries(l, h), head.k, head.v, head.pos, window=w, **options)
                s[i * Hk + h, :len(sc)] = sc
    evictable = torch.arange(S, device=dev)[None, :] < (n - w)[:, None]
    return s.float().masked_fill(~evictable, float("-inf"))


def _stack(storage: list[torch.Tensor], S: int) -> torch.Tensor:
    """The first S rows of each layer's (Hk, capacity, ...) storage, stacked over the layers (a view for one
    layer; rows past a head's length hold whatever the storage held, and the scores mask them by length)."""
    if len(storage) == 1:
        return storage[0][:, :S]
    out = storage[0].new_zeros(len(storage) * storage[0].shape[0], S, *storage[0].shape[2:])
    Hk = storage[0].shape[0]
    for i, t in enumerate(storage):
        r = min(S, t.shape[1])
        out[i * Hk:(i + 1) * Hk, :r] = t[:, :r]
    return out


def layer_groups(cache: PackedCache, max_rows: int = 1 << 21) -> list[list[int]]:
    """Consecutive layers in groups whose stacked heads (heads × longest head) stay within max_rows K rows
    (score_layers' workspace: 512 MiB of bfloat16 K at head dim 128); a layer larger than that is its own group."""
    groups, S = [[]], 0
    for l in range(len(cache)):
        S_l = int(cache.n[l].max())
        if groups[-1] and (len(groups[-1]) + 1) * cache.config.num_kv_heads * max(S, S_l) > max_rows:
            groups.append([])
            S = 0
        groups[-1].append(l)
        S = max(S, S_l)
    return groups


def keep_rows(scores: torch.Tensor, n: torch.Tensor, budgets, window: int, *, on_device=None):
    """Equals evict.keep_indices for every head at once. scores: (Hk, S) (-inf where not evictable), n: (Hk,)
    rows held, budgets: (Hk,), both on the host; on_device: the same two already on the scores' device, if the
    caller has them (each copy from the host makes the host wait for the device). budgets=None: known on the
    device only (on_device). Returns (rows (Hk, m) ascending, padded, on the device; counts (Hk,) on the host),
    m the largest count, or S and counts None when budgets is None."""
    Hk, S = scores.shape
    dev = scores.device
    counts = None
    if budgets is not None:
        if (budgets < window).any():
            raise ValueError(f"budgets {budgets.tolist()} go below the window {window}; a head always keeps its window")
        # A head keeps all n rows when n <= b, else its b - w best and its w newest: b rows. So the counts are
        # known on the host, without waiting for the device.
        counts = torch.minimum(n, budgets)
    n, budgets = on_device or (n.to(dev), budgets.to(dev))
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices  # ties -> older row, as keep_indices
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(S, device=dev).expand(Hk, S))
    row = torch.arange(S, device=dev)[None, :]
    top = (rank < (budgets - window)[:, None]) & (row < (n - window)[:, None])
    newest = (row >= (n - window)[:, None]) & (row < n[:, None])
    keep = torch.where((n <= budgets)[:, None], row < n[:, None], top | newest)  # (Hk, S), counts[h] rows each
    rows = torch.where(keep, row, S).sort(dim=1).values[:, : S if counts is None else int(counts.max())]
    return rows.clamp(max=max(S - 1, 0)), counts


def score_layer(cache: PackedCache, layer: int, policy: str = "rkv", **options) -> list[torch.Tensor]:
    """Equals evict.score_layer: per-head scores (T_h - w,) of one layer."""
    s = score_packed(cache, layer, policy, **options)
    return [s[h, :max(int(t) - cache.window, 0)] for h, t in enumerate(cache.n[layer])]


def compress_layer(cache: PackedCache, layer: int, budgets, policy: str = "rkv", *, scores=None, **options):
    """Equals evict.compress_layer: cut every KV head of `layer` to its budget, in place, and return the
    kept absolute positions of each head. `scores`, per-head lists from score_layer, can be reused."""
    Hk = cache.config.num_kv_heads
    if len(budgets) != Hk:
        raise ValueError(f"got {len(budgets)} budgets for {Hk} KV heads in layer {layer}")
    if policy == "full":
        return [h.pos for h in cache[layer]]
    if scores is None:
        s = score_packed(cache, layer, policy, **options)
    else:  # per-head lists, padded back to (Hk, S)
        S = int(cache.n[layer].max())
        s = torch.full((Hk, S), float("-inf"), device=cache.k[layer].device)
        for h, sc in enumerate(scores):
            s[h, :len(sc)] = sc
    rows, counts = keep_rows(s, cache.n[layer], torch.as_tensor(budgets, device="cpu"), cache.window)
    cache.keep(layer, rows, counts)
    return [cache.pos[layer][h, :int(c)] for h, c in enumerate(counts.tolist())]


# ----------------------------------------------------------------------------------------------
# 3. reasonalloc.py's twin. The head rules for many rows at once (a batch's compression: one row per layer and
#    sequence): the same arithmetic row by row, so each row equals the rule on that row's heads, bit for bit
#    (tested), without a Python loop over rows.


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
    """R.head_budgets of every row (see head_demand_rows for the layout), on the scores' device."""
    r = head_demand_rows(scores, held, layer_budget, window=window, utility=utility)
    total = held.shape[1] * torch.as_tensor(layer_budget, dtype=torch.long, device="cpu")
    return robustify_rows(r, total, power=beta, lo=mu, hi=hi, floor=window)


def adakv_head_budgets_rows(scores, held, layer_budget, *, window=8, alpha=0.2, **_):
    """R.adakv_head_budgets of every row."""
    c = head_demand_rows(scores, held, layer_budget, window=window, utility="raw").cpu().double()
    Hk = held.shape[1]
    bp = (torch.as_tensor(layer_budget, dtype=torch.long, device="cpu") - window).expand(c.shape[0])[:, None]  # (n, 1)
    short = (Hk * bp - c.sum(dim=1, keepdim=True)).clamp(min=0)
    c = torch.where(short > 0, c + short / Hk, c)
    return round_rows(c * (1 - alpha) + alpha * bp.double(), Hk * bp[:, 0]) + window


def head_rule_rows(rule, scores: torch.Tensor, held: torch.Tensor, layer_budget, *, window: int, layers=None,
                   **options) -> torch.Tensor:
    """Head budgets (n, Hk) of every row (a sequence's heads in one layer) by the head rule `rule`, layer_budget
    an int or (n,) one per row: its row-wise twin where there is one, else the rule on each row's per-head
    lists (e.g. utility "rank"; `layers`, the layer of each row, reaches it as reasonalloc.compress passes it).
    On the host, but on the scores' device from head_budgets_rows (ReasonAlloc's rule), which reads nothing back."""
    n, Hk, _ = scores.shape
    budget = torch.as_tensor(layer_budget, dtype=torch.long, device="cpu").expand(n)
    if rule is R.uniform_heads:
        return budget[:, None].expand(n, Hk).clone()
    if rule is R.head_budgets and options.get("utility", "length") in ("length", "raw") \
            and not options.get("normalize_heads", False):
        return head_budgets_rows(scores, held, budget, window=window, **options)
    if rule is R.adakv_head_budgets:
        return adakv_head_budgets_rows(scores, held, budget, window=window, **options)
    counts = (held - window).clamp(min=0).tolist()
    layers = [None] * n if layers is None else layers
    return torch.stack([rule([scores[i, h, :counts[i][h]] for h in range(Hk)], int(budget[i]), window=window,
                             layer=layers[i], **options) for i in range(n)])


# ----------------------------------------------------------------------------------------------
# The batched compression, and generation on this path


def compress_sequences(cache, layer_b: torch.Tensor, allocator: str, policy: str, due: list[bool], *,
                       policy_options, head_options, positions: bool = True) -> tuple[list, list]:
    """`compress` of the sequences of a BatchCache (or the one of a PackedCache: `compress` on the fast
    path) that are due (the others keep every token), so each sequence is cut exactly as in its own run.
    The layers go in groups (layer_groups: all of them, for one sequence at small budgets), and each
    group is one batch: scored in one call (score_layers), its head budgets split by the allocator's head
    rule in one call (the row-wise twin, head_rule_rows: one row per layer and sequence), and its rows
    selected in one sort (keep_rows), before each layer's storage is packed. A batch-1 step on a GPU is
    bound by the host launching kernels, so this keeps a compression to a few hundred launches and at most one
    wait for the device per group (ReasonAlloc's head budgets, read back after they are split on the device;
    uniform heads need none), and that wait comes after the group's scoring, split and packing are queued.
    Returns, per due sequence (None for the others), its head budgets (L, Hk) and
    (positions=True) its kept positions [l][h]."""
    L, Hk, n = len(cache), cache.model_config.num_kv_heads, cache.batch
    H = n * Hk  # heads of one layer, all sequences
    head_rule = R.get_allocator(allocator).heads
    rows = torch.tensor([i for i in range(n) if due[i]], dtype=torch.long, device="cpu")
    budgets = cache.n.view(L, n, Hk).clone()  # (L, n, Hk); not due: a budget of what a head holds keeps every token
    dev = cache.k[0].device
    dev_rows, r = (slice(None) if len(rows) == n else to_device(rows, dev)), len(rows)  # all due: no index
    for layers in layer_groups(cache):
        g = slice(layers[0], layers[-1] + 1)
        s = score_layers(cache, layers, policy, **(policy_options or {}))  # (len(layers)·H, S)
        S = s.shape[1]
        held_dev = torch.stack(cache.n_dev[g]).view(-1, n, Hk)  # read on the device: a copy would wait for it
        pending = None  # the group's head budgets, still on the device (ReasonAlloc's split runs there)
        if r:
            b = head_rule_rows(head_rule, s.view(-1, n, Hk, S)[:, dev_rows].reshape(-1, Hk, S),
                               held_dev[:, dev_rows].reshape(-1, Hk),
                               layer_b[g, None].long().expand(-1, r).reshape(-1), window=cache.window,
                               layers=[l for l in layers for _ in range(r)], **(head_options or {}))
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
            keep = keep_rows(s, cache.n[g].reshape(-1), None, cache.window,
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


def compress(cache: PackedCache, layer_b: torch.Tensor, allocator: str = "reasonalloc", policy: str = "rkv", *,
             policy_options=None, head_options=None, positions: bool = True) -> tuple[torch.Tensor, list | None]:
    """Equals reasonalloc.compress on a PackedCache: (head budgets (L, Hk), kept positions [l][h] or None).
    positions=False skips building L·Hk views, host time that on a GPU comes right after the compression's
    one wait."""
    before = cache.lengths()
    budgets, kept = compress_sequences(cache, layer_b, allocator, policy, [True], policy_options=policy_options,
                                       head_options=head_options, positions=positions)
    assert (cache.lengths() <= torch.maximum(budgets[0], before)).all(), "a head holds more than its budget"
    return budgets[0], kept[0]


def generate(model: Transformer, tokenizer, prompt, *, interval: int = 128, max_new_tokens: int = 512,
             window: int = 8, compress_fn=compress, **options) -> R.Generation:
    """Equals reasonalloc.generate (the same tokens and events; logits within float tolerance), on a
    PackedCache. Its spare rows: the tokens one interval adds, never more than the run can add (memory
    follows holdings). compress_fn: `compress`, or a wrapper of it (conformance.py's spools kept positions)."""
    cache = new_cache(model, window, spare=min(interval, max_new_tokens + 1))
    return R.generate(model, tokenizer, prompt, interval=interval, max_new_tokens=max_new_tokens, window=window,
                      cache=cache, compress_fn=compress_fn, **options)


def teacher_force(model: Transformer, ids: torch.Tensor, tokens: list[int], *, interval: int = 128,
                  window: int = 8, **options) -> tuple[torch.Tensor, list[dict]]:
    """Equals reasonalloc.teacher_force, on a PackedCache."""
    cache = new_cache(model, window, spare=min(interval, len(tokens) + 1))
    return R.teacher_force(model, ids, tokens, interval=interval, window=window, cache=cache, compress_fn=compress,
                           **options)


def batch_seeds(seeds, n: int) -> list[int]:
    """generate_batch's seeds as n Python ints (default 0..n-1): a list, a range or a 1-D integer tensor."""
    if seeds is None:
        return list(range(n))
    if isinstance(seeds, torch.Tensor):
        if seeds.dim() != 1 or seeds.dtype.is_floating_point or seeds.dtype == torch.bool:
            raise ValueError(f"seeds must be a 1-D tensor of integers, got {seeds.dtype} of shape {tuple(seeds.shape)}")
        seeds = seeds.tolist()
    if isinstance(seeds, (str, bytes)) or not hasattr(seeds, "__iter__"):
        raise ValueError(f"seeds must be a list of {n} integers (one per prompt), got {seeds!r}")
    seeds = list(seeds)
    bad = [s for s in seeds if not isinstance(s, int) or isinstance(s, bool)]
    if bad:
        raise ValueError(f"seeds must be integers, got {bad[:3]}")
    if len(seeds) != n:
        raise ValueError(f"got {len(seeds)} seeds for {n} prompts; give one seed per prompt")
    return seeds


def batch_prompt(prompt, i: int, config: ModelConfig):
    """One of generate_batch's prompts as reasonalloc.prompt_ids takes it: text, or token ids (a 1-D integer
    tensor or a list of ints) in the vocabulary; anything else is refused, naming the prompt."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                            for t in prompt):
        prompt = torch.tensor(prompt, dtype=torch.long, device="cpu")
    if not isinstance(prompt, torch.Tensor) or prompt.dim() != 1 or prompt.dtype.is_floating_point \
            or prompt.dtype == torch.bool:
        raise ValueError(f"prompt {i} must be text or a 1-D list or tensor of token ids, got {prompt!r:.60}")
    if prompt.numel() and not bool(((prompt >= 0) & (prompt < config.vocab_size)).all()):
        raise ValueError(f"prompt {i} holds token ids outside the vocabulary of {config.vocab_size}")
    return prompt


@torch.inference_mode()
def generate_batch(model, tokenizer, prompts: list, *, seeds: list[int] | None = None, budget: int,
                   allocator: str = "reasonalloc", policy: str = "rkv", profile=None, interval: int = 128,
                   window: int = 8, max_new_tokens: int = 512, temperature: float = 0.0, top_p: float = 1.0,
                   chat: bool = True, gamma: float = 0.5, beta: float = 0.5, mu: float = 0.25,
                   head_utility: str = "length", layer_options=None, head_options=None, policy_options=None,
                   record_positions: bool = False, graph: bool = False, on_logits=None) -> list[R.Generation]:
    """reasonalloc.generate for n prompts at once on the fast path: equal to n separate runs of
    generate(..., seed=seeds[i]) (this file's) (the same tokens and compression events; logits within float
    tolerance), which the parity tests check for every allocator. Each prompt (text or ids) is prefilled on
    its own; then every step decodes one token of every sequence in one forward pass over a BatchCache,
    where each (sequence, layer, KV head) keeps its own ragged cache, budgets and compressions. Prompts may
    differ in length (each sequence sits at its own position; memory is padded to the longest head of a
    layer). A sequence that stops is removed from the batch, freeing its memory. `seeds` default to
    0..n-1 (n samples of one prompt: give it n times). graph=True runs the step through GraphDecoder
    (a CUDA graph on a GPU). on_logits(i, step, logits) sees sequence i's (vocab,) logits before each
    choice. `seconds` of each result is the batch's wall time."""
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("generate_batch needs a non-empty list of prompts")
    seeds = batch_seeds(seeds, len(prompts))
    for seed in seeds:
        R.validate(budget=budget, window=window, interval=interval, temperature=temperature, top_p=top_p,
                 allocator=allocator, policy=policy, max_new_tokens=max_new_tokens, gamma=gamma, beta=beta, mu=mu,
                 head_utility=head_utility, seed=seed)
    cfg, device = model.config, model.embed.weight.device
    ids = [R.prompt_ids(cfg, tokenizer, batch_prompt(p, i, cfg), chat=chat, max_new_tokens=max_new_tokens)
           for i, p in enumerate(prompts)]
    short = [i for i, x in enumerate(ids) if x.numel() < window]
    if short:  # before any prefill: a batched step needs every sequence's observation window full
        raise ValueError(f"prompt(s) {short} hold fewer than window = {window} tokens; a batched step needs every "
                         f"sequence's observation window full (give longer prompts or a smaller window)")
    allocator, layer_b, layer_options, head_options = R.plan(
        cfg, budget=budget, allocator=allocator, policy=policy, profile=profile, window=window, gamma=gamma,
        beta=beta, mu=mu, head_utility=head_utility, layer_options=layer_options, head_options=head_options)
    n, L, Hk = len(prompts), cfg.num_layers, cfg.num_kv_heads
    stops = M.stop_ids(cfg, tokenizer)
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    budgets = [layer_b[:, None].expand(-1, Hk).clone() for _ in range(n)]  # (L, Hk) each sequence's b_lh
    out, events, held, full = ([[] for _ in range(n)] for _ in range(4))
    final = [None] * n  # (tokens held, next position) when a sequence ends

    t0 = time.perf_counter()
    spare = min(interval, max_new_tokens + 1)
    caches, last = [], []
    for x in ids:  # 1. each prompt on its own, with the full cache
        c = new_cache(model, window, spare=spare)
        last.append(model(x.to(device), c)[-1])
        caches.append(c)
    cache = BatchCache.stack(caches)
    del caches
    logits = torch.stack(last)  # (n, vocab)
    active = list(range(n))  # the sequence in each slot of the batch
    step_fn = GraphDecoder(model, cache) if graph else (lambda t: decode_batch(model, t, cache))
    for step in range(max_new_tokens + 1):
        lengths = cache.lengths()  # (L, slots·Hk)
        # 3. every Δ steps (and after the prompt, step 0), for each sequence with a head over its budget
        due = [policy != "full" and R.compression_due(step, interval, lengths[:, cache.seq_heads(j)], budgets[i])
               for j, i in enumerate(active)]
        if any(due):
            new_b, kept = compress_sequences(cache, layer_b, allocator, policy, due, policy_options=policy_options,
                                             head_options=head_options, positions=record_positions)
            after = cache.lengths()
            for j, i in enumerate(active):
                if due[j]:
                    budgets[i] = new_b[j]
                    heads = cache.seq_heads(j)
                    events[i].append(R.compression_event(step, layer_b, new_b[j], lengths[:, heads], after[:, heads],
                                                         kept[j] if record_positions else None))
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
            token = greedy[j] if greedy is not None else M.sample(logits[j], temperature, top_p, generators[i])
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
        results.append(R.Generation(
            text=tokenizer.decode(out[i]) if tokenizer is not None else "", tokens=out[i],
            prompt_tokens=int(ids[i].numel()), layer_budgets=layer_b.tolist(), events=events[i],
            cache_tokens=held[i], full_tokens=full[i], held_tokens=held_tokens, held_full_tokens=L * Hk * next_pos,
            cache_bytes=held_tokens * 2 * cfg.head_dim * elem, full_bytes=2 * L * Hk * next_pos * cfg.head_dim * elem,
            seconds=seconds,
            settings=R.run_settings(budget=budget, allocator=allocator, policy=policy, interval=interval,
                                  window=window, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                  seed=seeds[i], chat=chat, packed=True, layer_options=layer_options,
                                  head_options=head_options, policy_options=policy_options, profile=profile),
            prompt_ids=ids[i].tolist()))
    return results


# ----------------------------------------------------------------------------------------------
# 4. The CLI: reasonalloc.py's main job on this path


def main(args):
    R.main(args, generate_fn=generate, load_fn=load_model)


def parser():
    return R.parser("The main job of reasonalloc.py (the same flags) on the packed fast path: the cache packed per "
                    "layer, its heads scored and cut in batches, the weights laid out for a one-row product. It "
                    "gives the tokens of the per-head reference (tested), faster.")


if __name__ == "__main__":
    R.cli(main, parser)
