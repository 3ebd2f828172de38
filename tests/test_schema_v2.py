"""Schema v2 (issue 15): conversations in the OpenAI chat format, their validation, the documented
flattening into prompt and response, the limits and their dead-letter reasons, hostile input, and a
v2 episode through a file replay into the store with its messages and signals."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from monitor.config import load_settings
from monitor.episodes import (
    DEAD_LETTER_REASONS,
    MAX_MESSAGES,
    MAX_PARTS,
    MAX_TOOL_CALLS,
    REASONS,
    Episode,
    InvalidEpisode,
    parse_episode,
)
from monitor.service.replay import replay_file
from monitor.store import Store
from monitor.store import tables as t

LIMIT = 1 << 20
NOW = 1_767_225_600.0


def call(cid: str, name: str, args: str) -> dict[str, Any]:
    return {"id": cid, "type": "function", "function": {"name": name, "arguments": args}}


def agent_record(eid: str = "conv-1", **extra: Any) -> dict[str, Any]:
    """A system prompt, a user turn with an image, a tool call, its result and the final answer."""
    return {
        "episode_id": eid,
        "stream": "agents",
        "model": "gpt-4o-2024-08-06",
        "timestamp": "2026-01-01T00:00:00Z",
        "metadata": {"app": "weather"},
        "messages": [
            {"role": "system", "content": "You are a weather assistant."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is the weather where this photo was taken?"},
                    {"type": "image_url", "image_url": {"url": "https://example.com/paris.jpg", "detail": "low"}},
                ],
            },
            {"role": "assistant", "content": None, "tool_calls": [call("call_1", "get_weather", '{"city": "Paris"}')]},
            {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 21, "sky": "clear"}'},
            {"role": "assistant", "content": "It is 21 C and clear in Paris."},
        ],
        **extra,
    }


def parse(obj: Any) -> Episode:
    return parse_episode(json.dumps(obj).encode(), LIMIT, NOW)


def reason_of(raw: bytes | dict[str, Any]) -> tuple[str, str]:
    data = raw if isinstance(raw, bytes) else json.dumps(raw).encode()
    with pytest.raises(InvalidEpisode) as ei:
        parse_episode(data, LIMIT, NOW)
    assert ei.value.reason in REASONS
    return ei.value.reason, ei.value.detail


# -- valid records -----------------------------------------------------------------------------


def test_string_content_with_a_system_prompt() -> None:
    ep = parse(
        {
            "episode_id": "c",
            "messages": [
                {"role": "system", "content": "Be terse."},
                {"role": "user", "content": "Capital of France?"},
                {"role": "assistant", "content": "Paris."},
            ],
        }
    )
    assert ep.prompt == "system: Be terse.\n\nuser: Capital of France?"
    assert ep.response == "Paris."
    assert ep.stream == "default" and ep.timestamp == NOW
    assert ep.messages is not None and [m["role"] for m in ep.messages] == ["system", "user", "assistant"]


def test_tool_calls_results_and_parts_flatten_as_documented() -> None:
    ep = parse(agent_record())
    assert ep.prompt == (
        "system: You are a weather assistant.\n\n"
        "user: What is the weather where this photo was taken?\n[image]\n\n"
        'assistant called get_weather({"city": "Paris"})\n\n'
        'tool get_weather returned: {"temp_c": 21, "sky": "clear"}'
    )
    assert ep.response == "It is 21 C and clear in Paris."
    assert ep.timestamp == NOW and ep.model == "gpt-4o-2024-08-06" and ep.metadata == {"app": "weather"}
    # Kept as sent, the image part included.
    assert ep.messages == agent_record()["messages"]


def test_final_turn_of_only_tool_calls_is_the_response() -> None:
    rec = {
        "episode_id": "c",
        "schema_version": 2,
        "messages": [
            {"role": "developer", "content": [{"type": "text", "text": "Use tools."}]},
            {"role": "user", "content": "Book it", "name": "alice"},
            {"role": "assistant", "tool_calls": [call("a", "search", "{}"), call("b", "book", '{"id": 7}')]},
        ],
    }
    ep = parse(rec)
    assert ep.prompt == "developer: Use tools.\n\nuser: Book it"
    assert ep.response == 'assistant called search({})\nassistant called book({"id": 7})'


def test_assistant_text_with_calls_and_named_tool_results() -> None:
    rec = {
        "episode_id": "c",
        "messages": [
            {"role": "user", "content": "2+2 and 3*3?"},
            {
                "role": "assistant",
                "content": "Let me compute.",
                "tool_calls": [call("x1", "calc", '"2+2"'), call("x2", "calc", '"3*3"')],
            },
            {"role": "tool", "tool_call_id": "x2", "content": "9", "name": "calculator"},
            {"role": "tool", "tool_call_id": "x1", "content": [{"type": "text", "text": "4"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "4"}, {"type": "text", "text": "and 9"}]},
        ],
    }
    ep = parse(rec)
    assert ep.prompt == (
        "user: 2+2 and 3*3?\n\n"
        'assistant: Let me compute.\nassistant called calc("2+2")\nassistant called calc("3*3")\n\n'
        "tool calculator returned: 9\n\n"
        "tool calc returned: 4"
    )
    assert ep.response == "4\nand 9"


def test_to_json_is_a_record_that_parses_back() -> None:
    ep = parse(agent_record())
    out = ep.to_json()
    assert out["schema_version"] == 2 and "prompt" not in out and "response" not in out
    again = parse(out)
    assert (again.prompt, again.response, again.messages, again.timestamp) == (
        ep.prompt,
        ep.response,
        ep.messages,
        ep.timestamp,
    )


def test_v1_records_are_unchanged() -> None:
    ep = parse({"episode_id": "v1", "prompt": "p", "response": "r", "schema_version": 1})
    assert (ep.prompt, ep.response, ep.messages) == ("p", "r", None)
    assert ep.to_json() == {
        "episode_id": "v1",
        "timestamp": NOW,
        "stream": "default",
        "model": None,
        "prompt": "p",
        "response": "r",
        "metadata": None,
    }
    # Existing positional constructors keep working: messages is the last field, defaulting to None.
    assert Episode("e", 1.0, "s", None, "p", "r", None, 10).messages is None


# -- structural violations and limits ----------------------------------------------------------


def with_messages(messages: Any, **extra: Any) -> dict[str, Any]:
    return {"episode_id": "bad", "stream": "agents", "messages": messages, **extra}


USER = {"role": "user", "content": "hi"}
ANSWER = {"role": "assistant", "content": "hello"}


@pytest.mark.parametrize(
    ("record", "reason", "detail"),
    [
        (with_messages([USER, ANSWER], prompt="p"), "mixed_schema", "must not carry prompt or response"),
        (with_messages([USER, ANSWER], response="r"), "mixed_schema", "must not carry prompt or response"),
        ({"episode_id": "v", "schema_version": 2}, "missing_field", "messages is required with schema_version 2"),
        ({"episode_id": "v", "schema_version": 2, "prompt": "p", "response": "r"}, "invalid_value", "carry messages"),
        (with_messages([USER, ANSWER], schema_version=1), "invalid_value", "schema_version must be 2"),
        (with_messages([USER, ANSWER], schema_version="2"), "invalid_value", "schema_version must be 2"),
        ({"episode_id": "v", "schema_version": 3}, "invalid_value", "schema_version must be 1 (or 2 with messages)"),
        ({"episode_id": "v", "schema_version": "1"}, "invalid_value", "schema_version must be 1 (or 2 with messages)"),
        (with_messages({"role": "user"}), "invalid_message", "messages must be an array"),
        (with_messages([]), "invalid_message", "must not be empty"),
        (with_messages([USER, "hello"]), "invalid_message", "messages[1] must be an object"),
        (
            with_messages([USER, {"role": "wizard", "content": "x"}, ANSWER]),
            "invalid_message",
            "messages[1].role 'wizard' is not one of system, developer, user, assistant, tool",
        ),
        (with_messages([{"content": "x"}, ANSWER]), "invalid_message", "messages[0].role is required"),
        (
            with_messages([{**USER, "refusal": None}, ANSWER]),
            "invalid_message",
            "messages[0] has unknown keys 'refusal'",
        ),
        (with_messages([USER]), "invalid_message", "the last message must be the assistant's, messages[0] is 'user'"),
        (with_messages([{"role": "user", "content": None}, ANSWER]), "invalid_message", "messages[0].content is"),
        (with_messages([{"role": "user"}, ANSWER]), "invalid_message", "messages[0].content is required"),
        (with_messages([{"role": "assistant", "content": None}]), "invalid_message", "messages[0].content is"),
        (with_messages([{"role": "user", "content": 7}, ANSWER]), "invalid_message", "messages[0].content must be"),
        (
            with_messages([{"role": "user", "content": [{"type": "text", "text": 5}]}, ANSWER]),
            "invalid_message",
            "messages[0].content[0].text must be a string",
        ),
        (
            with_messages([{"role": "user", "content": [{"text": "no type"}]}, ANSWER]),
            "invalid_message",
            "messages[0].content[0].type must be a string",
        ),
        (
            with_messages([{"role": "user", "content": [{"type": "text", "text": "x", "extra": 1}]}, ANSWER]),
            "invalid_message",
            "a text part holds only type and text",
        ),
        (
            with_messages([{**USER, "tool_calls": [call("a", "f", "{}")]}, ANSWER]),
            "invalid_message",
            "messages[0].tool_calls is only allowed on assistant messages",
        ),
        (
            with_messages([{**USER, "tool_call_id": "a"}, ANSWER]),
            "invalid_message",
            "messages[0].tool_call_id is only allowed on tool messages",
        ),
        (
            with_messages([USER, {"role": "assistant", "tool_calls": [{**call("a", "f", "{}"), "type": "code"}]}]),
            "invalid_message",
            "messages[1].tool_calls[0].type must be 'function'",
        ),
        (
            with_messages([USER, {"role": "assistant", "tool_calls": [call("a", "f", {"city": "Paris"})]}]),  # type: ignore[arg-type]
            "invalid_message",
            "messages[1].tool_calls[0].function.arguments must be a string",
        ),
        (
            with_messages([USER, {"role": "assistant", "tool_calls": [call("a", "f\x1b[2J", "{}")]}]),
            "invalid_message",
            "function.name must not contain control characters (U+001B at index 1)",
        ),
        (
            with_messages([USER, {"role": "assistant", "tool_calls": "f()"}]),
            "invalid_message",
            "messages[1].tool_calls must be an array",
        ),
        (
            with_messages([USER, {"role": "tool", "tool_call_id": "nope", "content": "42"}, ANSWER]),
            "orphan_tool_result",
            "messages[1] answers tool call 'nope', which no earlier assistant message made",
        ),
        (
            # A call made after the result does not count: the result must follow its call.
            with_messages(
                [
                    USER,
                    {"role": "tool", "tool_call_id": "a", "content": "42"},
                    {"role": "assistant", "tool_calls": [call("a", "f", "{}")]},
                ]
            ),
            "orphan_tool_result",
            "messages[1] answers tool call 'a'",
        ),
        (
            with_messages([USER, {"role": "tool", "content": "42"}, ANSWER]),
            "invalid_message",
            "messages[1].tool_call_id must be a string",
        ),
        (
            with_messages(
                [
                    USER,
                    {"role": "assistant", "tool_calls": [call("a", "f", "{}")]},
                    {"role": "tool", "tool_call_id": "a", "content": None},
                    ANSWER,
                ]
            ),
            "invalid_message",
            "messages[2].content is required",
        ),
    ],
)
def test_violations_have_precise_reasons(record: dict[str, Any], reason: str, detail: str) -> None:
    got_reason, got_detail = reason_of(record)
    assert (got_reason, detail in got_detail) == (reason, True), got_detail


def test_limits() -> None:
    turns = [USER, ANSWER] * (MAX_MESSAGES // 2)
    assert parse(with_messages(turns)).messages is not None  # at the limit
    assert reason_of(with_messages([USER, *turns]))[0] == "too_many_messages"

    parts = [{"type": "text", "text": "x"}] * MAX_PARTS
    assert parse(with_messages([{"role": "user", "content": parts}, ANSWER])).prompt.count("x") == MAX_PARTS
    reason, detail = reason_of(with_messages([{"role": "user", "content": [*parts, parts[0]]}, ANSWER]))
    assert (reason, detail) == (
        "too_many_parts",
        f"messages[0].content has {MAX_PARTS + 1} parts, limit is {MAX_PARTS}",
    )

    calls = [call(f"c{i}", "f", "{}") for i in range(MAX_TOOL_CALLS)]
    assert parse(with_messages([USER, {"role": "assistant", "tool_calls": calls}])).response.count("called") == len(
        calls
    )
    reason, detail = reason_of(with_messages([USER, {"role": "assistant", "tool_calls": [*calls, call("z", "f", "")]}]))
    assert reason == "too_many_tool_calls" and "messages[1]" in detail


def test_new_reasons_are_dead_letter_reasons() -> None:
    # Metrics pre-zero from DEAD_LETTER_REASONS, alerts and the runbook name them.
    for reason in (
        "invalid_message",
        "too_many_messages",
        "too_many_parts",
        "too_many_tool_calls",
        "orphan_tool_result",
        "mixed_schema",
    ):
        assert reason in REASONS and reason in DEAD_LETTER_REASONS


# -- hostile input -----------------------------------------------------------------------------


def nested_part(depth: int) -> dict[str, Any]:
    inner: Any = "https://x"
    for _ in range(depth):
        inner = {"url": inner}
    return {"type": "image_url", "image_url": inner}


def test_hostile_inputs_are_dead_letters() -> None:
    # Nesting inside a kept part: bounded, far below the JSON encoders' recursion limits.
    assert parse(with_messages([{"role": "user", "content": [nested_part(6)]}, ANSWER])).prompt == "user: [image]"
    assert reason_of(with_messages([{"role": "user", "content": [nested_part(40)]}, ANSWER])) == (
        "invalid_message",
        "messages[0].content[0] nests deeper than 8 levels",
    )
    # Deeper than the JSON parsers go: refused while parsing, never a RecursionError.
    shallow = json.dumps(with_messages([{"role": "user", "content": [nested_part(1)]}, ANSWER])).encode()
    deep = shallow.replace(b'"https://x"', b'{"url": ' * 5000 + b'"x"' + b"}" * 5000)
    assert reason_of(deep)[0] == "too_deep"
    # A lone surrogate in a tool result, a NUL in a tool call's arguments: the rules of v1.
    lone = json.dumps(with_messages([USER, {"role": "assistant", "content": "a \ud800 b"}])).encode()
    assert reason_of(lone)[0] == "invalid_unicode"
    nul = json.dumps(with_messages([USER, {"role": "assistant", "tool_calls": [call("a", "f", '{"x": "\u0000"}')]}]))
    assert reason_of(nul.encode())[0] == "nul_character"
    # Wrong types everywhere.
    for bad in (None, 1, "messages", [None], [[USER]], [{"role": ["user"], "content": "x"}]):
        assert reason_of(with_messages(bad))[0] == "invalid_message", bad
    # Invalid UTF-8 inside a message.
    raw = json.dumps(with_messages([USER, {"role": "assistant", "content": "PLACEHOLDER"}])).encode()
    assert reason_of(raw.replace(b"PLACEHOLDER", b"\xff\xfe"))[0] == "invalid_utf8"


def test_mutated_conversations_never_raise_anything_else() -> None:
    """Seeded structural mutations of a valid conversation: each parses or is a dead letter with a
    named reason; no other exception escapes."""
    rng = random.Random(15)
    junk: list[Any] = [None, 0, -1.5, True, "", "x", [], {}, [None], {"a": 1}, "\ud800", "\x00", "tool", "call_1"]
    reasons: set[str] = set()
    for _ in range(3000):
        rec = copy.deepcopy(agent_record())
        msgs = rec["messages"]
        i = rng.randrange(len(msgs))
        msg = msgs[i]
        key = rng.choice(["role", "content", "name", "tool_calls", "tool_call_id", "extra"])
        op = rng.random()
        if op < 0.6:
            msg[key] = rng.choice(junk)
        elif op < 0.8:
            msg.pop(key, None)
        else:
            rng.shuffle(msgs)
        try:
            ep = parse_episode(json.dumps(rec).encode(), LIMIT, NOW)
        except InvalidEpisode as e:
            assert e.reason in REASONS and e.detail
            reasons.add(e.reason)
        else:
            assert ep.messages is not None and ep.messages[-1]["role"] == "assistant"
    assert {"invalid_message", "orphan_tool_result"} <= reasons


# -- end to end --------------------------------------------------------------------------------


def test_v2_episode_replayed_into_the_store_with_messages_and_signals(db_url: str, tmp_path: Path) -> None:
    path = tmp_path / "chat.jsonl"
    v1 = {"episode_id": "plain", "stream": "agents", "prompt": "p", "response": "r", "timestamp": NOW}
    failing = agent_record("conv-err")
    failing["messages"][3]["content"] = "Error: weather service unavailable"
    lines = [agent_record("conv-ok"), failing, v1, with_messages([USER])]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    dlq = tmp_path / "dlq.jsonl"
    settings = load_settings(
        None,
        [
            "dev=true",
            "source.kind=file",
            f"source.path={path}",
            f"database.url={db_url}",
            f"dead_letter.path={dlq}",
            "sampling.human.rate=1",
            "drift.embedding.enabled=false",
            # Watch the conversation signals; the reference is never full, so it keeps every value.
            "drift.reference_size=1000",
            "drift.signals={turns: [cusum], tool_calls: [cusum], tool_errors: [cusum], tool_output_share: [cusum]}",
        ],
    )
    report = replay_file(settings, str(path))
    assert report["episodes"] == 4 and report["invalid"] == 1
    assert report["dead_letters"] == {"invalid_message": 1}
    store = Store(db_url)
    try:
        with store.engine.connect() as conn:
            rows = {r.episode_id: r for r in conn.execute(sa.select(t.episodes))}
        assert rows["conv-ok"].messages == agent_record()["messages"]
        assert rows["conv-ok"].response == "It is 21 C and clear in Paris."
        assert rows["conv-ok"].prompt.startswith("system: You are a weather assistant.")
        assert rows["plain"].messages is None and rows["plain"].prompt == "p"
        state = store.load_state("agents", "drift")
    finally:
        store.close()
    assert state is not None
    refs = {name: s["ref"] for name, s in state["signals"].items()}
    # In input order: conv-ok, conv-err, plain (v1: one user and one assistant turn, no tools).
    assert refs["turns"] == [3.0, 3.0, 2.0]  # a user turn and two assistant turns
    assert refs["tool_calls"] == [1.0, 1.0, 0.0]
    assert refs["tool_errors"] == [0.0, 1.0, 0.0]
    ok_share = len('{"temp_c": 21, "sky": "clear"}') / (
        len("What is the weather where this photo was taken?")
        + len('{"temp_c": 21, "sky": "clear"}')
        + len("It is 21 C and clear in Paris.")
    )
    assert refs["tool_output_share"][0] == pytest.approx(ok_share)
    assert refs["tool_output_share"][2] == 0.0


def test_migration_0006_adds_messages_to_existing_episodes_and_downgrades(db_url: str) -> None:
    from alembic import command
    from alembic.config import Config

    from monitor.store.store import MIGRATIONS_DIR

    old = Store(db_url, migrate=False)
    old.migrate("0005")
    assert "messages" not in {c["name"] for c in sa.inspect(old.engine).get_columns("episodes")}
    row = {
        "episode_id": "before",
        "stream": "s",
        "model": None,
        "ts": 1.0,
        "prompt": "p",
        "response": "r",
        "metadata": {"k": 1},
        "source": "file:x",
        "position": "0",
        "ingested_at": 1.0,
    }
    with old.engine.begin() as conn:
        # Today's table, with the columns revision 0005 has: the insert names only the row's keys.
        conn.execute(t.episodes.insert(), [row])
    old.close()
    store = Store(db_url)  # to head, as the service does at start
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    with store.engine.begin() as conn:
        conn.execute(t.episodes.insert(), [{**row, "episode_id": "after", "messages": msgs}])
        got = {
            r.episode_id: r.messages for r in conn.execute(sa.select(t.episodes.c.episode_id, t.episodes.c.messages))
        }
    assert got == {"before": None, "after": msgs}
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    with store.engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0005")
    assert store.revision() == "0005"
    assert "messages" not in {c["name"] for c in sa.inspect(store.engine).get_columns("episodes")}
    with store.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM episodes")).scalar_one() == 2
    store.close()
