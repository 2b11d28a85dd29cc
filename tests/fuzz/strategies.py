"""Hypothesis settings and generic strategies shared by the fuzz tests (no tests here).

Every fuzz test is derandomized (the same examples on every run, so CI is deterministic) and
has no per-example deadline (the first gRPC call or YAML parse can be slow on a loaded runner).
"""

from __future__ import annotations

import json
from typing import Any

import yaml
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st


def fuzz_settings(max_examples: int) -> settings:
    """Deterministic settings: fixed seed, no deadline, no example database on disk."""
    return settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# Text that stresses encoders: any code point protobuf and YAML can carry (no surrogates),
# plus a few classics.
TRICKY = st.sampled_from(
    ["", " ", "\x00", "\n", "::", "::0", "::-1", "/", "..", "%s", "\u200b", "\U0001f600",
     "GPU-", "MIG-", "all", "none", "0", "-1", "1e400", "NaN", "null", "~", "true"]
)
TEXT = st.one_of(TRICKY, st.text(max_size=40))


def json_values(keys: st.SearchStrategy[str]) -> st.SearchStrategy[Any]:
    """JSON-like documents whose mapping keys are drawn from ``keys`` (known and random)."""
    scalars = st.one_of(
        st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
        st.floats(allow_nan=True, allow_infinity=True), TEXT,
    )
    return st.recursive(
        scalars,
        lambda children: st.one_of(
            st.lists(children, max_size=5),
            st.dictionaries(keys, children, max_size=6),
        ),
        max_leaves=30,
    )


def dump(document: Any, as_json: bool) -> str:
    """A document as JSON or YAML text (YAML may fail on odd floats; JSON always works)."""
    if as_json:
        return json.dumps(document)
    try:
        return yaml.safe_dump(document, allow_unicode=True, sort_keys=False)
    except yaml.YAMLError:
        return json.dumps(document)


@st.composite
def mutated_text(draw: st.DrawFn, seeds: list[str]) -> str:
    """A seed document with a few random edits: delete, insert, replace, duplicate, truncate."""
    text = draw(st.sampled_from(seeds))
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        lines = text.splitlines(keepends=True) or [""]
        op = draw(st.sampled_from(
            ["delete_char", "insert_text", "replace_line", "duplicate_line", "truncate",
             "delete_line", "swap_lines", "indent_line"]))
        pos = draw(st.integers(min_value=0, max_value=max(0, len(text))))
        line = draw(st.integers(min_value=0, max_value=len(lines) - 1))
        if op == "delete_char":
            text = text[:pos] + text[pos + 1:]
        elif op == "insert_text":
            text = text[:pos] + draw(st.one_of(TEXT, st.sampled_from(
                [":", "- ", "{", "}", "[", "]", "&a ", "*a", "!!binary ", "\t", "'", '"',
                 "? ", "|", ">", "#", ",", "!!python/object:os.system "]))) + text[pos:]
        elif op == "replace_line":
            lines[line] = draw(TEXT) + "\n"
            text = "".join(lines)
        elif op == "duplicate_line":
            lines.insert(line, lines[line])
            text = "".join(lines)
        elif op == "truncate":
            text = text[:pos]
        elif op == "delete_line":
            del lines[line]
            text = "".join(lines)
        elif op == "swap_lines":
            other = draw(st.integers(min_value=0, max_value=len(lines) - 1))
            lines[line], lines[other] = lines[other], lines[line]
            text = "".join(lines)
        else:
            lines[line] = " " * draw(st.integers(min_value=1, max_value=4)) + lines[line]
            text = "".join(lines)
    return text
