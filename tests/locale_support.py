"""The locale of a container that sets none, for tests of text encoding."""

from __future__ import annotations

import codecs
import locale
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import pytest


@contextmanager
def ascii_default_encoding() -> Iterator[None]:
    """Run the block under the C locale, where Python's default encoding is ASCII, as in a
    container without a locale; skip the test where this Python's C locale is UTF-8 anyway
    (UTF-8 mode). In-process, so mutation testing links the test to the code it calls."""
    previous = locale.setlocale(locale.LC_CTYPE)
    try:
        locale.setlocale(locale.LC_CTYPE, "C")
        if sys.flags.utf8_mode or codecs.lookup(locale.getpreferredencoding(False)).name == (
                "utf-8"):
            pytest.skip("the C locale's default encoding is UTF-8 here")
        yield
    finally:
        locale.setlocale(locale.LC_CTYPE, previous)
