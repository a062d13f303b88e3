"""The scheduler's pieces that need no model: stop strings held back across tokens."""
from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from bitnet_run.serve.engine import StopMatcher

pieces = st.lists(st.text(alphabet="ab\u00e9c", max_size=3), max_size=12)
stops = st.lists(st.text(alphabet="ab\u00e9c", min_size=1, max_size=4), max_size=3)


@given(pieces, stops)
def test_stop_matcher_releases_the_text_before_the_first_stop(parts, stop_strings):
    matcher = StopMatcher(tuple(stop_strings))
    released, stopped = "", False
    for part in parts:
        text, stopped = matcher.push(part)
        released += text
        if stopped:
            break
    if not stopped:
        released += matcher.flush()
    whole = "".join(parts)
    hits = [whole.find(s) for s in stop_strings if s in whole]
    # the same cut as searching the whole text at once (the stream stops at the first stop string)
    assert released == (whole[: min(hits)] if hits else whole)
    assert stopped == bool(hits)


def test_stop_matcher_holds_a_possible_start_of_a_stop():
    matcher = StopMatcher(("</s>",))
    assert matcher.push("hello <") == ("hello ", False)
    assert matcher.push("/") == ("", False)
    assert matcher.push("x") == ("</x", False)
    assert matcher.push(" </s> tail") == (" ", True)
