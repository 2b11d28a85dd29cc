"""The one backoff every retry loop uses."""

from __future__ import annotations

import pytest

from gpus.backoff import Backoff


def test_grows_caps_and_resets() -> None:
    backoff = Backoff(initial=0.1, cap=0.5)
    assert [backoff.next_delay() for _ in range(5)] == pytest.approx([0.1, 0.2, 0.4, 0.5, 0.5])
    backoff.reset()
    assert backoff.next_delay() == pytest.approx(0.1)


def test_factor_and_an_initial_above_the_cap() -> None:
    backoff = Backoff(initial=1, factor=3, cap=10)
    assert [backoff.next_delay() for _ in range(4)] == [1, 3, 9, 10]
    assert Backoff(initial=20, cap=5).next_delay() == 5


def test_arguments_are_keywords_only() -> None:
    # Two earlier copies took (initial, cap) and (initial, factor, cap) positionally.
    with pytest.raises(TypeError):
        Backoff(1, 2)  # type: ignore[call-arg]  # the old positional call, refused
