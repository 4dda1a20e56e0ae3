from __future__ import annotations

import queue
import threading

import pytest

from llamaworks.inference.generate import generate
from llamaworks.serve.engine import Engine, EngineStopped, QueueFull, Request

PROMPTS = ["The king", "Love is", "O fair lady of the night, speak", "Speak", "Thou art", "A"]


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    from llamaworks.inference.load import load_model

    model, tok = load_model(tiny_model_dir)
    eng = Engine(model.eval(), tok, max_batch=3, max_queue=64).start()
    yield eng
    eng.stop(cancel=True)


def _submit_all(eng, reqs):
    done = queue.Queue()
    for r in reqs:
        r.on_event = lambda ev, q=done: ev.kind in ("done", "error") and q.put(ev)
        eng.submit(r)
    events = [done.get(timeout=120) for _ in reqs]
    assert all(ev.kind == "done" for ev in events)
    return reqs


def test_greedy_equals_generate(engine, tiny_model, tiny_tokenizer):
    for p in PROMPTS[:4]:
        ref = generate(tiny_model, tiny_tokenizer, p, 20, temperature=0)[0]
        got = engine.complete(Request(tiny_tokenizer.encode(p), 20), timeout=60)
        assert got.tokens == ref.tokens and got.text == ref.text and got.finish_reason == ref.finish_reason


def test_stop_strings_equal_generate(engine, tiny_model, tiny_tokenizer):
    ref = generate(tiny_model, tiny_tokenizer, "The king", 30, temperature=0)[0]
    stop = ref.text[5:8]  # a string the greedy continuation is known to contain
    want = generate(tiny_model, tiny_tokenizer, "The king", 30, temperature=0, stop=[stop])[0]
    got = engine.complete(Request(tiny_tokenizer.encode("The king"), 30, stop=[stop]), timeout=60)
    assert got.text == want.text and got.finish_reason == want.finish_reason == "stop"


def test_a_requests_stop_ids_end_it(engine, tiny_model, tiny_tokenizer):
    ref = generate(tiny_model, tiny_tokenizer, "The king", 12, temperature=0)[0].tokens
    j = next(j for j in range(2, len(ref)) if ref[j] not in ref[:j])
    got = engine.complete(Request(tiny_tokenizer.encode("The king"), 12, stop_ids={ref[j]}), timeout=60)
    assert got.tokens == ref[:j] and got.finish_reason == "stop"  # the stop id is not part of the output
    assert engine.complete(Request(tiny_tokenizer.encode("The king"), 12), timeout=60).tokens == ref


def test_batched_requests_equal_requests_served_alone(engine, tiny_tokenizer):
    # More requests than slots, of different lengths, joining and leaving the running batch
    # at different steps; greedy and seeded sampling alike must not notice the others.
    specs = [(p, n, t) for i, p in enumerate(PROMPTS) for n, t in [(5 + 3 * i, 0.0), (12, 0.9)]]

    def make(p, n, t):
        return Request(tiny_tokenizer.encode(p), n, temperature=t, top_k=50, top_p=0.9, seed=7)

    alone = [engine.complete(make(*s), timeout=60) for s in specs]
    together = _submit_all(engine, [make(*s) for s in specs * 2])
    for i, r in enumerate(together):
        assert r.tokens == alone[i % len(specs)].tokens, specs[i % len(specs)]
        assert r.text == alone[i % len(specs)].text
    assert engine.active == 0 and engine.queue_length == 0


def test_cancel_frees_the_slot(engine, tiny_tokenizer):
    first = threading.Event()
    req = Request(tiny_tokenizer.encode("The king"), 200,
                  on_event=lambda ev: ev.kind == "text" and first.set())
    done = queue.Queue()
    inner = req.on_event
    req.on_event = lambda ev: (inner(ev), ev.kind == "done" and done.put(ev))
    engine.submit(req)
    assert first.wait(30)
    req.cancel()
    ev = done.get(timeout=30)
    assert ev.finish_reason in ("cancelled", "length")  # "length" only if it won the race
    assert engine.active == 0


def test_context_overflow_is_rejected(engine, tiny_tokenizer):
    with pytest.raises(ValueError, match="context window"):
        engine.submit(Request([1] * 10, engine.context - 5))


def test_queue_bound_and_stop(tiny_model_dir):
    from llamaworks.inference.load import load_model

    from .conftest import SlowModel

    model, tok = load_model(tiny_model_dir)
    eng = Engine(SlowModel(model.eval(), 0.02), tok, max_batch=1, max_queue=1).start()
    events = queue.Queue()
    reqs = [Request(tok.encode("a"), 100, on_event=events.put) for _ in range(2)]
    eng.submit(reqs[0])
    while eng.active == 0:  # wait until the first holds the only slot
        events.get(timeout=30)
    eng.submit(reqs[1])  # waits in the queue
    with pytest.raises(QueueFull, match="max_queue=1"):
        eng.submit(Request(tok.encode("b"), 5))
    eng.stop(cancel=True, timeout=30)
    assert not eng._thread.is_alive()
    assert [r.finish_reason for r in reqs] == ["cancelled", "cancelled"]
    with pytest.raises(EngineStopped):
        eng.submit(Request(tok.encode("c"), 5))
    assert eng.metrics.finished["cancelled"] == 2 and eng.metrics.rejected == 1


def test_bad_options(tiny_model_dir, tiny_tokenizer, tiny_model):
    with pytest.raises(ValueError, match="max_batch"):
        Engine(tiny_model, tiny_tokenizer, max_batch=0)


# --- one request's failure is its own (issue 17) ------------------------------------------


@pytest.mark.parametrize("bad, match", [
    (dict(seed=2**64, temperature=0.8), "seed"),  # used to raise in the engine thread, failing every slot
    (dict(seed=-(2**63) - 1, temperature=0.8), "seed"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=float("inf")), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_k=0, temperature=0.8), "top_k"),
    (dict(logprobs=-1), "logprobs"),
    (dict(prompt_ids=[]), "prompt_ids"),
    (dict(prompt_ids=[1, 10**6]), "prompt_ids"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(stop_ids=[10**6]), "stop_ids"),
    (dict(stop_ids="</s>"), "stop_ids"),
])
def test_requests_the_engine_cannot_run_are_refused_at_submit(engine, tiny_tokenizer, bad, match):
    kw = {"prompt_ids": tiny_tokenizer.encode("The king"), "max_tokens": 4, **bad}
    with pytest.raises(ValueError, match=match):
        engine.submit(Request(**kw))
    assert engine.complete(Request(tiny_tokenizer.encode("The king"), 4, seed=2**64 - 1, temperature=0.8),
                           timeout=60).finish_reason == "length"


class PoisonModel:
    """Raises in the prefill of any prompt that contains `poison`."""

    def __init__(self, model, poison: int):
        self.model, self.poison = model, poison

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, tokens, pos=None, rows=None):
        if rows is not None and bool((tokens == self.poison).any()):
            raise RuntimeError("poisoned prefill")
        return self.model(tokens, pos, rows=rows) if rows is not None else self.model(tokens, pos)


class PoisonTokenizer:
    """Its stream decoder raises at the third token of any prompt that starts with `marker`."""

    def __init__(self, tokenizer, marker: list[int]):
        self.tokenizer, self.marker = tokenizer, marker

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)

    def stream_decoder(self, prefix_ids=()):
        inner = self.tokenizer.stream_decoder(prefix_ids)
        if list(prefix_ids[: len(self.marker)]) != self.marker:
            return inner
        pushed = [0]

        class Decoder:
            def push(self, token):
                pushed[0] += 1
                if pushed[0] == 3:
                    raise RuntimeError("poisoned decode")
                return inner.push(token)

            def flush(self):
                return inner.flush()

        return Decoder()


def _neighbour_survives(eng, tok, poisoned: Request):
    """Start a long request, fail `poisoned` beside it, check the long one ends as if alone."""
    long_prompt = tok.encode("Love is")
    alone = eng.complete(Request(long_prompt, 40), timeout=60)
    events, running = queue.Queue(), threading.Event()
    neighbour = Request(long_prompt, 40, on_event=lambda ev: (running.set(), events.put(ev)))
    eng.submit(neighbour)
    assert running.wait(30)
    failed = queue.Queue()
    poisoned.on_event = lambda ev: ev.kind in ("done", "error") and failed.put(ev)
    eng.submit(poisoned)
    ev = failed.get(timeout=60)
    assert ev.kind == "error" and "poisoned" in ev.text and poisoned.finish_reason == "error"
    while (ev := events.get(timeout=60)).kind == "text":
        pass
    assert ev.kind == "done" and neighbour.tokens == alone.tokens and neighbour.text == alone.text
    assert eng.active == 0 and eng.metrics.finished["error"] == 1
    # The failed request's slot is free again and serves the next request.
    assert eng.complete(Request(long_prompt, 40), timeout=60).tokens == alone.tokens


def test_a_failing_prefill_fails_only_its_request(tiny_model_dir, tiny_tokenizer):
    from llamaworks.inference.load import load_model

    from .conftest import SlowModel

    model, tok = load_model(tiny_model_dir)
    poison = tok.encode("zebra", bos=False)[-1]
    eng = Engine(SlowModel(PoisonModel(model.eval(), poison), 0.01), tok, max_batch=2).start()
    try:
        _neighbour_survives(eng, tok, Request(tok.encode("A zebra"), 10))
    finally:
        eng.stop(cancel=True, timeout=30)


def test_a_failing_row_fails_only_its_request(tiny_model_dir):
    from llamaworks.inference.load import load_model

    from .conftest import SlowModel

    model, tok = load_model(tiny_model_dir)
    marker = tok.encode("Poison")
    eng = Engine(SlowModel(model.eval(), 0.01), PoisonTokenizer(tok, marker), max_batch=2).start()
    try:
        _neighbour_survives(eng, tok, Request(marker, 10))
    finally:
        eng.stop(cancel=True, timeout=30)
