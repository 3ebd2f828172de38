"""The compiled scan of the text signals (``monitor/signals/textscan.c``) gives the Python path's
values to the bit, and the install builds it."""

from __future__ import annotations

import importlib
import random
from typing import Any

import pytest
from realdata import alpaca_rows

from monitor.signals import TEXT_SIGNALS, text_stats, text_stats_many
from monitor.signals import textstats as ts


def _scan_module() -> Any:
    try:
        return importlib.import_module("monitor.signals.textscan")
    except ImportError as e:
        # `make install` compiles it (setup.py); an install that could not leaves every deployment
        # on the slower Python path without anyone noticing, so the suite says so, never skips.
        pytest.fail(f"monitor.signals.textscan was not built by the install (a C compiler is needed): {e}")


def _ascii_texts(seed: int) -> list[str]:
    """ASCII text that reaches every branch of the scan: every byte, separators of every kind,
    tokens repeated in other cases (the hash table's equal-token path), many distinct tokens (its
    probing), whitespace-only lines, and lengths around ``MAX_CHARS``."""
    rnd = random.Random(seed)
    every_byte = [chr(c) for c in range(128)]
    words = ["the", "The", "THE", "tHe", "x", "X1", "_", "a_b", "A_B", "42", "042", "don", "t"]
    seps = [" ", "\n", "\r\n", "\t", "\x0b", "\x0c", "\x1c", "\x1f", "\x00", "-", "'", ".", "  \n \t\n"]
    out = ["", " ", "\n", "\n\n\n", " \x1c\x1d\x1e\x1f\n\x0b", "a", "A\na", "\x7f", "$+<=>^`|~"]
    for i in range(1500):
        kind = i % 4
        if kind == 0:
            out.append("".join(rnd.choice(every_byte) for _ in range(rnd.randint(0, 200))))
        elif kind == 1:
            out.append("".join(rnd.choice(words) + rnd.choice(seps) for _ in range(rnd.randint(0, 120))))
        elif kind == 2:  # thousands of distinct tokens: long probe chains, a table near its load
            out.append(" ".join(f"w{rnd.randrange(10**6)}" for _ in range(rnd.randint(500, 3000))))
        else:
            n = ts.MAX_CHARS + rnd.randint(-3, 3)
            out.append("".join(rnd.choice("ab \n") for _ in range(n)))
    return out


def test_the_compiled_scan_gives_the_python_values_to_the_bit(monkeypatch: pytest.MonkeyPatch) -> None:
    _scan_module()
    rows = alpaca_rows("gpt-3.5-turbo-1106")[:300] + alpaca_rows("gpt4_1106_preview")[:300]
    responses = [r["output"] for r in rows] + _ascii_texts(0)
    # Non-ASCII answers: Python lower-cases them, C counts their tokens; their neighbours keep their values.
    responses += ["caf\u00e9 the The", "plain after it", "\u2028", "x" * 10 + "\u00e9" + "y" * ts.MAX_CHARS]
    # Case rules only Python's lower() knows (final sigma, a dotted capital I that lowers to two
    # characters), CJK runs, combining marks, digits of other scripts, lone surrogates.
    responses += ["\u03a3\u0391\u03a3 \u03c3\u03b1\u03c3 \u03c3\u03b1\u03c2", "\u0130stanbul istanbul i\u0307stanbul"]
    responses += ["\u4e2d\u6587\u3002\u4e2d\u6587 ok", "e\u0301 e\u0301 \u00e9", "\u0661\u0662 12 \u0661\u0662"]
    responses += ["x\ud800y x y"]
    rnd = random.Random(3)
    pool = [chr(c) for c in (*range(0x20, 0x250), *range(0x370, 0x500), 0x2028, 0x3000, 0xD800, 0x1F600, 0x4E2D)]
    responses += ["".join(rnd.choice(pool + [" "] * 40) for _ in range(rnd.randint(0, 300))) for _ in range(500)]
    prompts = ["p"] * len(responses)
    assert sum(r.isascii() for r in responses) > 1500
    compiled = text_stats_many(prompts, responses)
    monkeypatch.setattr(ts, "textscan", None)
    python = text_stats_many(prompts, responses)
    assert set(compiled) == set(TEXT_SIGNALS)
    for signal in TEXT_SIGNALS:
        for i, (a, b) in enumerate(zip(compiled[signal], python[signal], strict=True)):
            assert a == b, (signal, repr(responses[i][:60]))
            assert type(a) is type(b) is float
    # And each episode as text_stats computes it alone (the definitions' own path).
    for i in range(0, len(responses), 7):
        assert {s: compiled[s][i] for s in TEXT_SIGNALS} == text_stats("p", responses[i])


def test_the_scan_counts_what_its_tables_say() -> None:
    scan = _scan_module().scan
    lines, ratios, shares, rest = scan(
        ["The the THE cat\n\n \t\nx", "", "caf\u00e9", "ab$"], ts._SCAN_LOWER, ts._SCAN_SPACE, ts._SCAN_NON_TEXT, 8000
    )
    assert lines[:2] == [2, 0] and lines[3] == 1
    assert ratios[0] == 3 / 5 and ratios[1] == 1.0  # the, cat, x of 5 tokens; none: 1.0
    assert shares[3] == 1 / 3 and shares[1] == 0.0
    assert rest == [2]  # not ASCII: left to the caller
    # max_chars cuts the text before anything is counted.
    assert scan(["aa bb\ncc"], ts._SCAN_LOWER, ts._SCAN_SPACE, ts._SCAN_NON_TEXT, 4)[:2] == ([1], [1.0])


def test_the_compiled_word_definition_is_pythons_on_every_code_point() -> None:
    """``x<c>x`` is one token when ``c`` (lower-cased) is a word character and two otherwise: its
    distinct ratio (1.0 or 0.5) names the C scan's decision, held to the Python path's for each
    code point of the first four planes and of plane 14, and for every 97th one elsewhere."""
    distinct_ratio = _scan_module().distinct_ratio
    code_points = [*range(0x40000), *range(0xE0000, 0xF0000), *range(0x40000, 0x110000, 97)]
    wrong = []
    for c in code_points:
        text = "x" + chr(c) + "x"
        if distinct_ratio(text.lower().encode("utf-8", "surrogatepass"), ts._SCAN_LOWER) != ts._distinct_ratio(text):
            wrong.append(hex(c))
    assert not wrong, wrong[:20]


def test_the_scan_refuses_what_it_cannot_read() -> None:
    scan = _scan_module().scan
    tables = (ts._SCAN_LOWER, ts._SCAN_SPACE, ts._SCAN_NON_TEXT)
    with pytest.raises(TypeError, match=r"texts\[1\] is bytes"):
        scan(["ok", b"raw"], *tables, 10)
    with pytest.raises(ValueError, match="256 bytes"):
        scan(["ok"], b"short", ts._SCAN_SPACE, ts._SCAN_NON_TEXT, 10)
    with pytest.raises(ValueError, match="max_chars"):
        scan(["ok"], *tables, -1)
    with pytest.raises(TypeError):
        scan(None, *tables, 10)
    distinct_ratio = _scan_module().distinct_ratio
    # A text past the table the module keeps (its own table, freed after), between short ones that
    # use the kept table: every call counts its own tokens only.
    rnd = random.Random(5)
    huge = " ".join(f"t{rnd.randrange(60_000)}" for _ in range(120_000))
    for text in ("a b a", huge, "a b a", huge[:5000], "x"):
        raw = text.encode()
        assert distinct_ratio(raw, ts._SCAN_LOWER) == ts._distinct_ratio(text), len(text)
    # Bytes Python never writes (not UTF-8) are separators, never read past the end.
    assert distinct_ratio(b"\xff\xfea\xc3 a\xe4\xb8", ts._SCAN_LOWER) == 0.5
    assert distinct_ratio(b"", ts._SCAN_LOWER) == 1.0
    with pytest.raises(ValueError, match="256 bytes"):
        distinct_ratio(b"a", b"")
