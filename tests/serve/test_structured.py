"""Structured output: every reply of a random tiny model to 200 random JSON schemas parses and
validates (jsonschema), json_object replies parse, grammars are followed, unconstrained rows
of the same batch are unaffected; through the HTTP API with the openai client too. Both
tokenizer kinds: SentencePiece with byte fallback and byte-level BPE."""

from __future__ import annotations

import json
import random
import re
import threading

import pytest

pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

from llamaworks.serve.engine import Engine, Request  # noqa: E402
from llamaworks.serve.structured import Constraint, compile_constraint, token_bytes_table  # noqa: E402

from .conftest import MODEL, running_server  # noqa: E402

MAX_TOKENS = 240  # the tiny model's context is 256


# --- a family of random schemas -----------------------------------------------------------------

WORDS = ["alpha", "beta", "gamma", "delta", "x", "long name", "ünï", "a\"q"]


def random_schema(rng: random.Random, depth: int = 0) -> dict:
    """A random bounded schema: objects with nested properties and required fields, enums,
    arrays with item bounds, integers and numbers with ranges, bounded strings, booleans, null.
    Bounded so that a model writing at random closes it within MAX_TOKENS."""
    kinds = ["string", "integer", "number", "boolean", "enum", "null"] + (["object", "array"] if depth < 2 else [])
    kind = rng.choice(kinds)
    if kind == "string":
        s = {"type": "string", "maxLength": rng.randint(0, 6)}
        if rng.random() < 0.3:
            s["minLength"] = rng.randint(0, s["maxLength"])
        return s
    if kind == "integer":
        lo = rng.randint(-1000, 1000)
        return {"type": "integer", "minimum": lo, "maximum": lo + rng.choice([0, 1, 9, 100, 5000])}
    if kind == "number":
        lo = rng.choice([-10, -1.5, 0, 2, 100])
        return {"type": "number", "minimum": lo, "maximum": lo + rng.choice([0.5, 1, 50])}
    if kind == "boolean":
        return {"type": "boolean"}
    if kind == "null":
        return {"type": "null"}
    if kind == "enum":
        pool = WORDS + [1, 2.5, True, None]
        return {"enum": rng.sample(pool, rng.randint(1, 4))}
    if kind == "array":
        hi = rng.randint(0, 3)
        return {"type": "array", "items": random_schema(rng, depth + 1), "minItems": rng.randint(0, hi), "maxItems": hi}
    return random_object(rng, depth)


def random_object(rng: random.Random, depth: int) -> dict:
    names = rng.sample(["id", "name", "age", "tags", "ok", "score", "kind", "child", "note"], rng.randint(1, 4))
    props = {n: random_schema(rng, depth + 1) for n in names}
    required = [n for n in names if rng.random() < 0.7]
    return {"type": "object", "properties": props, "required": required, "additionalProperties": False}


def top_schema(seed: int) -> dict:
    """An object (a reply is a JSON object, as OpenAI's json_schema mode asks)."""
    return random_object(random.Random(seed), 0)


def test_the_family_is_varied():
    text = json.dumps([top_schema(s) for s in range(200)])
    for word in ('"enum"', '"array"', '"integer"', '"number"', '"minimum"', '"required"', '"maxLength"'):
        assert text.count(word) >= 20, word
    assert sum('"object"' in json.dumps(top_schema(s)["properties"]) for s in range(200)) >= 30  # nested


# --- through the engine ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    from llamaworks.inference.load import load_model

    model, tokenizer = load_model(tiny_model_dir)
    eng = Engine(model.eval(), tokenizer, max_batch=8, max_queue=512).start()
    yield eng
    eng.stop(cancel=True, timeout=30)


def _run_all(engine, reqs: list[Request], timeout: float = 600) -> list[Request]:
    done = threading.Semaphore(0)
    for r in reqs:
        r.on_event = lambda ev: done.release() if ev.kind in ("done", "error") else None
        engine.submit(r)
    for _ in reqs:
        assert done.acquire(timeout=timeout)
    return reqs


def test_200_random_schemas_always_validate(engine):
    tok = engine.tokenizer
    prompt = tok.encode("Answer in JSON:", bos=True)
    schemas = [top_schema(s) for s in range(200)]
    reqs = [Request(prompt, MAX_TOKENS, temperature=1.0, seed=s, constraint=compile_constraint("json_schema", sc))
            for s, sc in enumerate(schemas)]
    _run_all(engine, reqs)
    for seed, (schema, r) in enumerate(zip(schemas, reqs)):
        assert r.finish_reason == "stop", (seed, schema, r.finish_reason, len(r.tokens), r.text)
        jsonschema.validate(json.loads(r.text), schema)  # raises with the path of what is wrong


def test_json_object_replies_parse(engine):
    tok = engine.tokenizer
    c = compile_constraint("json_object")
    # A frequency penalty keeps a random model from repeating itself inside one string for ever.
    reqs = [Request(tok.encode("JSON:"), MAX_TOKENS, temperature=1.0, seed=s, constraint=c, frequency_penalty=1.0)
            for s in range(12)]
    _run_all(engine, reqs)
    stopped = [r for r in reqs if r.finish_reason == "stop"]
    assert len(stopped) >= 6, [(r.finish_reason, r.text) for r in reqs]
    for r in stopped:
        assert isinstance(json.loads(r.text), dict), r.text
    for r in reqs:  # cut by max_tokens ("length"): a prefix of some JSON object
        assert r.text.startswith("{")


def test_a_gbnf_grammar_is_followed_and_ends_the_reply(engine):
    tok = engine.tokenizer
    c = compile_constraint("grammar", 'root ::= ("yes" | "no") ", " [0-9] [0-9]? " " ("apples" | "pears")')
    reqs = _run_all(engine, [Request(tok.encode("Q:"), 50, temperature=1.0, seed=s, constraint=c) for s in range(16)])
    for r in reqs:
        assert r.finish_reason == "stop" and re.fullmatch(r"(yes|no), [0-9][0-9]? (apples|pears)", r.text), r.text
    assert len({r.text for r in reqs}) > 3  # sampled, not one answer


def test_max_tokens_truncation_ends_with_length(engine):
    tok = engine.tokenizer
    c = compile_constraint("json_schema", {"type": "object", "properties": {"s": {"type": "string"}},
                                           "required": ["s"]})
    r = engine.complete(Request(tok.encode("JSON:"), 4, temperature=1.0, seed=0, constraint=c))
    assert r.finish_reason == "length" and len(r.tokens) == 4 and r.text.startswith('{"s"')


def test_unconstrained_rows_are_unaffected(engine):
    tok = engine.tokenizer
    prompt = tok.encode("The king")
    alone = engine.complete(Request(prompt, 30, temperature=0.0)).tokens
    c = compile_constraint("json_schema", top_schema(3))
    reqs = [Request(prompt, 30, temperature=0.0)] + [
        Request(prompt, 60, temperature=1.0, seed=s, constraint=c) for s in range(5)]
    _run_all(engine, reqs)
    assert reqs[0].tokens == alone


def test_bad_grammars_are_value_errors():
    with pytest.raises(ValueError):
        compile_constraint("json_schema", {"type": "nonsense"})
    with pytest.raises(ValueError):
        compile_constraint("grammar", 'root ::= foo')
    with pytest.raises(ValueError):
        compile_constraint("json_schema", "not a schema")
    assert isinstance(compile_constraint("grammar", 'root ::= "a"+'), Constraint)


# --- byte-level BPE (Llama 3's tokenizer) ---------------------------------------------------------

def test_byte_level_tokens_and_schemas(tmp_path_factory, corpus_docs):
    from tiny_llama3 import make_model_dir, write_tokenizer

    from llamaworks.inference.load import load_model

    root = tmp_path_factory.mktemp("structured_llama3")
    model, tok = load_model(make_model_dir(root / "model", write_tokenizer(root / "tok", corpus_docs)))
    table, special = token_bytes_table(tok)
    assert table[tok.encode("{", bos=False)[0]] == b"{" and tok.special_tokens["<|eot_id|>"] in special
    eng = Engine(model.eval(), tok, max_batch=8).start()
    try:
        schemas = [top_schema(s) for s in range(200, 240)]
        eot = tok.special_tokens["<|eot_id|>"]
        reqs = [Request(tok.encode("JSON:"), MAX_TOKENS, temperature=1.0, seed=i, stop_ids={eot, tok.eos_id},
                        constraint=compile_constraint("json_schema", sc)) for i, sc in enumerate(schemas)]
        _run_all(eng, reqs)
    finally:
        eng.stop(cancel=True, timeout=30)
    for schema, r in zip(schemas, reqs):
        assert r.finish_reason == "stop", (schema, r.text)
        jsonschema.validate(json.loads(r.text), schema)


# --- HTTP, with the openai client -----------------------------------------------------------------

@pytest.fixture(scope="module")
def client(tiny_model_dir):
    openai = pytest.importorskip("openai")
    with running_server(tiny_model_dir, max_batch=4) as s:
        yield openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_json_schema_through_the_openai_client(client):
    schema = top_schema(7)
    out = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Describe a cat."}], max_tokens=200, temperature=1.0,
        seed=1, n=3, response_format={"type": "json_schema", "json_schema": {"name": "cat", "schema": schema,
                                                                             "strict": True}})
    assert [c.index for c in out.choices] == [0, 1, 2]
    for c in out.choices:
        assert c.finish_reason == "stop"
        jsonschema.validate(json.loads(c.message.content), schema)


def test_streamed_json_schema_choices_each_validate(client):
    schema = top_schema(11)
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "JSON please"}], max_tokens=200, temperature=1.0, seed=2,
        n=2, stream=True, response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
    texts, finish = {0: "", 1: ""}, {}
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    assert finish == {0: "stop", 1: "stop"}
    for t in texts.values():
        jsonschema.validate(json.loads(t), schema)


def test_grammar_and_json_object_through_completions(client):
    out = client.completions.create(model=MODEL, prompt="Yes or no?", max_tokens=20, temperature=1.0, seed=3,
                                    extra_body={"grammar": 'root ::= "yes" | "no"'})
    assert out.choices[0].text in ("yes", "no") and out.choices[0].finish_reason == "stop"


def test_bad_response_formats_are_400s(client):
    import openai

    for fmt in ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}},
                {"type": "json_schema"}, {"type": "yaml"}):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=5,
                                           response_format=fmt)
        assert e.value.body["param"] == "response_format"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="x", max_tokens=5, extra_body={"grammar": 'root ::= "a'})
    assert e.value.body["param"] == "grammar"
