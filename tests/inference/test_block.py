"""inference/block.py: a transformer block of an eager decode step as one native call
(llamaworks::decode_block) equals the modules' path bit for bit, and steps aside wherever a part
has no native kernel."""

from __future__ import annotations

import copy
import os
import weakref

import pytest
import torch

from llamaworks.inference import native
from llamaworks.inference.block import INT4, INT4_TILES, NativeBlock, NativeTransformer, projection, use_native_blocks
from llamaworks.inference.fuse import fuse_projections, unfuse
from llamaworks.inference.generate import generate_ids
from llamaworks.inference.kernels import use_native_kernels
from llamaworks.inference.quant import Int4Linear, quantize_model
from llamaworks.model import ModelArgs, TransformerBlock, build_model

pytestmark = pytest.mark.usefixtures("one_thread", "native_lib")

# head_dim 32 (the native attention takes multiples of 16); GQA; dim 128 so int4 groups of 128 (the
# tiled layout on AVX-512 VNNI/BF16) fit.
ARGS = dict(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, multiple_of=128, max_seq_len=64)
PRECISIONS = {"fp32": (torch.float32, None, 0), "bf16": (torch.bfloat16, None, 0), "int8": (torch.float32, "int8", 0),
              "int4_g32": (torch.float32, "int4", 32), "int4_g128": (torch.float32, "int4", 128)}


def decode_model(precision: str, blocks: bool, whole_step: bool = True, args: dict | None = None):
    args = args or ARGS
    dtype, mode, group = PRECISIONS[precision]
    m = build_model(ModelArgs(**args), seed=0).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in m.named_parameters():  # larger than init: well-separated logits
            if not name.endswith("norm.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.15)
    if mode:
        quantize_model(m, mode, group_size=group)
    if dtype != torch.float32:
        m.to(dtype).init_rope()
    fuse_projections(m)
    use_native_kernels(m)
    # A NativeTransformer either way, as load_model makes it: its passes over a cache run their prompt
    # products in the library kernels.prompt_gemm picks (kernels.cache_pass), so both sides prefill alike.
    assert use_native_blocks(m) == args["n_layers"] and type(m) is NativeTransformer
    if not blocks:
        for layer in m.layers:
            layer.__class__ = TransformerBlock  # the modules' blocks: no plan, Transformer.forward
    elif not whole_step:
        m._make_plan = lambda: None  # no whole-step plan: the blocks one call each, from model.py's forward
    return m


def steps(model, rows=None, bsz=2, cache_rows=2):
    """Prefill 5 tokens per sequence, then 6 decode steps of 1 token and one of 3 (a speculative
    verification); each step's logits and the caches after."""
    g = torch.Generator().manual_seed(2)
    model.setup_caches(cache_rows, 32)
    out = []
    with torch.no_grad():
        tokens = torch.randint(0, 300, (bsz, 5), generator=g)
        out.append(model(tokens, torch.arange(5), rows=rows))
        pos = 5
        for n in (1, 1, 1, 1, 1, 1, 3):
            tokens = torch.randint(0, 300, (bsz, n), generator=g)
            out.append(model(tokens, torch.arange(pos, pos + n), rows=rows))
            pos += n
    caches = [t for layer in model.layers for t in (layer.attention.kv_cache.k, layer.attention.kv_cache.v)]
    return out, caches


def native_calls(model, monkeypatch, whole_step: bool = False) -> list[bool]:
    """Record whether each block call (NativeBlock._native_call) or, with whole_step, each decode step
    that may run natively (NativeTransformer._decode_plan) runs natively."""
    calls = []
    cls, name = (NativeTransformer, "_decode_plan") if whole_step else (NativeBlock, "_native_call")
    real = getattr(cls, name)

    def spy(self, *a):
        call = real(self, *a)
        calls.append(call is not None)
        return call

    monkeypatch.setattr(cls, name, spy)
    return calls


@pytest.mark.parametrize("whole_step", [True, False], ids=["step", "blocks"])
@pytest.mark.parametrize("precision", list(PRECISIONS))
def test_native_blocks_equal_the_modules_bit_for_bit(precision, whole_step, monkeypatch):
    want_logits, want_caches = steps(decode_model(precision, blocks=False))
    model = decode_model(precision, blocks=True, whole_step=whole_step)
    for m in model.layers.modules():  # the block takes int4 in the layout the ISA gave it: 16-row tiles or not
        if isinstance(m, Int4Linear):
            assert projection(m)[0] == (INT4_TILES if m._tiled else INT4)
    calls = native_calls(model, monkeypatch, whole_step)
    got_logits, got_caches = steps(model)
    # the prompt (10 rows) takes the modules' path, the 7 decode steps (2 and 6 rows) the native step or blocks
    assert calls == ([True] * 7 if whole_step else [False] * 2 + [True] * 14)
    for want, got in zip(want_logits, got_logits):
        assert torch.equal(got, want)
    for want, got in zip(want_caches, got_caches):
        assert torch.equal(got, want)


@pytest.mark.parametrize("whole_step", [True, False], ids=["step", "blocks"])
def test_cache_rows_are_written_and_read_as_the_modules_do(whole_step, monkeypatch):
    rows = torch.tensor([2, 0])  # a server's slots, out of order, row 1 untouched
    want = steps(decode_model("fp32", blocks=False), rows=rows, cache_rows=3)
    model = decode_model("fp32", blocks=True, whole_step=whole_step)
    calls = native_calls(model, monkeypatch, whole_step)
    got = steps(model, rows=rows, cache_rows=3)
    assert sum(calls) == (7 if whole_step else 14)
    for a, b in zip(want[0] + want[1], got[0] + got[1]):
        assert torch.equal(a, b)
    assert not got[1][0][1].any()  # row 1 of the first layer's keys was never written


def test_greedy_batch_decoding_through_generate_matches(monkeypatch):
    prompts = [[1, 17, 250, 3], [1, 5]]
    want = [t for t, _ in generate_ids(decode_model("int8", blocks=False), prompts, 10, temperature=0.0)]
    model = decode_model("int8", blocks=True)
    calls = native_calls(model, monkeypatch, whole_step=True)
    got = [t for t, _ in generate_ids(model, prompts, 10, temperature=0.0)]
    assert torch.equal(torch.cat(got, 1), torch.cat(want, 1)) and sum(calls) > 0


def test_blocks_step_aside_where_a_part_has_no_native_kernel(monkeypatch):
    model = decode_model("fp32", blocks=True)
    steps_native = native_calls(model, monkeypatch, whole_step=True)
    calls = native_calls(model, monkeypatch)
    # a forward hook on a block's module must see it run
    seen = []
    handle = model.layers[0].feed_forward.register_forward_hook(lambda *a: seen.append(1))
    steps(model)
    handle.remove()
    # no whole step (a module has a hook: its plan is None), the other block natively
    assert len(seen) == 8 and calls[2:] == [False, True] * 7 and steps_native == [False] * 7
    # unfused projections (as apply_lora leaves them): the modules' path, the same numbers
    want = steps(decode_model("fp32", blocks=False))
    calls.clear()
    unfuse(model)
    got = steps(model)
    assert not any(calls)
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    # a bf16 cache under fp32 activations (serve --kv-dtype), gradients, more than 8 rows: the modules' path
    model = decode_model("fp32", blocks=True)
    block = model.layers[0]
    pos = torch.zeros(2, 1, dtype=torch.long)
    x, freqs, mask = torch.randn(2, 1, 128), model.freqs_cis[pos], torch.ones(2, 1, 1, 32, dtype=torch.bool)
    model.setup_caches(2, 32)
    with torch.no_grad():
        assert block._native_call(x, freqs, pos, mask, None) is not None
        assert block._native_call(torch.randn(3, 3, 128), freqs, pos, mask, None) is None
    assert block._native_call(x, freqs, pos, mask, None) is None  # weights that record gradients
    model.setup_caches(2, 32, dtype=torch.bfloat16)
    with torch.no_grad():
        assert block._native_call(x, freqs, pos, mask, None) is None


def test_use_native_blocks_changes_the_class_only():
    plain = decode_model("int4_g32", blocks=False)
    model = copy.deepcopy(plain)
    assert use_native_blocks(model) == 2 and use_native_blocks(model) == 0  # once
    assert all(type(b) is NativeBlock and isinstance(b, TransformerBlock) for b in model.layers)
    want, got = plain.state_dict(), model.state_dict()
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)
    native.disable("test")
    try:
        assert use_native_blocks(copy.deepcopy(plain)) == 0
    finally:
        native.reset()


def test_decode_block_names_a_wrong_call():
    model = decode_model("fp32", blocks=True)
    model.setup_caches(1, 32)
    block = model.layers[0]
    x = torch.randn(1, 1, 128)
    pos = torch.zeros(1, 1, dtype=torch.long)
    with torch.no_grad():
        call = list(block._native_call(x, model.freqs_cis[pos], pos, torch.ones(1, 1, 1, 32, dtype=torch.bool), None))
    bad = list(call)
    bad[5] = bad[5][:-1]  # one tensor short
    with pytest.raises(RuntimeError, match="take more tensors than the 3 given"):
        torch.ops.llamaworks.decode_block(*bad)
    bad = list(call)
    bad[4] = [0, 0, 9, 0]
    with pytest.raises(RuntimeError, match="unknown projection kind 9"):
        torch.ops.llamaworks.decode_block(*bad)
    bad = list(call)
    bad[0] = torch.randn(3, 3, 128)
    with pytest.raises(RuntimeError, match="B \\* S <= 8"):
        torch.ops.llamaworks.decode_block(*bad)


def test_compiled_steps_call_the_block_and_write_the_caches_in_place():
    from torch._inductor.utils import run_and_get_code

    want_logits, want_caches = steps(decode_model("int4_g32", blocks=True))
    model = decode_model("int4_g32", blocks=True)
    model.setup_caches(2, 32)
    compiled = torch.compile(model, dynamic=False, fullgraph=True)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        tokens = torch.randint(0, 300, (2, 5), generator=g)
        logits = [model(tokens, torch.arange(5))]  # the prompt: eager
        tokens = torch.randint(0, 300, (2, 1), generator=g)
        out, (code, *_) = run_and_get_code(compiled, tokens, torch.arange(5, 6))
        logits.append(out)
    # one extern call per block, on the caches themselves: no functional copy of them
    assert code.count("= torch.ops.llamaworks.decode_block.default(") == ARGS["n_layers"] and "copy_" not in code
    torch.testing.assert_close(logits[1], want_logits[1], atol=1e-5, rtol=1e-5)  # inductor's norm and output
    caches = [t for layer in model.layers for t in (layer.attention.kv_cache.k, layer.attention.kv_cache.v)]
    for want, got in zip(want_caches, caches):  # position 5 written as the eager blocks wrote it
        assert torch.equal(got[:, :, :6], want[:, :, :6])


def test_generate_compiles_the_step_of_a_loaded_model_once_and_never_during_decode():
    # `llamaworks generate --compile` on a model as load_model makes it (NativeTransformer): the step is
    # compiled before the prefill, and the eager prefill between (inside kernels.cache_pass) must not
    # invalidate it: a guard on cache_pass's flag recompiled it at the first decode step. In a thread of
    # its own, as a server's or a notebook's: the flag is per thread, unset until a first prefill.
    import threading

    from torch._dynamo.utils import counters

    model = decode_model("fp32", blocks=True)
    want = [c[0] for c in generate_ids(model, [[1, 37, 99], [1, 5]], 6, temperature=0.0, logprobs=False)]
    torch._dynamo.reset()
    counters.clear()
    got, graphs = [], []

    def run():
        gen = generate_ids(model, [[1, 37, 99], [1, 5]], 6, temperature=0.0, compile=True, sync_every=1,
                           logprobs=False)
        got.append(next(gen)[0])
        graphs.append(counters["stats"]["unique_graphs"])
        got.extend(c[0] for c in gen)
        graphs.append(counters["stats"]["unique_graphs"])

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert graphs == [1, 1], (graphs, dict(counters["stats"]))
    assert torch.cat(got, 1).tolist() == torch.cat(want, 1).tolist()
    torch._dynamo.reset()


def test_the_step_plan_follows_the_caches_and_names_a_freed_plan():
    model = decode_model("int8", blocks=True)
    tokens, pos = torch.tensor([[3], [4]]), torch.tensor([0])
    with torch.no_grad():
        model.setup_caches(2, 32)
        first = model(tokens, pos)
        handle = model._plan.handle
        assert handle is not None and model(tokens, pos) is not None and model._plan.handle == handle  # reused
        # new weights and new caches (the next generate call): planned again, the new weights used
        for b in model.layers:
            b.ffn_norm.weight.mul_(0.5)
        want = decode_model("int8", blocks=False)
        for b in want.layers:
            b.ffn_norm.weight.mul_(0.5)
        model.setup_caches(2, 32)
        want.setup_caches(2, 32)
        got = model(tokens, pos)
        assert model._plan.handle != handle and torch.equal(got, want(tokens, pos)) and not torch.equal(got, first)
        with pytest.raises(RuntimeError, match=f"no plan {handle} \\(freed"):
            torch.ops.llamaworks.decode_step(handle, tokens, pos, torch.empty(0, dtype=torch.long))
        with pytest.raises(IndexError):  # a token outside the vocabulary, as the embedding names it
            model(torch.tensor([[300], [4]]), torch.tensor([1]))
        # a copy made after decoding runs on its own weights and caches, not through the original's plan
        twin = copy.deepcopy(model)
        for b in twin.layers:
            b.ffn_norm.weight.mul_(2.0)
        assert torch.equal(twin(tokens, pos), first) and twin._plan.handle not in (None, model._plan.handle)
        assert torch.equal(model(tokens, pos), got)
        # a state dict loaded between steps over the same caches is planned again (int4 rebuilds its layouts)
        handle = model._plan.handle
        model.load_state_dict(twin.state_dict())
        assert "_plan" not in model.__dict__ and torch.equal(model(tokens, pos), first)
        assert model._plan.handle != handle
        # clearing the caches frees them: the plan that held them goes too
        cache = weakref.ref(model.layers[0].attention.kv_cache.k)
        model.clear_caches()
        assert "_plan" not in model.__dict__ and cache() is None


def test_int32_ids_positions_and_rows_take_the_modules_path(monkeypatch):
    """The operators take int64; the model's forward also takes int32 ids, positions and rows (before this,
    int32 positions crashed the fused attention's rope_cache, blocks or not)."""
    want = decode_model("fp32", blocks=False)
    model = decode_model("fp32", blocks=True)
    for m in (want, model):
        m.setup_caches(3, 32)
    plans = native_calls(model, monkeypatch, whole_step=True)
    with torch.no_grad():
        i32 = torch.int32
        for tokens, pos, rows in ((torch.tensor([[3], [4]], dtype=i32), torch.tensor([0]), None),
                                  (torch.tensor([[3], [4]]), torch.tensor([1], dtype=i32), None),
                                  (torch.tensor([[3], [4]]), torch.tensor([2]), torch.tensor([2, 0], dtype=i32))):
            assert torch.equal(model(tokens, pos, rows=rows), want(tokens, pos, rows=rows))
    assert plans == []  # none reached the plan


BAD_STEPS = {"negative position": ([[1]], [-1]), "position past the cache": ([[1]], [32]),
             "negative id": ([[-1]], [0]), "id past the vocabulary": ([[300]], [0]),
             "more rows than the cache": ([[1], [2], [3]], [0])}


@pytest.mark.parametrize("case", list(BAD_STEPS))
def test_bad_steps_raise_as_the_modules_do(case):
    tokens, pos = (torch.tensor(t) for t in BAD_STEPS[case])
    for blocks in (True, False):  # an error naming the problem on both paths, never a crash
        model = decode_model("int4_g128", blocks=blocks)
        model.setup_caches(2, 32)
        with torch.no_grad(), pytest.raises((RuntimeError, IndexError)):
            model(tokens, pos)


def paged_passes(model, kv_dtype=None, hidden=False, rope_in_one=True):
    """The serving engine's passes over a paged cache (inference/paged.py): a ragged prompt pass of two
    sequences (the modules' path, more than 8 tokens), then 5 ragged decode passes of 3 sequences at
    their own positions, one token each; each pass's output (logits, or the normed hidden state) and
    the pools after."""
    from llamaworks.inference.paged import Ragged, RaggedGroup, setup_paged_caches

    table = setup_paged_caches(model, 40, 4, 64, dtype=kv_dtype)
    for layer in model.layers:
        layer.attention.kv_cache.rope_in_one &= rope_in_one
    g = torch.Generator().manual_seed(3)
    n, width, size = 3, 8, 4
    blocks = torch.arange(1, 1 + n * width).view(n, width)  # each sequence its own blocks (0 is the null block)
    outs = []
    with torch.no_grad():
        # sequences 0 and 2 start with a prompt of 6 tokens; 1 decodes at positions 9.. over keys never written
        table.blocks = blocks[[0, 2]]
        pos = torch.arange(6).repeat(2)
        table.ragged = Ragged(table.blocks[torch.arange(2).repeat_interleave(6), pos // size] * size + pos % size,
                              (RaggedGroup(0, 0, 2, 6, 0),))
        outs.append(model(torch.randint(0, 300, (1, 12), generator=g), pos.view(1, -1), return_hidden=hidden))
        for t in range(5):
            pos = torch.tensor([6 + t, 9 + t, 6 + t])
            table.blocks = blocks
            slots = blocks[torch.arange(n), pos // size] * size + pos % size
            table.ragged = Ragged(slots, (RaggedGroup(0, 0, n, 1, None),))
            outs.append(model(torch.randint(0, 300, (1, n), generator=g), pos.view(1, n), return_hidden=hidden))
        table.ragged = None
    return outs, [t for layer in model.layers for t in (layer.attention.kv_cache.k, layer.attention.kv_cache.v)]


@pytest.mark.parametrize("precision,kv_dtype,hidden", [(p, None, False) for p in PRECISIONS]
                         + [("fp32", torch.bfloat16, False), ("int4_g128", None, True)])
def test_a_paged_decode_pass_is_one_native_call_equal_to_the_modules(precision, kv_dtype, hidden, monkeypatch):
    # The serving engine's decode passes (one token per sequence, a paged pool) as one native call,
    # llamaworks::decode_step_paged: logits (or the hidden state the engine takes) and pool writes equal
    # the modules' (PagedKVCache.rope_update, paged.ragged_attention) bit for bit, for every precision and
    # a bf16 pool under an fp32 model (serve --kv-dtype); the prompt pass keeps the modules.
    want, want_pools = paged_passes(decode_model(precision, blocks=False), kv_dtype, hidden)
    model = decode_model(precision, blocks=True)
    calls = []
    real = torch.ops.llamaworks.decode_step_paged
    monkeypatch.setattr(torch.ops.llamaworks, "decode_step_paged", lambda *a: calls.append(a[1].shape) or real(*a))
    got, got_pools = paged_passes(model, kv_dtype, hidden)
    assert calls == [(1, 3)] * 5
    for a, b in zip(want + want_pools, got + got_pools):
        assert torch.equal(a, b)


def test_paged_decode_steps_aside_where_it_cannot_run(monkeypatch):
    # rope_in_one off (LLAMAWORKS_RAGGED_ROPE=0: RoPE and the pool write as separate operators): every
    # pass through the modules, the same numbers
    calls = []
    real = torch.ops.llamaworks.decode_step_paged
    monkeypatch.setattr(torch.ops.llamaworks, "decode_step_paged", lambda *a: calls.append(1) or real(*a))
    want = paged_passes(decode_model("fp32", blocks=False))[0]
    got = paged_passes(decode_model("fp32", blocks=True), rope_in_one=False)[0]
    assert calls == [] and all(torch.equal(a, b) for a, b in zip(want, got))


@pytest.mark.parametrize("threads", [2, 4])
@pytest.mark.parametrize("whole_step", [True, False], ids=["step", "blocks"])
@pytest.mark.parametrize("precision", list(PRECISIONS))
def test_a_step_on_a_team_of_threads_equals_one_thread(precision, whole_step, threads):
    """With several threads a whole step runs in one parallel region (csrc/parallel.h): its products and
    attention are handed to the region's threads as sections, split as at::parallel_for splits them, so
    the logits and caches equal one thread's bit for bit; a block's call (decode_block, compiled steps) the
    same. The products here exceed the one-thread grain (64 KiB), so sections do reach the team; with more
    threads than the process's CPUs (4 on a 2-CPU machine) there is no team (its threads never sleep) and
    each section is a region of its own, the same results. A bad step inside the region raises instead of
    hanging it."""
    args = dict(ARGS, dim=256, n_heads=8, n_kv_heads=4)  # wqkv 256 x 512 fp32: 512 KiB, int4: 64 KiB

    def run(n: int):
        model = decode_model(precision, blocks=True, whole_step=whole_step, args=args)
        torch.set_num_threads(n)
        try:
            return steps(model), model
        finally:
            torch.set_num_threads(1)

    (want, want_caches), _ = run(1)
    before = native.team_sections()
    (got, got_caches), model = run(threads)
    team = threads <= len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else threads <= os.cpu_count()
    assert (native.team_sections() > before) == team  # the steps' sections ran on a team, where there is one
    for a, b in zip(want + want_caches, got + got_caches):
        assert torch.equal(a, b)
    torch.set_num_threads(threads)
    try:
        with torch.no_grad(), pytest.raises(RuntimeError, match="outside the cache"):
            model(torch.tensor([[1], [2]]), torch.tensor([32]))  # past the cache: rope_cache's check, in the team
        model.setup_caches(2, 32)
        with torch.no_grad():
            assert model(torch.tensor([[1], [2]]), torch.tensor([0])).shape == (2, 1, 300)  # the team still works
    finally:
        torch.set_num_threads(1)
