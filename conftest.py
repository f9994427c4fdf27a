"""Fixtures and helpers shared by the test files (test_reasonalloc.py: the spec; test_fast.py: the fast path's
parity; test_tools.py: benchmarks, CLIs, the default model; test_conformance.py: the events format): tiny
random Hugging Face models of every supported family, our model built from one, a byte tokenizer."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "benchmarks"))  # the benchmarks are imported as modules

import model as M  # noqa: E402

TINY_PROMPT = torch.arange(3, 43) % 97  # 40 tokens


WAVE = [0.5, 0.2, 0.3]
# A profile for every allocator of the tiny model (3 layers × 2 KV heads): the wave, and a head split for
# `hindsight` (one layer leaning each way, one even).
PROFILE = {"demand": WAVE, "head_split": [[0.8, 0.2], [0.5, 0.5], [0.1, 0.9]]}


class ByteTok:
    """A stand-in tokenizer for a tiny random model: ids are bytes."""

    eos_token_id = None

    def decode(self, ids):
        return bytes(i % 256 for i in ids).decode("latin-1")


def forcing(tokens, logits=None):
    """A generation hook feeding `tokens` (teacher forcing), appending to `logits` the logits that
    predict each of them."""
    def hook(step, token, x, cache):
        if step < len(tokens):
            if logits is not None:
                logits.append(x.clone())
            return tokens[step]
        return None
    return hook


def make_tiny_hf(kind: str):
    """A tiny random transformers model of one of the supported families (and variants)."""
    import transformers as tf

    common = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2)
    if kind == "llama":
        cfg = tf.LlamaConfig(**common, rope_theta=10000.0, tie_word_embeddings=False)
        cls = tf.LlamaForCausalLM
    elif kind == "llama3_rope":
        # Long wavelengths (> 64 / low_freq_factor) are scaled, short ones (< 64 / high) kept,
        # with the head_dim-16 frequencies spanning both sides and the band between.
        rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
        cfg = tf.LlamaConfig(**{**common, "hidden_size": 64, "num_attention_heads": 4},
                             rope_parameters=rope, tie_word_embeddings=False)
        cls = tf.LlamaForCausalLM
    elif kind == "qwen2":
        cfg = tf.Qwen2Config(**common, rope_theta=1000000.0, tie_word_embeddings=True)
        cls = tf.Qwen2ForCausalLM
    elif kind == "qwen3":
        # head_dim set apart from hidden_size / num_heads (64 / 4 = 16), as Qwen3 does.
        cfg = tf.Qwen3Config(**common, head_dim=24, rope_theta=1000000.0, tie_word_embeddings=False)
        cls = tf.Qwen3ForCausalLM
    else:
        raise KeyError(kind)
    torch.manual_seed(0)
    hf = cls(cfg).eval().float()
    # Random init leaves norms at 1 and biases at 0; perturb them so they are really tested.
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return hf


@pytest.fixture(scope="session")
def tiny_hf():
    """make_tiny_hf, as a fixture: tiny_hf("llama" | "llama3_rope" | "qwen2" | "qwen3")."""
    return make_tiny_hf


@pytest.fixture(scope="module", params=["llama", "llama3_rope", "qwen2", "qwen3"])
def tiny_pair(request, tmp_path_factory):
    """(transformers model, our model loaded from its saved folder, the folder) for each family."""
    hf = make_tiny_hf(request.param)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path, safe_serialization=True)
    hf.config._attn_implementation = "eager"
    return hf, M.load_model(path), path


@pytest.fixture(scope="module")
def tiny_model():
    """Our model with the tiny random llama's weights: 3 layers, 4 query / 2 KV heads, D = 16, vocab 97,
    a context of 512 and no EOS, so generation runs as long as asked."""
    hf = make_tiny_hf("llama")
    cfg = M.ModelConfig.from_hf({**hf.config.to_dict(), "max_position_embeddings": 512, "eos_token_id": None})
    ours = M.Transformer(cfg)
    ours.load_state_dict(M.fuse_checkpoint(hf.state_dict(), cfg), strict=False)
    return ours.eval()


@pytest.fixture(scope="session")
def default_model():
    """The embedded SmolLM2-135M-Instruct (converted on first use): (model, tokenizer, folder)."""
    from convert import resolve_model_dir
    from tokenizer import load_tokenizer

    path = resolve_model_dir(None)
    return M.load_model(path), load_tokenizer(path), path


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tiny_hf):
    """A tiny random llama saved as a model folder, with a character-level tokenizer, a chat template and a
    wave profile."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    d = tmp_path_factory.mktemp("tiny_model")
    hf = tiny_hf("llama")
    hf.config.max_position_embeddings = 512
    hf.save_pretrained(d)
    chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,:;?!+-*/=()'\n"
    tok = Tokenizer(models.WordLevel({c: i + 3 for i, c in enumerate(chars)} | {"<unk>": 0}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    tok.decoder = decoders.Fuse()
    tok.save(str(d / "tokenizer.json"))
    template = ("{% for m in messages %}{% if m.role == 'user' %}Q: {{ m.content }}\nA:{% else %}{{ m.content }}\n"
                "{% endif %}{% endfor %}")  # in the characters above; a conversation extends its prefix
    (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    prompts = d / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in
                               ["What is 2+3? Think.", "Count the sheep: one, two.", "Why is the sky blue?"]))
    cfg = M.ModelConfig.from_hf(d)
    import profile as P  # this project's profile.py

    P.save_profile(P.make_profile(cfg, torch.tensor([0.5, 0.2, 0.3]), torch.ones(3, 2), {}), d / "wave.json")
    return d
