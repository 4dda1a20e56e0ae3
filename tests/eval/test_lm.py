from __future__ import annotations

import pytest
import torch

from llamaworks.eval.lm import EvalModel, GenOptions, disjoint_window, rolling_windows, split_trailing_space

REQUESTS = [
    ("The king said", " good night"),
    ("The king said ", "good night"),
    ("", "Thou art fair"),
    ("Scene 3.\nThe queen", " will come"),
    ("A", "B"),
    ("Speak love night day sword crown heart blood fair foul good ill thou thee thy art", " hath doth"),
    ("Q: what is 12+30?\nA:", " 42"),
    ("Lady", ", my lord."),
    ("The king said", " good day"),
    ("x" * 40, " y"),
    ("Go", " go go go go go go go go go go"),
]


def _manual(model, ctx, cont):
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        lp = torch.log_softmax(model(ids)[0].double(), -1)
    pos = range(len(ctx) - 1, len(ctx) + len(cont) - 1)
    return sum(float(lp[p, t]) for p, t in zip(pos, cont))


def test_split_trailing_space():
    assert split_trailing_space("Answer: ", "Paris") == ("Answer:", " Paris")
    assert split_trailing_space("Answer:\n ", "x") == ("Answer:", "\n x")
    assert split_trailing_space("Answer:", " Paris") == ("Answer:", " Paris")


def test_encode_pair_splits_the_joint_encoding(tiny_model, tiny_tokenizer):
    lm = EvalModel(tiny_model, tiny_tokenizer)
    ctx, cont = lm.encode_pair("The king said ", "good night")
    whole = tiny_tokenizer.encode("The king said good night", bos=False)
    assert ctx[0] == tiny_tokenizer.bos_id and ctx[1:] == tiny_tokenizer.encode("The king said", bos=False)
    assert cont == whole[len(ctx) - 1:]
    assert lm.encode_pair("", "Thou")[0] == [tiny_tokenizer.bos_id]
    no_bos = EvalModel(tiny_model, tiny_tokenizer, add_bos=False)
    assert no_bos.encode_pair("The king said ", "good night") == (ctx[1:], cont)
    assert no_bos.encode_pair("", "Thou")[0] == [tiny_tokenizer.bos_id]  # lm-eval's prefix token
    with pytest.raises(ValueError, match="continuation"):
        lm.encode_pair("a", "")


def test_loglikelihood_matches_a_direct_forward(tiny_model, tiny_tokenizer):
    lm = EvalModel(tiny_model, tiny_tokenizer, batch_size=4)
    got = lm.loglikelihood(REQUESTS)
    for (c, x), (lp, greedy) in zip(REQUESTS, got):
        ctx, cont = lm.encode_pair(c, x)
        assert lp == pytest.approx(_manual(tiny_model, ctx, cont), abs=1e-5)
        assert lp < 0 and isinstance(greedy, bool)


def test_is_greedy_for_the_models_own_greedy_continuation(tiny_model, tiny_tokenizer):
    lm = EvalModel(tiny_model, tiny_tokenizer)
    ctx = [tiny_tokenizer.bos_id] + tiny_tokenizer.encode("The king", bos=False)
    with torch.no_grad():
        nxt = int(tiny_model(torch.tensor([ctx]))[0, -1].argmax())
        other = (nxt + 1) % tiny_tokenizer.vocab_size
    (_, g1), (_, g2) = lm.loglikelihood_tokens([(ctx, [nxt]), (ctx, [other])])
    assert g1 and not g2


@pytest.mark.parametrize("add_bos", [True, False])
def test_results_do_not_depend_on_batch_size(tiny_model, tiny_tokenizer, add_bos):
    one = EvalModel(tiny_model, tiny_tokenizer, batch_size=1, add_bos=add_bos)
    seven = EvalModel(tiny_model, tiny_tokenizer, batch_size=7, add_bos=add_bos)
    for (a, ga), (b, gb) in zip(one.loglikelihood(REQUESTS), seven.loglikelihood(REQUESTS)):
        assert a == pytest.approx(b, abs=1e-5) and ga == gb
    texts = [c + x for c, x in REQUESTS]
    assert one.loglikelihood_rolling(texts) == pytest.approx(seven.loglikelihood_rolling(texts), abs=1e-5)
    gen = [(c, {"until": ["\n"], "max_gen_toks": 6}) for c, _ in REQUESTS]
    assert one.generate_until(gen) == seven.generate_until(gen)


def test_long_inputs_are_truncated_from_the_left(tiny_model, tiny_tokenizer):
    lm = EvalModel(tiny_model, tiny_tokenizer, max_length=16)
    ctx, cont = list(range(10, 40)), [5, 6, 7]
    (lp, _), = lm.loglikelihood_tokens([(ctx, cont)])
    kept = (ctx + cont)[-17:]
    assert lp == pytest.approx(_manual(tiny_model, kept[: -len(cont)], cont), abs=1e-5)
    with pytest.raises(ValueError, match="max_length"):
        lm.loglikelihood_tokens([([1], list(range(3, 20)))])


def test_rolling_windows_match_lm_eval():
    # The gold windows of lm-evaluation-harness' test_get_rolling_token_windows_v1.
    gold = [
        ([-100, 0, 1, 2, 3, 4, 5, 6, 7, 8], [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]),
        ([9, 10, 11, 12, 13, 14, 15, 16, 17, 18], [10, 11, 12, 13, 14, 15, 16, 17, 18, 19]),
        ([19, 20, 21, 22, 23, 24, 25, 26, 27, 28], [20, 21, 22, 23, 24, 25, 26, 27, 28, 29]),
        ([23, 24, 25, 26, 27, 28, 29, 30, 31, 32], [30, 31, 32, 33]),
    ]
    assert list(rolling_windows(list(range(34)), -100, 10, 1)) == gold
    assert disjoint_window(gold[3]) == ([23, 24, 25, 26, 27, 28, 29], [30, 31, 32, 33])
    assert list(rolling_windows([], 0, 10)) == []


def test_rolling_loglikelihood_covers_long_texts(tiny_model, tiny_tokenizer):
    short = EvalModel(tiny_model, tiny_tokenizer, max_length=8)
    text = "The king said good night to the queen and the lord, 1234."
    toks = tiny_tokenizer.encode(text, bos=False)
    assert len(toks) > 16
    expected = sum(_manual(tiny_model, *disjoint_window(w))
                   for w in rolling_windows(toks, tiny_tokenizer.bos_id, 8))
    assert short.loglikelihood_rolling([text])[0] == pytest.approx(expected, abs=1e-5)
    # Within one window, rolling = loglikelihood of the text after an empty context (BOS).
    full = EvalModel(tiny_model, tiny_tokenizer)
    assert full.loglikelihood_rolling([text])[0] == pytest.approx(full.loglikelihood([("", text)])[0][0], abs=1e-5)


def test_generate_until_is_greedy_and_cut_at_stop(tiny_model, tiny_tokenizer):
    from llamaworks.inference.generate import generate

    lm = EvalModel(tiny_model, tiny_tokenizer)
    ref = generate(tiny_model, tiny_tokenizer, ["The king said"], 12, temperature=0)[0].text
    assert lm.generate_until([("The king said", {"max_gen_toks": 12})]) == [ref]
    stop = ref.strip()[:2]
    got = lm.generate_until([("The king said", {"max_gen_toks": 12, "until": [stop]})])[0]
    assert got == ref[: ref.find(stop)]


def test_sampling_does_not_depend_on_batch_size(tiny_model, tiny_tokenizer):
    reqs = [(c, {"temperature": 1.0, "max_gen_toks": 8, "seed": 7}) for c, _ in REQUESTS[:5]]
    reqs += [("The king said", {"temperature": 1.0, "max_gen_toks": 8, "seed": 7})] * 4  # k samples of one prompt
    one = EvalModel(tiny_model, tiny_tokenizer, batch_size=1).generate_until(reqs)
    seven = EvalModel(tiny_model, tiny_tokenizer, batch_size=7).generate_until(reqs)
    assert one == seven
    assert len(set(one[5:])) > 1  # the copies are different samples
    other_seed = [(c, {**o, "seed": 8}) for c, o in reqs]
    assert EvalModel(tiny_model, tiny_tokenizer, batch_size=7).generate_until(other_seed) != one


def test_gen_options():
    assert GenOptions.parse({"until": "\n"}).until == ("\n",)
    assert GenOptions.parse({"temperature": 0.8, "do_sample": False}).temperature == 0.0
    assert GenOptions.parse({"do_sample": True}).temperature == 1.0
    assert GenOptions.parse({"temperature": 0.1}).temperature == 0.1
    with pytest.raises(ValueError, match="max_tokens"):
        GenOptions.parse({"max_tokens": 3})
    with pytest.raises(ValueError, match="max_gen_toks"):
        GenOptions.parse({"max_gen_toks": 0})


class _LogitsOnly(torch.nn.Module):
    # Any module mapping tokens to logits (EvalModel's most general model).
    def __init__(self, model):
        super().__init__()
        self.inner, self.args, self.output = model, model.args, model.output

    def forward(self, tokens):
        return self.inner(tokens)


def _naive(model, ctx, cont, max_length):
    # The plain computation, one request at a time: a full forward over the truncated input,
    # log-softmax at the continuation positions, is_greedy from the argmax there.
    inp = (ctx + cont)[-(max_length + 1):][:-1]
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([inp]))[0, len(inp) - len(cont):].double(), -1)
    target = torch.tensor(cont)
    return float(lp.gather(-1, target.unsqueeze(-1)).sum()), bool((lp.argmax(-1) == target).all())


def test_shared_prefix_scoring_equals_a_plain_forward_per_request(tiny_model, tiny_tokenizer):
    bos, max_length = tiny_tokenizer.bos_id, 24
    g = torch.Generator().manual_seed(0)

    def toks(n):
        return torch.randint(3, tiny_tokenizer.vocab_size, (n,), generator=g).tolist()

    shared = [bos] + toks(9)
    with torch.no_grad():  # the model's own greedy 3-token continuation of `shared`
        greedy = []
        for _ in range(3):
            greedy.append(int(tiny_model(torch.tensor([shared + greedy]))[0, -1].argmax()))
    wrong_second = greedy[:1] + [(greedy[1] + 1) % tiny_tokenizer.vocab_size] + greedy[2:]
    items = [
        (shared, toks(4)), (shared, toks(1)), (shared, toks(7)),  # one context, several continuations
        (shared, greedy), (shared, greedy[:1]), (shared, wrong_second),
        (shared, toks(4)),
        ([bos], toks(5)), ([bos], toks(1)),  # empty context: BOS alone
        ([bos] + toks(3), toks(2)), (toks(6), toks(3)),  # other contexts in the same batches
        ([bos] + toks(40), toks(3)), ([bos] + toks(40), toks(1)),  # longer than the window: left truncation
        ([bos] + toks(30), toks(20)),  # truncation cutting into what would be the shared prefix
        (toks(2), toks(max_length)),  # the longest continuation that fits, beside long prefixes
    ]
    items.append(items[0])  # an exact duplicate
    expected = [_naive(tiny_model, c, x, max_length) for c, x in items]
    assert expected[3][1] and expected[4][1] and not expected[5][1] and not expected[0][1]
    plain = _LogitsOnly(tiny_model)  # not a Transformer: the plain forward per request
    for model, batch_size in [(tiny_model, 1), (tiny_model, 3), (tiny_model, 7), (tiny_model, 64), (plain, 5)]:
        lm = EvalModel(model, tiny_tokenizer, batch_size=batch_size, max_length=max_length)
        got = lm.loglikelihood_tokens(items)
        for (lp, is_greedy), (ref_lp, ref_greedy) in zip(got, expected):
            assert lp == pytest.approx(ref_lp, abs=1e-5) and is_greedy == ref_greedy
    assert all(layer.attention.kv_cache is None for layer in tiny_model.layers)  # caches released


def test_requests_that_fill_the_window_are_not_batched_past_it(tiny_model, tiny_tokenizer):
    # A truncated long context (prefix of 255 tokens) beside a continuation of 256 tokens: one
    # shared cache would need 510 positions, past the model's max_seq_len=256.
    window = tiny_model.args.max_seq_len
    g = torch.Generator().manual_seed(1)
    items = [(torch.randint(3, 500, (300,), generator=g).tolist(), [7, 8]),
             ([tiny_tokenizer.bos_id], torch.randint(3, 500, (window,), generator=g).tolist())]
    got = EvalModel(tiny_model, tiny_tokenizer, batch_size=2).loglikelihood_tokens(items)
    for (lp, is_greedy), (c, x) in zip(got, items):
        ref_lp, ref_greedy = _naive(tiny_model, c, x, window)
        assert lp == pytest.approx(ref_lp, abs=1e-5) and is_greedy == ref_greedy


@pytest.mark.parametrize("name", ["<|eot_id|>", "<|eom_id|>", "<|end_of_text|>"])
def test_generate_until_stops_at_llama3_stop_tokens(tmp_path, corpus_docs, name):
    pytest.importorskip("tokenizers")
    from tiny_llama3 import steer_to_stop, write_tokenizer

    from llamaworks.model import ModelArgs, build_model
    from llamaworks.tokenizer import load_tokenizer

    tok = load_tokenizer(write_tokenizer(tmp_path / "tok", corpus_docs))
    model = build_model(ModelArgs.from_name("tiny", vocab_size=tok.vocab_size, n_layers=1), seed=0).eval()
    before = steer_to_stop(model, tok.encode("The king said"), tok.special_tokens[name])
    got = EvalModel(model, tok).generate_until([("The king said", {"max_gen_toks": 16})])
    assert got == [tok.decode(before)]
