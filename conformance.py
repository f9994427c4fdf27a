"""Conformance vectors: what a backend in any language checks without running this project's model.

Legend: L layers, Hk KV heads, D head dim, w window, B budget, b_lh head budgets, Δ interval.

`vectors/`: inputs and expected outputs of the pure functions (robustify, every allocator's layer rule,
the head rules, keep_indices, the R-KV and SnapKV scores), hand-sized and adversarial (ties, all-equal
demand, heads shorter than the window, a head at the floor), computed in float64 and written to 12
significant digits; and `vectors/events/`, full events files (reasonalloc.py section 5, events.schema.json)
of a tiny model whose weights any language rebuilds from a seed (`model.recipe_weights`), one per
allocator. `python conformance.py vectors` regenerates them; a test checks they come out byte for byte
equal, and `python reasonalloc.py check vectors/events/FILE` replays each.

Run it:  python conformance.py vectors [--out vectors]
         python conformance.py random-model --out DIR [--seed 0]    (a random Llama folder, for GPU runs)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

import evict
import model as M
import reasonalloc as R

HERE = Path(__file__).resolve().parent

# The tiny model of the events vectors (weights: model.recipe_weights)
TINY_CONFIG = {"model_type": "llama", "vocab_size": 96, "hidden_size": 32, "intermediate_size": 64,
               "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
               "max_position_embeddings": 512, "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
               "tie_word_embeddings": False}




def lcg_tensor(shape, seed: int) -> torch.Tensor:
    """float32 values in [-1, 1) from the LCG of `model.recipe_weights` (stored exactly in the JSON)."""
    return torch.tensor(M.lcg_uniform(math.prod(shape), seed), dtype=torch.float32, device="cpu").view(shape)


def num(x) -> float:
    """A float64 result, to 12 significant digits: equal on every machine that computes in float64."""
    return float(f"{float(x):.12g}")


def vector_cases() -> dict[str, list[dict]]:
    """Every vector file's cases: {"inputs": ..., "output": ...}."""
    cases: dict[str, list[dict]] = {}
    rob = [dict(demand=[3.0, 1.0, 0.5, 0.0], total=40, power=0.5, lo=0.25, hi=2.0, floor=4),
           dict(demand=[1.0, 1.0, 1.0], total=31, power=0.5, lo=0.25, hi=2.0, floor=0),  # all equal, remainder 1
           dict(demand=[0.0, 0.0], total=17, power=0.5, lo=0.25, hi=2.0, floor=2),  # all zero: uniform
           dict(demand=[100.0, 0.0, 0.0, 0.0], total=64, power=1.0, lo=0.25, hi=2.0, floor=8),  # one at the cap
           dict(demand=[5.0, 5.0, 1.0], total=30, power=0.0, lo=0.25, hi=2.0, floor=0),  # power 0: flat
           dict(demand=[2.0, 1.0], total=20, power=0.5, lo=0.5, hi=1.2, floor=10)]  # floors pin everyone
    cases["robustify"] = [{"inputs": c, "output": R.robustify(torch.tensor(c["demand"], device="cpu"), c["total"],
                                                                power=c["power"], lo=c["lo"], hi=c["hi"],
                                                                floor=c["floor"]).tolist()} for c in rob]
    demand = [0.5, 0.2, 0.3, 0.9]
    cases["layer_budgets"] = [
        {"inputs": dict(allocator=a, num_layers=4, budget=b, window=w, profile_demand=demand if R.get_allocator(a).needs_profile else None),
         "output": R.layer_budgets(a, 4, b, window=w, profile=demand if R.get_allocator(a).needs_profile else None).tolist()}
        for a in R.ALLOCATORS for b, w in ((16, 4), (9, 8))]
    heads = {
        "plain": [lcg_tensor((12,), 1).double(), lcg_tensor((12,), 2).double()],
        "ties": [torch.tensor([0.5] * 6 + [0.25] * 6, dtype=torch.float64), torch.tensor([0.5] * 12, dtype=torch.float64)],
        "ragged": [lcg_tensor((20,), 3).double().abs(), lcg_tensor((4,), 4).double().abs(), lcg_tensor((9,), 5).double().abs()],
        "shorter_than_window": [torch.zeros(0, dtype=torch.float64), lcg_tensor((10,), 6).double().abs()],
        "one_head_starved": [torch.full((16,), 1e-9, dtype=torch.float64), torch.linspace(1, 2, 16, dtype=torch.float64)],
    }
    hb = []
    for name, scores in heads.items():
        for rule, opts in (("head_budgets", {"utility": "length"}), ("head_budgets", {"utility": "rank"}),
                           ("head_budgets", {"utility": "raw"}), ("adakv_head_budgets", {}), ("uniform_heads", {})):
            out = getattr(R, rule)(scores, 12, window=4, **opts)
            hb.append({"inputs": {"case": name, "rule": rule, "scores": [[num(v) for v in s] for s in scores],
                                  "layer_budget": 12, "window": 4, "options": R.resolved_options(getattr(R, rule), opts)},
                       "output": out.tolist()})
    cases["head_budgets"] = hb
    ki = [(lcg_tensor((10,), 7).double(), 9, 4), (torch.tensor([1.0, 2.0, 2.0, 1.0, 2.0], dtype=torch.float64), 6, 3),
          (torch.ones(6, dtype=torch.float64), 5, 2), (lcg_tensor((3,), 8).double(), 12, 4), (lcg_tensor((6,), 9).double(), 4, 4)]
    cases["keep_indices"] = [{"inputs": {"scores": [num(v) for v in s], "budget": b, "window": w},
                              "output": evict.keep_indices(s, b, w).tolist()} for s, b, w in ki]
    sc = []
    for i, (G, w, T, D) in enumerate([(2, 4, 16, 8), (1, 3, 9, 4), (2, 4, 5, 8)]):
        q, k, v = lcg_tensor((G, w, D), 10 + i), lcg_tensor((T, D), 20 + i), lcg_tensor((T, D), 30 + i)
        if i == 1:
            k[3] = k[2]  # two equal keys: redundancy ties
        for policy in ("rkv", "snapkv"):
            fn = evict.get_policy(policy)
            s = fn(q.double(), k.double(), v.double(), torch.arange(T, device="cpu"), window=w)
            sc.append({"inputs": {"policy": policy, "q_win": q.tolist(), "k": k.tolist(), "v": v.tolist(),
                                  "pos": list(range(T)), "window": w, "options": R.resolved_options(fn, {})},
                       "output": [num(x) for x in s.tolist()]})
    cases["scores"] = sc
    return cases


EVENT_RUNS = [("reasonalloc", "rkv"), ("uniform", "rkv"), ("uniform", "snapkv"), ("pyramid", "rkv"), ("head", "rkv"),
              ("wave", "rkv"), ("adakv", "rkv")]


def event_documents(seed: int = 0) -> dict[str, dict]:
    """Full events files of the recipe model (float64, reference path): one per allocator and policy."""
    model = M.recipe_model(TINY_CONFIG, seed)
    prompt = torch.tensor([(7 * i + 3) % TINY_CONFIG["vocab_size"] for i in range(40)], device="cpu")
    docs = {}
    for allocator, policy in EVENT_RUNS:
        g = R.generate(model, None, prompt, budget=16, window=4, interval=8, max_new_tokens=48, allocator=allocator,
                       policy=policy, profile=[0.5, 0.2, 0.3], record_positions=True)
        docs[f"{allocator}-{policy}"] = R.events_document(
            model, g, source={"recipe": "lcg64", "seed": seed, "config": TINY_CONFIG})
    return docs


def write_vectors(out: Path) -> list[Path]:
    """Every vector file into `out` (one JSON per function, and events/ for the runs). Returns the files."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "events").mkdir(exist_ok=True)
    files = []
    for name, cases in vector_cases().items():
        files.append(out / f"{name}.json")
        M.write_atomic(files[-1], json.dumps({"function": name, "cases": cases}, indent=1) + "\n")
    for name, doc in event_documents().items():
        files.append(out / "events" / f"{name}.json")
        M.write_atomic(files[-1], json.dumps(doc) + "\n")
    return files


def write_random_model(out: Path, *, seed: int = 0, layers: int = 4, hidden: int = 256, heads: int = 8,
                       kv_heads: int = 2, context: int = 4096) -> Path:
    """A random Llama model folder made on the spot (weights: `model.recipe_weights` from `seed`), with a
    byte-level tokenizer (256 bytes + <|im_start|>, <|im_end|>) and a ChatML template: for runs where the
    default model cannot go, e.g. a GPU machine reachable only through a 64 MiB file transfer."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": tok.get_vocab_size(),
              "hidden_size": hidden, "intermediate_size": 2 * hidden, "num_hidden_layers": layers,
              "num_attention_heads": heads, "num_key_value_heads": kv_heads, "max_position_embeddings": context,
              "rope_theta": 10000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": False}
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    template = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    (out / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    (out / "config.json").write_text(json.dumps(config, indent=1))
    save_file(M.recipe_weights(config, seed), out / "model.safetensors", metadata={"format": "pt"})
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="Regenerate the conformance vectors, or write a random model folder "
                                            "(see the module docstring).")
    p.add_argument("what", choices=["vectors", "random-model"])
    p.add_argument("--out", help="folder to write to (default for vectors: vectors/)")
    p.add_argument("--seed", type=int, default=0, help="random-model: the weights' seed")
    p.add_argument("--layers", type=int, default=4, help="random-model: layers")
    p.add_argument("--hidden", type=int, default=256, help="random-model: hidden size (8 heads, 2 KV heads)")
    args = p.parse_args()
    if args.what == "random-model":
        if not args.out:
            sys.exit("error: random-model needs --out DIR")
        print(write_random_model(Path(args.out), seed=args.seed, layers=args.layers, hidden=args.hidden))
    else:
        torch.set_num_threads(1)  # one summation order for the float64 reductions
        for f in write_vectors(Path(args.out or HERE / "vectors")):
            print(f)
