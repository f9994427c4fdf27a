"""A from-scratch Llama / Qwen2 / Qwen3 forward pass over an explicit per-head KV cache.

Legend (used in every module of this project):
    L   layers              Hq  query heads          Hk  key/value heads
    G   Hq // Hk (GQA group) D   head dim             T   tokens in one head's cache
    w   observation window (newest tokens, always kept)
    B   average budget per KV head, in tokens

The cache is the point of this file: `cache[l][h]` is KV head h of layer l, holding its own keys,
values and absolute positions. After head-wise eviction the heads of one layer hold different numbers
of tokens, and attention below is written per KV head so that this costs nothing to support.

Run it:  python model.py --prompt "What is 17 * 23?"   (full cache, greedy, streams the text)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")


# ----------------------------------------------------------------------------------------------
# Config


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # rope_type: "default", "linear" or "llama3"; the scaling numbers live in rope_scaling as a
    # sorted tuple of (key, value) pairs so the dataclass stays frozen and hashable.
    rope_type: str = "default"
    rope_scaling: tuple = ()
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2 always; Llama / Qwen3 when attention_bias is set
    o_bias: bool = False  # Llama / Qwen3 with attention_bias (Qwen2 never biases o_proj)
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on each q and k head, before RoPE
    bos_token_id: int | None = None
    eos_token_ids: tuple = ()
    config_hash: str = ""  # sha256 of the config.json contents, for profile identity

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported model_type {self.model_type!r}; this project runs "
                f"{', '.join(SUPPORTED_MODEL_TYPES)} checkpoints"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ValueError(f"config field {name} must be a positive integer, got {getattr(self, name)!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for rotary embeddings")
        if self.rope_type not in ("default", "linear", "llama3"):
            raise ValueError(f"unsupported rope type {self.rope_type!r}; supported: default, linear, llama3")

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_hf(cls, path_or_dict) -> "ModelConfig":
        """Read a Hugging Face config.json (a folder, the file itself, or an already parsed dict)."""
        if isinstance(path_or_dict, dict):
            cfg, raw = path_or_dict, json.dumps(path_or_dict, sort_keys=True).encode()
            gen = {}
        else:
            path = Path(path_or_dict)
            file = path / "config.json" if path.is_dir() else path
            if not file.is_file():
                raise FileNotFoundError(f"no config.json in {path}: pass a Hugging Face model folder")
            raw = file.read_bytes()
            try:
                cfg = json.loads(raw)
            except json.JSONDecodeError as e:
                raise ValueError(f"{file} is not valid JSON: {e}") from None
            gen_file = file.parent / "generation_config.json"
            gen = json.loads(gen_file.read_text()) if gen_file.is_file() else {}
        if not isinstance(cfg, dict):
            raise ValueError("config.json must hold a JSON object")

        model_type = cfg.get("model_type")
        if model_type is None:
            raise ValueError("config.json has no model_type; expected one of " + ", ".join(SUPPORTED_MODEL_TYPES))
        if model_type not in SUPPORTED_MODEL_TYPES:
            arch = ", ".join(cfg.get("architectures") or [])
            raise ValueError(f"unsupported model_type {model_type!r}{f' ({arch})' if arch else ''}; this project "
                             f"runs {', '.join(SUPPORTED_MODEL_TYPES)} checkpoints")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {cfg['hidden_act']!r} is not supported (only silu / SwiGLU)")
        if cfg.get("use_sliding_window", False):
            raise ValueError("sliding-window attention (use_sliding_window=true) is not supported")

        def need(key):
            if key not in cfg:
                raise ValueError(f"config.json is missing the field {key!r}")
            return cfg[key]

        num_heads = need("num_attention_heads")
        hidden = need("hidden_size")
        # Qwen3 sets head_dim apart from hidden_size / num_heads, so read it when it is there.
        head_dim = cfg.get("head_dim") or hidden // num_heads

        # Two layouts in use: older top-level rope_theta + rope_scaling, newer rope_parameters.
        rope = dict(cfg.get("rope_parameters") or {})
        if not rope and cfg.get("rope_scaling"):
            rope = dict(cfg["rope_scaling"])
        theta = rope.pop("rope_theta", None) or cfg.get("rope_theta", 10000.0)
        rope_type = rope.pop("rope_type", None) or rope.pop("type", None) or "default"
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError("partial rotary embeddings are not supported")
        rope.pop("partial_rotary_factor", None)

        eos = gen.get("eos_token_id", cfg.get("eos_token_id"))
        eos = () if eos is None else tuple(eos) if isinstance(eos, list) else (eos,)
        bias = bool(cfg.get("attention_bias", False))
        return cls(
            model_type=model_type,
            vocab_size=need("vocab_size"),
            hidden_size=hidden,
            intermediate_size=need("intermediate_size"),
            num_layers=need("num_hidden_layers"),
            num_heads=num_heads,
            num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_type=rope_type,
            rope_scaling=tuple(sorted((k, v) for k, v in rope.items() if v is not None)),
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=bias or model_type == "qwen2",
            o_bias=bias and model_type != "qwen2",
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            qk_norm=model_type == "qwen3",
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos,
            config_hash=hashlib.sha256(raw).hexdigest()[:16],
        )


# ----------------------------------------------------------------------------------------------
# The explicit per-head KV cache


@dataclass
class HeadCache:
    """One KV head's cache: keys (post-RoPE), values and absolute positions, row-aligned."""
    k: torch.Tensor  # (T, D)
    v: torch.Tensor  # (T, D)
    pos: torch.Tensor  # (T,) long, ascending


class KVCache:
    """cache[l][h] -> HeadCache. Also keeps, per layer, the post-RoPE queries of the last `window`
    tokens (`q_win[l]: (Hq, w, D)`), which is the observation window the eviction policies read."""

    def __init__(self, config: ModelConfig, window: int = 8, *, dtype=torch.float32, device="cpu"):
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.config, self.window = config, window
        D = config.head_dim
        empty = lambda *shape, dt=dtype: torch.empty(*shape, dtype=dt, device=device)  # noqa: E731
        self.layers = [
            [HeadCache(empty(0, D), empty(0, D), empty(0, dt=torch.long)) for _ in range(config.num_kv_heads)]
            for _ in range(config.num_layers)
        ]
        self.q_win = [empty(config.num_heads, 0, D) for _ in range(config.num_layers)]
        self.next_pos = 0  # absolute position of the next token to be appended

    def __getitem__(self, layer: int) -> list[HeadCache]:
        return self.layers[layer]

    def __len__(self) -> int:
        return len(self.layers)

    def lengths(self) -> torch.Tensor:
        """(L, Hk) number of tokens each head holds."""
        return torch.tensor([[len(h.pos) for h in layer] for layer in self.layers], dtype=torch.long)

    def window_queries(self, layer: int, kv_head: int) -> torch.Tensor:
        """(G, w, D): the window queries of the G query heads that share `kv_head`."""
        G = self.config.group_size
        return self.q_win[layer][kv_head * G:(kv_head + 1) * G]

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor, q: torch.Tensor, pos: torch.Tensor):
        """Append T new tokens to every head of `layer`. k, v: (T, Hk, D); q: (T, Hq, D); pos: (T,)."""
        for h, head in enumerate(self.layers[layer]):
            head.k = torch.cat([head.k, k[:, h]])
            head.v = torch.cat([head.v, v[:, h]])
            head.pos = torch.cat([head.pos, pos])
        self.q_win[layer] = torch.cat([self.q_win[layer], q.transpose(0, 1)], dim=1)[:, -self.window:]

    def nbytes(self) -> int:
        return sum(h.k.nbytes + h.v.nbytes for layer in self.layers for h in layer)

    def attend(self, layer: int, q: torch.Tensor, q_pos: torch.Tensor) -> torch.Tensor:
        """(T, Hq, D) attention output of `layer`. Query head j reads KV head j // G, as llama2.c's
        `h / kv_mul`; one call per KV head serves its whole group, and each head may hold a different
        number of tokens."""
        G = self.config.group_size
        return torch.cat([attend(q[:, h * G:(h + 1) * G], q_pos, head) for h, head in enumerate(self.layers[layer])],
                         dim=1)


class PackedCache:
    """The fast path: the same per-head caches, packed per layer into padded storage.

    k[l], v[l]: (Hk, capacity, D); pos[l]: (Hk, capacity). Head h of layer l holds rows [0, n[l, h]),
    oldest first: the same rows in the same order as KVCache's cache[l][h], so policies and selection give
    the same answer on both (test_reasonalloc checks it). Appends write in place into spare capacity;
    when it runs out, the storage grows to the needed length plus `spare` rows (set it to the compression
    interval and a compressed cache never reallocates between compressions). Compression packs the kept
    rows to the front and trims the capacity to the longest head plus 1.5 `spare` (reusing the storage
    while it stays between 1 and 2 `spare` above the longest head), so the memory held is the budgeted
    tokens plus 1 to 2 intervals, padded to the longest head of each layer."""

    packed = True
    static = False  # GraphDecoder's mode: fixed shapes, lengths only on the device (see there)

    def __init__(self, config: ModelConfig, window: int = 8, *, dtype=torch.float32, device="cpu",
                 spare: int = 128):
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.config, self.window, self.spare = config, window, max(int(spare), 1)
        L, Hk, D = config.num_layers, config.num_kv_heads, config.head_dim
        self.k = [torch.empty(Hk, 0, D, dtype=dtype, device=device) for _ in range(L)]
        self.v = [torch.empty(Hk, 0, D, dtype=dtype, device=device) for _ in range(L)]
        self.pos = [torch.empty(Hk, 0, dtype=torch.long, device=device) for _ in range(L)]
        self.n = torch.zeros(L, Hk, dtype=torch.long)  # tokens held, on the CPU (no device sync to read)
        self.n_dev = [torch.zeros(Hk, dtype=torch.long, device=device) for _ in range(L)]  # the same, on device
        self.q_win = [torch.empty(config.num_heads, 0, D, dtype=dtype, device=device) for _ in range(L)]
        self.next_pos = 0
        self.heads = torch.arange(Hk, device=device)  # (Hk,) for the per-head scatter of an append

    def __len__(self) -> int:
        return self.config.num_layers

    def lengths(self) -> torch.Tensor:
        return self.n.clone()

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
        G = self.config.group_size
        return self.q_win[layer][kv_head * G:(kv_head + 1) * G]

    def _reserve(self, layer: int, rows: int):
        cap = self.k[layer].shape[1]
        if rows <= cap:
            return
        new = rows + self.spare
        for name in ("k", "v", "pos"):
            old = getattr(self, name)[layer]
            buf = old.new_zeros(old.shape[0], new, *old.shape[2:])
            buf[:, :cap] = old
            getattr(self, name)[layer] = buf

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor, q: torch.Tensor, pos: torch.Tensor):
        """Append T new tokens to every head of `layer`. k, v: (T, Hk, D); q: (T, Hq, D); pos: (T,)."""
        K, V, P = self.k[layer], self.v[layer], self.pos[layer]
        if self.static:  # one token, scattered at each head's length; nothing read back to the host
            heads, rows = self.heads, self.n_dev[layer]
            K[heads, rows], V[heads, rows], P[heads, rows] = k[0], v[0], pos.expand(K.shape[0])
            self.n_dev[layer] += 1
            qw = self.q_win[layer]
            qw.copy_(torch.cat([qw[:, 1:], q.transpose(0, 1)], dim=1))
            return
        T, n = k.shape[0], self.n[layer]
        self._reserve(layer, int(n.max()) + T)
        K, V, P = self.k[layer], self.v[layer], self.pos[layer]
        if not self.ragged(layer):  # every head at the same length: one slice write
            t = int(n[0])
            K[:, t:t + T], V[:, t:t + T], P[:, t:t + T] = k.transpose(0, 1), v.transpose(0, 1), pos
        elif T == 1:  # decode after head-wise compression: one scatter at each head's own end
            heads, rows = self.heads, self.n_dev[layer]
            K[heads, rows], V[heads, rows], P[heads, rows] = k[0], v[0], pos
        else:
            for h in range(K.shape[0]):
                t = int(n[h])
                K[h, t:t + T], V[h, t:t + T], P[h, t:t + T] = k[:, h], v[:, h], pos
        self.n[layer] += T
        self.n_dev[layer] += T
        self.q_win[layer] = torch.cat([self.q_win[layer], q.transpose(0, 1)], dim=1)[:, -self.window:]

    def attend(self, layer: int, q: torch.Tensor, q_pos: torch.Tensor) -> torch.Tensor:
        """(T, Hq, D): all heads of `layer` in one batched call, padding masked out."""
        T, Hq, D = q.shape
        Hk = self.config.num_kv_heads
        G = Hq // Hk
        S = self.k[layer].shape[1] if self.static else int(self.n[layer].max())
        K, V = self.k[layer][:, :S], self.v[layer][:, :S]  # (Hk, S, D)
        qh = q.view(T, Hk, G, D).permute(1, 2, 0, 3).reshape(Hk, G * T, D)  # (Hk, G·T, D), g major
        att = torch.matmul(qh, K.transpose(1, 2)).float() / math.sqrt(D)  # (Hk, G·T, S)
        mask = None
        if self.static or self.ragged(layer):  # rows past a head's length are padding
            mask = torch.arange(S, device=K.device)[None, :] < self.n_dev[layer][:, None]  # (Hk, S)
            mask = mask[:, None, :]
        if T > 1:  # causal by absolute position, as the reference
            causal = self.pos[layer][:, None, :S] <= q_pos.repeat(G)[None, :, None]  # (Hk, G·T, S)
            mask = causal if mask is None else mask & causal
        if mask is not None:
            att = att.masked_fill(~mask, float("-inf"))
        att = torch.softmax(att, dim=-1).to(V.dtype)  # softmax in float32
        y = torch.matmul(att, V)  # (Hk, G·T, D)
        return y.view(Hk, G, T, D).permute(2, 0, 1, 3).reshape(T, Hq, D)

    def keep(self, layer: int, rows: torch.Tensor, counts: torch.Tensor):
        """Compress `layer` in place: rows (Hk, m) ascending row indices (padded past counts[h]),
        counts (Hk,) how many each head keeps. Packs them to the front and trims the capacity."""
        m = rows.shape[1]
        idx = rows.to(self.k[layer].device)
        D = self.k[layer].shape[2]
        k = torch.gather(self.k[layer], 1, idx[:, :, None].expand(-1, -1, D))
        v = torch.gather(self.v[layer], 1, idx[:, :, None].expand(-1, -1, D))
        p = torch.gather(self.pos[layer], 1, idx)
        cap = self.k[layer].shape[1]
        if not m + self.spare <= cap <= m + 2 * self.spare:
            # Trim (or grow) to the kept rows plus `spare`, plus half a `spare` of slack so the next
            # compression, whose longest head may differ by a few rows, can reuse the storage.
            cap = m + self.spare + self.spare // 2
            self.k[layer] = k.new_zeros(k.shape[0], cap, D)
            self.v[layer] = v.new_zeros(v.shape[0], cap, D)
            self.pos[layer] = p.new_zeros(p.shape[0], cap)
        # else: already within one spare of that size, so reuse the storage in place; its address stays,
        # and a captured CUDA graph (GraphDecoder) stays valid across the compression.
        self.k[layer][:, :m], self.v[layer][:, :m], self.pos[layer][:, :m] = k, v, p
        self.n[layer] = counts.cpu()
        self.n_dev[layer].copy_(counts)

    def nbytes(self) -> int:
        """K and V bytes held by the heads (padding excluded, to compare with KVCache.nbytes())."""
        return int(self.n.sum()) * 2 * self.config.head_dim * self.k[0].element_size()

    def allocated_bytes(self) -> int:
        """K and V bytes of the storage, padding and spare capacity included."""
        return sum(k.nbytes + v.nbytes for k, v in zip(self.k, self.v))


# ----------------------------------------------------------------------------------------------
# Layers


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Normalise in float32 (as the reference implementations do), scale in the model dtype.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """(D/2,) inverse frequencies, with Llama-3's frequency-dependent scaling when configured."""
    D = config.head_dim
    inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, D, 2, dtype=torch.float32) / D)
    s = dict(config.rope_scaling)
    if config.rope_type == "linear":
        inv_freq = inv_freq / s["factor"]
    elif config.rope_type == "llama3":
        # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band between
        # the two cut-offs blended linearly in 1 / wavelength.
        factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old_ctx = s.get("original_max_position_embeddings", config.max_position_embeddings)
        wavelen = 2 * math.pi / inv_freq
        blend = ((old_ctx / wavelen - lo) / (hi - lo)).clamp(0.0, 1.0)  # 0 = fully scaled, 1 = kept
        inv_freq = (1 - blend) * inv_freq / factor + blend * inv_freq
    return inv_freq


def rope_cos_sin(pos: torch.Tensor, inv_freq: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, 1, D) cos and sin of the rotation angles pos·inv_freq; computed once per forward pass and
    shared by every layer."""
    freqs = pos.to(torch.float32)[:, None] * inv_freq[None, :]  # (T, D/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (T, D)
    return emb.cos().to(dtype)[:, None, :], emb.sin().to(dtype)[:, None, :]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (T, H, D). Rotate-half RoPE, the Hugging Face layout: dimension i pairs with
    i + D/2. Checkpoints in HF layout need no permutation of q/k weights; feeding permuted
    (interleaved, Meta / llama.cpp) weights here is the classic bug that answers the first few
    tokens right and then degrades."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def attend(q: torch.Tensor, q_pos: torch.Tensor, head: HeadCache) -> torch.Tensor:
    """Causal attention of G query heads over one KV head's cache.

    q: (T, G, D), q_pos: (T,) -> (T, G, D). The mask is by absolute position (a key is visible to a
    query at an equal or later position), so it is right whatever tokens were evicted."""
    D = q.shape[-1]
    att = torch.einsum("tgd,sd->tgs", q, head.k).float() / math.sqrt(D)  # (T, G, S)
    visible = head.pos[None, :] <= q_pos[:, None]  # (T, S)
    att = att.masked_fill(~visible[:, None, :], float("-inf"))
    att = torch.softmax(att, dim=-1).to(head.v.dtype)  # softmax in float32
    return torch.einsum("tgs,sd->tgd", att, head.v)


class Attention(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.c = c
        self.wq = nn.Linear(c.hidden_size, c.num_heads * c.head_dim, bias=c.qkv_bias)
        self.wk = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=c.qkv_bias)
        self.wv = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=c.qkv_bias)
        self.wo = nn.Linear(c.num_heads * c.head_dim, c.hidden_size, bias=c.o_bias)
        if c.qk_norm:
            self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps)
            self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps)

    def forward(self, x, pos, rope, cache: KVCache, layer: int):
        T, c = x.shape[0], self.c
        q = self.wq(x).view(T, c.num_heads, c.head_dim)  # (T, Hq, D)
        k = self.wk(x).view(T, c.num_kv_heads, c.head_dim)  # (T, Hk, D)
        v = self.wv(x).view(T, c.num_kv_heads, c.head_dim)  # (T, Hk, D)
        if c.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        cache.append(layer, k, v, q, pos)
        y = cache.attend(layer, q, pos)  # (T, Hq, D): per head (KVCache) or batched (PackedCache)
        return self.wo(y.reshape(T, c.num_heads * c.head_dim))


class MLP(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.w_gate = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.w_up = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.w_down = nn.Linear(c.intermediate_size, c.hidden_size, bias=c.mlp_bias)

    def forward(self, x):
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))  # SwiGLU


class Block(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.attn = Attention(c)
        self.mlp_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = MLP(c)

    def forward(self, x, pos, rope, cache, layer):
        x = x + self.attn(self.attn_norm(x), pos, rope, cache, layer)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)

    def new_cache(self, window: int = 8, *, packed: bool = False, spare: int = 128):
        """The reference per-head KVCache, or with packed=True the fast PackedCache (tested equal)."""
        p = self.embed.weight
        if packed:
            return PackedCache(self.config, window, dtype=p.dtype, device=p.device, spare=spare)
        return KVCache(self.config, window, dtype=p.dtype, device=p.device)

    def forward(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """tokens: (T,) -> logits (T, vocab) in float32; appends the T tokens to `cache`
        (a prefill when the cache is empty, a decode step when T == 1)."""
        if tokens.dim() != 1:
            raise ValueError(f"tokens must be a 1-D tensor of ids (batch size is 1), got shape {tuple(tokens.shape)}")
        T = tokens.shape[0]
        end = cache.next_pos + T
        if end > self.config.max_position_embeddings:
            raise ValueError(
                f"sequence of {end} tokens exceeds the model's context of "
                f"{self.config.max_position_embeddings} (max_position_embeddings); use a shorter prompt "
                f"or fewer new tokens"
            )
        pos = torch.arange(cache.next_pos, end, device=tokens.device)  # (T,)
        logits = self.run(tokens, pos, cache)
        cache.next_pos = end
        return logits

    def run(self, tokens: torch.Tensor, pos: torch.Tensor, cache) -> torch.Tensor:
        """The forward pass proper, positions given as a tensor (GraphDecoder replays it)."""
        x = self.embed(tokens)  # (T, d)
        rope = rope_cos_sin(pos, self.inv_freq, x.dtype)  # (T, 1, D) cos, sin
        for layer, block in enumerate(self.blocks):
            x = block(x, pos, rope, cache, layer)
        return self.lm_head(self.norm(x)).float()


class GraphDecoder:
    """One-token decode steps over a PackedCache, replayed from a CUDA graph.

    Eager decode of a batch-1 model is bound by the host launching ~45 small kernels per layer, not
    by the GPU. Here the step runs in the cache's static mode: attention spans the whole capacity with
    the length mask, the new token is scattered at each head's length, and the window queries roll in
    place, so every tensor keeps its shape and address from step to step and the step can be captured
    once and replayed. A compression (or a capacity growth) moves the storage and triggers a new
    capture. On CPU there are no graphs: the same static step runs eagerly (which is what the parity
    test checks)."""

    def __init__(self, model: "Transformer", cache: PackedCache):
        if not getattr(cache, "packed", False):
            raise ValueError("GraphDecoder needs a PackedCache: model.new_cache(window, packed=True)")
        dev = model.embed.weight.device
        self.model, self.cache = model, cache
        self.token = torch.zeros(1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)
        self.use_graph = dev.type == "cuda"
        self.graph, self.layout, self.logits, self.captures = None, None, None, 0

    def _step(self) -> torch.Tensor:
        self.cache.static = True
        try:
            return self.model.run(self.token, self.pos, self.cache)
        finally:
            self.cache.static = False

    def _capture(self):
        c = self.cache
        saved_n, saved_q = [n.clone() for n in c.n_dev], [q.clone() for q in c.q_win]
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
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._step()
        self.captures += 1

    def __call__(self, token) -> torch.Tensor:
        """Append `token` (an int or a 1-element tensor) and return the (1, vocab) float32 logits."""
        c = self.cache
        if c.next_pos + 1 > c.config.max_position_embeddings:
            raise ValueError(f"sequence exceeds the model's context of {c.config.max_position_embeddings} tokens")
        if c.q_win[0].shape[1] < c.window:
            raise ValueError(f"GraphDecoder needs at least window = {c.window} tokens in the cache first")
        for layer in range(len(c)):
            c._reserve(layer, int(c.n[layer].max()) + 2)  # room for this step (and a warm-up step)
        self.token.copy_(torch.as_tensor(token).view(1))
        self.pos.fill_(c.next_pos)
        if self.use_graph:
            layout = tuple(t.data_ptr() for t in (*c.k, *c.v, *c.pos, *c.n_dev, *c.q_win))
            if layout != self.layout:
                self._capture()
                self.layout = layout
            self.graph.replay()
            logits = self.logits
        else:
            logits = self._step()
        c.n += 1
        c.next_pos += 1
        return logits


# ----------------------------------------------------------------------------------------------
# Loading: a strict map from Hugging Face checkpoint names to our parameters


def weight_map(c: ModelConfig) -> dict[str, str]:
    """{checkpoint tensor name: parameter name in Transformer}. Exactly these tensors must be present."""
    m = {"model.embed_tokens.weight": "embed.weight", "model.norm.weight": "norm.weight"}
    if not c.tie_word_embeddings:
        m["lm_head.weight"] = "lm_head.weight"
    for i in range(c.num_layers):
        hf, me = f"model.layers.{i}.", f"blocks.{i}."
        m[hf + "input_layernorm.weight"] = me + "attn_norm.weight"
        m[hf + "post_attention_layernorm.weight"] = me + "mlp_norm.weight"
        for hf_name, my_name, bias in (("q_proj", "wq", c.qkv_bias), ("k_proj", "wk", c.qkv_bias),
                                       ("v_proj", "wv", c.qkv_bias), ("o_proj", "wo", c.o_bias)):
            m[f"{hf}self_attn.{hf_name}.weight"] = f"{me}attn.{my_name}.weight"
            if bias:
                m[f"{hf}self_attn.{hf_name}.bias"] = f"{me}attn.{my_name}.bias"
        if c.qk_norm:
            m[hf + "self_attn.q_norm.weight"] = me + "attn.q_norm.weight"
            m[hf + "self_attn.k_norm.weight"] = me + "attn.k_norm.weight"
        for hf_name, my_name in (("gate_proj", "w_gate"), ("up_proj", "w_up"), ("down_proj", "w_down")):
            m[f"{hf}mlp.{hf_name}.weight"] = f"{me}mlp.{my_name}.weight"
            if c.mlp_bias:
                m[f"{hf}mlp.{hf_name}.bias"] = f"{me}mlp.{my_name}.bias"
    return m


def safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise FileNotFoundError(f"{index} lists shards that are not there: {', '.join(missing)}")
        return [path / s for s in shards]
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    if list(path.glob("*.bin")) or list(path.glob("*.pt")) or list(path.glob("*.pth")):
        raise ValueError(
            f"{path} holds only pickle checkpoints (.bin/.pt); they can run arbitrary code when loaded, "
            f"so only .safetensors is read. Convert with: python -c \"import torch; from safetensors.torch "
            f"import save_file; save_file(torch.load('pytorch_model.bin'), 'model.safetensors')\" after "
            f"checking that you trust the file"
        )
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path}")


def load_model(path, dtype=torch.float32, device="cpu") -> Transformer:
    """Build on the meta device (no memory), then assign the checkpoint's tensors in place."""
    from safetensors import safe_open

    path = Path(path)
    config = ModelConfig.from_hf(path)
    files = safetensors_files(path)
    with torch.device("meta"):
        model = Transformer(config)
    names = weight_map(config)
    params = dict(model.named_parameters(remove_duplicate=False))
    state, unexpected = {}, []
    for file in files:
        with safe_open(file, framework="pt", device=str(device)) as f:
            for key in f.keys():
                if key in names:
                    state[names[key]] = f.get_tensor(key).to(dtype)
                elif key == "lm_head.weight" and config.tie_word_embeddings:
                    continue  # some exports save the tied head too; it is the embedding again
                else:
                    unexpected.append(key)
    missing = sorted(k for k, v in names.items() if v not in state)
    if missing or unexpected:
        raise ValueError(
            f"checkpoint in {path} does not match its config ({config.model_type}, {config.num_layers} layers): "
            + (f"missing tensors: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}. " if missing else "")
            + (f"unexpected tensors: {', '.join(unexpected[:8])}{' ...' if len(unexpected) > 8 else ''}."
               if unexpected else "")
        )
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(params[name].shape):
            raise ValueError(f"tensor for {name} has shape {tuple(tensor.shape)}, config expects "
                             f"{tuple(params[name].shape)}")
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed.weight
    model.inv_freq = rope_inv_freq(config).to(device)
    return model.eval()


# ----------------------------------------------------------------------------------------------
# Tokenizer and chat prompts


class Tokenizer:
    """A `tokenizers.Tokenizer` plus what generation needs from tokenizer_config.json: the special
    tokens and the chat template."""

    def __init__(self, path):
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            raise FileNotFoundError(f"no tokenizer.json in {path}")
        self.tok = HFTokenizer.from_file(str(path / "tokenizer.json"))
        cfg_file = path / "tokenizer_config.json"
        cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
        token = lambda t: t.get("content") if isinstance(t, dict) else t  # noqa: E731
        self.bos_token, self.eos_token = token(cfg.get("bos_token")), token(cfg.get("eos_token"))
        self.chat_template = cfg.get("chat_template")
        if isinstance(self.chat_template, list):  # a list of named templates: take "default"
            self.chat_template = next((t["template"] for t in self.chat_template if t.get("name") == "default"), None)
        self.add_bos = bool(cfg.get("add_bos_token", False))

    @property
    def eos_token_id(self):
        return None if self.eos_token is None else self.tok.token_to_id(self.eos_token)

    def encode(self, text: str) -> list[int]:
        # Special tokens written in the text (from a chat template) are parsed as such.
        ids = self.tok.encode(text, add_special_tokens=False).ids
        bos = None if self.bos_token is None else self.tok.token_to_id(self.bos_token)
        return [bos] + ids if self.add_bos and bos is not None and ids[:1] != [bos] else ids

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def render_chat(self, prompt: str, system: str | None = None) -> str:
        """The prompt as the model's own chat template renders it (a sandboxed Jinja environment, as
        transformers does); without a template, a plain "User: / Assistant:" layout."""
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        if not self.chat_template:
            return "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages) + "Assistant:"
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(msg):
            raise ValueError(f"chat template error: {msg}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        env.filters["tojson"] = lambda x, **kw: json.dumps(x, ensure_ascii=False, **kw)
        return env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=True, bos_token=self.bos_token or "",
            eos_token=self.eos_token or "")


def load_tokenizer(path) -> Tokenizer:
    return Tokenizer(path)


def stop_ids(config: ModelConfig, tokenizer: Tokenizer) -> set[int]:
    ids = set(config.eos_token_ids)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


class TextStream:
    """Prints generated text as it comes, decoding the whole tail so multi-byte characters that span
    tokens are printed only once complete."""

    def __init__(self, tokenizer: Tokenizer, out=sys.stdout):
        self.tokenizer, self.out, self.ids, self.printed = tokenizer, out, [], 0

    def put(self, token: int):
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if not text.endswith("\ufffd"):
            self.out.write(text[self.printed:])
            self.out.flush()
            self.printed = len(text)


def encode_prompt(tokenizer: Tokenizer, config: ModelConfig, prompt: str, *, chat: bool = True,
                  max_new_tokens: int = 0) -> torch.Tensor:
    """The prompt as (T,) ids, rendered with the chat template; checks it fits the context."""
    text = tokenizer.render_chat(prompt) if chat else prompt
    ids = tokenizer.encode(text)
    check_context(config, len(ids), max_new_tokens)
    return torch.tensor(ids, dtype=torch.long)


def check_context(config: ModelConfig, prompt_tokens: int, max_new_tokens: int):
    if prompt_tokens == 0:
        raise ValueError("the prompt is empty")
    if prompt_tokens + max_new_tokens > config.max_position_embeddings:
        raise ValueError(
            f"prompt of {prompt_tokens} tokens + {max_new_tokens} new tokens exceeds the model's context of "
            f"{config.max_position_embeddings} tokens; shorten the prompt or lower --max-new-tokens")


def resolve_model_dir(model: str | None) -> Path:
    """--model DIR, or the embedded default model (converted on first use)."""
    if model:
        return Path(model)
    from convert import default_model_dir

    return default_model_dir()


@torch.inference_mode()
def generate_full(model: Transformer, tokenizer: Tokenizer, prompt: str, *, max_new_tokens=256,
                  chat=True, stream=None) -> list[int]:
    """Greedy decoding with the full cache (the FullKV reference)."""
    ids = encode_prompt(tokenizer, model.config, prompt, chat=chat, max_new_tokens=max_new_tokens)
    cache, stops, out = model.new_cache(), stop_ids(model.config, tokenizer), []
    logits = model(ids.to(model.embed.weight.device), cache)
    for _ in range(max_new_tokens):
        token = int(logits[-1].argmax())
        if token in stops:
            break
        out.append(token)
        if stream:
            stream.put(token)
        logits = model(torch.tensor([token], device=ids.device), cache)
    return out


def main(args):
    path = resolve_model_dir(args.model)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    model, tokenizer = load_model(path, dtype=dtype, device=args.device), load_tokenizer(path)
    out = generate_full(model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens,
                        chat=not args.no_chat, stream=TextStream(tokenizer))
    print(f"\n[{len(out)} tokens, full cache]", file=sys.stderr)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="Greedy generation with the full KV cache (the FullKV reference).")
    p.add_argument("--prompt", required=True, help="user message; rendered with the model's chat template")
    p.add_argument("--model", help="Hugging Face model folder (llama / qwen2 / qwen3, safetensors); "
                                   "default: the embedded SmolLM2-135M-Instruct, converted on first use")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--no-chat", action="store_true", help="feed the prompt as raw text, without the chat template")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--device", default="cpu")
    main(p.parse_args())
