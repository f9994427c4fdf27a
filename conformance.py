"""Conformance vectors: what a backend in any language checks without running this project's model.

Legend: L layers, Hk KV heads, D head dim, w window, B budget, b_lh head budgets, Δ interval.

The tooling around the spec for the authors of other backends (docs/backends.md):
- the events format (events.schema.json): one run's compressions, written by `record`, replayed on the
  per-head reference with the same tokens forced by `check`, which reports the first difference;
- weights any language rebuilds from a seed (`recipe_weights`) and a model folder's fingerprint;
- `vectors/`: inputs and expected outputs of the pure functions (robustify, every allocator's layer rule,
  the head rules, keep_indices, the R-KV and SnapKV scores), hand-sized and adversarial (ties, all-equal
  demand, heads shorter than the window, a head at the floor), computed in float64 and written to 12
  significant digits; and `vectors/events/`, full events files of a tiny recipe model, one per allocator.

Run it:  python conformance.py record --prompt "..." --events FILE [--fast] [reasonalloc.py's flags]
         python conformance.py check EVENTS.json [--model DIR]
         python conformance.py vectors [--out vectors]             (a test checks they regenerate byte for byte)
         python conformance.py random-model --out DIR [--seed 0]    (a random Llama folder, for GPU runs)
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path
os.environ.setdefault("GOMP_SPINCOUNT", "1000")  # before torch loads OpenMP: idle threads soon yield the core

import torch

import evict
import fast
import model as M
import reasonalloc as R
from convert import resolve_model_dir, safetensors_files
from files import check_output, model_files, write_atomic

HERE = Path(__file__).resolve().parent

# ----------------------------------------------------------------------------------------------
# Weights any language can rebuild from a seed (the events vectors' tiny model), and a model folder's identity

LCG_A, LCG_C = 6364136223846793005, 1442695040888963407  # Knuth's MMIX 64-bit linear congruential generator


def lcg_uniform(n: int, seed: int) -> list[float]:
    """n values in [-1, 1): x ← (A·x + C) mod 2^64 from x = seed, each value 2·(x >> 40)/2^24 − 1."""
    x, out = seed % 2**64, []
    for _ in range(n):
        x = (LCG_A * x + LCG_C) % 2**64
        out.append(2 * (x >> 40) / 2**24 - 1)
    return out


class LCGStream:
    """`lcg_uniform`'s values in order, drawn a block at a time by jump-ahead: from state x, the next j states
    are A^j·x + C·(A^(j-1) + ... + A + 1) mod 2^64 (numpy's uint64 arithmetic wraps mod 2^64). Equal to
    lcg_uniform bit for bit (tested), without a Python float per value: a 145 MB random model is drawn
    within about twice its own memory."""

    def __init__(self, seed: int, block: int = 4096):
        import numpy as np

        mult, add, a, c = [], [], 1, 0
        for _ in range(block):  # a = A^j, c = C·(A^(j-1) + ... + 1), j = 1 .. block
            a, c = (LCG_A * a) % 2**64, (LCG_A * c + LCG_C) % 2**64
            mult.append(a)
            add.append(c)
        self.np, self.mult, self.add = np, np.array(mult, dtype=np.uint64), np.array(add, dtype=np.uint64)
        self.x = np.array([seed % 2**64], dtype=np.uint64)

    def take(self, n: int) -> torch.Tensor:
        """The next n values, (n,) float64 on the CPU."""
        np, out, done = self.np, self.np.empty(n, dtype=self.np.float64), 0
        while done < n:
            m = min(n - done, len(self.mult))
            states = self.mult[:m] * self.x + self.add[:m]  # (m,) the next m states
            out[done:done + m] = (states >> np.uint64(40)).astype(np.float64) * (2 / 2**24) - 1
            self.x, done = states[-1:], done + m
        return torch.from_numpy(out)


def recipe_weights(config: dict, seed: int) -> dict[str, torch.Tensor]:
    """Checkpoint tensors (Hugging Face names) from `seed`, reproducible in any language:
    for the names in byte order, every norm weight is 1; every other tensor is filled row-major from one
    stream x ← (6364136223846793005·x + 1442695040888963407) mod 2^64 (x starts at `seed`), each value
    (2·u − 1)/√(columns) with u = (x >> 40) / 2^24, then rounded to float32."""
    cfg = M.ModelConfig.from_hf(config)
    shapes = M.checkpoint_shapes(cfg)
    stream, out = LCGStream(seed), {}
    for name in sorted(shapes):
        shape = shapes[name]
        if name.endswith("norm.weight"):
            out[name] = torch.ones(shape, dtype=torch.float32, device="cpu")
        else:
            out[name] = (stream.take(math.prod(shape)) / math.sqrt(shape[-1])).float().view(shape)
    return out


def recipe_model(config: dict, seed: int, dtype=torch.float64) -> M.Transformer:
    """A model with `recipe_weights`, for conformance tests (float64 by default: choices far from float noise)."""
    cfg = M.ModelConfig.from_hf(config)
    model = M.Transformer(cfg)
    model.load_state_dict(M.fuse_checkpoint(recipe_weights(config, seed), cfg), strict=False)
    return model.to(dtype).eval()


def model_fingerprint(path: Path, *, samples: int = 4, sample_bytes: int = 1 << 12) -> str:
    """A short identity of a model folder's contents, for keying saved results: sha256 over config.json, the
    tokenizer files, and every tensor of the weights by name (over all shards, in name order): its dtype, shape
    and `samples` slices of its bytes spread over it. The weight files' layout and header metadata, which
    converters and library versions write differently for the same weights, do not count. Any re-quantization,
    fine-tune or swapped shard changes it; hashing every byte instead would take minutes on a multi-GB checkpoint."""
    path = Path(path)
    h = hashlib.sha256()
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        h.update(name.encode() + b"\0" + ((path / name).read_bytes() if (path / name).is_file() else b"-") + b"\0")
    tensors = {}  # name -> (file, start of its bytes, end, dtype, shape)
    for file in safetensors_files(path):
        with open(file, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(header_len))
        for name, t in header.items():
            if name != "__metadata__":
                a, b = t["data_offsets"]
                tensors[name] = (file, 8 + header_len + a, 8 + header_len + b, t["dtype"], t["shape"])
    handles = {}
    for name in sorted(tensors):
        file, a, b, dtype, shape = tensors[name]
        f = handles.setdefault(file, open(file, "rb"))
        h.update(f"{name}:{dtype}:{shape}\0".encode())
        for i in range(samples):
            f.seek(a + (b - a) * i // samples)
            h.update(f.read(min(sample_bytes, b - (a + (b - a) * i // samples))))
    for f in handles.values():
        f.close()
    return h.hexdigest()[:16]



# ----------------------------------------------------------------------------------------------
# The events document and the replay checker: the golden reference for other backends.
#
# A backend (vLLM, SGLang, a custom kernel) that implements these allocators writes, for one run, what it
# decided at each compression in the versioned format of events.schema.json: B_l, b_lh, the lengths before
# and after, and the absolute positions each head kept. `python conformance.py check EVENTS.json` replays
# the run on the per-head reference path with the same tokens forced and reports the first difference,
# with the reference's scores of the tokens involved. Budgets and kept positions must be equal; scores
# only explain a difference: two within rtol·max(|a|, |b|) + atol are a tie (or float noise), and the
# reference breaks ties toward the older token (a stable sort).

SCHEMA_NAME, SCHEMA_VERSION = "reasonalloc-events", 1
SCHEMA_FILE = HERE / "events.schema.json"
# Two scores this close are a tie (or a near-tie: rounding at the file's dtype can order them either way) when a
# difference is explained: a few units of the dtype's rounding, relative (bfloat16 keeps ~3 digits).
DTYPE_RTOL = {"float64": 1e-9, "float32": 1e-5, "float16": 2e-3, "bfloat16": 1.6e-2}
RTOL, ATOL = 1e-3, 1e-6  # when the dtype is not one of those


def resolved_options(fn, given: dict | None, skip=("window", "profile", "layer")) -> dict:
    """Every keyword option `fn` takes, with its default unless `given` sets it: the complete record."""
    params = inspect.signature(fn).parameters.values()
    out = {p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY and p.name not in skip}
    return out | {k: v for k, v in (given or {}).items() if k in out}


def model_identity(c, *, source: dict) -> dict:
    """What an events document says about its model (`c`: a model.ModelConfig)."""
    return {"architecture": c.model_type, "num_layers": c.num_layers, "num_heads": c.num_heads,
            "num_kv_heads": c.num_kv_heads, "head_dim": c.head_dim, "vocab_size": c.vocab_size,
            "config_hash": c.config_hash, "source": source}


def events_document(model, g: R.Generation, *, source: dict) -> dict:
    """One run as a versioned events document. `source`: where the weights come from, {"fingerprint": ...}
    of a model folder (`model_fingerprint`) or {"recipe": "lcg64", "seed": s, "config": {...}}."""
    s = g.settings
    alloc = R.get_allocator(s["allocator"])
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
                                 "kept_positions") if k in e} for e in g.events]  # positions: if recorded
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


def check_settings(doc: dict, path) -> None:
    """What the schema cannot say: every rule option is one the rule takes, of its default's type; the settings
    pass generate()'s own checks; token ids lie in the vocabulary; kept positions ascend. Each refusal names the
    field, so a bad file ends `check` with exit status 2, never a traceback or a reported difference."""
    s, src = doc["settings"], doc["model"]["source"]
    if "fingerprint" not in src and not {"recipe", "seed", "config"} <= set(src):
        raise ValueError(f"{path}: model.source must name the weights: {{\"fingerprint\": ...}} of a model "
                         f"folder (null if it cannot be computed) or {{\"recipe\", \"seed\", \"config\"}}, got "
                         f"{json.dumps(src)}")
    alloc, policy = R.get_allocator(s["allocator"]), evict.get_policy(s["policy"])  # unknown names: one line each
    rules = {"layer_options": alloc.layers, "head_options": alloc.heads, "policy_options": policy}
    for field, fn in rules.items():
        takes = resolved_options(fn, {})
        for key, value in s[field].items():
            if key not in takes:
                raise ValueError(f"{path}: settings.{field} has an unknown option {key!r}; {fn.__name__} takes "
                                 f"{', '.join(takes) or 'none'}")
            default = takes[key]
            if isinstance(default, bool) or isinstance(default, str):
                ok = type(value) is type(default)
            elif isinstance(default, (int, float)):
                ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            else:
                ok = True
            if not ok:
                raise ValueError(f"{path}: settings.{field}.{key} must be a {type(default).__name__} like its default "
                                 f"{default!r}, got {json.dumps(value)}")
    lo, ho = s["layer_options"], s["head_options"]
    R.validate(budget=s["budget"], window=s["window"], interval=s["interval"], temperature=s["temperature"],
               top_p=s["top_p"], allocator=s["allocator"], policy=s["policy"], max_new_tokens=s["max_new_tokens"],
               gamma=lo.get("gamma", 0.5), beta=ho.get("beta", 0.5), mu=ho.get("mu", 0.25),
               head_utility=ho.get("utility", "length"), seed=s["seed"])
    vocab = doc["model"]["vocab_size"]
    for field in ("prompt_ids", "tokens"):
        outside = [t for t in doc[field] if not 0 <= t < vocab]
        if outside:
            raise ValueError(f"{path}: {field} holds ids outside the vocabulary of {vocab} tokens: {outside[:5]}")
    for i, e in enumerate(doc["events"]):
        for l, layer in enumerate(e["kept_positions"]):
            for h, kept in enumerate(layer):
                if any(a >= b for a, b in zip(kept, kept[1:])):
                    raise ValueError(f"{path}: event {i} (step {e['step']}), layer {l}, KV head {h}: kept positions "
                                     f"must be distinct and ascending, got {kept[:8]}{' ...' if len(kept) > 8 else ''}")


def read_events(path) -> dict:
    """An events file, checked: JSON, the format and its version, the schema, and every budget's total."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no events file {path}")
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        at = f" at line {e.lineno}, column {e.colno}" if isinstance(e, json.JSONDecodeError) else ""
        raise ValueError(f"{path} is not valid JSON ({getattr(e, 'msg', e)}{at}); is it truncated? Write it "
                         f"again") from None
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA_NAME:
        old = isinstance(doc, dict) and "events" in doc and "version" not in doc
        raise ValueError(f"{path} is not a {SCHEMA_NAME} file" + (
            ": it is an events file from before the format was versioned (no 'version'); write it again with "
            "python conformance.py record --events FILE" if old else ""))
    if type(doc.get("version")) is not int or doc["version"] != SCHEMA_VERSION:  # true and 1.0 are not 1
        raise ValueError(f"{path} has {SCHEMA_NAME} version {doc.get('version')!r}; this reasonalloc reads version "
                         f"{SCHEMA_VERSION} only (see events.schema.json): write the file again in version "
                         f"{SCHEMA_VERSION}")
    errors = schema_errors(doc, json.loads(SCHEMA_FILE.read_text()))
    if errors:
        raise ValueError(f"{path} does not follow events.schema.json: " + "; ".join(errors[:5]))
    check_totals(doc, path)
    check_settings(doc, path)
    return doc


def load_for(doc: dict, model_dir=None, device="cpu"):
    """The model an events document names: its recipe, or a model folder (default: the embedded model)."""
    if model_dir is not None and not Path(model_dir).is_dir():
        raise ValueError(f"--model {model_dir} is not a folder; give the Hugging Face model folder the run used")
    src, dtype = doc["model"]["source"], getattr(torch, doc["settings"]["dtype"])
    recipe = "recipe" in src and model_dir is None
    if recipe and src["recipe"] != "lcg64":
        raise ValueError(f"unknown weight recipe {src['recipe']!r}; this reasonalloc knows 'lcg64'")
    path = None if recipe else resolve_model_dir(model_dir)
    config = M.ModelConfig.from_hf(src["config"] if recipe else path)
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
    return M.load_model(path, dtype=dtype, device=device)


def replay(model, doc: dict, *, at_step=None, layer=None):
    """Rerun the document's run on the per-head reference path with its tokens forced. With `at_step`, also
    return the scores every head of `layer` had just before the compression at that step:
    [(positions the head holds, the scores of its evictable rows: all but the last w)] per head."""
    s, tokens = doc["settings"], doc["tokens"]
    seen = {}

    def hook(step, token, logits, cache):
        if step == at_step:
            scores = evict.score_layer(cache, layer, s["policy"], **s["policy_options"])
            seen["scores"] = [(cache[layer][h].pos.tolist(), sc.double().tolist()) for h, sc in enumerate(scores)]
        return tokens[step] if step < len(tokens) else None

    g = R.generate(model, None, torch.tensor(doc["prompt_ids"], dtype=torch.long, device="cpu"),
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


def kept_pattern(theirs: list, ours: list, window: list, event_pairs) -> str | None:
    """The pattern of a kept-positions difference, if it is one of the two common backend bugs: the protected
    window (the head's w newest, `window`) not all kept, or every kept position moved by one constant (all heads
    of the event, given as (theirs, ours) pairs). None otherwise."""
    dropped = [p for p in window if p not in theirs]
    if dropped:
        return (f"  pattern: protected-window tokens evicted: the backend dropped {dropped}, among the head's "
                f"w = {len(window)} newest positions {window}, which every head always keeps (the observation "
                f"window); check the backend's window size and which rows it protects")
    shifts = {b - a for t, o in event_pairs if len(t) == len(o) for a, b in zip(o, t)}
    if len(shifts) == 1 and 0 not in shifts and all(len(t) == len(o) for t, o in event_pairs):
        c = shifts.pop()
        return (f"  pattern: every kept position of this event, in every head, is the reference's {c:+d}: the "
                f"backend counts positions from another origin (0- or 1-based, a BOS or the prompt counted "
                f"differently), not a scoring difference")
    return None


def explain(d: dict, scores, doc: dict, rtol: float, atol: float, ours_event: dict | None = None,
            demand=None) -> list[str]:
    """Lines that say what differs at the first difference `d`: the pattern first when it is a known one (window
    evicted, positions shifted, a head-budget split with its layer's budgets and demand), then the reference's
    scores and whether they tie at the file's dtype."""
    where, s = f"event {d['event']} (step {d['step']})", doc["settings"]
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
        theirs_event = doc["events"][d["event"]]["kept_positions"]
        heads = [(t, o) for tl, ol in zip(theirs_event, ours_event["kept_positions"]) for t, o in zip(tl, ol)]
        pattern = kept_pattern(d["theirs"], d["ours"], [p for p in pos if p not in score_of], heads)
        if pattern:
            return lines + [pattern]
        pairs = [(score_of.get(a), score_of.get(b)) for a in only_theirs for b in only_ours]
        if pairs and all(a is not None and b is not None and tie(a, b, rtol, atol) for a, b in pairs):
            lines.append(f"  a tie at {s['dtype']}: these scores are equal within rtol {rtol:g}, atol {atol:g} (the "
                         f"dtype's rounding). The reference keeps the older token among equal scores (stable sort); "
                         f"check the backend's tie rule, or its score precision")
        else:
            lines.append(f"  not a tie: the backend kept tokens the reference scores lower or does not hold; check "
                         f"the score function ({s['policy']} with {s['policy_options']}) or the selection")
        return lines
    if d["field"] == "head_budgets":
        l, theirs, ours = d["layer"], doc["events"][d["event"]], ours_event
        lines = [f"{where}, layer {l}, KV head {d['head']}: head budget {d['theirs']} in the backend, {d['ours']} in "
                 f"the reference",
                 f"  layer {l}'s budgets b_lh: {theirs['head_budgets'][l]} in the backend, {ours['head_budgets'][l]} "
                 f"in the reference (B_l {theirs['layer_budgets'][l]} and {ours['layer_budgets'][l]})",
                 f"  tokens each head held before (T_h): {theirs['lengths_before'][l]} in the backend, "
                 f"{ours['lengths_before'][l]} in the reference"]
        if demand is not None:
            r, gap = demand
            lines.append(f"  the reference's head demand r_h (pooled top Hk·(B_l − w) of {s['allocator']}'s head rule "
                         f"with {s['head_options']}): {r}; the file records no demand of the backend's")
            if gap is not None and tie(*gap, rtol, atol):
                lines.append(f"  a near-tie at {s['dtype']}: the pooled utilities at the threshold, {gap[0]:.8g} and "
                             f"{gap[1]:.8g}, are equal within the dtype's rounding (rtol {rtol:g}), so a backend may "
                             f"count one token to another head; check its score precision")
            elif gap is not None:
                lines.append("  not a near-tie at the threshold: check the head rule (utility, pooling, robustify) "
                             "or the scores it pools")
        return lines
    if d["head"] is not None:
        return [f"{where}, layer {d['layer']}, KV head {d['head']}: {d['field']} {d['theirs']} in the backend, "
                f"{d['ours']} in the reference"]
    if d["layer"] is not None:
        return [f"{where}, layer {d['layer']}: layer budget {d['theirs'][d['layer']]} in the backend, "
                f"{d['ours'][d['layer']]} in the reference (layer budgets {d['theirs']} vs {d['ours']})"]
    return [f"{where}: {d['field']} {d['theirs']} in the backend, {d['ours']} in the reference"]


def reference_demand(doc: dict, scores, layer: int, layer_budget: int):
    """The reference's head demand r_h at a compression, from the scores it pooled, and the two pooled utilities
    at the threshold (the k-th and the (k+1)-th largest; None when there is no cut)."""
    rule = R.get_allocator(doc["settings"]["allocator"]).heads
    if rule not in (R.head_budgets, R.adakv_head_budgets):
        return None
    w, opts = doc["settings"]["window"], doc["settings"]["head_options"]
    utility = opts.get("utility", "length") if rule is R.head_budgets else "raw"
    tensors = [torch.tensor(sc, dtype=torch.float64, device="cpu") for _, sc in scores]
    r = R.head_demand(tensors, layer_budget, window=w, utility=utility,
                      normalize_heads=opts.get("normalize_heads", False) if rule is R.head_budgets else False)
    pooled = torch.cat(R.comparable(tensors, utility, w)).sort(descending=True).values
    k = len(tensors) * (layer_budget - w)
    if rule is R.head_budgets and opts.get("normalize_heads", False):  # the pooled values are rescaled per head:
        return r.tolist(), None  # no threshold pair is reported rather than one of other values
    return r.tolist(), (float(pooled[k - 1]), float(pooled[k])) if 0 < k < len(pooled) else None


def check(doc: dict, model, *, rtol: float | None = None, atol: float = ATOL, out=print) -> bool:
    """Replay `doc` and compare it event by event; print agreement or the first difference. True if all agree.
    rtol None: the file's dtype's (DTYPE_RTOL)."""
    rtol = DTYPE_RTOL.get(doc["settings"]["dtype"], RTOL) if rtol is None else rtol
    if "recipe" not in doc["model"]["source"] and doc["model"]["source"].get("fingerprint") is None:
        out("note: the file names no weight fingerprint, so check cannot tell whether the model it loads holds the "
            "weights the run used; a difference may come from other weights")
    g, _ = replay(model, doc)
    theirs, ours = doc["events"], g.events
    d = first_difference(theirs, ours)
    agree = len(theirs) if d is None else d["event"]
    for i in range(agree):
        out(f"event {i} (step {ours[i]['step']}): agrees ({sum(map(sum, ours[i]['lengths_after']))} tokens kept)")
    if d is None:
        out(f"all {len(ours)} compression events agree: budgets and kept positions are equal")
        return True
    scores = demand = None
    if d["field"] in ("kept_positions", "head_budgets"):
        _, scores = replay(model, doc, at_step=d["step"], layer=d["layer"])
    if d["field"] == "head_budgets":
        demand = reference_demand(doc, scores, d["layer"], ours[d["event"]]["layer_budgets"][d["layer"]])
    ours_event = ours[d["event"]] if d["event"] < len(ours) else None
    for line in explain(d, scores, doc, rtol, atol, ours_event, demand):
        out(line)
    return False


def check_main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="conformance.py check",
        description="Replay an events file on the per-head reference path with the same tokens forced and compare "
                    "every compression event: layer and head budgets, lengths and kept positions must be equal. "
                    "On the first difference it prints the event, layer and head, and the reference's scores of "
                    "the tokens that differ. Exit status 0 only when every event agrees.")
    p.add_argument("events", help=f"an events file ({SCHEMA_NAME} version {SCHEMA_VERSION}, events.schema.json)")
    p.add_argument("--model", help="the model folder the events were made with (default: the weight recipe named in "
                                   "the file, or else the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--rtol", type=float, help="relative tolerance under which two scores are a tie (default: the "
                                             "file's dtype's rounding: " + ", ".join(f"{k} {v:g}" for k, v in
                                                                                    DTYPE_RTOL.items()) + ")")
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
# The vectors

# The tiny model of the events vectors (weights: recipe_weights)
TINY_CONFIG = {"model_type": "llama", "vocab_size": 96, "hidden_size": 32, "intermediate_size": 64,
               "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
               "max_position_embeddings": 512, "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
               "tie_word_embeddings": False}




def lcg_tensor(shape, seed: int) -> torch.Tensor:
    """float32 values in [-1, 1) from the LCG of `recipe_weights` (stored exactly in the JSON)."""
    return torch.tensor(lcg_uniform(math.prod(shape), seed), dtype=torch.float32, device="cpu").view(shape)


def num(x) -> float:
    """A float64 result, to 12 significant digits: equal on every machine that computes in float64."""
    return float(f"{float(x):.12g}")


def run_case(function: str, inputs: dict, *, R=R, evict=evict):
    """The output of one vector case, computed by the reference functions (or by the modules given: the mutation
    test hands in deliberately wrong copies). docs/rules.md states every rule these cases pin."""
    x = inputs
    if function == "robustify":
        return R.robustify(torch.tensor(x["demand"], dtype=torch.float64, device="cpu"), x["total"], power=x["power"],
                           lo=x["lo"], hi=x["hi"], floor=x["floor"]).tolist()
    if function == "layer_budgets":
        return R.layer_budgets(x["allocator"], x["num_layers"], x["budget"], window=x["window"],
                               profile=x["profile_demand"], **x["options"]).tolist()
    if function == "head_budgets":
        scores = [torch.tensor(s, dtype=torch.float64, device="cpu") for s in x["scores"]]
        return getattr(R, x["rule"])(scores, x["layer_budget"], window=x["window"], **x["options"]).tolist()
    if function == "keep_indices":
        return evict.keep_indices(torch.tensor(x["scores"], dtype=torch.float64, device="cpu"), x["budget"],
                                  x["window"]).tolist()
    if function == "scores":
        q, k, v = (torch.tensor(x[n], dtype=torch.float64, device="cpu") for n in ("q_win", "k", "v"))
        out = evict.get_policy(x["policy"])(q, k, v, torch.tensor(x["pos"], device="cpu"), window=x["window"],
                                            **x["options"])
        return [num(s) for s in out.tolist()]
    if function == "trigger":  # the steps that compress: each step adds a token to every head, a compression cuts
        lengths = torch.full_like(torch.tensor(x["budgets"], device="cpu"), x["prompt_length"])  # (L, Hk)
        budgets, steps = torch.tensor(x["budgets"], device="cpu"), []
        for step in range(x["max_new_tokens"] + 1):
            if step > 0:
                lengths += 1
            if R.compression_due(step, x["interval"], lengths, budgets):
                steps.append(step)
                lengths = torch.minimum(lengths, budgets)
        return steps
    raise KeyError(function)


def same_output(expected, got, rtol: float = 1e-9) -> bool:
    """A vector's expected output against a computed one: integers exactly, floats within rtol (the files keep
    12 significant digits)."""
    if isinstance(expected, list):
        return isinstance(got, list) and len(got) == len(expected) and all(map(same_output, expected, got))
    if isinstance(expected, float) or isinstance(got, float):
        return abs(expected - got) <= rtol * max(abs(expected), abs(got), 1e-300)
    return expected == got


def vector_inputs() -> dict[str, list[dict]]:
    """Every vector file's inputs: each option of each function at a non-default value, each tie rule made
    decisive by a case, and the edges (one unit or layer, B = w + 1, zero demand, a head with nothing evictable)."""
    f64 = dict(dtype=torch.float64, device="cpu")
    rob = [dict(demand=[3.0, 1.0, 0.5, 0.0], total=40, power=0.5, lo=0.25, hi=2.0, floor=4),
           dict(demand=[1.0, 1.0, 1.0], total=31, power=0.5, lo=0.25, hi=2.0, floor=0),  # remainder tie: earlier unit
           dict(demand=[0.0, 3.0], total=28, power=0.5, lo=0.25, hi=2.0, floor=1),  # remainder tie: larger demand
           dict(demand=[0.0, 0.0], total=17, power=0.5, lo=0.25, hi=2.0, floor=2),  # all zero: uniform
           dict(demand=[100.0, 0.0, 0.0, 0.0], total=64, power=1.0, lo=0.25, hi=2.0, floor=8),  # zero share rises
           dict(demand=[5.0, 5.0, 1.0], total=30, power=0.0, lo=0.25, hi=2.0, floor=0),  # power 0: flat
           dict(demand=[9.0, 4.0, 1.0], total=42, power=2.0, lo=0.25, hi=2.0, floor=0),  # power 2: sharper
           dict(demand=[2.0, 1.0], total=20, power=0.5, lo=0.5, hi=1.2, floor=10),  # floors pin everyone
           dict(demand=[50.0, 1.0, 1.0, 1.0], total=40, power=1.0, lo=0.5, hi=1.5, floor=0),  # lo and hi both bind
           dict(demand=[50.0, 1.0, 1.0, 1.0], total=40, power=1.0, lo=0.5, hi=3.0, floor=0),  # lo binds alone
           dict(demand=[50.0, 1.0, 0.0, 1.0], total=40, power=1.0, lo=0.1, hi=3.0, floor=2),  # floor above lo·m
           dict(demand=[7.0], total=9, power=0.5, lo=0.25, hi=2.0, floor=0),  # one unit
           dict(demand=[float("inf"), 1.0, 1.0], total=30, power=0.5, lo=0.25, hi=2.0, floor=0)]  # infinite demand
    cases = {"robustify": rob}
    demand, lb = [0.5, 0.2, 0.3, 0.9], []
    for a in R.ALLOCATORS:
        for b, w in ((16, 4), (9, 8)):
            lb.append(dict(allocator=a, num_layers=4, budget=b, window=w, options={}))
    lb += [dict(allocator="wave", num_layers=4, budget=16, window=4, options={"gamma": 1.0}),
           dict(allocator="wave", num_layers=4, budget=16, window=4, options={"gamma": 0.0}),
           dict(allocator="wave", num_layers=4, budget=16, window=4, options={"gamma": 2.0, "lo": 0.1, "hi": 3.0}),
           dict(allocator="wave", num_layers=1, budget=16, window=4, options={}),  # one layer
           dict(allocator="pyramid", num_layers=4, budget=16, window=4, options={"beta": 5.0}),
           dict(allocator="pyramid", num_layers=1, budget=16, window=4, options={}),  # a pyramid of one layer
           dict(allocator="pyramid", num_layers=5, budget=10, window=4, options={"beta": 2.0})]
    for c in lb:
        rule = R.get_allocator(c["allocator"]).layers
        c["profile_demand"] = demand[:c["num_layers"]] if R.get_allocator(c["allocator"]).needs_profile else None
        c["options"] = resolved_options(rule, c["options"])  # every option the rule takes, defaults included
    cases["layer_budgets"] = lb
    heads = {
        "plain": [lcg_tensor((12,), 1).double(), lcg_tensor((12,), 2).double()],
        "ties": [torch.tensor([0.5] * 6 + [0.25] * 6, **f64), torch.tensor([0.5] * 12, **f64)],
        "pooled_tie_across_heads": [torch.ones(6, **f64), torch.ones(6, **f64), torch.ones(2, **f64) * 0.5],
        "ragged": [lcg_tensor((20,), 3).double().abs(), lcg_tensor((4,), 4).double().abs(),
                   lcg_tensor((9,), 5).double().abs()],
        "offsets": [lcg_tensor((10,), 11).double() + 3.0, lcg_tensor((10,), 12).double() * 4.0],  # normalize_heads
        "shorter_than_window": [torch.zeros(0, **f64), lcg_tensor((10,), 6).double().abs()],
        "nothing_evictable": [torch.zeros(0, **f64), torch.zeros(0, **f64)],  # zero demand everywhere
        "one_head_starved": [torch.full((16,), 1e-9, **f64), torch.linspace(1, 2, 16, **f64)],
    }
    rules = [("head_budgets", {"utility": "length"}), ("head_budgets", {"utility": "rank"}),
             ("head_budgets", {"utility": "raw"}), ("adakv_head_budgets", {}), ("uniform_heads", {}),
             ("head_budgets", {"beta": 1.0}), ("head_budgets", {"beta": 0.0, "mu": 0.1}),
             ("head_budgets", {"mu": 0.5}), ("head_budgets", {"mu": 0.5, "hi": 1.25}),
             ("head_budgets", {"normalize_heads": True}),
             ("head_budgets", {"utility": "raw", "normalize_heads": True}), ("adakv_head_budgets", {"alpha": 0.5}),
             ("adakv_head_budgets", {"alpha": 0.0})]
    hb = []
    for name, scores in heads.items():
        for rule, opts in rules:
            for layer_budget in (12, 5):  # B_l = 12, and B_l = w + 1
                hb.append({"case": name, "rule": rule, "scores": [[num(v) for v in s] for s in scores],
                           "layer_budget": layer_budget, "window": 4,
                           "options": resolved_options(getattr(R, rule), opts)})
    # The offline head split: a table row per layer (an even row, a leaning one, an all-zero one), scores unread.
    split = [[3.0, 1.0, 0.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]
    for layer in range(len(split)):
        for layer_budget, opts in ((12, {}), (5, {}), (12, {"beta": 1.0, "mu": 0.5})):
            hb.append({"case": "offline_split", "rule": "hindsight_heads",
                       "scores": [[num(v) for v in s] for s in heads["ragged"]], "layer_budget": layer_budget,
                       "window": 4, "options": resolved_options(R.hindsight_heads, {"layer": layer, "head_split": split,
                                                                                    **opts}, skip=("window",))})
    cases["head_budgets"] = hb
    ki = [(lcg_tensor((10,), 7).double(), 9, 4), (torch.tensor([1.0, 2.0, 2.0, 1.0, 2.0], **f64), 6, 3),
          (torch.ones(6, **f64), 5, 2), (lcg_tensor((3,), 8).double(), 12, 4), (lcg_tensor((6,), 9).double(), 4, 4),
          (torch.tensor([3.0, 1.0, 3.0, 2.0, 3.0, 3.0], **f64), 7, 4)]  # ties at the cut: the older tokens
    cases["keep_indices"] = [{"scores": [num(v) for v in s], "budget": b, "window": w} for s, b, w in ki]
    sc = []
    variants = [{}, {"lam": 0.3}, {"gqa_reduce": "mean"}, {"kernel": 3}, {"kernel": 1}, {"sim_threshold": 0.2},
                {"zero_col0_quirk": False}, {"sim_threshold": 0.2, "zero_col0_quirk": False}]
    for i, (G, w, T, D) in enumerate([(2, 4, 16, 8), (1, 3, 9, 4), (2, 4, 5, 8), (2, 3, 12, 6)]):
        q, k, v = lcg_tensor((G, w, D), 10 + i), lcg_tensor((T, D), 20 + i), lcg_tensor((T, D), 30 + i)
        if i == 1:
            k[3] = k[2]  # two equal keys: redundancy ties
        if i == 3:
            k[5] = k[5] * 1e-7  # a tiny key: R-KV's normalisation epsilon matters
        for policy in ("rkv", "snapkv"):
            fn = evict.get_policy(policy)
            for opts in variants if i in (0, 3) else [{}]:
                sc.append({"policy": policy, "q_win": q.tolist(), "k": k.tolist(), "v": v.tolist(),
                           "pos": list(range(T)), "window": w, "options": resolved_options(fn, opts)})
    unique = []
    for c in sc:  # snapkv takes fewer options than rkv: drop the repeats its variants make
        if c not in unique:
            unique.append(c)
    cases["scores"] = unique
    cases["trigger"] = [
        dict(prompt_length=30, budgets=[[12, 12], [12, 12]], interval=8, max_new_tokens=40),  # compresses at 0
        dict(prompt_length=5, budgets=[[12, 12], [12, 12]], interval=8, max_new_tokens=40),  # first over at 8
        dict(prompt_length=5, budgets=[[13, 20], [30, 25]], interval=8, max_new_tokens=40),  # at budget: not over
        dict(prompt_length=9, budgets=[[10, 40], [40, 40]], interval=1, max_new_tokens=12),  # every step
        dict(prompt_length=9, budgets=[[10, 12], [40, 11]], interval=5, max_new_tokens=33),  # ragged budgets
    ]
    return cases


def vector_cases() -> dict[str, list[dict]]:
    """Every vector file's cases: {"inputs": ..., "output": run_case(...)}."""
    return {name: [{"inputs": x, "output": run_case(name, x)} for x in inputs]
            for name, inputs in vector_inputs().items()}


EVENT_RUNS = [("reasonalloc", "rkv"), ("uniform", "rkv"), ("uniform", "snapkv"), ("pyramid", "rkv"), ("head", "rkv"),
              ("wave", "rkv"), ("adakv", "rkv")]


def event_documents(seed: int = 0) -> dict[str, dict]:
    """Full events files of the recipe model (float64, reference path): one per allocator and policy."""
    model = recipe_model(TINY_CONFIG, seed)
    prompt = torch.tensor([(7 * i + 3) % TINY_CONFIG["vocab_size"] for i in range(40)], device="cpu")
    docs = {}
    for allocator, policy in EVENT_RUNS:
        g = R.generate(model, None, prompt, budget=16, window=4, interval=8, max_new_tokens=48, allocator=allocator,
                       policy=policy, profile=[0.5, 0.2, 0.3], record_positions=True)
        docs[f"{allocator}-{policy}"] = events_document(
            model, g, source={"recipe": "lcg64", "seed": seed, "config": TINY_CONFIG})
    return docs


def write_vectors(out: Path) -> list[Path]:
    """Every vector file into `out` (one JSON per function, and events/ for the runs). Returns the files."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "events").mkdir(exist_ok=True)
    files = []
    for name, cases in vector_cases().items():
        files.append(out / f"{name}.json")
        write_atomic(files[-1], json.dumps({"function": name, "cases": cases}, indent=1) + "\n")
    for name, doc in event_documents().items():
        files.append(out / "events" / f"{name}.json")
        write_atomic(files[-1], json.dumps(doc) + "\n")
    return files


def write_random_model(out: Path, *, seed: int = 0, layers: int = 4, hidden: int = 256, heads: int = 8,
                       kv_heads: int = 2, context: int = 4096) -> Path:
    """A random Llama model folder made on the spot (weights: `recipe_weights` from `seed`), with a
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
    save_file(recipe_weights(config, seed), out / "model.safetensors", metadata={"format": "pt"})
    return out


# ----------------------------------------------------------------------------------------------
# CLI


def record_parser() -> argparse.ArgumentParser:
    p = R.parser("Run reasonalloc.py's main job (the same flags) and write the run as a versioned events document "
                 "(events.schema.json): the model's identity, every setting that changes a choice, the prompt and "
                 "generated token ids, and every compression event with its kept positions.")
    p.prog = "conformance.py record"
    p.add_argument("--events", required=True, help="the events JSON file to write")
    p.add_argument("--fast", action="store_true", help="run on the packed fast path (fast.py) instead of the "
                                                       "per-head reference")
    return p


def spooled(compress_fn, spool):
    """`compress_fn` that writes each compression's kept positions to `spool` (one JSON line per event) as it
    is made and hands generate none: a long recorded run's memory then grows with its events' budgets
    (steps × L × Hk numbers), not with steps × budget kept positions. `document_chunks` joins them back."""
    def compress(*args, positions=True, **kw):
        budgets, kept = compress_fn(*args, positions=True, **kw)
        spool.write(json.dumps([[p.tolist() for p in layer] for layer in kept]) + "\n")
        return budgets, None
    return compress


def document_chunks(doc: dict, spool):
    """An events document as JSON text chunks, one event at a time, each event's kept positions read back
    from `spool` (written by `spooled`, in event order), so the whole document is never held at once."""
    spool.seek(0)
    yield json.dumps({k: v for k, v in doc.items() if k != "events"})[:-1] + ', "events": ['
    for i, event in enumerate(doc["events"]):
        yield (", " if i else "") + json.dumps({**event, "kept_positions": json.loads(spool.readline())})
    yield "]}"


def record_main(args):
    """python conformance.py record: reasonalloc.py's main job, then its events document written to --events."""
    if args.compare:
        raise ValueError("--events records one run; --compare makes eight. Drop one of the two")
    events = check_output(args.events, "--events", inputs=[args.profile, *model_files(args.model)])
    with tempfile.TemporaryFile("w+", dir=events.parent, prefix=f".{events.name}.", suffix=".kept") as spool:
        def write(path, model, g):
            doc = events_document(model, g, source={"fingerprint": model_fingerprint(path)})
            write_atomic(events, document_chunks({**doc, "text": g.text}, spool))
            print(f"events written to {events} (check a backend's with: python conformance.py check FILE)")

        gen, compress = (fast.generate, fast.compress) if args.fast else (R.generate, R.compress)
        R.main(args, generate_fn=lambda *a, **kw: gen(*a, compress_fn=spooled(compress, spool), **kw), after=write,
               load_fn=fast.load_model if args.fast else None)


if __name__ == "__main__":
    if sys.argv[1:2] == ["check"]:  # the replay checker, with its own exit status (0 agree, 1 differ, 2 bad input)
        sys.exit(check_main(sys.argv[2:]))
    if sys.argv[1:2] == ["record"]:
        R.cli(record_main, record_parser, sys.argv[2:])
        sys.exit(0)
    p = argparse.ArgumentParser(description="Regenerate the conformance vectors, or write a random model folder; "
                                            "`record` and `check` (see their --help) write and replay events files.")
    p.add_argument("what", choices=["vectors", "random-model", "record", "check"])
    p.add_argument("--out", help="folder to write to (default for vectors: vectors/)")
    p.add_argument("--seed", type=int, default=0, help="random-model: the weights' seed")
    p.add_argument("--layers", type=int, default=4, help="random-model: layers")
    p.add_argument("--hidden", type=int, default=256, help="random-model: hidden size (8 heads, 2 KV heads)")
    args = p.parse_args()
    if args.what == "random-model":
        if not args.out:
            sys.exit("error: random-model needs --out DIR")
        if Path(args.out).exists() and (not Path(args.out).is_dir() or any(Path(args.out).iterdir())):
            sys.exit(f"error: --out {args.out} already exists and is not an empty folder; a random model is written "
                     f"into a new folder, so choose another name")
        if args.layers < 1 or args.hidden < 16 or args.hidden % 16:
            sys.exit(f"error: a random model needs --layers >= 1 and --hidden a positive multiple of 16 (8 heads of "
                     f"an even head dim), got --layers {args.layers} --hidden {args.hidden}")
        out = Path(args.out)
        work = out.with_name(f".{out.name}.tmp-{os.getpid()}")  # written whole, then renamed into place
        try:
            write_random_model(work, seed=args.seed, layers=args.layers, hidden=args.hidden)
            os.replace(work, out)
        except (OSError, KeyboardInterrupt) as e:
            shutil.rmtree(work, ignore_errors=True)
            sys.exit(f"error: cannot write a random model to {out} ({getattr(e, 'strerror', None) or 'interrupted'})")
        print(out)
    else:
        torch.set_num_threads(1)  # one summation order for the float64 reductions
        try:
            for f in write_vectors(Path(args.out or HERE / "vectors")):
                print(f)
        except (OSError, KeyboardInterrupt) as e:
            sys.exit(f"error: cannot write the vectors to {args.out or HERE / 'vectors'} "
                     f"({getattr(e, 'strerror', None) or 'interrupted'})")
