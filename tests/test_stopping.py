"""Stopping without a model: EOS, length, stop strings split across tokens, and the hold-back rule."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from textgen_server.stopping import FinishReason, StopDecision, StoppingCriteria

EOS = 2
TOKEN = 100  # any id that is not EOS; stopping looks only at the text


def _feed(criteria: StoppingCriteria, deltas: list[str]) -> tuple[str, FinishReason | None, list[str]]:
    """Forward deltas as the generation state would; returns the emitted text, finish reason, chunks."""
    chunks = []
    for delta in deltas:
        decision = criteria.step(TOKEN, delta)
        chunks.append(decision.text)
        if decision.finished:
            return "".join(chunks), decision.finish_reason, chunks
    return "".join(chunks) + criteria.flush(), None, chunks


def test_finish_reason_values() -> None:
    assert FinishReason.STOP.value == "stop"
    assert FinishReason.LENGTH.value == "length"


def test_stop_string_spanning_tokens_is_never_emitted() -> None:
    criteria = StoppingCriteria(EOS, 100, ["###"])
    steps = [criteria.step(TOKEN, d) for d in ["Hello", " wor", "ld #", "#", "# and more"]]
    assert [s.text for s in steps] == ["Hello", " wor", "ld ", "", ""]
    assert steps[-1] == StopDecision("", FinishReason.STOP)
    assert all(not s.finished for s in steps[:-1])


def test_text_before_the_stop_string_in_the_same_delta_is_emitted() -> None:
    criteria = StoppingCriteria(EOS, 100, ["STOP"])
    assert criteria.step(TOKEN, "abc") == StopDecision("abc")
    assert criteria.step(TOKEN, "deSTOPfg") == StopDecision("de", FinishReason.STOP)
    assert criteria.finish_reason is FinishReason.STOP


def test_a_false_start_is_released_once_it_cannot_be_a_stop_string() -> None:
    criteria = StoppingCriteria(EOS, 100, ["</end>"])
    assert criteria.step(TOKEN, "a </e").text == "a "
    assert criteria.step(TOKEN, "x").text == "</ex"
    # Holding "<" again, then releasing "<<" except the last "<", which may still start "</end>".
    assert criteria.step(TOKEN, "<").text == ""
    assert criteria.step(TOKEN, "<").text == "<"


def test_eos_stops_and_releases_held_text() -> None:
    criteria = StoppingCriteria(EOS, 100, ["###"])
    assert criteria.step(TOKEN, "answer #").text == "answer "
    assert criteria.step(EOS, "") == StopDecision("#", FinishReason.STOP)


@pytest.mark.parametrize(("stop", "emitted"), [("\ufffd", "hi"), ("i\ufffd", "h"), ("\n", "hi")])
def test_text_released_at_eos_is_checked_for_stop_strings(stop: str, emitted: str) -> None:
    # EOS cut a character short (its bytes decode as U+FFFD), or ended text held back meanwhile.
    criteria = StoppingCriteria(EOS, 100, [stop])
    first = criteria.step(TOKEN, "hi")
    released = "\ufffd" if "\ufffd" in stop else "\n"
    last = criteria.step(EOS, released)
    assert first.text + last.text == emitted
    assert last.finish_reason is FinishReason.STOP


def test_eos_without_stop_strings() -> None:
    criteria = StoppingCriteria(EOS, 100)
    assert criteria.step(TOKEN, "hi") == StopDecision("hi")
    assert criteria.step(EOS, "") == StopDecision("", FinishReason.STOP)
    assert criteria.generated_tokens == 2


def test_length_releases_held_text() -> None:
    criteria = StoppingCriteria(EOS, 3, ["###"])
    assert criteria.step(TOKEN, "a").text == "a"
    assert criteria.step(TOKEN, "b#").text == "b"
    assert criteria.step(TOKEN, "#") == StopDecision("##", FinishReason.LENGTH)


def test_precedence_on_the_last_token() -> None:
    # EOS on the max_new_tokens-th token: the model ended, so "stop".
    criteria = StoppingCriteria(EOS, 1)
    assert criteria.step(EOS, "") == StopDecision("", FinishReason.STOP)
    # A stop string completing on the last token: "stop", and it is not emitted.
    criteria = StoppingCriteria(EOS, 2, ["##"])
    criteria.step(TOKEN, "x#")
    assert criteria.step(TOKEN, "#y") == StopDecision("", FinishReason.STOP)


def test_flush_releases_held_text_and_ends_the_sequence() -> None:
    criteria = StoppingCriteria(EOS, 100, ["<|im_end|>"])
    assert criteria.step(TOKEN, "ok <|im").text == "ok "
    assert criteria.flush() == "<|im"
    assert criteria.flush() == ""
    assert criteria.finish_reason is None  # the caller reports why it ended (e.g. max_total_tokens)
    with pytest.raises(RuntimeError):
        criteria.step(TOKEN, "x")


def test_step_after_finish_is_an_error() -> None:
    criteria = StoppingCriteria(EOS, 1)
    criteria.step(TOKEN, "x")
    with pytest.raises(RuntimeError):
        criteria.step(TOKEN, "y")


def test_overlapping_stop_strings_the_first_to_complete_wins() -> None:
    # "bc" completes before "abcd", however the text is split.
    for deltas in (["abcd"], ["a", "b", "c", "d"], ["ab", "cd"]):
        assert _feed(StoppingCriteria(EOS, 100, ["abcd", "bc"]), deltas)[:2] == ("a", FinishReason.STOP)
    # Ending together: the longer (earlier-starting) one wins.
    assert _feed(StoppingCriteria(EOS, 100, ["c", "bc"]), ["abcd"])[:2] == ("a", FinishReason.STOP)


def test_argument_checks() -> None:
    with pytest.raises(ValueError, match="at most 4"):
        StoppingCriteria(EOS, 10, ["a", "b", "c", "d", "e"])
    with pytest.raises(ValueError, match="non-empty"):
        StoppingCriteria(EOS, 10, [""])
    with pytest.raises(TypeError):
        StoppingCriteria(EOS, 10, "###")
    with pytest.raises(ValueError):
        StoppingCriteria(EOS, 0)
    StoppingCriteria(EOS, 10, ["a", "b", "c", "d"])


# --- properties over random splits --------------------------------------------------------------


def _expected(text: str, stops: list[str]) -> tuple[str, bool]:
    """The text before the stop string that completes first (earliest end, then longest)."""
    hits = [(text.find(s) + len(s), text.find(s)) for s in stops if s in text]
    return (text[: min(hits)[1]], True) if hits else (text, False)


def _split(text: str, cuts: list[int]) -> list[str]:
    bounds = sorted({0, len(text), *(c % (len(text) + 1) for c in cuts)})
    return [text[a:b] for a, b in itertools.pairwise(bounds)] or [""]


ALPHABET = "ab#<>\n é"  # small, so partial matches are frequent; multi-byte characters included
text_st = st.text(ALPHABET, max_size=40)
stop_st = st.text(ALPHABET, min_size=1, max_size=5)


@settings(max_examples=400, deadline=None)
@given(
    prefix=text_st,
    suffix=text_st,
    stop=stop_st,
    insert=st.booleans(),
    cuts=st.lists(st.integers(0, 200), max_size=30),
    empties=st.lists(st.integers(0, 30), max_size=3),
)
def test_property_one_stop_string(
    prefix: str, suffix: str, stop: str, insert: bool, cuts: list[int], empties: list[int]
) -> None:
    text = prefix + (stop if insert else "") + suffix
    deltas = _split(text, cuts)
    for i in empties:  # a token that adds no text (an incomplete UTF-8 character, say)
        deltas.insert(i % (len(deltas) + 1), "")
    emitted, reason, chunks = _feed(StoppingCriteria(EOS, 10_000, [stop]), deltas)
    expected, stopped = _expected(text, [stop])
    assert emitted == (text[: text.find(stop)] if stop in text else text) == expected
    assert (reason is FinishReason.STOP) == stopped
    # Never emitted early: every prefix streamed so far is a prefix of the answer, free of the stop.
    so_far = ""
    for chunk in chunks:
        so_far += chunk
        assert expected.startswith(so_far) and stop not in so_far


@settings(max_examples=300, deadline=None)
@given(
    text=st.text(ALPHABET, max_size=60),
    stops=st.lists(stop_st, min_size=1, max_size=4),
    cuts=st.lists(st.integers(0, 200), max_size=30),
)
def test_property_several_stop_strings(text: str, stops: list[str], cuts: list[int]) -> None:
    emitted, reason, _ = _feed(StoppingCriteria(EOS, 10_000, stops), _split(text, cuts))
    expected, stopped = _expected(text, stops)
    assert emitted == expected
    assert (reason is FinishReason.STOP) == stopped


@settings(max_examples=200, deadline=None)
@given(
    text=st.text(ALPHABET, min_size=1, max_size=40),
    cuts=st.lists(st.integers(0, 200), max_size=30),
    limit=st.integers(1, 40),
)
def test_property_length_releases_everything(text: str, cuts: list[int], limit: int) -> None:
    stop = "a#a#a"
    assume(stop not in text)  # its prefixes still get held back and must come out at the limit
    deltas = _split(text, cuts)
    criteria = StoppingCriteria(EOS, limit, [stop])
    emitted, reason, _ = _feed(criteria, deltas)
    if len(deltas) >= limit:
        assert reason is FinishReason.LENGTH
        assert emitted == "".join(deltas[:limit])
    else:
        assert reason is None and emitted == text
