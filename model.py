"""A from-scratch Llama / Qwen2 / Qwen3 forward pass over an explicit per-head KV cache.

Legend (used in every module of this project):
    L   layers              Hq  query heads          Hk  key/value heads
    G   Hq // Hk (GQA group) D   head dim             T   tokens in one head's cache
    w   observation window (newest tokens, always kept)
    B   average budget per KV head, in tokens

The cache is the point of this file: `cache[l][h]` is KV head h of layer l, holding its own keys,
values and absolute positions. After head-wise eviction the heads of one layer hold different numbers
of tokens, and attention below is written per KV head so that this costs nothing to support.
The story, top to bottom: config -> the per-head cache -> RMSNorm -> RoPE -> attention -> MLP ->
block -> transformer -> strict safetensors loading -> the decode loop and FullKV generation -> CLI.

Run it:  python model.py --prompt "What is 17 * 23?"   (full cache, greedy, streams the text)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
os.environ.setdefault("GOMP_SPINCOUNT", "1000")  # before torch loads OpenMP: idle threads soon yield the core

import torch
import torch.nn as nn
import torch.nn.functional as F

from convert import check_device, rebuild_hint, resolve_model_dir, safetensors_files
from tokenizer import TextStream, Tokenizer, load_tokenizer, read_json_object

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}  # the --dtype choices of every CLI


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
            gen = read_json_object(file.parent / "generation_config.json")
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
        for key, value in (("num_attention_heads", num_heads), ("hidden_size", hidden)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"config.json field {key} must be a positive integer, got {value!r}")
        # Qwen3 sets head_dim apart from hidden_size / num_heads, so read it when it is there.
        head_dim = cfg.get("head_dim") or hidden // num_heads

        # Two layouts in use: older top-level rope_theta + rope_scaling, newer rope_parameters.
        for key in ("rope_parameters", "rope_scaling"):
            if cfg.get(key) is not None and not isinstance(cfg[key], dict):
                raise ValueError(f"config.json field {key} must be a JSON object like "
                                 f'{{"rope_type": "linear", "factor": 2.0}}, got {cfg[key]!r}')
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
            model_type=model_type, vocab_size=need("vocab_size"), hidden_size=hidden,
            intermediate_size=need("intermediate_size"), num_layers=need("num_hidden_layers"),
            num_heads=num_heads, num_kv_heads=cfg.get("num_key_value_heads") or num_heads, head_dim=head_dim,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6), rope_theta=float(theta), rope_type=rope_type,
            rope_scaling=tuple(sorted((k, v) for k, v in rope.items() if v is not None)),
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=bias or model_type == "qwen2", o_bias=bias and model_type != "qwen2",
            mlp_bias=bool(cfg.get("mlp_bias", False)), qk_norm=model_type == "qwen3",
            bos_token_id=cfg.get("bos_token_id"), eos_token_ids=eos,
            config_hash=hashlib.sha256(raw).hexdigest()[:16],
        )


def check_context(config: ModelConfig, tokens: int, new_tokens: int = 0):
    """The one context check: a non-empty sequence whose tokens plus new_tokens fit max_position_embeddings."""
    if tokens <= 0:
        raise ValueError("the prompt is empty")
    if new_tokens < 0:
        raise ValueError(f"the number of new tokens must be >= 0, got {new_tokens} (--max-new-tokens)")
    if tokens + new_tokens > config.max_position_embeddings:
        more = f" + {new_tokens} new tokens" if new_tokens else ""
        raise ValueError(f"a sequence of {tokens} tokens{more} exceeds the model's context of "
                         f"{config.max_position_embeddings} tokens (max_position_embeddings); shorten the prompt or "
                         f"lower --max-new-tokens")


# ----------------------------------------------------------------------------------------------
# The explicit per-head KV cache


@dataclass
class HeadCache:
    """One KV head's cache: keys (post-RoPE), values and absolute positions, row-aligned."""
    k: torch.Tensor  # (T, D)
    v: torch.Tensor  # (T, D)
    pos: torch.Tensor  # (T,) long, ascending


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


class KVCache:
    """cache[l][h] -> HeadCache. Also keeps, per layer, the post-RoPE queries of the last `window`
    tokens (`q_win[l]: (Hq, w, D)`), which is the observation window the eviction policies read."""

    def __init__(self, config: ModelConfig, window: int = 8, *, dtype=torch.float32, device="cpu"):
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.config, self.window = config, window
        D = config.head_dim
        empty = lambda *shape, dt=dtype: torch.empty(*shape, dtype=dt, device=device)  # noqa: E731
        self.layers = [[HeadCache(empty(0, D), empty(0, D), empty(0, dt=torch.long))
                        for _ in range(config.num_kv_heads)] for _ in range(config.num_layers)]
        self.q_win = [empty(config.num_heads, 0, D) for _ in range(config.num_layers)]
        self.next_pos = 0  # absolute position of the next token to be appended

    def __getitem__(self, layer: int) -> list[HeadCache]:
        return self.layers[layer]

    def __len__(self) -> int:
        return len(self.layers)

    def lengths(self) -> torch.Tensor:
        """(L, Hk) number of tokens each head holds."""
        return torch.tensor([[len(h.pos) for h in layer] for layer in self.layers], dtype=torch.long, device="cpu")

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


# ----------------------------------------------------------------------------------------------
# Layers, in the order data flows through them


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


class Attention(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.c = c
        # q, k and v in one projection (their checkpoint rows concatenated at load, see fuse_checkpoint): one
        # matrix-vector product per layer instead of three, which is what a batch-1 decode step is made of.
        self.split = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.num_kv_heads * c.head_dim)
        self.wqkv = nn.Linear(c.hidden_size, sum(self.split), bias=c.qkv_bias)
        self.wo = nn.Linear(c.num_heads * c.head_dim, c.hidden_size, bias=c.o_bias)
        if c.qk_norm:
            self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps)
            self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps)

    def forward(self, x, pos, rope, cache: KVCache, layer: int):
        T, c = x.shape[0], self.c
        q, k, v = self.wqkv(x).split(self.split, dim=-1)
        q = q.view(T, c.num_heads, c.head_dim)  # (T, Hq, D)
        k = k.view(T, c.num_kv_heads, c.head_dim)  # (T, Hk, D)
        v = v.view(T, c.num_kv_heads, c.head_dim)  # (T, Hk, D)
        if c.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        cache.append(layer, k, v, q, pos)
        y = cache.attend(layer, q, pos)  # (T, Hq, D), each KV head over its own tokens
        return self.wo(y.reshape(T, c.num_heads * c.head_dim))


class MLP(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.w_gate_up = nn.Linear(c.hidden_size, 2 * c.intermediate_size, bias=c.mlp_bias)  # gate rows, then up rows
        self.w_down = nn.Linear(c.intermediate_size, c.hidden_size, bias=c.mlp_bias)

    def forward(self, x):
        gate, up = self.w_gate_up(x).chunk(2, dim=-1)
        return self.w_down(F.silu(gate) * up)  # SwiGLU


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

    def new_cache(self, window: int = 8) -> KVCache:
        """An empty per-head KVCache in this model's dtype and device."""
        p = self.embed.weight
        return KVCache(self.config, window, dtype=p.dtype, device=p.device)

    def forward(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """tokens: (T,) -> logits (T, vocab) in float32; appends the T tokens to `cache`
        (a prefill when the cache is empty, a decode step when T == 1)."""
        if tokens.dim() != 1:
            raise ValueError(f"tokens must be a 1-D tensor of ids (batch size is 1), got shape {tuple(tokens.shape)}")
        end = cache.next_pos + tokens.shape[0]
        check_context(self.config, end)
        pos = torch.arange(cache.next_pos, end, device=tokens.device)  # (T,)
        logits = self.run(tokens, pos, cache)
        cache.next_pos = end
        return logits

    def run(self, tokens: torch.Tensor, pos: torch.Tensor, cache) -> torch.Tensor:
        """The forward pass proper, positions given as a tensor: any cache with `append` and `attend`
        (e.g. one where several sequences each sit at their own position)."""
        x = self.embed(tokens)  # (T, d)
        rope = rope_cos_sin(pos, self.inv_freq, x.dtype)  # (T, 1, D) cos, sin
        for layer, block in enumerate(self.blocks):
            x = block(x, pos, rope, cache, layer)
        return self.lm_head(self.norm(x)).float()


# ----------------------------------------------------------------------------------------------
# Loading: a strict map from Hugging Face checkpoint names to our parameters


def weight_map(c: ModelConfig) -> dict[str, str]:
    """{checkpoint tensor name: parameter name in Transformer}. Exactly these tensors must be present. Several
    names map to one fused parameter (a layer's q/k/v to attn.wqkv, gate/up to mlp.w_gate_up): its rows are
    theirs concatenated in the order listed here (fuse_checkpoint), so checkpoints stay Hugging Face files."""
    m = {"model.embed_tokens.weight": "embed.weight", "model.norm.weight": "norm.weight"}
    if not c.tie_word_embeddings:
        m["lm_head.weight"] = "lm_head.weight"
    for i in range(c.num_layers):
        hf, me = f"model.layers.{i}.", f"blocks.{i}."
        m[hf + "input_layernorm.weight"] = me + "attn_norm.weight"
        m[hf + "post_attention_layernorm.weight"] = me + "mlp_norm.weight"
        for hf_name, my_name, bias in (("q_proj", "wqkv", c.qkv_bias), ("k_proj", "wqkv", c.qkv_bias),
                                       ("v_proj", "wqkv", c.qkv_bias), ("o_proj", "wo", c.o_bias)):
            m[f"{hf}self_attn.{hf_name}.weight"] = f"{me}attn.{my_name}.weight"
            if bias:
                m[f"{hf}self_attn.{hf_name}.bias"] = f"{me}attn.{my_name}.bias"
        if c.qk_norm:
            m[hf + "self_attn.q_norm.weight"] = me + "attn.q_norm.weight"
            m[hf + "self_attn.k_norm.weight"] = me + "attn.k_norm.weight"
        for hf_name, my_name in (("gate_proj", "w_gate_up"), ("up_proj", "w_gate_up"), ("down_proj", "w_down")):
            m[f"{hf}mlp.{hf_name}.weight"] = f"{me}mlp.{my_name}.weight"
            if c.mlp_bias:
                m[f"{hf}mlp.{hf_name}.bias"] = f"{me}mlp.{my_name}.bias"
    return m


def checkpoint_shapes(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    """{checkpoint tensor name: its shape}, for every name in weight_map."""
    D, d, I = c.head_dim, c.hidden_size, c.intermediate_size
    out = {"q_proj": c.num_heads * D, "k_proj": c.num_kv_heads * D, "v_proj": c.num_kv_heads * D, "o_proj": d,
           "gate_proj": I, "up_proj": I, "down_proj": d}  # rows of each projection
    cols = {"o_proj": c.num_heads * D, "down_proj": I}
    shapes = {}
    for name in weight_map(c):
        proj = name.split(".")[-2]
        if name.endswith("embed_tokens.weight") or name == "lm_head.weight":
            shapes[name] = (c.vocab_size, d)
        elif proj in out:
            shapes[name] = (out[proj],) if name.endswith(".bias") else (out[proj], cols.get(proj, d))
        else:  # a norm
            shapes[name] = (D,) if proj in ("q_norm", "k_norm") else (d,)
    return shapes


def fuse_checkpoint(tensors: dict[str, torch.Tensor], c: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict from checkpoint tensors named as in weight_map (a tied lm_head.weight is ignored): the
    tensors of a fused parameter are concatenated along their rows in weight_map's order."""
    parts: dict[str, list[torch.Tensor]] = {}
    for name, mine in weight_map(c).items():
        if name in tensors:
            parts.setdefault(mine, []).append(tensors[name])
    return {mine: ts[0] if len(ts) == 1 else torch.cat(ts, dim=0) for mine, ts in parts.items()}


def load_model(path, dtype=torch.float32, device="cpu") -> Transformer:
    """Build on the meta device (no memory), then assign the checkpoint's tensors in place."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    check_device(device)
    config = ModelConfig.from_hf(path)
    files = safetensors_files(path)
    with torch.device("meta"):
        model = Transformer(config)
    names, shapes = weight_map(config), checkpoint_shapes(config)
    tensors, unexpected, stale = {}, [], []
    for file, assigned in files.items():
        try:
            with safe_open(file, framework="pt", device=str(device)) as f:
                for key in f.keys():
                    if assigned is not None and key not in assigned:
                        stale.append(f"{key} (in {file.name})")
                    elif key in names:
                        tensors[key] = f.get_tensor(key).to(dtype)
                    elif key == "lm_head.weight" and config.tie_word_embeddings:
                        continue  # some exports save the tied head too; it is the embedding again
                    else:
                        unexpected.append(key)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise ValueError(f"{file} is truncated or corrupt ({str(e).splitlines()[0]}){rebuild_hint(path)}") from None
    if stale:
        raise ValueError(f"shards in {path} hold tensors that model.safetensors.index.json does not assign to "
                         f"them: {', '.join(sorted(stale)[:4])}{' ...' if len(stale) > 4 else ''}; a stale copy "
                         f"must not replace the real weights, so remove it (or fix the index)")
    missing = sorted(k for k in names if k not in tensors)
    if missing or unexpected:
        raise ValueError(
            f"checkpoint in {path} does not match its config ({config.model_type}, {config.num_layers} layers): "
            + (f"missing tensors: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}. " if missing else "")
            + (f"unexpected tensors: {', '.join(unexpected[:8])}{' ...' if len(unexpected) > 8 else ''}."
               if unexpected else "")
        )
    for name, tensor in tensors.items():
        if tuple(tensor.shape) != shapes[name]:
            raise ValueError(f"tensor {name} has shape {tuple(tensor.shape)}, config expects {shapes[name]}")
    model.load_state_dict(fuse_checkpoint(tensors, config), strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed.weight
    model.inv_freq = rope_inv_freq(config).to(device)
    return model.eval()


# ----------------------------------------------------------------------------------------------
# FullKV generation and the CLI


def stop_ids(config: ModelConfig, tokenizer: Tokenizer | None) -> set[int]:
    """Token ids that end a generation: the config's EOS ids and the tokenizer's EOS token."""
    ids = set(config.eos_token_ids)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def encode_prompt(tokenizer: Tokenizer, config: ModelConfig, prompt: str, *, chat: bool = True,
                  max_new_tokens: int = 0) -> torch.Tensor:
    """The prompt as (T,) ids, rendered with the chat template; checks it fits the context."""
    text = tokenizer.render_chat(prompt) if chat else prompt
    ids = tokenizer.encode(text)
    check_context(config, len(ids), max_new_tokens)
    return torch.tensor(ids, dtype=torch.long, device="cpu")


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


@torch.inference_mode()
def decode(model: Transformer, ids: torch.Tensor, cache, *, max_new_tokens: int, choose=None, stops=(),
           on_step=None) -> list[int]:
    """The decode loop of the project: feed the prompt `ids` (T,), then one token at a time.

    After the prompt (step 0, token None) and after each fed token (step s, the s-th token), it calls
    `on_step(step, token, logits, cache)`, logits (vocab,) predicting the next token; that is where a caller
    compresses the cache, measures it, or streams the text. If on_step returns a token id, that id is fed
    next (teacher forcing; a stop token is then fed too); otherwise `choose(step, logits)` picks one
    (default: greedy; `sample` draws with a temperature) and a token in `stops` ends the loop. Returns the
    fed tokens. `cache` may already hold tokens (a conversation continues in it)."""
    choose = choose or (lambda step, logits: int(logits.argmax()))  # greedy
    device = model.embed.weight.device
    logits = model(ids.to(device), cache)  # the prompt, in one pass
    token, out = None, []
    for step in range(max_new_tokens + 1):
        forced = on_step(step, token, logits[-1], cache) if on_step is not None else None
        if step == max_new_tokens:
            break
        token = forced if forced is not None else choose(step, logits[-1])
        if forced is None and token in stops:
            break
        out.append(token)
        logits = model(torch.tensor([token], device=device), cache)  # one decode step
    return out


def generate_full(model: Transformer, tokenizer: Tokenizer, prompt: str, *, max_new_tokens=256,
                  chat=True, stream=None) -> list[int]:
    """Greedy decoding with the full cache (the FullKV reference). stream: e.g. a tokenizer.TextStream."""
    ids = encode_prompt(tokenizer, model.config, prompt, chat=chat, max_new_tokens=max_new_tokens)
    return decode(model, ids, model.new_cache(), max_new_tokens=max_new_tokens,
                  stops=stop_ids(model.config, tokenizer), on_step=stream)


def main(args):
    if not args.prompt.strip():
        raise ValueError("--prompt is empty; give the user message to answer")
    if args.max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    check_device(args.device)  # before the weights load, not after
    path = resolve_model_dir(args.model)
    model, tokenizer = load_model(path, dtype=DTYPES[args.dtype], device=args.device), load_tokenizer(path)
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
    p.add_argument("--dtype", choices=list(DTYPES), default="float32")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    try:
        main(args)
    except (ValueError, FileNotFoundError, RuntimeError, KeyboardInterrupt) as e:  # Ctrl-C: one line too
        sys.exit(f"error: {str(e) or 'interrupted'}")
