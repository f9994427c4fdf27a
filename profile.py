"""The offline Reasoning-Wave profiler: how many cached tokens each layer needs, measured once per model.

Legend:
    L   layers              Hq  query heads          Hk  key/value heads
    G   Hq // Hk (GQA group) D   head dim             T   tokens in one head's cache
    ρ   attention mass to cover (default 0.93)

Decode a few calibration prompts with the full cache. At every decode step, for each layer and KV
head, take the newest query's attention over the cache (a GQA group's mean attention), sort it
descending and count k = the fewest tokens whose mass reaches ρ; divide by T (normalize="length") so
long and short prompts weigh the same. The mean over steps, heads and prompts is the layer's demand
d_l; the vector d is the wave (arXiv 2606.11164's "Reasoning Wave"). Level 1 of ReasonAlloc splits the
budget by it (reasonalloc.wave_layers). A profile file stores the measurement and its settings only, with
the model's identity; budgets are derived from it when used, so they never go stale.

    python profile.py --out profiles/smollm2-135m-instruct.json --halves
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import sysconfig
import time
from pathlib import Path

# This file is named profile.py, as the project's layout asks, so from this folder it shadows Python's
# standard `profile` module, which cProfile imports (and torch imports cProfile in torch._dynamo, e.g.
# when a model is built on the meta device). Re-export the standard module's names so both keep working.
_spec = importlib.util.spec_from_file_location("_stdlib_profile", Path(sysconfig.get_paths()["stdlib"]) / "profile.py")
_stdlib_profile = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_stdlib_profile)
run, runctx, Profile, _Utils = (_stdlib_profile.run, _stdlib_profile.runctx, _stdlib_profile.Profile,
                                _stdlib_profile._Utils)
os.environ.setdefault("GOMP_SPINCOUNT", "1000")  # before torch loads OpenMP: idle threads soon yield the core

import torch  # noqa: E402

from convert import resolve_model_dir  # noqa: E402
from files import check_output, model_files, write_atomic  # noqa: E402
from model import check_device, decode, encode_prompt, load_model, stop_ids  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402

FORMAT = "reasonalloc-profile/1"
HERE = Path(__file__).resolve().parent
DEFAULT_PROMPTS = HERE / "data" / "calibration.jsonl"


def rho_count(att: torch.Tensor, rho: float) -> int:
    """The smallest k such that the k largest entries of the attention row `att` (T,) sum to >= ρ."""
    p = torch.sort(att.double(), descending=True).values
    mass = p.cumsum(0) / p.sum()
    return min(int((mass < rho - 1e-12).sum()) + 1, att.numel())


def newest_query_attention(cache, layer: int) -> list[torch.Tensor]:
    """Per KV head (T_h,): the newest token's attention over that head's cache, averaged over the
    G query heads of its group (softmax in float32)."""
    G = cache.config.group_size
    q = cache.q_win[layer][:, -1]  # (Hq, D) the newest query
    out = []
    for h, head in enumerate(cache[layer]):
        logits = q[h * G:(h + 1) * G].float() @ head.k.float().T / math.sqrt(q.shape[-1])  # (G, T)
        out.append(torch.softmax(logits, dim=-1).mean(dim=0))
    return out


def step_demand(cache, rho: float, normalize: str) -> torch.Tensor:
    """(L, Hk) the ρ-mass count of every head at this step (divided by T when normalize == "length")."""
    rows = []
    for l in range(len(cache)):
        rows.append([rho_count(a, rho) / (a.numel() if normalize == "length" else 1)
                     for a in newest_query_attention(cache, l)])
    return torch.tensor(rows, dtype=torch.float64, device="cpu")


def aggregate(records: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """records: one (steps, L, Hk) tensor per prompt. Returns (per-layer demand (L,), per-head demand
    (L, Hk)): the mean over every step of every prompt (and, for the layer demand, over heads)."""
    allsteps = torch.cat(records)  # (Σ steps, L, Hk)
    heads = allsteps.mean(dim=0)
    return heads.mean(dim=1), heads


def check_settings(rho, prompts, normalize, max_new_tokens: int = 1):
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1 (the wave is measured on decode steps), got {max_new_tokens}")
    if not 0 < rho <= 1:
        raise ValueError(f"rho must be in (0, 1], got {rho}")
    if len(prompts) == 0:
        raise ValueError("no calibration prompts: give at least one")
    if normalize not in ("length", "none"):
        raise ValueError(f"normalize must be 'length' or 'none', got {normalize!r}")


@torch.inference_mode()
def measure_records(model, prompts, *, tokenizer=None, rho: float = 0.93, max_new_tokens: int = 128,
                    normalize: str = "length", chat: bool = True, log=None) -> list[torch.Tensor]:
    """Decode each prompt greedily with the full cache; one (steps, L, Hk) demand tensor per prompt.
    Prompts are strings (needs the tokenizer) or 1-D LongTensors of ids."""
    check_settings(rho, prompts, normalize, max_new_tokens)
    stops = stop_ids(model.config, tokenizer)
    records = []
    for i, prompt in enumerate(prompts):
        t0 = time.perf_counter()
        ids = prompt if isinstance(prompt, torch.Tensor) else encode_prompt(
            tokenizer, model.config, prompt, chat=chat, max_new_tokens=max_new_tokens)
        cache, steps = model.new_cache(), []

        def measure(step, token, logits, cache):  # after every decoded token (step 0 is the prompt)
            if step > 0:
                steps.append(step_demand(cache, rho, normalize))

        decode(model, ids, cache, max_new_tokens=max_new_tokens, stops=stops, on_step=measure)
        if not steps:  # the model stopped at once: measure the last prompt token instead
            steps.append(step_demand(cache, rho, normalize))
        records.append(torch.stack(steps))
        if log:
            log(f"prompt {i + 1}/{len(prompts)}: {len(ids)} prompt + {len(steps)} decoded tokens, "
                f"{time.perf_counter() - t0:.1f} s")
    return records


def measure_demand(model, prompts, *, rho: float = 0.93, **kwargs) -> torch.Tensor:
    """(L,) the Reasoning Wave of `model` over `prompts` (see measure_records for the options)."""
    return aggregate(measure_records(model, prompts, rho=rho, **kwargs))[0]


# ----------------------------------------------------------------------------------------------
# The profile file


def identity(config) -> dict:
    return {"model_type": config.model_type, "num_layers": config.num_layers, "num_heads": config.num_heads,
            "num_kv_heads": config.num_kv_heads, "config_hash": config.config_hash}


def make_profile(config, demand, head_demand, settings: dict) -> dict:
    return {"format": FORMAT, "model": identity(config), "settings": settings,
            "demand": [float(x) for x in demand], "head_demand": [[float(x) for x in row] for row in head_demand]}


def save_profile(profile: dict, path):
    """Write atomically (files.write_atomic): a failed run never leaves a partial profile behind."""
    write_atomic(path, json.dumps(profile, indent=1))


def load_profile(path, config=None) -> dict:
    """Read a profile; with `config`, refuse one made for another model, naming the field."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"profile {path} not found; make one with: python profile.py --model DIR --out {path}")
    try:
        profile = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"profile {path} is not valid JSON: {e}") from None
    if not isinstance(profile, dict) or profile.get("format") != FORMAT or "demand" not in profile:
        raise ValueError(f"{path} is not a {FORMAT} file")
    demand = profile["demand"]
    def valid(x):  # a finite number >= 0
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x >= 0

    if not isinstance(demand, list) or not demand or not all(valid(x) for x in demand):
        raise ValueError(f"profile {path}: 'demand' must be a list of finite numbers >= 0, one per layer; "
                         f"remake it with python profile.py --out {path}")
    if not isinstance(profile.get("model"), dict):
        raise ValueError(f"profile {path} has no 'model' object saying which model it was made for; remake it "
                         f"with python profile.py --model DIR --out {path}")
    if config is not None:
        want = identity(config)
        for key, value in want.items():
            if profile["model"].get(key) != value:
                raise ValueError(
                    f"profile {path} was made for another model: {key} is {profile['model'].get(key)!r} there, "
                    f"{value!r} for this one. Make the right one with: python profile.py --model DIR --out FILE")
        if len(profile["demand"]) != config.num_layers:
            raise ValueError(f"profile {path} has {len(profile['demand'])} layers, the model {config.num_layers}")
    if "head_split" in profile:  # the `hindsight` allocator's offline split: per layer, a number >= 0 per KV head
        rows, shape = profile["head_split"], (config.num_layers, config.num_kv_heads) if config is not None else None
        if not (isinstance(rows, list) and rows and all(isinstance(r, list) and r and all(map(valid, r)) for r in rows)
                and len({len(r) for r in rows}) == 1 and shape in (None, (len(rows), len(rows[0])))):
            raise ValueError(f"profile {path}: 'head_split' must be one row per layer of one number >= 0 per KV head"
                             f"{f' ({shape[0]} × {shape[1]})' if shape else ''}; remake it with python "
                             f"benchmarks/oracle.py heads --out {path}")
    return profile


def find_profile(config, folder=HERE / "profiles") -> dict:
    """The shipped profile made for this model (the default model's), or an error naming the command."""
    for file in sorted(Path(folder).glob("*.json")) if Path(folder).is_dir() else []:
        try:
            return load_profile(file, config)
        except ValueError:
            continue
    raise ValueError("allocators 'wave' and 'reasonalloc' need a layer-demand profile for this model and none "
                     "was found; make one with: python profile.py --model DIR --out FILE, then pass --profile FILE "
                     "(or use --allocator uniform / pyramid / head / adakv)")


def read_jsonl(path, what: str = "prompts") -> list[tuple[int, object]]:
    """The one reader of the project's line files: (line number, value) for every non-blank line, the
    value parsed as JSON when the line starts with "{", else the line's text. Errors name file and line."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read {what} file {path}: {e}") from None
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                rows.append((n, json.loads(line)))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {n}: not valid JSON ({e.msg}); each line must be one JSON "
                                 f"object") from None
        else:
            rows.append((n, line.strip()))
    if not rows:
        raise ValueError(f"{what} file {path} is empty; it needs one JSON object per line")
    return rows


def read_prompts(path) -> list[str]:
    """A JSON Lines file of {"prompt": ...} (or "problem" / "question") objects, or plain text with one
    prompt per line."""
    prompts = []
    for n, obj in read_jsonl(path, "prompts"):
        text = obj
        if isinstance(obj, dict):
            text = next((obj[k] for k in ("prompt", "problem", "question") if k in obj), None)
        if not isinstance(text, str):
            raise ValueError(f"{path}, line {n}: no 'prompt' (or 'problem' / 'question') text field")
        prompts.append(text)
    return prompts


def pearson(a, b) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64, device="cpu"), torch.as_tensor(b, dtype=torch.float64, device="cpu")
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()).clamp_min(1e-30))


def bar_chart(values, width: int = 40, labels=None) -> str:
    top = max(values) or 1
    labels = labels or [f"L{i:<3d}" for i in range(len(values))]
    return "\n".join(f"  {lab} {'█' * max(1, round(v / top * width)):<{width}} {v}" for lab, v in zip(labels, values))


def plot(path, profile: dict):
    """A PNG of the wave (needs matplotlib, which is not a dependency)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = profile["demand"]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.plot(range(len(d)), d, "o-")
    ax.set_ylabel("demand d_l (ρ-mass share)")
    ax.set_xlabel("layer")
    ax.set_title(f"Reasoning Wave, ρ = {profile['settings']['rho']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(args):
    check_settings(args.rho, [None] * args.num_prompts, args.normalize, args.max_new_tokens)
    inputs = [args.prompts, *model_files(args.model)]
    out = check_output(args.out, "--out", inputs=inputs)
    if args.plot:
        check_output(args.plot, "--plot", inputs=inputs + [args.out])
    check_device(args.device)
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        raise ValueError("--plot needs matplotlib, which is not installed: pip install matplotlib (or drop --plot)")
    prompts = read_prompts(args.prompts)[: args.num_prompts]
    if args.halves and len(prompts) < 2:
        raise ValueError("--halves needs at least 2 prompts")
    path = resolve_model_dir(args.model)
    model, tokenizer = load_model(path, device=args.device), load_tokenizer(path)
    log = lambda m: print(f"[profile] {m}", file=sys.stderr, flush=True)  # noqa: E731
    log(f"{len(prompts)} prompts × up to {args.max_new_tokens} tokens, ρ = {args.rho}")
    records = measure_records(model, prompts, tokenizer=tokenizer, rho=args.rho, max_new_tokens=args.max_new_tokens,
                              normalize=args.normalize, log=log)
    demand, heads = aggregate(records)
    settings = {"rho": args.rho, "prompts": len(prompts), "prompts_file": Path(args.prompts).name,
                "max_new_tokens": args.max_new_tokens, "normalize": args.normalize,
                "decode_steps": int(sum(len(r) for r in records))}
    profile = make_profile(model.config, demand, heads, settings)
    if args.halves:
        half = len(records) // 2
        a, b = aggregate(records[:half])[0], aggregate(records[half:])[0]
        profile["halves"] = {"first": a.tolist(), "second": b.tolist(), "pearson": pearson(a, b)}
    save_profile(profile, out)
    print("Reasoning Wave (demand per layer, ×1000):")
    print(bar_chart([round(1000 * x) for x in profile["demand"]]))
    if args.halves:
        print(f"stability: Pearson correlation between the waves of prompts 1-{half} and "
              f"{half + 1}-{len(records)}: {profile['halves']['pearson']:.3f}")
    if args.plot:
        plot(args.plot, profile)
        print(f"plot written to {args.plot}")
    print(f"profile written to {out}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="Measure a model's per-layer KV demand (the Reasoning Wave) for "
                                            "ReasonAlloc's layer-level budgets.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="profile JSON to write")
    p.add_argument("--model", help="Hugging Face model folder; default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--prompts", default=str(DEFAULT_PROMPTS), help="calibration prompts (JSON Lines or one per line)")
    p.add_argument("--num-prompts", type=int, default=8, help="use at most this many prompts")
    p.add_argument("--max-new-tokens", type=int, default=128, help="decode steps per prompt")
    p.add_argument("--rho", type=float, default=0.93, help="attention mass a layer's kept tokens must cover")
    p.add_argument("--normalize", choices=["length", "none"], default="length",
                   help="divide each count by the cache length, so long and short prompts weigh the same")
    p.add_argument("--halves", action="store_true",
                   help="also measure the wave on each half of the prompts and report their correlation")
    p.add_argument("--plot", help="write a PNG of the wave (needs matplotlib)")
    p.add_argument("--device", default="cpu")
    try:
        main(p.parse_args())
    except (ValueError, FileNotFoundError, RuntimeError, KeyboardInterrupt) as e:  # Ctrl-C: one line too
        sys.exit(f"error: {str(e) or 'interrupted'}")
