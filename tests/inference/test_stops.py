"""StopMatcher: the same text as the definition (withhold what could begin a stop string, cut
before the first one), in time linear in the new text however long the stop strings are."""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llamaworks.inference.stops import StopAutomaton, StopMatcher, first_stop


class ChunkTokenizer:
    """Token i decodes to chunks[i]: any split of a text into pieces, without a vocabulary."""

    def __init__(self, chunks: list[str], tail: str = ""):
        self.chunks, self.tail = chunks, tail

    def stream_decoder(self, prefix_ids):
        tok = self

        class Decoder:
            def push(self, token: int) -> str:
                return tok.chunks[token]

            def flush(self) -> str:
                return tok.tail

        return Decoder()


def reference(chunks: list[str], stop: list[str], tail: str = "") -> tuple[list[str], bool]:
    """The deltas by the definition, recomputed from scratch at every step."""
    stop = [s for s in stop if s]
    pending, out = "", []
    for c in [*chunks, None]:
        final = c is None
        pending += tail if final else c
        cut = first_stop(pending, stop)
        if cut >= 0:
            return [*out, pending[:cut]], True
        hold = 0 if final else max((k for s in stop for k in range(1, len(s)) if pending.endswith(s[:k])), default=0)
        out.append(pending[: len(pending) - hold])
        pending = pending[len(pending) - hold:]
    return out, False


def run(chunks: list[str], stop: list[str], tail: str = "") -> tuple[list[str], bool]:
    m = StopMatcher(ChunkTokenizer(chunks, tail), [], stop)
    out = []
    for i in range(len(chunks)):
        delta, hit = m.push(i)
        out.append(delta)
        if hit:
            assert m.push(0) == ("", True) and m.finish() == ""
            return out, True
    out.append(m.finish())
    return out, m.stopped  # a stop string completed by the decoder's flush


text = st.text(alphabet="abc", max_size=5)


@settings(max_examples=600, deadline=None)
@given(chunks=st.lists(text, max_size=12), stop=st.lists(text, max_size=4), tail=text)
def test_matches_the_definition_delta_by_delta(chunks, stop, tail):
    assert run(chunks, stop, tail) == reference(chunks, stop, tail)


@settings(max_examples=300, deadline=None)
@given(target=st.text(alphabet="ab", min_size=1, max_size=8), pieces=st.lists(st.text(alphabet="ab", max_size=6),
                                                                              max_size=8))
def test_automaton_state_is_the_longest_prefix_ending_the_text(target, pieces):
    a, seen = StopAutomaton(target), ""
    for p in pieces:
        end = a.feed(p)
        hit = (seen + p).find(target)
        if hit >= 0:
            assert end == hit + len(target) - len(seen)
            return
        seen += p
        assert end == -1
        assert a.state == max(k for k in range(len(target)) if seen.endswith(target[:k]))


def test_first_stop_string_to_start_wins_within_one_token():
    assert run(["xabcd"], ["abcd", "bc"]) == (["x"], True)
    assert run(["xab", "cd"], ["abcd", "bc"]) == (["x", ""], True)  # "bc" completes first


def test_withheld_text_is_released_when_it_cannot_be_a_stop_string():
    assert run(["abc E", "N", "x"], ["END"]) == (["abc ", "", "ENx", ""], False)
    assert run(["abc E", "N"], ["END"]) == (["abc ", "", "EN"], False)  # released at the end


def test_long_stop_strings_cost_time_linear_in_the_new_text():
    # 16 stop strings of 250k characters (the attack): the old matcher built every
    # prefix of every stop string at every token, 13.7 s for 3 tokens. The text fed here
    # follows a stop string's prefix for a while, so the matcher holds text back too.
    stop = [("ab" * 125_000)[: 250_000 - i] + "z" for i in range(16)]
    t0 = time.perf_counter()
    m = StopMatcher(ChunkTokenizer(["a", "b", "c"]), [], stop)
    built = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = [m.push(i % 2)[0] for i in range(2000)] + [m.push(2)[0]]
    fed = time.perf_counter() - t0
    assert "".join(out) == "ab" * 1000 + "c"  # held back until "c" showed it was no stop string
    assert fed < 0.5, fed  # ~10 ms on 2 CPU cores
    assert built < 5, built  # linear in the stop strings' length: ~0.5 s on 2 CPU cores


def test_empty_stop_strings_are_ignored():
    assert run(["a", "b"], ["", ""]) == (["a", "b", ""], False)
    with pytest.raises(AssertionError):
        StopAutomaton("")
