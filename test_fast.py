"""The packed fast path (fast.py) against the spec it mirrors: each twin gives the reference's numbers.

model.py's twin: the weight layouts and the split product, PackedCache, BatchCache and GraphDecoder;
evict.py's twin: the batched scores and selection; reasonalloc.py's twin: the row-wise head rules, the batched
compression, generate / teacher_force / generate_batch on this path. The spec's own tests: test_reasonalloc.py.
"""

import functools
import shutil

import pytest
import torch

import evict as E
import fast as Fa
import reasonalloc as R
from conftest import PROFILE, TINY_PROMPT, WAVE, ByteTok, forcing


@pytest.mark.parametrize("seed", range(3))
def test_robustify_rows_gives_robustify_bits(seed):
    """robustify_rows finds robustify's bisection scale by a search over float64 bit patterns: the same budgets,
    bit for bit, on every row, the degenerate ones included (zero demand, totals at the floors, a zero power,
    clips of 1, demands spread over twelve orders of magnitude), at any width of the search."""
    g = torch.Generator().manual_seed(seed)
    for trial in range(60):
        n, k = int(torch.randint(1, 6, (1,), generator=g)), [1, 2, 3, 8, 16][trial % 5]
        d = [torch.rand(n, k, generator=g) * 1000, torch.randint(0, 4, (n, k), generator=g).double(),
             torch.zeros(n, k), torch.rand(n, k, generator=g) ** 12 * 1e6][trial % 4]
        floor = [0, 1, 8][trial % 3]
        total = max(k * floor + int(torch.randint(0, 3000, (1,), generator=g)) * (trial % 7 != 0), 1)  # at the floors
        options = dict(power=[0.5, 1.0, 0.0][trial % 3], lo=[0.25, 0.0, 1.0][trial % 3], hi=[2.0, 1.0][trial % 2])
        rows = Fa.robustify_rows(d, total, floor=floor, **options)
        for i in range(n):
            assert rows[i].tolist() == R.robustify(d[i], total, floor=floor, **options).tolist(), (trial, i)
        # The search's width changes its rounds (63 at 1 try, 6 at 4095, a GPU's default), not what it finds.
        tries = [1, 7, 4095][trial % 3]
        assert torch.equal(Fa.robustify_rows(d, total, floor=floor, tries=tries, **options), rows), (trial, tries)
    # the default widths: the CPU's; a GPU's for one sequence (32 layers of 8 heads); a GPU's for 512 sequences,
    # narrowed so the (n, tries, k) block stays within 2^24 elements
    assert [Fa.search_tries(32, 8, "cpu"), Fa.search_tries(32, 8, "cuda"), Fa.search_tries(32 * 512, 8, "cuda")] == \
        [63, 4095, 127]
    assert [Fa.search_rounds(t) for t in (63, 4095, 127)] == [11, 6, 9]


@torch.inference_mode()
def test_weight_layouts_and_thread_split_equal_the_loaded_weights(tmp_path, tiny_hf):
    """store_weights changes where the weights lie and how many threads share a one-row product, never what
    the model computes: every layout and split gives the row-major, one-thread logits (prefill and decode)."""
    tiny_hf("qwen2").save_pretrained(tmp_path, safe_serialization=True)  # tied embedding, q/k/v biases
    base = Fa.load_model(tmp_path, layout="rows", parts=1)
    ids = torch.arange(3, 20)

    def logits(m):
        cache = m.new_cache()
        return torch.cat([m(ids, cache)] + [m(torch.tensor([t]), cache) for t in (5, 9, 40, 7)])

    ref = logits(base)
    for layout, parts in [("columns", 1), ("columns", 2), ("rows", 2), ("columns", 3), ("auto", None)]:
        m = Fa.load_model(tmp_path, layout=layout, parts=parts)
        a = m.blocks[0]
        wide, narrow = a.attn.wqkv, a.mlp.w_down  # out >= in (128 x 64) and out < in (64 x 96)
        columns = layout in ("columns", "auto")
        assert (wide.weight.stride(0) == 1) == columns and narrow.weight.is_contiguous()
        assert m.embed.weight is m.lm_head.weight and m.lm_head.weight.stride(0) == (1 if columns else 64)
        n = torch.get_num_threads() if parts is None else parts
        assert wide.parts == (n if 64 % n == 0 else 1) and narrow.parts == (n if 64 % n == 0 else 1)
        torch.testing.assert_close(logits(m), ref, rtol=1e-5, atol=1e-5)
        for lin in (wide, narrow):  # a strided row (every other element) goes through the split as well
            x = torch.randn(1, 2 * lin.in_features)[:, ::2]
            torch.testing.assert_close(lin(x), torch.nn.functional.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-5)
        for name, p in base.state_dict().items():  # the same values under the same names and shapes
            assert torch.equal(m.state_dict()[name], p), name
    with pytest.raises(ValueError, match="layout must be"):
        Fa.load_model(tmp_path, layout="blocked")
    # A set of projection names: those column-major, the rest rows (the GPU's "auto", Fa.GPU_COLUMNS)
    m = Fa.load_model(tmp_path, layout=Fa.GPU_COLUMNS, parts=1)
    a = m.blocks[0]
    assert a.attn.wqkv.weight.is_contiguous() and a.attn.wo.weight.stride(0) == 1 and a.mlp.w_down.weight.stride(0) == 1
    assert m.embed.weight is m.lm_head.weight and m.lm_head.weight.stride(0) == 1
    torch.testing.assert_close(logits(m), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="unknown projection name"):
        Fa.load_model(tmp_path, layout={"o", "gate"})


BATCH_PROMPTS = [TINY_PROMPT, (torch.arange(60) * 7 + 5) % 97, torch.arange(10, 22)]  # 40, 60 and 12 tokens


def batch_vs_separate(model, tok, prompts, seeds, **kw):
    """generate_batch against one fast.generate per prompt: the same tokens, events, cache sizes,
    and logits within float tolerance. Returns the batch's results."""
    seen = {}
    batch = Fa.generate_batch(model, tok, prompts, seeds=seeds,
                             on_logits=lambda i, step, x: seen.setdefault(i, []).append(x.clone()), **kw)
    for i, (p, seed) in enumerate(zip(prompts, seeds)):
        ref = []
        g = Fa.generate(model, tok, p, seed=seed, hook=lambda step, t, x, c: ref.append(x.clone()), **kw)
        b = batch[i]
        assert b.tokens == g.tokens, f"sequence {i}"
        assert b.events == g.events, f"sequence {i}"
        assert (b.cache_tokens, b.full_tokens, b.held_tokens, b.held_full_tokens, b.cache_bytes, b.full_bytes) == \
            (g.cache_tokens, g.full_tokens, g.held_tokens, g.held_full_tokens, g.cache_bytes, g.full_bytes)
        assert b.settings == g.settings and b.prompt_ids == g.prompt_ids
        torch.testing.assert_close(torch.stack(seen[i]), torch.stack(ref[:len(seen[i])]), rtol=1e-5, atol=1e-5)
    return batch


@pytest.mark.parametrize("policy", ["rkv", "snapkv"])
@pytest.mark.parametrize("allocator", list(R.ALLOCATORS))
def test_batched_generation_equals_separate_runs(tiny_model, allocator, policy):
    """Three prompts of different lengths in one batch; each is compressed on its own schedule (the short one
    reaches its budget later) with its own head budgets."""
    batch = batch_vs_separate(tiny_model, ByteTok(), BATCH_PROMPTS, [0, 1, 2], budget=16, allocator=allocator,
                              policy=policy, profile=PROFILE, interval=8, window=4, max_new_tokens=30,
                              record_positions=True)
    assert all(len(g.tokens) == 30 for g in batch)
    steps = [[e["step"] for e in g.events] for g in batch]
    assert steps[0][0] == 0
    if min(batch[2].layer_budgets) >= 12:  # the 12-token prompt is not over budget after its prefill
        assert steps[2][0] > 0
    if allocator in ("head", "reasonalloc", "adakv", "hindsight"):  # the head level splits each sequence's heads apart
        assert any(len(set(h)) > 1 for g in batch for e in g.events for h in e["head_budgets"])


@pytest.mark.parametrize("policy", ["rkv", "snapkv", "knorm", "streaming", "random"])
def test_score_layers_stacks_score_packed(tiny_model, policy):
    """A compression scores a group of layers in one call: each layer's block equals its own score_packed
    (heads ragged after a head-wise compression, layers of different longest heads), and layer_groups splits
    the layers when the stacked heads would pass the limit."""
    cache = Fa.new_cache(tiny_model, 4, spare=8)
    tiny_model(TINY_PROMPT, cache)
    Fa.compress(cache, torch.tensor([30, 12, 20]), "reasonalloc", "rkv")
    for t in range(5):
        tiny_model(torch.tensor([t + 3]), cache)
    Hk = cache.config.num_kv_heads
    assert len(set(cache.n[0].tolist())) > 1 and len({int(cache.n[l].max()) for l in range(3)}) > 1
    s = Fa.score_layers(cache, [0, 1, 2], policy)
    assert s.shape == (3 * Hk, int(cache.n.max()))
    for l in range(3):
        one = Fa.score_packed(cache, l, policy)
        block = s[l * Hk:(l + 1) * Hk]
        torch.testing.assert_close(block[:, :one.shape[1]], one, rtol=1e-6, atol=1e-7)
        assert torch.isinf(block[:, one.shape[1]:]).all()
    assert Fa.layer_groups(cache) == [[0, 1, 2]]
    assert Fa.layer_groups(cache, max_rows=Hk * int(cache.n.max())) == [[0], [1], [2]]


def test_compress_without_positions_cuts_the_same(tiny_model):
    """compress(positions=False) returns no kept positions and cuts every head as positions=True does, on both paths."""
    for new_cache, compress in ((tiny_model.new_cache, R.compress), (lambda w: Fa.new_cache(tiny_model, w), Fa.compress)):
        out = []
        for positions in (True, False):
            cache = new_cache(4)
            tiny_model(TINY_PROMPT, cache)
            budgets, kept = compress(cache, torch.tensor([30, 12, 20]), "reasonalloc", "rkv", positions=positions)
            assert (kept is None) == (not positions)
            out.append((budgets, cache.lengths(), [cache[l][h].pos for l in range(3) for h in range(2)]))
        assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])
        assert all(torch.equal(a, b) for a, b in zip(out[0][2], out[1][2]))


def test_compress_with_the_full_policy_evicts_nothing_on_both_paths(tiny_model):
    out = []
    for cache, compress in ((tiny_model.new_cache(4), R.compress), (Fa.new_cache(tiny_model, 4), Fa.compress)):
        tiny_model(TINY_PROMPT, cache)
        budgets, kept = compress(cache, torch.tensor([10, 10, 10]), "reasonalloc", "full")
        assert (cache.lengths() == 40).all() and all(len(p) == 40 for layer in kept for p in layer)
        out.append(budgets)
    assert torch.equal(out[0], out[1])


@pytest.mark.parametrize("seed", range(6))
def test_head_rules_rows_equal_the_rules_bit_for_bit(seed):
    """head_rule_rows on padded (n, Hk, S) scores gives, row by row, what each head rule gives on that sequence's
    per-head lists: adversarial lengths (empty heads, all candidates fitting), tied scores, zero demand."""
    g = torch.Generator().manual_seed(seed)
    n, Hk, S, w = 7, 4, 30, 3
    held = torch.randint(w, S + 1, (n, Hk), generator=g)
    held[0] = w  # no candidates at all
    held[1, :2] = S
    ties = torch.randint(0, 4, (n, Hk, S), generator=g).float() / 7  # many exact ties
    scores = torch.where(torch.rand(n, 1, 1, generator=g) < 0.5, ties, torch.rand(n, Hk, S, generator=g))
    scores = scores.masked_fill(torch.arange(S)[None, None, :] >= (held - w)[:, :, None], float("-inf"))
    for B in (w, w + 2, 9, 20, 40):
        for rule, options in [(R.head_budgets, {}), (R.head_budgets, {"utility": "raw", "beta": 1.0, "mu": 0.0}),
                              (R.head_budgets, {"utility": "rank"}), (R.head_budgets, {"normalize_heads": True}),
                              (R.adakv_head_budgets, {}), (R.uniform_heads, {})]:
            rows = Fa.head_rule_rows(rule, scores, held, B, window=w, **options)
            for i in range(n):
                lists = [scores[i, h, :held[i, h] - w] for h in range(Hk)]
                assert rows[i].tolist() == rule(lists, B, window=w, **options).tolist(), (rule.__name__, options, B, i)
    # One budget per row (compress_sequences splits every layer of every sequence in one call)
    budgets = torch.randint(w, 41, (n,), generator=g)
    for rule, options in [(R.head_budgets, {}), (R.adakv_head_budgets, {}), (R.uniform_heads, {}),
                          (R.head_budgets, {"utility": "rank"})]:
        rows = Fa.head_rule_rows(rule, scores, held, budgets, window=w, **options)
        for i in range(n):
            lists = [scores[i, h, :held[i, h] - w] for h in range(Hk)]
            assert rows[i].tolist() == rule(lists, int(budgets[i]), window=w, **options).tolist(), (rule.__name__, i)


def test_batched_sampling_stops_and_graph_step(tiny_model):
    """Samples of one prompt (seeds 5, 6, 5: the first and last agree), a sequence that stops early and leaves
    the batch while the others go on, and the same through fast.GraphDecoder's static step."""
    kw = dict(budget=16, allocator="reasonalloc", profile=WAVE, interval=8, window=4, max_new_tokens=24)
    batch = batch_vs_separate(tiny_model, ByteTok(), [TINY_PROMPT] * 3, [5, 6, 5], temperature=0.9, **kw)
    assert batch[0].tokens == batch[2].tokens != batch[1].tokens
    greedy = Fa.generate_batch(tiny_model, ByteTok(), BATCH_PROMPTS, budget=16, profile=WAVE, interval=8, window=4,
                              max_new_tokens=24)
    stop = greedy[1].tokens[10]  # a token that ends sequence 1 at step 10 (and maybe others, at their own steps)

    class StopTok(ByteTok):
        eos_token_id = stop

    batch = batch_vs_separate(tiny_model, StopTok(), BATCH_PROMPTS, [0, 1, 2], **kw)
    assert len(batch[1].tokens) <= 10 and max(len(g.tokens) for g in batch) > len(batch[1].tokens)
    graph = Fa.generate_batch(tiny_model, StopTok(), BATCH_PROMPTS, graph=True, **kw)
    assert [g.tokens for g in graph] == [g.tokens for g in batch] and [g.events for g in graph] == [g.events for g in batch]


def test_batched_generation_bad_input(tiny_model):
    kw = dict(budget=16, profile=WAVE, window=4, max_new_tokens=4)
    with pytest.raises(ValueError, match="non-empty list of prompts"):
        Fa.generate_batch(tiny_model, ByteTok(), [], **kw)
    with pytest.raises(ValueError, match="2 seeds for 3 prompts"):
        Fa.generate_batch(tiny_model, ByteTok(), BATCH_PROMPTS, seeds=[0, 1], **kw)
    calls = []
    hook = tiny_model.register_forward_pre_hook(lambda *_: calls.append(1))
    try:  # refused before any prompt is prefilled (issue 33, item 8)
        with pytest.raises(ValueError, match=r"prompt\(s\) \[1\] hold fewer than window"):
            Fa.generate_batch(tiny_model, ByteTok(), [TINY_PROMPT, torch.arange(3, 5)], **kw)
    finally:
        hook.remove()
    assert not calls
    # Types at the door (issue 33, items 5 and 9): prompts are text or token ids in the vocabulary, seeds integers.
    for prompts, words in [([None], "prompt 0 must be text or a 1-D list or tensor of token ids"),
                           ([TINY_PROMPT, 5], "prompt 1 must be text"), ([[1, 2.5]], "prompt 0 must be text"),
                           ([torch.full((10,), 97)], "prompt 0 holds token ids outside the vocabulary of 97")]:
        with pytest.raises(ValueError, match=words):
            Fa.generate_batch(tiny_model, ByteTok(), prompts, **kw)
    for seeds, words in [("ab", "seeds must be a list"), (3, "seeds must be a list"), ([1.5, 2, 3], "integers"),
                         ([None, 1, 2], "integers"), (torch.tensor([0.5, 1.0, 2.0]), "1-D tensor of integers")]:
        with pytest.raises(ValueError, match=words):
            Fa.generate_batch(tiny_model, ByteTok(), BATCH_PROMPTS, seeds=seeds, **kw)
    as_list = Fa.generate_batch(tiny_model, ByteTok(), [TINY_PROMPT.tolist()], seeds=torch.tensor([7]), **kw)
    assert as_list[0].tokens == Fa.generate_batch(tiny_model, ByteTok(), [TINY_PROMPT], seeds=[7], **kw)[0].tokens
    with pytest.raises(ValueError, match="context"):
        Fa.generate_batch(tiny_model, ByteTok(), [TINY_PROMPT, torch.arange(600) % 97], **kw)
    with pytest.raises(ValueError, match="budget"):
        Fa.generate_batch(tiny_model, ByteTok(), BATCH_PROMPTS, **{**kw, "budget": 3})


@pytest.mark.parametrize("allocator", list(R.ALLOCATORS))
@pytest.mark.parametrize("policy", ["rkv", "snapkv"])
def test_packed_path_equals_reference(tiny_model, allocator, policy):
    """Same logits at every step and the same kept positions at every compression, through ragged
    head-wise budgets (force a fixed continuation so both see identical inputs)."""
    force = ((torch.arange(40) * 7 + 3) % 97).tolist()
    runs = []
    for gen in (R.generate, Fa.generate):
        logits = []
        g = gen(tiny_model, ByteTok(), TINY_PROMPT, budget=20, allocator=allocator, policy=policy,
                       profile=PROFILE, interval=6, max_new_tokens=len(force), hook=forcing(force, logits),
                       record_positions=True)
        runs.append((g, torch.stack(logits)))
    (ref, ref_logits), (fast, fast_logits) = runs
    torch.testing.assert_close(fast_logits, ref_logits, rtol=1e-5, atol=1e-5)
    assert len(ref.events) == len(fast.events) >= 5
    for a, b in zip(ref.events, fast.events):
        assert a["head_budgets"] == b["head_budgets"] and a["kept_positions"] == b["kept_positions"]
    assert ref.cache_tokens == fast.cache_tokens and ref.cache_bytes == fast.cache_bytes
    if allocator in ("head", "reasonalloc", "adakv", "hindsight"):  # the case the packing must get right
        assert any(len(set(row)) > 1 for e in ref.events for row in e["head_budgets"]), "no ragged heads"


@pytest.mark.parametrize("policy", ["streaming", "knorm", "random"])
def test_packed_scores_and_selection_equal_reference_other_policies(tiny_model, policy):
    force = ((torch.arange(30) * 5 + 1) % 97).tolist()
    out = [gen(tiny_model, ByteTok(), TINY_PROMPT, budget=16, allocator="adakv", policy=policy,
               interval=5, max_new_tokens=len(force), hook=forcing(force), record_positions=True)
           for gen in (R.generate, Fa.generate)]
    assert [e["kept_positions"] for e in out[0].events] == [e["kept_positions"] for e in out[1].events]


def test_packed_redundancy_in_row_blocks_equals_per_head():
    """Every head's redundancy over its own rows, in one padded block or in row blocks, with the heads in one
    group or in groups of similar length (lengths given), whatever the padding holds (here NaN)."""
    torch.manual_seed(0)
    k = torch.randn(6, 50, 16)
    k[:, 20] = k[:, 5] * 2  # planted duplicates
    n = torch.tensor([50, 31, 12, 45, 31, 40])  # groups [0, 3, 5], [1, 4] (a tie), [2]
    for h in range(6):
        k[h, n[h]:] = float("nan")
    for quirk in (True, False):
        for threshold in (0.5, -0.1):  # below 0, padding's zero cosines must still not count as similar
            for chunk in (1 << 26, 6 * 50 * 7):  # one block, and blocks of 7 rows
                for lengths in (None, n):
                    got = Fa.redundancy(k, n, zero_col0_quirk=quirk, sim_threshold=threshold, chunk_elems=chunk,
                                        lengths=lengths)
                    for h in range(6):
                        want = E.redundancy(k[h, :n[h]], zero_col0_quirk=quirk, sim_threshold=threshold)
                        torch.testing.assert_close(got[h, :n[h]], want, rtol=1e-6, atol=1e-7)
                        assert (got[h, n[h]:] == 0).all()


def test_length_groups_by_hand():
    """Longest first; a head joins while it holds at least 3/4 of its group's longest; empty heads are left out."""
    assert Fa.length_groups([50, 31, 12, 45, 0, 38]) == [([0, 3, 5], 50), ([1], 31), ([2], 12)]
    assert Fa.length_groups([8, 8, 8]) == [([0, 1, 2], 8)]
    assert Fa.length_groups([0, 0]) == []


def test_packed_cache_appends_in_place_and_trims_to_budget_plus_interval(tiny_model):
    cache = Fa.new_cache(tiny_model, 8, spare=16)
    tiny_model(TINY_PROMPT, cache)  # 40 tokens: capacity 40 + 16
    storage = cache.k[0].data_ptr()
    for t in range(10):
        tiny_model(torch.tensor([t]), cache)
    assert cache.k[0].data_ptr() == storage and cache.k[0].shape[1] == 56  # no reallocation
    Fa.compress(cache, torch.full((3,), 20), "reasonalloc", "rkv")  # 3 layers x 2 KV heads, B_l = 20
    assert (cache.lengths().sum(1) == 2 * 20).all() and cache.ragged(1)
    longest = int(cache.lengths()[1].max())
    assert cache.k[1].shape[1] == longest + 16 + 8  # trimmed from 56 to the kept tokens plus 1.5 intervals
    for t in range(16):
        tiny_model(torch.tensor([t]), cache)
    before = [(k.data_ptr(), k.shape[1]) for k in cache.k]
    Fa.compress(cache, torch.full((3,), 20), "reasonalloc", "rkv")
    reused = 0
    for layer, (ptr, cap) in enumerate(before):
        m = int(cache.lengths()[layer].max())
        fits = m + 16 <= cap <= m + 32  # storage already 1 to 2 intervals above the longest head
        assert (cache.k[layer].data_ptr() == ptr) == fits  # then compressed in place, else trimmed
        reused += fits
    assert reused >= 1
    assert int(cache.lengths()[1].max()) + 16 <= cache.k[1].shape[1] <= int(cache.lengths()[1].max()) + 2 * 16  # the kept tokens plus one interval of spare rows
    assert cache.nbytes() == int(cache.lengths().sum()) * 2 * 16 * 4


def test_graph_decoder_widens_the_reuse_band(tiny_model):
    """Under GraphDecoder a new storage costs a new CUDA graph, so a compression reuses the storage while it
    is 1 to 3 intervals above the longest head (eager: 1 to 2)."""
    for graphed in (False, True):
        cache = Fa.new_cache(tiny_model, 8, spare=16)
        tiny_model(TINY_PROMPT, cache)  # 40 tokens: capacity 40 + 16
        if graphed:
            Fa.GraphDecoder(tiny_model, cache)
        storage = cache.k[0].data_ptr()
        Fa.compress(cache, torch.full((3,), 20), "uniform", "rkv")  # 20 rows a head: 64 = 20 + 2.75 intervals
        assert (cache.k[0].data_ptr() == storage) == graphed
        # GraphDecoder rounded the 56 rows up to 64, a multiple of PackedCache.align = 16
        assert cache.k[0].shape[1] == (64 if graphed else 20 + 16 + 8)


def test_graph_decoder_rounds_capacities_to_16_rows(tiny_model):
    """Under GraphDecoder every layer's storage holds a multiple of 16 rows (its ragged layers' mask rows are
    that far apart): the storage it finds, after each compression's trim and after a growth; eager caches
    keep exact capacities."""
    cache = Fa.new_cache(tiny_model, 8, spare=16)
    tiny_model(TINY_PROMPT, cache)  # 40 tokens: capacity 56
    assert [k.shape[1] for k in cache.k] == [56] * 3
    decode = Fa.GraphDecoder(tiny_model, cache)
    caps = lambda: [k.shape[1] for k in cache.k]  # noqa: E731
    assert caps() == [64] * 3 and all(v.shape[1] == 64 and p.shape[1] == 64 for v, p in zip(cache.v, cache.pos))
    for step in range(62):
        decode(step % 50)
        assert all(c % 16 == 0 and c >= n + 1 for c, n in zip(caps(), cache.lengths().amax(dim=1).tolist()))
        if step == 28:
            assert caps() == [96] * 3  # grown at 40 + 23 + 2 rows to those plus a spare, rounded up: 96
        if step >= 29 and (step - 29) % 16 == 0:
            before = caps()
            Fa.compress(cache, torch.tensor([12, 20, 28]), "reasonalloc", "rkv", positions=False)
            longest = cache.lengths().amax(dim=1).tolist()
            for c0, c, m in zip(before, caps(), longest):
                assert c % 16 == 0 and m + 16 <= c <= -(-(m + 48) // 16) * 16  # 1 to 3 spares, rounded up
                assert c == c0 or c == -(-(m + 32) // 16) * 16  # reused, or trimmed to 2 spares rounded up
    caches = [Fa.new_cache(tiny_model, 8, spare=16) for _ in range(2)]
    for c, ids in zip(caches, (TINY_PROMPT, TINY_PROMPT[:33])):
        tiny_model(ids, c)
    batch = Fa.BatchCache.stack(caches)  # capacities 40 + 16 rows
    Fa.GraphDecoder(tiny_model, batch)
    batch.select([1])  # sequence 1 holds 33 rows: 33 + 16 + 8, rounded up
    assert [k.shape[1] for k in batch.k] == [64] * 3 and batch.n.amax().item() == 33


def test_graph_decoder_static_step_equals_eager_packed(tiny_model):
    """GraphDecoder's static step (whole-capacity attention, scatter append, rolling window queries),
    run eagerly on CPU, gives the eager fast path's logits through compressions and capacity growth."""
    force = ((torch.arange(30) * 11 + 2) % 97).tolist()
    layer_b = torch.tensor([14, 10, 12])
    for allocator in ("reasonalloc", "uniform"):  # ragged heads; heads of one length (one mask row per layer)
        logits = []
        for graph in (False, True):
            cache = Fa.new_cache(tiny_model, 8, spare=4)
            out = [tiny_model(TINY_PROMPT, cache)[-1]]
            step = Fa.GraphDecoder(tiny_model, cache) if graph else (lambda t: tiny_model(torch.tensor([t]), cache))
            for i, t in enumerate(force, 1):
                out.append(step(t)[-1])
                if i % 6 == 0:
                    Fa.compress(cache, layer_b, allocator, "rkv")
            logits.append(torch.stack(out))
            assert cache.next_pos == 40 + 30 and (cache.lengths() <= 14 + 6).all()
            if graph:
                assert cache.even == ((True,) * 3 if allocator == "uniform" else cache.even) and \
                    (allocator == "uniform" or not all(cache.even))
        torch.testing.assert_close(logits[1], logits[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="PackedCache"):
        Fa.GraphDecoder(tiny_model, tiny_model.new_cache(8))


@torch.inference_mode()
def test_static_step_keeps_window_queries_as_a_ring_read_in_order(tiny_model):
    """The static step writes each new query over the oldest window query (a ring); everything else reads them
    oldest first: after 11 steps (not a multiple of w = 8) the window queries equal the reference cache's, read
    through window_queries, after scoring, and in a BatchCache stacked from a cache left mid-ring."""
    force = ((torch.arange(11) * 5 + 1) % 97).tolist()
    ref = tiny_model.new_cache(8)
    tiny_model(TINY_PROMPT, ref)
    for t in force:
        tiny_model(torch.tensor([t]), ref)

    def ring():
        cache = Fa.new_cache(tiny_model, 8)
        tiny_model(TINY_PROMPT, cache)
        step = Fa.GraphDecoder(tiny_model, cache)
        for t in force:
            step(t)
        assert cache.q_shift == 3 and cache.q_slot.tolist() == [3]  # 11 steps past an ordered window of 8
        return cache

    close = functools.partial(torch.testing.assert_close, rtol=1e-5, atol=1e-5)
    cache = ring()
    close(torch.roll(cache.q_win[0], -3, dims=1), ref.q_win[0])  # as the static step left them: a ring
    assert not torch.allclose(cache.q_win[0], ref.q_win[0], rtol=1e-3, atol=1e-3)
    for l in range(3):
        for h in range(2):
            close(cache.window_queries(l, h), ref.window_queries(l, h))
    assert cache.q_shift == 0 and cache.q_slot.tolist() == [0]
    cache = ring()
    Fa.score_packed(cache, 1, "rkv")
    assert cache.q_shift == 0
    close(cache.q_win[1], ref.q_win[1])
    batch = Fa.BatchCache.stack([ring(), ring()])
    for l in range(3):
        close(batch.q_win[l], torch.cat([ref.q_win[l]] * 2))


def test_cache_without_window_queries_decodes_the_same_and_refuses_scoring(tiny_model):
    """queries=False (a FullKV run that never compresses): the same logits, eager and in the static step, with
    no window queries kept; scoring, compressing or batching it is refused with a clear error."""
    force = ((torch.arange(12) * 7 + 3) % 97).tolist()
    logits = []
    for queries in (True, False):
        for graph in (False, True):
            cache = Fa.new_cache(tiny_model, 8, spare=4, queries=queries)
            out = [tiny_model(TINY_PROMPT, cache)[-1]]
            step = Fa.GraphDecoder(tiny_model, cache) if graph else (lambda t: tiny_model(torch.tensor([t]), cache))
            out += [step(t)[-1] for t in force]
            logits.append(torch.stack(out))
            assert cache.q_win[0].shape[1] == (8 if queries else 0)
    for other in logits[1:]:
        torch.testing.assert_close(other, logits[0], rtol=1e-5, atol=1e-5)
    for call in (lambda: Fa.compress(cache, torch.tensor([14, 10, 12]), "reasonalloc", "rkv"),
                 lambda: Fa.score_packed(cache, 0, "rkv"), lambda: cache.window_queries(0, 0),
                 lambda: Fa.BatchCache.stack([cache])):
        with pytest.raises(ValueError, match="queries=True"):
            call()


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("cl") is None,
                    reason="torch.compile's CPU backend needs a C++ compiler")
def test_compiled_static_step_equals_eager(tiny_model):
    """GraphDecoder(compile=True): the static step through torch.compile gives the eager step's logits,
    through a compression that moves the storage (a new layout, compiled again)."""
    import torch._dynamo

    torch._dynamo.reset()
    force = ((torch.arange(12) * 7 + 3) % 97).tolist()
    logits = []
    for compiled in (False, True):
        cache = Fa.new_cache(tiny_model, 8, spare=4)
        tiny_model(TINY_PROMPT, cache)
        step, out = Fa.GraphDecoder(tiny_model, cache, compile=compiled), []
        for i, t in enumerate(force, 1):
            out.append(step(t)[-1])
            if i == 6:
                Fa.compress(cache, torch.tensor([14, 10, 12]), "reasonalloc", "rkv")
        logits.append(torch.stack(out))
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("allocator", ["uniform", "head", "reasonalloc", "hindsight"])
def test_teacher_force_equals_reference(tiny_model, allocator):
    """fast.teacher_force against reasonalloc.teacher_force (itself tested equal to step-by-step decoding): the
    same events, logits within float tolerance."""
    force = ((torch.arange(45) * 13 + 5) % 97).tolist()
    kw = dict(budget=14, allocator=allocator, profile=PROFILE, interval=8, record_positions=True)
    ref_logits, ref_events = R.teacher_force(tiny_model, TINY_PROMPT, force, **kw)
    logits, events = Fa.teacher_force(tiny_model, TINY_PROMPT, force, **kw)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    assert events == ref_events and len(events) == 6
