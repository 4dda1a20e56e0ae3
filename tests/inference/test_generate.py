from __future__ import annotations

import math

import pytest
import torch

from llamaworks.inference.generate import generate, generate_ids
from llamaworks.inference.sampling import sample
from llamaworks.inference.stops import StopMatcher
from llamaworks.model import ModelArgs, build_model


@pytest.fixture(scope="module")
def model(tiny_tokenizer):
    # Larger-than-init weights give peaked, well-separated logits, so greedy comparisons
    # test the code rather than floating-point tie-breaking.
    args = ModelArgs.from_name("tiny", vocab_size=tiny_tokenizer.vocab_size, n_layers=2)
    m = build_model(args, seed=1).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if not name.endswith("norm.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.12)
    return m


def greedy_reference(model, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
    toks, lps = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([toks]))[0, -1]
            t = int(logits.argmax())
            lps.append(float(torch.log_softmax(logits, -1)[t]))
            toks.append(t)
    return toks[len(prompt):], lps


def run_ids(model, prompts, n, **kw):
    chunks = list(generate_ids(model, prompts, n, **kw))
    return torch.cat([c[0] for c in chunks], 1).tolist(), torch.cat([c[1] for c in chunks], 1).tolist()


# --- sampling (pure) ---------------------------------------------------------------------

def test_greedy_and_degenerate_filters_pick_argmax():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    want = logits.argmax(-1)
    assert torch.equal(sample(logits, temperature=0), want)
    assert torch.equal(sample(logits, temperature=1.0, top_k=1, top_p=1.0), want)
    assert torch.equal(sample(logits, temperature=1.0, top_p=1e-6), want)


def test_sampling_matches_the_tempered_distribution():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    n = 40_000
    g = torch.Generator().manual_seed(0)
    noise = torch.empty(n, 5).exponential_(1, generator=g)
    draws = sample(logits.expand(n, 5), temperature=0.7, top_p=1.0, noise=noise)
    freq = torch.bincount(draws, minlength=5).double() / n
    want = torch.softmax(logits.double() / 0.7, -1)
    assert torch.allclose(freq, want, atol=4 * math.sqrt(0.25 / n)), (freq, want)


def test_top_p_and_top_k_never_sample_the_tail():
    logits = torch.tensor([3.0, 2.5, 0.0, -1.0, -2.0])  # probs ~ [.59, .36, .03, .01, .004]
    n = 5000
    noise = torch.empty(n, 5).exponential_(1, generator=torch.Generator().manual_seed(0))
    nucleus = sample(logits.expand(n, 5), temperature=1.0, top_p=0.9, noise=noise)
    # Meta's rule keeps tokens while the mass *before* them is <= top_p: {0, 1} here.
    assert set(nucleus.tolist()) == {0, 1}
    topk = sample(logits.expand(n, 5), temperature=1.0, top_k=3, top_p=1.0, noise=noise)
    assert set(topk.tolist()) == {0, 1, 2}


# --- generation --------------------------------------------------------------------------

def test_greedy_kv_cache_equals_full_forward(model):
    prompt = [1, 37, 99, 250, 7, 8]
    want, want_lp = greedy_reference(model, prompt, 20)
    got, got_lp = run_ids(model, [prompt], 20, temperature=0.0)
    assert got[0] == want
    assert got_lp[0] == pytest.approx(want_lp, abs=1e-4)


def test_prefill_projects_only_the_prompts_last_positions(model):
    # The output projection of the prefill sees each prompt's last position alone (bsz rows, not
    # bsz x longest), and the first token and its logprob are still the full forward's.
    prompts = [[1, 5, 9, 200, 17], [1, 300]]
    seen = []
    hook = model.output.register_forward_hook(lambda mod, args, out: seen.append(tuple(args[0].shape)))
    try:
        got, got_lp = run_ids(model, prompts, 1, temperature=0.0)
    finally:
        hook.remove()
    assert seen == [(2, 1, model.args.dim)]
    for p, tok, lp in zip(prompts, got, got_lp):
        want, want_lp = greedy_reference(model, p, 1)
        assert tok == want and lp == pytest.approx(want_lp, abs=1e-5)


def test_batch_of_different_lengths_equals_each_alone(model):
    prompts = [[1, 5, 9, 200], [1, 300], [1, 44, 45, 46, 47, 48, 49, 50, 51], [1, 7, 7]]
    batch, _ = run_ids(model, prompts, 24, temperature=0.0)
    for p, row in zip(prompts, batch):
        alone, _ = run_ids(model, [p], 24, temperature=0.0)
        assert row == alone[0]


def test_seed_makes_sampling_reproducible(model):
    a, _ = run_ids(model, [[1, 5, 6]], 30, temperature=1.0, seed=123)
    b, _ = run_ids(model, [[1, 5, 6]], 30, temperature=1.0, seed=123)
    c, _ = run_ids(model, [[1, 5, 6]], 30, temperature=1.0, seed=124)
    assert a == b and a != c


def test_eos_stops_and_pads(model):
    prompt = [1, 37, 99]
    ref, _ = greedy_reference(model, prompt, 12)
    eos = ref[4]
    first = ref.index(eos)
    got, _ = run_ids(model, [prompt], 12, temperature=0.0, eos_id=eos, sync_every=1)
    row = got[0]
    assert row[: first + 1] == ref[: first + 1]
    assert all(t == eos for t in row[first:])
    assert len(row) < 12  # it stopped early instead of decoding all 12 steps


def test_compiled_decode_step_gives_the_same_tokens(model):
    pytest.importorskip("torch._dynamo")
    prompt = [1, 37, 99, 250]
    eager, _ = run_ids(model, [prompt], 8, temperature=0.0)
    compiled, _ = run_ids(model, [prompt], 8, temperature=0.0, compile=True)
    assert compiled == eager


@pytest.mark.parametrize("compile", [False, True])
def test_generation_without_logprobs_yields_none_and_the_same_tokens(model, compile):
    # logprobs=False skips the log-softmax a step (the decode benchmark's and the CLI's plain generation)
    prompts = [[1, 37, 99, 250], [1, 5]]
    want, _ = run_ids(model, prompts, 9, temperature=0.0, sync_every=4)
    chunks = list(generate_ids(model, prompts, 9, temperature=0.0, sync_every=4, logprobs=False, compile=compile))
    assert all(lp is None for _, lp in chunks) and [c[0].shape[1] for c in chunks] == [1, 4, 4]
    assert torch.cat([c[0] for c in chunks], 1).tolist() == want


def test_compiled_prefill_gives_the_same_tokens(model):
    pytest.importorskip("torch._dynamo")
    prompts = [[1, 37, 99, 250], [1, 5, 6, 7, 8, 9, 10]]  # different lengths: dynamic shapes
    eager, _ = run_ids(model, prompts, 6, temperature=0.0)
    compiled, _ = run_ids(model, prompts, 6, temperature=0.0, compile_prefill=True)
    assert compiled == eager


def test_compiled_decode_compiles_before_the_prefill_and_never_during_decode(model):
    # The decode that callers time starts at the first yield (the prefill's token): the step is
    # compiled before it, as one graph, and a multi-token decode (stop ids, sampling) recompiles
    # nothing, in this call or the next with the same shapes.
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    stats = {}
    gen = generate_ids(model, [[1, 37, 99], [1, 5]], 12, temperature=0.9, seed=3, stop_ids=[7], compile=True,
                       sync_every=1, stats=stats)
    first = next(gen)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs == 1 and stats["compile_s"] > 0, (dict(counters["stats"]), stats)
    with torch._dynamo.config.patch(error_on_recompile=True):
        rest = list(gen)
        again = list(generate_ids(model, [[1, 2, 3], [1, 8]], 12, temperature=0.9, seed=3, stop_ids=[7],
                                  compile=True, sync_every=1))
    assert len(rest) == 11 and len(again) >= 1 and first[0].shape == (2, 1)
    assert counters["stats"]["unique_graphs"] == graphs, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])


def test_compiled_sampling_and_stops_equal_eager(model):
    # The warm-up writes the cache and must not draw from the sampling stream.
    prompts = [[1, 37, 99, 250], [1, 5, 6]]
    eager, eager_lp = run_ids(model, prompts, 10, temperature=0.9, seed=5)
    compiled, compiled_lp = run_ids(model, prompts, 10, temperature=0.9, seed=5, compile=True)
    assert compiled == eager
    torch.testing.assert_close(torch.tensor(compiled_lp), torch.tensor(eager_lp), atol=1e-4, rtol=0)
    stop = eager[0][3]
    eager, _ = run_ids(model, prompts, 10, temperature=0.9, seed=5, eos_id=stop)
    compiled, _ = run_ids(model, prompts, 10, temperature=0.9, seed=5, eos_id=stop, compile=True)
    assert compiled == eager and eager[0][3:] == [stop] * (len(eager[0]) - 3)


def test_compile_step_uses_cuda_graphs_on_cuda_only(monkeypatch):
    from llamaworks.inference.generate import compile_step

    modes = []

    def fake_compile(fn, dynamic=None, mode=None, fullgraph=False):
        modes.append((dynamic, mode))
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    marks = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    kept = torch.zeros(3), torch.ones(2)
    assert compile_step(lambda: kept, torch.device("cpu"))() is kept
    step = compile_step(lambda: kept, torch.device("cuda"))
    out = step()
    assert modes == [(False, None), (False, "reduce-overhead")] and marks == [1]
    # outputs are copies: the next replay of a CUDA graph overwrites its own
    assert all(torch.equal(a, b) and a.data_ptr() != b.data_ptr() for a, b in zip(out, kept))


def test_max_new_tokens_is_clipped_to_the_context(model):
    ctx = model.args.max_seq_len
    got, _ = run_ids(model, [[1] + [5] * (ctx - 4)], 50, temperature=0.0)
    assert len(got[0]) == 3


@pytest.mark.parametrize("kw,msg", [({"top_p": 0.0, "temperature": 1.0}, "top_p"),
                                     ({"top_k": 0, "temperature": 1.0}, "top_k")])
def test_bad_sampling_parameters(model, kw, msg):
    with pytest.raises(ValueError, match=msg):
        run_ids(model, [[1, 2]], 3, **kw)
    with pytest.raises(ValueError, match="max_new_tokens"):
        run_ids(model, [[1, 2]], 0)


class _EosAs:
    """The tokenizer with a different eos id, to make a random model stop where we want
    (generation stops at `stop_ids`, which for SentencePiece is {eos_id})."""

    def __init__(self, tok, eos_id):
        self._tok, self.eos_id = tok, eos_id
        self.stop_ids = frozenset([eos_id] if eos_id >= 0 else [])

    def __getattr__(self, name):
        return getattr(self._tok, name)


def test_generate_text_logprobs_and_eos(model, tiny_tokenizer):
    prompt = "The king"
    ids = tiny_tokenizer.encode(prompt)
    ref, ref_lp = greedy_reference(model, ids, 16)
    [c] = generate(model, tiny_tokenizer, [prompt], 16, temperature=0.0, logprobs=True)
    assert c.tokens == [t for t in ref if t != tiny_tokenizer.eos_id][: len(c.tokens)]
    assert c.text == tiny_tokenizer.decode(ids + c.tokens)[len(tiny_tokenizer.decode(ids)):]
    assert c.logprobs == pytest.approx(ref_lp[: len(c.tokens)], abs=1e-4)
    assert c.prompt_tokens == len(ids)
    eos = ref[5]
    [d] = generate(model, _EosAs(tiny_tokenizer, eos), prompt, 16, temperature=0.0)
    assert d.finish_reason == "stop" and d.tokens == ref[: ref.index(eos)]


def test_stop_strings_cut_and_stream(model, tiny_tokenizer):
    tiny_tokenizer = _EosAs(tiny_tokenizer, -1)  # never stop at eos: only the stop string may end it
    [full] = generate(model, tiny_tokenizer, "O, ", 40, temperature=0.0)
    assert full.finish_reason == "length" and len(full.text) > 12
    stop = full.text[6:9]
    streamed = []
    [c] = generate(model, tiny_tokenizer, "O, ", 40, temperature=0.0, stop=[stop, "never-seen-zz"],
                   on_text=lambda i, d: streamed.append(d))
    assert c.finish_reason == "stop"
    assert c.text == full.text[: full.text.find(stop)]
    assert "".join(streamed) == c.text


def test_streaming_equals_final_text(model, tiny_tokenizer):
    pieces: dict[int, list[str]] = {0: [], 1: []}
    res = generate(model, tiny_tokenizer, ["Fair ", "What is 12345?"], 30, temperature=0.9, seed=3,
                   on_text=lambda i, d: pieces[i].append(d))
    for i, r in enumerate(res):
        assert "".join(pieces[i]) == r.text


def test_stop_stream_withholds_partial_stop_string(tiny_tokenizer):
    s = StopMatcher(tiny_tokenizer, tiny_tokenizer.encode("x"), ["END"])
    out = []
    for t in tiny_tokenizer.encode("abc EN", bos=False):
        out.append(s.push(t)[0])
    assert "".join(out).endswith("abc ") and "EN" not in "".join(out)
    assert s.finish() == "EN"  # not a stop string after all: released at the end


def test_prompt_longer_than_context(model, tiny_tokenizer):
    long = "word " * 2000
    with pytest.raises(ValueError, match=r"context window is 256.*truncate"):
        generate(model, tiny_tokenizer, long, 5)
    [c] = generate(model, tiny_tokenizer, long, 5, temperature=0.0, truncate=True)
    assert c.prompt_tokens == model.args.max_seq_len - 1 and len(c.tokens) == 1


def test_generate_cli(tiny_model_dir, capsys):
    from llamaworks.cli import main

    rc = main(["generate", "--checkpoint", str(tiny_model_dir), "--prompt", "The king", "--max-new-tokens", "8",
               "--temperature", "0", "--seed", "1"])
    out, err = capsys.readouterr()
    assert rc == 0 and out.startswith("The king")
    assert "prefill:" in err and "decode:" in err and "tokens/s" in err
    rc = main(["generate", "--checkpoint", str(tiny_model_dir / "nope"), "--prompt", "x"])
    assert rc == 2 and "does not exist" in capsys.readouterr().err


@pytest.mark.slow  # compiles the decode step (~30 s on 2 busy cores)
def test_generate_cli_compiles_outside_the_timed_decode(tiny_model_dir, capsys):
    from llamaworks.cli import main

    args = ["generate", "--checkpoint", str(tiny_model_dir), "--prompt", "The king", "--max-new-tokens", "12",
            "--temperature", "0", "--device", "cpu"]
    assert main(args) == 0
    eager = capsys.readouterr()
    assert main([*args, "--compile"]) == 0
    compiled = capsys.readouterr()
    assert compiled.out == eager.out  # fused and compiled: the same greedy text
    assert "compile:" in compiled.err and "before the prefill" in compiled.err and "compile:" not in eager.err
