"""Schema v1 validation: every kind of bad input gets a reason, never an exception of another kind."""

from __future__ import annotations

import json

import pytest

from monitor.episodes import REASONS, InvalidEpisode, parse_episode

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
        (ok(episode_id=""), "invalid_value"),
        (ok(episode_id="x" * 129), "invalid_value"),
        (ok(stream=""), "invalid_value"),
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
        (b'{"episode_id": "e", "prompt": "p", "response": "r", "metadata": {"x": 1e400}}', "invalid_json"),
        (b'{"episode_id": "e", "prompt": "p", "response": "r", "metadata": {"x": -Infinity}}', "invalid_json"),
        (
            b'{"episode_id": "e", "prompt": "p", "response": "r", "metadata": ' + b"[" * 100000 + b"]" * 100000 + b"}",
            "invalid_json",
        ),
    ],
)
def test_bad_input_reasons(raw: bytes, expected: str) -> None:
    assert reason(raw, limit=10_000_000) == expected


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
