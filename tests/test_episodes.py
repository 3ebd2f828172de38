"""Schema v1 validation: every kind of bad input gets a reason, never an exception of another kind."""

from __future__ import annotations

import json

import pytest

from monitor.episodes import MAX_METADATA_DEPTH, REASONS, InvalidEpisode, parse_episode, parse_timestamp

NOW = 1_767_225_600.0
LIMIT = 256 * 1024


def ok(**kw: object) -> bytes:
    base: dict[str, object] = {"episode_id": "e1", "prompt": "p", "response": "r"}
    base.update(kw)
    return json.dumps(base).encode()


def reason(raw: bytes, limit: int = LIMIT) -> str:
    with pytest.raises(InvalidEpisode) as ei:
        parse_episode(raw, limit, NOW)
    assert ei.value.reason in REASONS
    return ei.value.reason


def test_minimal_episode_gets_defaults() -> None:
    ep = parse_episode(ok(), LIMIT, NOW)
    assert (ep.episode_id, ep.stream, ep.model, ep.timestamp, ep.metadata) == ("e1", "default", None, NOW, None)


def test_full_episode_and_timestamps() -> None:
    ep = parse_episode(ok(stream="s", model="m-1", metadata={"a": [1]}, timestamp="2026-01-01T00:00:00Z"), LIMIT, NOW)
    assert ep.timestamp == 1767225600.0 and ep.stream == "s" and ep.model == "m-1" and ep.metadata == {"a": [1]}
    assert parse_episode(ok(timestamp="2026-01-01T01:00:00+01:00"), LIMIT, NOW).timestamp == 1767225600.0
    assert parse_episode(ok(timestamp=1767225600.5), LIMIT, NOW).timestamp == 1767225600.5
    assert parse_episode(ok(schema_version=1), LIMIT, NOW).episode_id == "e1"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b'{"episode_id": "e1", "prompt": "trunc', "invalid_json"),
        (b"", "invalid_json"),
        (b"[1, 2]", "not_object"),
        (b'"just a string"', "not_object"),
        (b"null", "not_object"),
        (ok(episode_id=7), "wrong_type"),
        (ok(prompt=None), "wrong_type"),
        (ok(response=["r"]), "wrong_type"),
        (ok(stream=3), "wrong_type"),
        (ok(model=1.5), "wrong_type"),
        (ok(metadata="m"), "wrong_type"),
        (ok(timestamp=True), "wrong_type"),
        (ok(timestamp="yesterday"), "invalid_value"),
        (ok(timestamp="2026-01-01T00:00:00"), "invalid_value"),
        (ok(timestamp=-5), "invalid_value"),
        (ok(timestamp="9999-12-31T23:59:59-23:59"), "invalid_value"),  # past 9999 in UTC: was an internal error
        (ok(timestamp="1969-12-31T23:59:59Z"), "invalid_value"),  # before 1970, as a number is refused
        (ok(episode_id=""), "invalid_value"),
        (ok(episode_id="x" * 129), "invalid_value"),
        (ok(stream=""), "invalid_value"),
        (ok(stream="chat\u200b"), "invalid_value"),  # reads as "chat"
        (ok(stream="\u202echat"), "invalid_value"),  # a right-to-left override
        # Ids and model names by the same rule: they reach log lines, exports and the review UI.
        (ok(episode_id="id\u202eexe.txt"), "invalid_value"),
        (ok(episode_id="e\u2028FAKE LOG LINE"), "invalid_value"),
        (ok(model="pol\u2029FAKE LOG LINE"), "invalid_value"),
        (ok(model="gpt\u200d4"), "invalid_value"),
        (
            json.dumps(
                {"episode_id": "e", "stream": "chat\u2066", "messages": [{"role": "user", "content": "q"}]}
            ).encode(),
            "invalid_value",
        ),  # schema v2: the same rule
        (
            json.dumps(
                {"episode_id": "e\u200b", "stream": "chat", "messages": [{"role": "user", "content": "q"}]}
            ).encode(),
            "invalid_value",
        ),
        (ok(schema_version=2), "invalid_value"),
        (b'{"prompt": "p", "response": "r"}', "missing_field"),
        (b'{"episode_id": "e", "response": "r"}', "missing_field"),
        (b'{"episode_id": "e", "prompt": "p"}', "missing_field"),
        (ok(respnose="typo"), "unknown_field"),
        (b'{"episode_id": "e", "prompt": "p", "response": "r\\u0000"}', "nul_character"),
        (b'{"episode_id": "e", "prompt": "p", "response": "r", "metadata": {"k\\u0000": 1}}', "nul_character"),
        (b'{"episode_id": "e", "prompt": "p\x00", "response": "r"}', "nul_character"),
        (b'{"episode_id": "e", "prompt": "p", "response": "\\ud800"}', "invalid_unicode"),
        (b'{"episode_id": "e", "prompt": "\xff\xfe", "response": "r"}', "invalid_utf8"),
        (b'{"episode_id": "e", "prompt": "p", "response": NaN}', "invalid_json"),
        (b'{"episode_id": "e", "prompt": "p", "response": "r", "metadata": {"x": 1e400}}', "number_out_of_range"),
        (b'{"episode_id": "e", "prompt": "p", "response": "r", "metadata": {"x": -Infinity}}', "invalid_json"),
        (
            b'{"episode_id": "e", "prompt": "p", "response": "r", "metadata": ' + b"[" * 100000 + b"]" * 100000 + b"}",
            "too_deep",
        ),
    ],
)
def test_bad_input_reasons(raw: bytes, expected: str) -> None:
    assert reason(raw, limit=10_000_000) == expected


def test_a_byte_order_mark_before_a_record_is_ignored() -> None:
    """The first line of a file a Windows tool wrote; RFC 8259 lets a parser ignore the mark."""
    assert parse_episode(b"\xef\xbb\xbf" + ok(), LIMIT, NOW).episode_id == "e1"


def test_oversize_is_checked_before_parsing() -> None:
    big = ok(response="x" * (5 * 1024 * 1024))
    assert reason(big) == "oversize"
    assert parse_episode(ok(response="x" * 1000), 2000, NOW).response == "x" * 1000


def test_context_is_kept_for_dead_letters() -> None:
    with pytest.raises(InvalidEpisode) as ei:
        parse_episode(ok(stream="s1", prompt=5), LIMIT, NOW)
    assert (ei.value.episode_id, ei.value.stream) == ("e1", "s1")


def test_surrogate_pairs_and_escaped_backslashes_are_fine() -> None:
    ep = parse_episode(b'{"episode_id": "e", "prompt": "\\ud83d\\ude00", "response": "\\\\u0000 is text"}', LIMIT, NOW)
    assert ep.prompt == "\U0001f600" and ep.response == "\\u0000 is text"


def deep_metadata(levels: int, leaf: bytes = b"1", arrays: bool = True) -> bytes:
    """Metadata nesting ``levels`` objects/arrays (the metadata object is level 1), written out by
    hand: json.dumps would recurse."""
    inner = levels - 1
    opens, closes = (b"[", b"]") if arrays else (b'{"k":', b"}")
    return b'{"d":' + opens * inner + leaf + closes * inner + b"}"


def with_metadata(meta: bytes, tail: bytes = b"") -> bytes:
    # Metadata before the text fields: the old recursive scans descended into it before finding the escape.
    return b'{"episode_id": "e", "metadata": ' + meta + b', "prompt": "p", "response": "r' + tail + b'"}'


# Issue 13: records that crashed the pipeline instead of getting a reason.
@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        # 1e400 written out as an integer: OverflowError in float().
        (
            b'{"episode_id": "e", "prompt": "p", "response": "r", "timestamp": 1' + b"0" * 400 + b"}",
            "number_out_of_range",
        ),
        (with_metadata(b'{"n": -' + b"9" * 5000 + b"}"), "number_out_of_range"),
        # 1,000 deep: orjson parses it, the store's JSON encoder hit the recursion limit.
        (with_metadata(deep_metadata(1000)), "too_deep"),
        (with_metadata(deep_metadata(1000, arrays=False)), "too_deep"),
        # 600 deep with an escaped NUL or lone surrogate: RecursionError in the recursive scans.
        (with_metadata(deep_metadata(600), b"\\u0000"), "nul_character"),
        (with_metadata(deep_metadata(600), b"\\ud800"), "invalid_unicode"),
        (with_metadata(deep_metadata(600, b'"\\u0000"')), "nul_character"),
        (with_metadata(deep_metadata(MAX_METADATA_DEPTH + 1)), "too_deep"),
        (with_metadata(deep_metadata(MAX_METADATA_DEPTH + 1, arrays=False)), "too_deep"),
        # Text that looks like an escape (an escaped backslash, then u0000) takes the slow path.
        (with_metadata(deep_metadata(40), b"\\\\u0000"), "too_deep"),
    ],
)
def test_poison_pills_get_a_reason(raw: bytes, expected: str) -> None:
    assert reason(raw, limit=10_000_000) == expected


def test_metadata_at_the_depth_limit_is_fine_on_both_parse_paths() -> None:
    for arrays in (True, False):
        meta = deep_metadata(MAX_METADATA_DEPTH, arrays=arrays)
        fast = parse_episode(with_metadata(meta), LIMIT, NOW)
        # An escaped backslash followed by u0000 is text, but sends the record down the slow path.
        slow = parse_episode(with_metadata(meta, b"\\\\u0000"), LIMIT, NOW)
        assert fast.metadata == slow.metadata and fast.metadata is not None
        assert slow.response == "r\\u0000"


@pytest.mark.parametrize(
    "number",
    [
        b"18446744073709551615",
        b"18446744073709551616",
        b"-9223372036854775808",
        b"-9223372036854775809",
        b"1e308",
        b"1" + b"0" * 300,
    ],
)
def test_numbers_read_the_same_on_both_parse_paths(number: bytes) -> None:
    raw = b'{"episode_id": "e", "prompt": "p", "response": "r%s", "metadata": {"n": ' + number + b"}}"
    fast = parse_episode(raw % b"", LIMIT, NOW).metadata
    slow = parse_episode(raw % b"\\\\u0000", LIMIT, NOW).metadata
    assert fast is not None and slow is not None
    assert fast["n"] == slow["n"] and type(fast["n"]) is type(slow["n"])


@pytest.mark.parametrize("field", ["episode_id", "stream", "model"])
@pytest.mark.parametrize("char", ["\n", "\r", "\t", "\x1b", "\x7f", "\x85", "\x9f"])
def test_control_characters_in_ids_are_rejected(field: str, char: str) -> None:
    with pytest.raises(InvalidEpisode) as ei:
        parse_episode(ok(**{field: f"a{char}b"}), LIMIT, NOW)
    assert ei.value.reason == "invalid_value"
    assert "control character" in ei.value.detail and f"U+{ord(char):04X}" in ei.value.detail
    assert char not in ei.value.detail  # the detail names it, it does not carry it
    if field != "model":  # nor does the dead letter's context
        assert getattr(ei.value, field) is None


def test_printable_unicode_ids_are_fine() -> None:
    ep = parse_episode(ok(episode_id="épisode ü-\U0001f600", stream="日本 語", model="mistral–7b ×2"), LIMIT, NOW)
    assert (ep.episode_id, ep.stream, ep.model) == ("épisode ü-\U0001f600", "日本 語", "mistral–7b ×2")


def test_huge_integer_timestamp_is_out_of_range() -> None:
    for value in (10**400, -(10**400), 10**30):
        with pytest.raises(InvalidEpisode) as ei:
            parse_timestamp(value)
        assert ei.value.reason == "invalid_value"
    assert parse_timestamp(253402300799) == 253402300799.0


def test_a_timestamp_past_the_skew_limit_is_refused_with_its_stream() -> None:
    assert parse_episode(ok(timestamp=NOW + 300, stream="chat"), LIMIT, NOW, 300.0).timestamp == NOW + 300
    with pytest.raises(InvalidEpisode) as ei:
        parse_episode(ok(timestamp="2026-01-01T00:05:01Z", stream="chat"), LIMIT, NOW, 300.0)
    e = ei.value
    assert (e.reason, e.episode_id, e.stream) == ("timestamp_in_future", "e1", "chat")
    assert "2026-01-01T00:05:01Z is 301 s ahead" in e.detail
    # No limit, and a record without a timestamp is stamped with the reader's clock.
    assert parse_episode(ok(timestamp="9999-12-31T23:59:59Z"), LIMIT, NOW, None).timestamp == 253402300799.0
    assert parse_episode(ok(), LIMIT, NOW, 0.001).timestamp == NOW


def test_a_leap_second_is_the_next_second() -> None:
    """23:59:60 is valid RFC 3339 (a leap second): it was refused as "not RFC 3339". It counts as the next
    second, as POSIX time does; a second 61, or 60 in the middle of a minute's text, is still refused."""
    assert parse_timestamp("2016-12-31T23:59:60Z") == parse_timestamp("2017-01-01T00:00:00Z")
    assert parse_timestamp("2016-12-31T18:59:60.5-05:00") == parse_timestamp("2017-01-01T00:00:00.5Z")
    for bad in ("2016-12-31T23:59:61Z", "2016-12-31T23:60:00Z"):
        with pytest.raises(InvalidEpisode, match="not RFC 3339"):
            parse_timestamp(bad)
