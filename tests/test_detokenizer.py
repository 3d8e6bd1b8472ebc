"""Incremental detokenization equals a full decode, token by token, at constant cost per token."""

import random

import pytest
import tokenizers
from tokenizers import decoders, models

from shardinfer.engine.detokenizer import IncrementalDetokenizer
from shardinfer.engine.request import Request
from shardinfer.engine.sampling import SamplingParams
from shardinfer.models.registry import gguf_family
from shardinfer.weights.gguf_file import GGUFFile
from shardinfer.weights.registry import resolve_registry_name
from shardinfer.weights.tokenizer import Tokenizer

TEXT = "naïve café 東京 👩‍👩‍👧 🎉 Ünïcödé — ok."


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    # Only the GGUF metadata is read: no model weights, no JAX.
    path = resolve_registry_name("smollm2-135m-instruct")
    return Tokenizer.from_gguf(GGUFFile(path, gguf_family))


def _llama2_style() -> Tokenizer:
    """A byte-fallback tokenizer whose decoder strips the first token's leading space, as
    Llama 2's does: the case where decoding a window without context would go wrong."""
    vocab = {"<unk>": 0, "</s>": 1, "▁hello": 2, "▁world": 3, "▁": 4, "a": 5}
    vocab |= {f"<0x{b:02X}>": 6 + b for b in range(256)}
    backend = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    backend.add_special_tokens([tokenizers.AddedToken("</s>", special=True)])
    return Tokenizer(backend)


def _stream(tokenizer: Tokenizer, ids: list[int]) -> tuple[list[str], str]:
    detok = IncrementalDetokenizer(tokenizer)
    pieces = [detok.add(i) for i in ids]
    return pieces, detok.pending


def test_multibyte_text_one_token_at_a_time(tok):
    ids = tok.encode(TEXT, add_special_tokens=False)
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # characters do split across tokens
    pieces, pending = _stream(tok, ids)
    assert "".join(pieces) == tok.decode(ids) == TEXT
    assert pending == ""
    assert not any("\ufffd" in p for p in pieces)  # a split character is never emitted half
    # After every token, what was returned plus what is held back is the full decode.
    detok, text = IncrementalDetokenizer(tok), ""
    for k, i in enumerate(ids, 1):
        text += detok.add(i)
        assert text + detok.pending == tok.decode(ids[:k])


def test_special_tokens_inside_a_split_character_are_skipped(tok):
    ids = tok.encode("東京🎉", add_special_tokens=False)
    special = tok.token_id("<|im_end|>")
    assert special is not None and tok.decode([special]) == ""
    mixed = [special, *ids[:1], special, *ids[1:2], special, *ids[2:], special]
    pieces, pending = _stream(tok, mixed)
    assert "".join(pieces) + pending == tok.decode(mixed) == "東京🎉"


def test_stream_ending_mid_character_keeps_the_replacement(tok):
    ids = tok.encode("ab 東", add_special_tokens=False)[:-1]  # the last byte is missing
    pieces, pending = _stream(tok, ids)
    assert pending.endswith("\ufffd") and "".join(pieces) + pending == tok.decode(ids)


def test_random_ids_match_full_decode(tok):
    rng = random.Random(0)
    for _ in range(200):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 60))]
        pieces, pending = _stream(tok, ids)
        # Random bytes may be invalid UTF-8: the full decode has U+FFFD there, and so must this.
        assert "".join(pieces) + pending == tok.decode(ids)


def test_byte_fallback_decoder_with_leading_space_strip():
    tk = _llama2_style()
    byte = {b: 6 + b for b in range(256)}
    ids = [2, 3, 4, *(byte[b] for b in "東京 👩‍👧".encode()), 1, 5, 4, 2]
    pieces, pending = _stream(tk, ids)
    assert "".join(pieces) + pending == tk.decode(ids) == "hello world 東京 👩‍👧a  hello"
    assert not any("\ufffd" in p for p in pieces)
    rng = random.Random(1)
    chars = list("é東京👩‍👧🎉\nx")
    for _ in range(200):
        ids = []
        for _ in range(rng.randrange(1, 20)):
            if rng.random() < 0.5:
                ids.append(rng.choice([1, 2, 3, 4, 5]))
            else:
                ids += [byte[b] for b in rng.choice(chars).encode()]
        pieces, pending = _stream(tk, ids)
        assert "".join(pieces) + pending == tk.decode(ids)


def test_byte_fallback_cut_mid_character_keeps_what_was_complete():
    # ByteFallback rewrites a whole run of byte tokens as U+FFFD once one byte in it is
    # invalid, including characters completed (and streamed) earlier. Text given out cannot
    # be taken back, so here the result keeps them and U+FFFD follows.
    tk = _llama2_style()
    ids = [6 + b for b in "東京".encode()][:-1]
    pieces, pending = _stream(tk, ids)
    assert "".join(pieces) == "東" and pending and set(pending) == {"\ufffd"}
    assert tk.decode(ids) == "\ufffd" * 5


@pytest.mark.parametrize("kind", ["text", "random"])
def test_work_per_token_is_bounded(tok, kind, monkeypatch):
    if kind == "text":
        ids = (tok.encode(TEXT, add_special_tokens=False) * 200)[:2000]
    else:
        rng = random.Random(2)
        ids = [rng.randrange(tok.vocab_size) for _ in range(2000)]
    decoded = []  # how many ids each underlying decode call was given
    real = tok.decode
    monkeypatch.setattr(tok, "decode", lambda ids: decoded.append(len(ids)) or real(ids))
    pieces, pending = _stream(tok, ids)
    assert len(decoded) <= 2 * len(ids)  # at most two short decodes per token
    # Linear, not quadratic: re-decoding everything would be ~2,000,000 ids.
    assert sum(decoded) <= 10 * len(ids), (sum(decoded), max(decoded))
    monkeypatch.undo()
    assert "".join(pieces) + pending == tok.decode(ids)


def _old_request_texts(tok, ids, stop):
    """What Request did before: decode everything after each token and cut at a stop."""
    for k in range(1, len(ids) + 1):
        text = tok.decode(ids[:k])
        cut = min((i for s in stop if (i := text.find(s)) >= 0), default=-1)
        if cut >= 0:
            return k, text[:cut]
    return len(ids), tok.decode(ids)


def _run_request(tok, ids, stop):
    params = SamplingParams(max_tokens=10_000, stop=stop)
    request = Request([1, 2], params, frozenset(), tok, max_seq_len=100_000)
    deltas = []
    for k, i in enumerate(ids, 1):
        request.append(i)
        if not request.done:
            assert request.text == tok.decode(ids[:k])  # `text` is the full decode, as before
        deltas.append(request.take_delta())
        if request.done:
            break
    return request, deltas


@pytest.mark.parametrize("stop", [("東京",), ("é 東",), ("nothing here", "👧 🎉"), ("zzz",)])
def test_request_stop_string_split_over_tokens(tok, stop):
    ids = tok.encode(TEXT, add_special_tokens=False)
    request, deltas = _run_request(tok, ids, stop)
    n, expected = _old_request_texts(tok, ids, stop)
    assert len(request.output_ids) == n and request.text == expected
    assert "".join(deltas) == request.text == request.output().text
    if stop != ("zzz",):
        assert request.finish_reason == "stop" and stop[-1] not in request.text
        assert TEXT.startswith(expected) and TEXT[len(expected) :].startswith(stop[-1])


def test_request_random_ids_match_old_behaviour(tok):
    rng = random.Random(3)
    for _ in range(30):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 50))]
        stop = ("e ", "th", "\ufffd ")
        request, deltas = _run_request(tok, ids, stop)
        n, expected = _old_request_texts(tok, ids, stop)
        assert len(request.output_ids) == n and request.text == expected
        if request.done:
            assert "".join(deltas) == request.text


def test_request_without_tokenizer_has_no_text():
    request = Request([1], SamplingParams(max_tokens=3), frozenset(), None, max_seq_len=100)
    for i in (5, 6, 7):
        request.append(i)
    assert request.output_ids == [5, 6, 7] and request.text == "" and request.done
