"""The packed fast path: the reference per-head cache, policies and selection, batched over the KV heads
of a layer, plus a static decode step replayed from a CUDA graph. Every piece equals a reference function
(named in its docstring); the parity tests in test_reasonalloc.py are this file's spec.

Legend:
    L   layers              Hq  query heads          Hk  key/value heads
    G   Hq // Hk (GQA group) D   head dim             T   tokens in one head's cache
    w   observation window (newest tokens, always kept)
    S   rows of a layer's padded storage that hold tokens (its longest head)

reasonalloc.generate(..., packed=True) (`--fast` on the CLI) runs generation on this path;
reasonalloc.generate_batch runs many sequences at once on a BatchCache.
"""

from __future__ import annotations

import dataclasses
import math
import time

import torch
import torch.nn.functional as F

import evict
from model import HeadCache, ModelConfig, Transformer, check_context

# ----------------------------------------------------------------------------------------------
# The cache


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
    # at capacity 1283 against 1280; README, "GPU"). 1 elsewhere: the eager path's masks are built per call.
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
            # one long cache over many blocks (README, "GPU": our compiled FullKV at 32k went from 30 % to 68 % of
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
                b.k[l][heads, :t], b.v[l][heads, :t], b.pos[l][heads, :t] = c.k[l][:, :t], c.v[l][:, :t], c.pos[l][:, :t]
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
# Scores and selection, batched over the heads of a layer (head h holds rows [0, n_h) of (Hk, S, D))


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
