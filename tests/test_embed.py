"""The encoder: si.Embedder's vectors equal sentence-transformers' for the real all-MiniLM-L6-v2
on every mesh, and POST /v1/embeddings answers the official openai client in OpenAI's shape."""

import re

import jax
import numpy as np
import openai
import pytest

import shardinfer as si
from shardinfer.serving.async_embedder import AsyncEmbedder
from shardinfer.serving.http import create_app, serve_in_thread

MODEL = "all-minilm-l6-v2"
LONG = "A long text " + "that goes on and on " * 80  # ~400 tokens: truncated at 256
TEXTS = [
    "The cat sat on the mat.",
    LONG,
    "Zoë's café serves crème brûlée — 東京の天気は晴れです 🌤",
    "short",
    "Embeddings map text to vectors whose angles say how alike two texts are.",
    "Ein Satz auf Deutsch, mit Umlauten: über, schön, Größe.",
    "x",
    "Paris is the capital of France. " * 6,
]
# More rows than one batch (max_batch=8 below), lengths mixed so the batches are sorted and
# scattered back: the order given must come back.
MANY = [TEXTS[i % len(TEXTS)] + f" #{i}" * (i % 5) for i in range(21)]


def _model_dir():
    from shardinfer.weights.registry import resolve_registry_name

    return resolve_registry_name(MODEL)


@pytest.fixture(scope="module")
def reference():
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(_model_dir()), device="cpu")
    return st, st.encode(TEXTS + MANY, batch_size=64, convert_to_numpy=True)


def _cosine_distance(a, b) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return 1 - (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


@pytest.mark.parametrize("mesh", ["data=8", "data=2,model=4"])
def test_embeddings_equal_sentence_transformers_on_every_mesh(mesh, reference):
    st, expected = reference
    embedder = si.Embedder(MODEL, mesh=mesh, max_batch=8, compilation_cache=None)
    axes = dict(kv.split("=") for kv in mesh.split(","))
    assert {k: v for k, v in embedder.mesh.shape.items() if v > 1} == {
        k: int(v) for k, v in axes.items()
    }
    assert embedder.max_seq_len == st.max_seq_length == 256
    assert len(embedder.tokenize([LONG])[0]) == 256  # truncated, as sentence-transformers does
    got = embedder.embed(TEXTS + MANY)
    assert got.shape == (len(TEXTS) + len(MANY), 384) and got.dtype == np.float32
    assert _cosine_distance(got, expected).max() < 1e-5
    np.testing.assert_allclose(np.linalg.norm(got, axis=-1), 1.0, atol=1e-5)  # normalized
    # Token ids as the tokenizer makes them give the same vectors as the texts.
    again = embedder.embed_tokens(embedder.tokenize(TEXTS[:3]))
    np.testing.assert_allclose(again, got[:3], atol=1e-6)


def test_bad_embedder_input_names_the_problem():
    embedder = si.Embedder(MODEL, mesh="data=8", max_batch=8, compilation_cache=None)
    with pytest.raises(ValueError, match="wrap a single text"):
        embedder.embed("one text")
    with pytest.raises(ValueError, match="text 1 is a int"):
        embedder.embed(["fine", 3])
    with pytest.raises(ValueError, match="row 0 must be a non-empty"):
        embedder.embed_tokens([[]])
    with pytest.raises(ValueError, match="row 1 has 300 tokens, over max_seq_len=256"):
        embedder.embed_tokens([[101, 102], [101] * 300])
    with pytest.raises(ValueError, match="row 0"):
        embedder.embed_tokens([[101, 10**6]])
    with pytest.raises(ValueError, match="max_batch must be >= 1"):
        si.Embedder(MODEL, max_batch=0)


@pytest.fixture(scope="module")
def server():
    mesh = si.make_mesh("data=2", devices=jax.devices()[:2])
    embedder = si.Embedder(MODEL, mesh=mesh, max_batch=8, compilation_cache=None)
    engine = AsyncEmbedder(embedder)
    with serve_in_thread(create_app(engine, MODEL)) as base:
        yield base, embedder.tokenize  # the tokenizer is thread-safe; the devices are the engine's
    engine.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0)


def test_v1_embeddings_through_the_openai_client(client, reference):
    _, expected = reference
    reply = client.embeddings.create(model=MODEL, input=TEXTS)  # the client asks for base64
    assert reply.object == "list" and reply.model == MODEL
    assert [d.index for d in reply.data] == list(range(len(TEXTS)))
    got = np.array([d.embedding for d in reply.data])
    assert _cosine_distance(got, expected[: len(TEXTS)]).max() < 1e-5
    assert reply.usage.prompt_tokens == reply.usage.total_tokens > 256
    floats = client.embeddings.create(model=MODEL, input=TEXTS[0], encoding_format="float")
    assert len(floats.data) == 1 and len(floats.data[0].embedding) == 384
    np.testing.assert_allclose(floats.data[0].embedding, got[0], atol=1e-6)
    one_list = client.embeddings.create(model=MODEL, input=[TEXTS[3]], dimensions=384)
    np.testing.assert_allclose(one_list.data[0].embedding, got[3], atol=1e-6)


def test_v1_embeddings_token_input(server, client, reference):
    _, expected = reference
    short, cat = server[1]([TEXTS[3], TEXTS[0]])  # ids with [CLS] and [SEP], as the model's
    reply = client.embeddings.create(model=MODEL, input=short, encoding_format="float")
    assert _cosine_distance([reply.data[0].embedding], expected[3:4]).max() < 1e-5
    two = client.embeddings.create(model=MODEL, input=[short, cat])
    assert _cosine_distance([d.embedding for d in two.data], expected[[3, 0]]).max() < 1e-5
    assert two.usage.prompt_tokens == len(short) + len(cat)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(input=[]), "input is empty"),
        (dict(input=""), "input is empty"),
        (dict(input=["ok", "   "]), r"input\[1\] is only whitespace"),
        (dict(input=[101, 10**6]), "input: .*10+"),
        (dict(input=[[101, 102], [101] * 300]), r"input\[1\].*over max_seq_len=256"),
        (dict(input="fine", dimensions=128), "dimensions=128 is not available"),
    ],
)
def test_v1_embeddings_bad_input_is_a_400_naming_it(client, kwargs, message):
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model=MODEL, **kwargs)
    assert caught.value.status_code == 400
    assert re.search(message, caught.value.body["message"]), caught.value.body


def test_v1_embeddings_wrong_model_and_wrong_endpoint(client):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.embeddings.create(model="other", input="x")
    with pytest.raises(openai.OpenAIError, match="embedding model"):
        client.completions.create(model=MODEL, prompt="x", max_tokens=2)
    # The server is still fine after all that.
    assert len(client.embeddings.create(model=MODEL, input="still up").data) == 1
