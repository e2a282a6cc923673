"""services.scheduler.textstream: incremental detokenization with stop strings, on the tiny
LLaVA byte-level BPE tokenizer (multi-byte characters really are split across tokens there) and
on a fake byte tokenizer for exact control of UTF-8 boundaries."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.scheduler.textstream import TextStream

REPLACEMENT = "\ufffd"


@pytest.fixture(scope="module")
def tok(tiny_models):
    from prism.models.processors import load_processor

    return load_processor(tiny_models["llava"]).tokenizer


def enc(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def stream_all(ts: TextStream, ids: list[int], sizes=(1,)) -> list[str]:
    """Push `ids` in chunks cycling through `sizes`; the released pieces, then the flush."""
    out, i, k = [], 0, 0
    while i < len(ids):
        n = max(1, sizes[k % len(sizes)])
        out.append(ts.push(ids[i : i + n]))
        i, k = i + n, k + 1
    out.append(ts.flush())
    return out


class ByteTokenizer:
    """Fake tokenizer: id b < 256 is the byte b; ids >= 256 are special tokens (skipped)."""

    def __init__(self):
        self.calls = 0

    def decode(self, ids, skip_special_tokens=True):
        assert skip_special_tokens is True
        self.calls += 1
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def byte_ids(text: str) -> list[int]:
    return list(text.encode("utf-8"))


# ---- the tokenizer really splits characters ---------------------------------------------------------


def test_tiny_tokenizer_splits_multibyte_characters(tok):
    ids = enc(tok, "✓")
    assert len(ids) >= 2 and all(REPLACEMENT in tok.decode([i]) for i in ids)
    assert tok.decode(ids) == "✓"


# ---- without stop strings -------------------------------------------------------------------------------


@pytest.mark.parametrize("text", [
    "The red horse ran quickly to the old harbor.",
    "Price: 12.50 dollars\n\nNext line, and   spaces.",
    "héllo wörld ✓ 日本語 🙂 café — done",
    "🙂🙂 ✓✓ 日日",
])
@pytest.mark.parametrize("sizes", [(1,), (2,), (3, 1), (100,)])
def test_released_text_equals_the_full_decode(tok, text, sizes):
    ids = enc(tok, text)
    ts = TextStream(tok)
    pieces = stream_all(ts, ids, sizes)
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True) == text
    assert all(REPLACEMENT not in p for p in pieces)
    assert not ts.stopped
    assert pieces[-1] == ""  # nothing held back once every character is complete


def test_text_is_released_as_tokens_arrive(tok):
    ids = enc(tok, "one two three")
    ts = TextStream(tok)
    released = ""
    for i, t in enumerate(ids):
        released += ts.push([t])
        assert released == tok.decode(ids[: i + 1])  # ascii: nothing is ever held


def test_special_tokens_are_skipped(tok):
    eos = tok.eos_token_id
    ts = TextStream(tok)
    assert ts.push(enc(tok, "Hi")) == "Hi"
    assert ts.push([eos]) == ""
    assert ts.flush() == ""


def test_empty_push_and_empty_flush(tok):
    ts = TextStream(tok, stop=("x",))
    assert ts.push([]) == ""
    assert ts.flush() == ""


# ---- incomplete UTF-8 ----------------------------------------------------------------------------------


def test_incomplete_character_is_held_until_complete(tok):
    ids = enc(tok, "a✓b")
    ts = TextStream(tok)
    pieces = [ts.push([i]) for i in ids]
    assert "".join(pieces) == "a✓b"
    assert all(REPLACEMENT not in p for p in pieces)
    check = enc(tok, "✓")
    # while the check mark's bytes arrive one token at a time, nothing is released
    first = ids.index(check[0])
    assert pieces[first : first + len(check) - 1] == [""] * (len(check) - 1)
    assert "✓" in pieces[first + len(check) - 1]


def test_flush_returns_an_incomplete_tail(tok):
    ids = enc(tok, "ok ✓")
    ts = TextStream(tok)
    released = "".join(ts.push([i]) for i in ids[:-1])
    assert released == "ok "
    tail = ts.flush()
    assert tail and set(tail) == {REPLACEMENT}


@pytest.mark.parametrize("text", ["é", "✓", "🙂", "a🙂b日c"])
def test_fake_tokenizer_every_byte_split(text):
    tk = ByteTokenizer()
    ts = TextStream(tk)
    pieces = [ts.push([b]) for b in byte_ids(text)]
    assert "".join(pieces) == text
    assert all(REPLACEMENT not in p for p in pieces)
    # a character is released exactly when its last byte arrives
    assert [p for p in pieces if p] == [c for c in text]


def test_fake_tokenizer_invalid_byte_in_the_middle_is_released_once_text_follows():
    ts = TextStream(ByteTokenizer())
    assert ts.push([0x61, 0xFF]) == "a"  # a lone 0xFF decodes to U+FFFD: held while it is the tail
    assert ts.push([0x62]) == REPLACEMENT + "b"  # no longer the tail: it is the text
    assert ts.flush() == ""


def test_fake_tokenizer_special_ids_skipped():
    ts = TextStream(ByteTokenizer(), stop=("ab",))
    assert ts.push([0x61, 300, 0x62]) == ""  # "a" <special> "b" is "ab"
    assert ts.stopped


# ---- stop strings ---------------------------------------------------------------------------------------


def test_stop_string_spanning_tokens_stops_and_is_excluded(tok):
    text = "Hello world. STOP here"
    ids = enc(tok, text)
    stop = "d. ST"
    ts = TextStream(tok, stop=(stop,))
    pieces, stopped_at = [], None
    for i, t in enumerate(ids):
        pieces.append(ts.push([t]))
        if ts.stopped and stopped_at is None:
            stopped_at = i
    assert ts.stopped
    assert "".join(pieces) == "Hello worl"
    # it stops on the token that completes the stop string, not before and not after
    assert stop not in tok.decode(ids[:stopped_at]) and stop in tok.decode(ids[: stopped_at + 1])
    assert all(p == "" for p in pieces[stopped_at + 1 :])
    assert ts.flush() == ""
    assert ts.push(enc(tok, " more")) == "" and ts.flush() == ""


def test_stop_string_inside_one_chunk(tok):
    ts = TextStream(tok, stop=("ll",))
    assert ts.push(enc(tok, "Hello world")) == "He"
    assert ts.stopped and ts.flush() == ""


def test_stop_at_the_very_start(tok):
    ts = TextStream(tok, stop=("The",))
    pieces = stream_all(ts, enc(tok, "The end"))
    assert "".join(pieces) == "" and ts.stopped


def test_possible_stop_prefix_is_held_then_released(tok):
    text = "Hello world. STOP here"
    ids = enc(tok, text)
    ts = TextStream(tok, stop=("STOP!",))
    released = ""
    for i, t in enumerate(ids):
        released += ts.push([t])
        full = tok.decode(ids[: i + 1])
        # held back: the longest tail of the text that starts "STOP!"
        held = max((k for k in range(1, 5) if full.endswith("STOP!"[:k])), default=0)
        assert released == full[: len(full) - held]
    assert not ts.stopped
    assert released == text


def test_flush_returns_the_held_tail(tok):
    ts = TextStream(tok, stop=("</answer>",))
    released = "".join(ts.push([t]) for t in enc(tok, "result: 42 </ans"))
    assert released == "result: 42 "
    assert ts.flush() == "</ans"
    assert ts.flush() == ""


def test_nothing_after_a_stop(tok):
    ts = TextStream(tok, stop=("42",))
    released = "".join(ts.push([t]) for t in enc(tok, "result: 42 and more"))
    assert released == "result: "
    assert ts.flush() == ""


def test_earliest_of_several_stop_strings(tok):
    ts = TextStream(tok, stop=("world", "o w", "zzz"))
    pieces = stream_all(ts, enc(tok, "Hello world, hello"))
    assert "".join(pieces) == "Hell"


def test_repeated_partial_matches_before_the_real_stop(tok):
    ts = TextStream(tok, stop=("aab",))
    pieces = stream_all(ts, enc(tok, "x aa aaa aab tail"))
    assert "".join(pieces) == "x aa aaa "


def test_stop_starting_before_an_incomplete_character_is_excluded(tok):
    # "a" could start "a✓"; while "✓" is still incomplete the text ends in U+FFFD, and "a" must
    # still be held, not released (it would leak part of the stop string)
    ts = TextStream(tok, stop=("a✓",))
    pieces = stream_all(ts, enc(tok, "xa✓ more"))
    assert "".join(pieces) == "x"
    assert ts.stopped


def test_stop_starting_before_an_incomplete_character_fake_tokenizer():
    ts = TextStream(ByteTokenizer(), stop=("a🙂",))
    pieces = [ts.push([b]) for b in byte_ids("za🙂z")]
    assert "".join(pieces) == "z" and ts.stopped
    ts = TextStream(ByteTokenizer(), stop=("a🙂",))
    pieces = [ts.push([b]) for b in byte_ids("za😀z")]  # same first bytes, a different emoji
    assert "".join(pieces) == "za😀z" and not ts.stopped


def test_multibyte_stop_string(tok):
    ts = TextStream(tok, stop=("日本",))
    pieces = stream_all(ts, enc(tok, "go 日日本 now"))
    assert "".join(pieces) == "go 日"
    assert all(REPLACEMENT not in p for p in pieces)


# ---- property: any text, any chunking ----------------------------------------------------------------

ALPHABET = st.sampled_from(list("ab .,\n") + ["é", "✓", "日", "🙂", "the", " STOP", "ll"])
TEXTS = st.lists(ALPHABET, min_size=1, max_size=24).map("".join)


@settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=TEXTS, stop_from_text=st.booleans(), cut=st.tuples(st.integers(0, 100), st.integers(1, 4)),
       other_stop=TEXTS, sizes=st.lists(st.integers(1, 4), min_size=1, max_size=5))
def test_property_stream_equals_decode_up_to_the_stop(tok, text, stop_from_text, cut, other_stop, sizes):
    ids = enc(tok, text)
    full = tok.decode(ids)
    if stop_from_text:
        start = cut[0] % len(full)
        stop = full[start : start + cut[1]]
    else:
        stop = other_stop[:6]
    ts = TextStream(tok, stop=(stop,))
    pieces = stream_all(ts, ids, sizes)
    at = full.find(stop)
    assert "".join(pieces) == (full if at < 0 else full[:at])
    assert ts.stopped == (at >= 0)
    assert all(REPLACEMENT not in p for p in pieces)
