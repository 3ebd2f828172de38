"""Text statistics on hand-made and real episodes."""

from __future__ import annotations

import math
import statistics

import pytest
from realdata import alpaca_rows

from monitor.signals import TEXT_SIGNALS, text_stats
from monitor.signals.textstats import MAX_CHARS


def test_every_declared_signal_is_computed() -> None:
    assert set(text_stats("p", "r")) == set(TEXT_SIGNALS)


@pytest.mark.parametrize(
    ("response", "signal", "value"),
    [
        ("", "empty_response", 1.0),
        ("   \n", "empty_response", 1.0),
        ("ok", "empty_response", 0.0),
        ("I'm sorry, but I can't help with that.", "refusal", 1.0),
        ("  I cannot assist with this request.", "refusal", 1.0),
        ("As an AI language model, I do not have opinions.", "refusal", 1.0),
        ("Sure! Here is the recipe. I'm sorry it is long.", "refusal", 0.0),
        ("the the the the", "distinct_token_ratio", 0.25),
        ("one two three", "distinct_token_ratio", 1.0),
        ("abc\x07\x07", "non_text_ratio", 0.4),
        ("plain text.\n", "non_text_ratio", 0.0),
        ("a+b=c", "non_text_ratio", 0.4),  # ASCII symbols are not text, as they are beside non-ASCII text
        ("a+b=c \u00e9", "non_text_ratio", 2 / 7),
        ("1. one\n\n  \n2. two\n3. three", "response_log_lines", math.log(4)),
        ("", "response_log_lines", 0.0),
    ],
)
def test_known_values(response: str, signal: str, value: float) -> None:
    assert text_stats("prompt", response)[signal] == pytest.approx(value)


def test_lengths_are_log_scaled() -> None:
    s = text_stats("x" * 9, "y" * 99)
    assert s["prompt_log_chars"] == pytest.approx(math.log(10)) and s["response_log_chars"] == pytest.approx(
        math.log(100)
    )


def test_cost_is_bounded_for_huge_responses() -> None:
    s = text_stats("p", "word " * 1_000_000)
    assert s["distinct_token_ratio"] < 0.01


def test_real_shifts_move_the_statistics() -> None:
    """Real deployed-model traffic: verbose vs concise styles differ in length, and the reward-hacking
    NullModel's constant output is degenerate (one response repeated)."""

    def mean(model: str, signal: str) -> float:
        return statistics.fmean(text_stats(r["instruction"], r["output"])[signal] for r in alpaca_rows(model))

    assert (
        mean("gpt-3.5-turbo-1106_verbose", "response_log_chars")
        > mean("gpt-3.5-turbo-1106_concise", "response_log_chars") + 0.5
    )
    # alpaca-7b answers in plain paragraphs where gpt-3.5 lays out lists and steps
    assert mean("gpt-3.5-turbo-1106", "response_log_lines") > mean("alpaca-7b", "response_log_lines") + 0.3
    null = [text_stats(r["instruction"], r["output"]) for r in alpaca_rows("NullModel")]
    assert len({round(s["response_log_chars"], 6) for s in null}) == 1  # a constant answer
    refusals = mean("claude-2", "refusal")
    assert 0.0 <= refusals < 0.2


def _by_definition(prompt: str, response: str) -> dict[str, float]:
    """The signals computed character by character from their definitions: what the regex and
    bytes.translate fast paths of ``text_stats`` must equal exactly."""
    import re
    import unicodedata

    r = response[:MAX_CHARS]
    tokens = re.findall(r"\w+", r.lower())
    bad = sum(1 for ch in r if unicodedata.category(ch)[0] not in "LMNPZ" and ch not in "\n\r\t")
    scripts = {
        "LATIN" if ch.isascii() else unicodedata.name(ch, "UNKNOWN").split(" ", 1)[0] for ch in r if ch.isalpha()
    }
    return {
        "response_log_chars": math.log1p(len(response)),
        "prompt_log_chars": math.log1p(len(prompt)),
        "response_log_lines": math.log1p(sum(1 for line in r.split("\n") if line.strip())),
        "empty_response": 0.0 if response.strip() else 1.0,
        "refusal": text_stats("", r)["refusal"],
        "distinct_token_ratio": len(set(tokens)) / len(tokens) if tokens else 1.0,
        "non_text_ratio": bad / len(r) if r else 0.0,
        "mixed_script": 1.0 if len(scripts) > 1 and not r.isascii() else 0.0,
    }


def test_fast_paths_equal_the_definitions_on_real_and_random_text() -> None:
    import random

    texts = [row["output"] for row in alpaca_rows("gpt-3.5-turbo-1106")[:300]]
    # gpt-4's answers: a third of them hold a non-ASCII character (quotes, dashes, accents, CJK)
    texts += [row["output"] for row in alpaca_rows("gpt4_1106_preview") if not row["output"].isascii()][:300]
    rnd = random.Random(0)
    # Every ASCII byte, Latin, Greek, Cyrillic, general punctuation, CJK, emoji, private use,
    # zero-width and bidi controls, combining marks, Arabic digits, line and paragraph separators,
    # enclosed and fraction numbers, fullwidth forms, lone surrogates (JSON can carry them).
    pool = [chr(c) for c in (*range(0x250), *range(0x370, 0x500), *range(0x2000, 0x2100), *range(0x4E00, 0x4E20))]
    pool += [chr(c) for c in (*range(0x2460, 0x2500), *range(0xFF00, 0xFF60), 0xD800, 0xDFFF)]
    pool += [chr(c) for c in (0x1F600, 0xE000, 0x200B, 0x202E, 0xFEFF, 0x0301, 0x0660, 0x2028, 0x85, 0xA0, 0x3000)]
    ascii_pool = [chr(c) for c in range(128)]
    mostly_ascii = ascii_pool * 8 + pool[:0x250:7]  # a rare non-ASCII character among ASCII words
    for i in range(4500):
        chars = (ascii_pool, pool, mostly_ascii)[i % 3]
        texts.append("".join(rnd.choice(chars) for _ in range(rnd.randint(0, 60))))
    for text in texts:
        assert text_stats("a prompt", text) == _by_definition("a prompt", text), repr(text[:60])


def test_the_batch_of_statistics_equals_one_episode_at_a_time() -> None:
    """``text_stats_many`` (the drift observer's batch path) gives every signal of every episode to
    the bit, on real answers, hostile text and the edges its shortcuts touch (whitespace-only and
    empty answers, a refusal cut at the 300th character, answers past ``MAX_CHARS``)."""
    import random

    from monitor.signals import text_stats_many

    rows = alpaca_rows("gpt4_1106_preview")[:400] + alpaca_rows("alpaca-7b")[:200]
    prompts, responses = [r["instruction"] for r in rows], [r["output"] for r in rows]
    rnd = random.Random(1)
    pool = [chr(c) for c in (*range(0x250), 0x85, 0xA0, 0x2028, 0x3000, 0xD800, 0x1F600, 0x202E, 0x4E2D)]
    edges = ["", " ", "\n\t \u3000\x85", "\u2028", " " * 290 + "I'm sorry", " " * 296 + "I'm sorry"]
    edges += ["x" * (MAX_CHARS + 50)]
    edges += ["As an AI" + "!" * 300, "I cannot\n\n \nsay", "a\u00a0\n\u2028\nb"]
    edges += ["".join(rnd.choice(pool) for _ in range(rnd.randint(0, 80))) for _ in range(600)]
    prompts += ["", *edges][: len(edges)]
    responses += edges
    columns = text_stats_many(prompts, responses)
    assert set(columns) == set(TEXT_SIGNALS)
    for i, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
        one = text_stats(prompt, response)
        assert {s: columns[s][i] for s in TEXT_SIGNALS} == one, repr(response[:60])
    assert text_stats_many([], []) == {s: [] for s in TEXT_SIGNALS}


def test_word_tokens_are_the_unicode_word_runs() -> None:
    """The bytes fast path cuts where ``\\w+`` does, in any script, and keeps a token whole across
    accents (UTF-8 bytes of 0x80 and up are never spaces)."""
    import re

    from monitor.signals.textstats import word_tokens

    for text in ("Don\u2019t", "na\u00efve caf\u00e9s", "\u4e2d\u6587\u3002ok", "a\u00a0b\u2028c", "x\ud800y", "A_b-C"):
        words = [w.decode("utf-8", "surrogatepass") for w in word_tokens(text)]
        assert words == re.findall(r"\w+", text.lower()), repr(text)


def test_every_ascii_character_counts_alike_with_or_without_non_ascii_text() -> None:
    """The ASCII fast path and the general path agree character by character: a code answer's
    value does not jump when one curly quote appears in it."""
    from monitor.signals.textstats import non_text_ratio

    for c in map(chr, range(128)):
        assert non_text_ratio(c) == 2 * non_text_ratio(c + "\u00e9"), repr(c)


def test_the_reward_model_feature_keeps_its_trained_definition() -> None:
    """Trained reward-model versions learned ``non_text_ratio`` as the first definition had it
    (ASCII symbols uncounted in pure-ASCII text): the feature keeps it, whatever the drift signal does."""
    from monitor.reward.features import FEATURE_NAMES, response_features
    from monitor.signals.textstats import non_text_ratio_v1

    assert non_text_ratio_v1("a+b=c") == 0.0 and non_text_ratio_v1("a+b=c\x07") == pytest.approx(1 / 6)
    assert non_text_ratio_v1("a+b=c \u00e9") == pytest.approx(2 / 7)
    assert response_features("p", "x = a + b")[FEATURE_NAMES.index("non_text_ratio")] == 0.0
