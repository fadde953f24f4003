"""Hypothesis strategies for a request field's value as a client may write it: what the property tests draw."""

from __future__ import annotations

import functools
import re

from hypothesis import strategies as st

from firegen_core import contract

SAFE_INTEGER = 2**53 - 1  # past it a JavaScript client's number is a double


@functools.cache
def request_value(name: str) -> st.SearchStrategy:
    """Any value a client may write for the request field `name` (a doc's, or the page's again from a doc: `Edit
    as new`, `Try again` read a doc's fields whatever their type): near the field's range and far from it, of
    every JSON type. Left out: what a JavaScript number cannot hold as the contract's Python reads it (integers
    past 2^53; an integral float, which JavaScript reads as an integer; NaN and infinities, which JSON has no
    words for)."""
    fraction = st.floats(allow_nan=False, allow_infinity=False).filter(lambda f: not f.is_integer())
    values = [st.none(), st.booleans(), st.integers(-SAFE_INTEGER, SAFE_INTEGER), fraction, st.text(max_size=8)]
    small = st.integers(0, 9)
    values += [st.lists(small, max_size=2), st.dictionaries(st.text(min_size=1, max_size=2), small, max_size=1)]
    if name in contract.PARAMS:
        spec = contract.PARAMS[name]
        near = st.floats(spec.low - 8, spec.high + 8).filter(lambda f: not f.is_integer())
        values += [st.integers(int(spec.low) - 40, int(spec.high) + 40), near]
    if name in contract.TEXT_FIELDS:
        # Blank, at and past the 2,000 code point limit, astral characters (two UTF-16 units), lone surrogates.
        piece = st.sampled_from(["a", " ", "\x85", "\u3000", "\ufeff", "\N{GRINNING FACE}", "\ud800", "\udc00"])
        long = st.builds(lambda c, n: c * n, st.sampled_from(["x", "\N{GRINNING FACE}", " "]), st.integers(1998, 2002))
        values += [st.text(piece, max_size=6), long]
    return st.one_of(values)


@functools.cache
def valid_value(name: str) -> st.SearchStrategy:
    """A value the contract accepts for the request field `name` (text fields: non-blank text)."""
    if name in contract.PARAMS:
        spec = contract.PARAMS[name]
        if spec.kind is float:
            return st.floats(spec.low, spec.high)
        step = spec.multiple_of or 1
        return (
            st.integers(int(spec.low) // step, int(spec.high) // step)
            .map(lambda n: n * step)
            .filter(lambda n: spec.low <= n <= spec.high)
        )
    if name == "seed":
        return st.integers(0, 2**32)
    if name == "use_cloud_storage":
        return st.just(True)
    visible = re.compile(f"[^{contract.BLANK_CLASS}]")
    text = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=20)
    return text.filter(lambda value: visible.search(value) is not None)
