"""/v1/embeddings through the official `openai` client against the live app: each input's final
hidden states (after the final norm) mean-pooled, against transformers' LlamaModel on the same
weights; float and base64 encodings, token-id inputs, usage, errors, auth."""

from __future__ import annotations

import base64

import pytest
import torch

from .conftest import MODEL, running_server

TEXTS = ["The king is dead", "Love", "O fair lady of the night, speak to me of the stars and the sea"]


@pytest.fixture(scope="module")
def hf_reference(tiny_model):
    """Mean-pooled last_hidden_state (after the final norm) of transformers' LlamaModel."""
    transformers = pytest.importorskip("transformers")
    from llamaworks.convert.hf import hf_config_dict, to_hf_state_dict

    args = tiny_model.args
    cfg = transformers.LlamaConfig(**hf_config_dict(args))
    cfg._attn_implementation = "eager"
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.load_state_dict(to_hf_state_dict(tiny_model.state_dict(), args), strict=True)

    def embed(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return hf.model(torch.tensor([ids])).last_hidden_state[0].mean(0)

    return embed


@pytest.fixture(scope="module")
def embedding_server(tiny_model_dir):
    with running_server(tiny_model_dir, max_batch=2, api_key="sekrit") as s:
        yield s


@pytest.fixture()
def oai(embedding_server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=embedding_server.url + "/v1", api_key="sekrit", max_retries=0, timeout=60)


def test_a_batch_of_texts_is_the_mean_of_the_final_hidden_states(oai, embedding_server, hf_reference):
    tok = embedding_server.tokenizer
    # The official client asks for base64 by default and decodes it.
    got = oai.embeddings.create(model=MODEL, input=TEXTS)
    ids = [tok.encode(t, bos=True, eos=False) for t in TEXTS]
    assert [d.index for d in got.data] == [0, 1, 2] and got.model == MODEL and got.object == "list"
    assert got.usage.prompt_tokens == got.usage.total_tokens == sum(map(len, ids))
    for d, x in zip(got.data, ids):
        want = hf_reference(x)
        assert len(d.embedding) == want.shape[0]
        torch.testing.assert_close(torch.tensor(d.embedding), want, atol=1e-4, rtol=1e-4)
    # float encoding: the same numbers as JSON
    floats = oai.embeddings.create(model=MODEL, input=TEXTS[1], encoding_format="float")
    torch.testing.assert_close(torch.tensor(floats.data[0].embedding), torch.tensor(got.data[1].embedding),
                               atol=1e-5, rtol=1e-5)


def test_token_id_inputs_and_raw_base64(oai, embedding_server, hf_reference):
    httpx = pytest.importorskip("httpx")
    ids = [[1, 5, 77, 300], [1, 9]]
    got = oai.embeddings.create(model=MODEL, input=ids, encoding_format="float")
    for d, x in zip(got.data, ids):
        torch.testing.assert_close(torch.tensor(d.embedding), hf_reference(x), atol=1e-4, rtol=1e-4)
    r = httpx.post(embedding_server.url + "/v1/embeddings", headers={"Authorization": "Bearer sekrit"},
                   json={"model": MODEL, "input": ids[0], "encoding_format": "base64"}, timeout=60)
    assert r.status_code == 200, r.text
    raw = base64.b64decode(r.json()["data"][0]["embedding"])
    vec = torch.frombuffer(bytearray(raw), dtype=torch.float32)  # little-endian float32, as OpenAI's
    torch.testing.assert_close(vec, hf_reference(ids[0]), atol=1e-4, rtol=1e-4)


def test_bad_requests_get_openai_errors_and_auth_is_required(oai, embedding_server):
    openai = pytest.importorskip("openai")
    httpx = pytest.importorskip("httpx")
    for bad, param in [({"input": []}, "input"), ({"input": [""]}, "input"), ({"input": [[1, 10**6]]}, "input"),
                       ({"input": "x", "encoding_format": "int8"}, "encoding_format"),
                       ({"input": "x", "dimensions": 3}, "dimensions"), ({"input": {"a": 1}}, "input")]:
        r = httpx.post(embedding_server.url + "/v1/embeddings", headers={"Authorization": "Bearer sekrit"},
                       json={"model": MODEL, **bad}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (bad, r.text)
    too_long = [1] * (embedding_server.engine.context + 1)
    with pytest.raises(openai.BadRequestError, match="context window"):
        oai.embeddings.create(model=MODEL, input=[too_long])
    r = httpx.post(embedding_server.url + "/v1/embeddings", json={"model": MODEL, "input": "x"}, timeout=30)
    assert r.status_code == 401 and r.json()["error"]["type"]
    metrics = httpx.get(embedding_server.url + "/metrics", timeout=30).text
    assert 'llamaworks_http_requests_total{endpoint="embeddings",code="200"}' in metrics


def test_embeddings_run_between_generation_steps(embedding_server, oai):
    """While completions are generating, embeddings are computed by the engine thread between
    steps and equal those computed alone."""
    import threading

    alone = oai.embeddings.create(model=MODEL, input=TEXTS[2], encoding_format="float").data[0].embedding
    done = []
    t = threading.Thread(target=lambda: done.append(oai.completions.create(model=MODEL, prompt="The king",
                                                                           max_tokens=40, temperature=0)))
    t.start()
    during = [oai.embeddings.create(model=MODEL, input=TEXTS[2], encoding_format="float").data[0].embedding
              for _ in range(3)]
    t.join(60)
    assert done and done[0].choices[0].text is not None
    for v in during:
        torch.testing.assert_close(torch.tensor(v), torch.tensor(alone), atol=1e-5, rtol=1e-5)
