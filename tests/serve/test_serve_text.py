"""Incremental detokenization and stop strings (avmp.serve.text)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from avmp.serve.text import IncrementalDetokenizer, StopStrings

pytest.importorskip("mistral_common")


@pytest.fixture(scope="module")
def mistral():
    from avmp.engine.tokenizer import MistralTokenizer

    return MistralTokenizer()


class _Bytes:
    """A byte-level decoder: token i is byte i, so one character may take several tokens."""

    def decode(self, token_ids: list[int]) -> str:
        return bytes(token_ids).decode("utf-8", errors="replace")


def _pieces(decoder, ids: list[int], step: int) -> list[str]:
    text = IncrementalDetokenizer(decoder)
    out = [text.add(ids[i : i + step]) for i in range(0, len(ids), step)]
    return out + [text.flush()]


@pytest.mark.parametrize("step", [1, 2, 5])
def test_pieces_join_to_the_whole_decode(mistral, step):
    # SentencePiece drops a word's leading space when the word is decoded alone, and
    # the emoji is spelt in byte-fallback tokens: both must come out whole
    ids = mistral.encode("Hello world, héllo 🙂 again")[1:]  # without BOS
    pieces = _pieces(mistral, ids, step)
    assert "".join(pieces) == mistral.decode(ids)
    assert all("\ufffd" not in piece for piece in pieces)


def test_a_character_split_over_tokens_is_held_back_until_complete():
    ids = list("a🙂b".encode())  # the emoji is 4 bytes
    pieces = _pieces(_Bytes(), ids, 1)
    assert pieces == ["a", "", "", "", "🙂", "b", ""]


def test_flush_gives_an_incomplete_character_at_the_end():
    text = IncrementalDetokenizer(_Bytes())
    assert text.add([ord("x")]) == "x"
    assert text.add(list("🙂".encode())[:2]) == ""
    assert text.flush() == "\ufffd"
    assert text.flush() == ""


def test_stop_string_cuts_the_text_before_it():
    stops = StopStrings(["END"])
    sent = [stops.add(part) for part in ["Hel", "lo E", "N", "D more"]]
    assert "".join(p.text for p in sent) == "Hello "
    assert [p.stopped for p in sent] == [False, False, False, True]
    assert stops.add("later").text == "" and stops.finish() == ""


def test_the_tail_that_could_start_a_stop_string_is_held_back():
    stops = StopStrings(["abc"])
    assert stops.add("xxab").text == "xx"  # "ab" may become "abc"
    assert stops.add("d").text == "abd"
    assert stops.add("a").text == ""
    assert stops.finish() == "a"
    assert stops.text == "xxabda"


def test_the_first_stop_string_to_appear_wins():
    stops = StopStrings(["world", "lo"])
    piece = stops.add("hello world")
    assert piece.stopped and piece.text == "hel"


def test_a_stop_string_inside_one_piece_and_no_stops():
    assert StopStrings(["\n"]).add("one\ntwo").text == "one"
    none = StopStrings([])
    assert none.add("all of it").text == "all of it" and none.finish() == ""


@given(
    st.lists(st.text(alphabet="abc\n", max_size=6), max_size=8),
    st.lists(st.text(alphabet="abc\n", min_size=1, max_size=3), max_size=3),
)
def test_sent_text_is_a_prefix_without_stops_cut_right_before_one(parts, stops):
    cut = StopStrings(stops)
    pieces = [cut.add(part) for part in parts]
    sent = "".join(p.text for p in pieces) + cut.finish()
    whole = "".join(parts)
    assert whole.startswith(sent) and sent == cut.text
    assert not any(stop in sent for stop in stops)
    if cut.stopped:
        assert any(whole[len(sent) :].startswith(stop) for stop in stops)
    else:
        assert sent == whole


def test_ids_past_the_tokenizers_vocabulary_decode_to_nothing(mistral):
    # a model may have more embedding rows than its tokenizer has tokens (a padded or a
    # larger random vocabulary) and sample one: the text skips it, the stream goes on
    ids = mistral.encode("Hello world")[1:]
    beyond = [mistral.vocab_size, mistral.vocab_size + 70_000]
    assert mistral.decode(ids[:1] + beyond + ids[1:]) == mistral.decode(ids)
    assert "".join(_pieces(mistral, ids[:1] + beyond + ids[1:], 1)) == mistral.decode(ids)


def test_a_streamed_event_is_one_ascii_line_whatever_the_text():
    # a client that splits the stream with str.splitlines must still read whole events
    import json

    from pydantic import BaseModel

    from avmp.serve.responses import _sse

    class Piece(BaseModel):
        text: str

    text = "a\u2028b\u2029c\x85d\x1ce é🙂\n"
    event = _sse(Piece(text=text))
    assert event.isascii() and event.endswith("\n\n")
    assert len(event.rstrip("\n").splitlines()) == 1
    assert json.loads(event.removeprefix("data: "))["text"] == text


@given(st.text("abEND", max_size=30), st.integers(1, 5))
def test_a_stop_string_kept_in_the_output_ends_the_text(text, step):
    stops = StopStrings(["END", "bb"], include=True)  # neither can overlap the other
    sent = "".join(stops.add(text[i : i + step]).text for i in range(0, len(text), step))
    sent += stops.finish()
    found = [(text.find(s), len(s)) for s in ("END", "bb") if s in text]
    if not found:
        assert sent == text and not stops.stopped
    else:  # up to the end of the first match, and nothing after
        begin, size = min(found)
        assert sent == text[: begin + size] and stops.stopped


def test_mistral_decodes_special_tokens_when_asked(mistral):
    ids = [mistral.encode("Hello there")[0], *mistral.encode("Hello there")[1:], 2]
    assert mistral.decode(ids) == "Hello there"
    assert mistral.decode(ids, skip_special_tokens=False) == "<s>Hello there</s>"
