"""How OTLP spans become one conversation (``monitor.ingest.otlp``): which model calls carry it,
the shapes instrumentations write, tool spans without ids, several choices, token counts.

Each case is a trace as a real instrumentation writes it (the GenAI semantic conventions,
OpenLLMetry's Anthropic instrumentation), converted and then validated as every record is.
"""

from __future__ import annotations

import json
from typing import Any

import orjson

from monitor.episodes import Episode, parse_episode
from monitor.ingest.otlp import OtlpLimits, Span, convert
from monitor.signals.conversation import conversation_stats

LIMITS = OtlpLimits()
ROOT = "a000000000000001"


def _span(sid: str, attrs: dict[str, Any], start: int, parent: str = ROOT) -> Span:
    return Span("5b8efff798038103d269b633813fc60c", sid, parent, str(attrs.get("gen_ai.operation.name")), start, 0,
                attrs, [], {})  # fmt: skip


def _text(role: str, text: str) -> dict[str, Any]:
    return {"role": role, "parts": [{"type": "text", "content": text}]}


def _call(call_id: str | None, name: str, **args: Any) -> dict[str, Any]:
    part: dict[str, Any] = {"type": "tool_call", "name": name, "arguments": args}
    if call_id is not None:
        part["id"] = call_id
    return {"role": "assistant", "parts": [part]}


def _result(call_id: str | None, text: str, key: str = "response") -> dict[str, Any]:
    part: dict[str, Any] = {"type": "tool_call_response", key: text}
    if call_id is not None:
        part["id"] = call_id
    return {"role": "tool", "parts": [part]}


def _chat(sid: str, start: int, inputs: list[dict[str, Any]], outputs: list[dict[str, Any]], **extra: Any) -> Span:
    attrs = {
        "gen_ai.operation.name": "chat",
        "gen_ai.input.messages": json.dumps(inputs),
        "gen_ai.output.messages": json.dumps(outputs),
        **extra,
    }
    return _span(sid, attrs, start)


def _agent(**attrs: Any) -> Span:
    return _span(ROOT, {"gen_ai.operation.name": "invoke_agent", **attrs}, 0, parent="")


def _tool(sid: str, start: int, name: str, result: str, call_id: str | None = None) -> Span:
    attrs = {"gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": name, "gen_ai.tool.call.result": result}
    if call_id is not None:
        attrs["gen_ai.tool.call.id"] = call_id
    return _span(sid, attrs, start)


def _episode(spans: list[Span]) -> tuple[dict[str, Any], Episode]:
    """The one record the spans make, and that record validated."""
    conv = convert(spans, LIMITS)
    assert not conv.rejected, conv.rejected
    (record,) = conv.records
    return record, parse_episode(orjson.dumps(record), 1 << 22, 0.0)


def _shape(record: dict[str, Any]) -> list[tuple[Any, ...]]:
    """Each message as (role, content[, call ids][, answered id])."""
    out: list[tuple[Any, ...]] = []
    for m in record["messages"]:
        item: tuple[Any, ...] = (m["role"], m["content"])
        if m.get("tool_calls"):
            item += (tuple(c["id"] for c in m["tool_calls"]),)
        if m.get("tool_call_id"):
            item += (m["tool_call_id"],)
        out.append(item)
    return out


SYSTEM = json.dumps([{"type": "text", "content": "You are Acme support."}])
QUESTION = _text("user", "How do I reset my password?")
ANSWER = _text("assistant", "Go to Settings > Security > Reset password.")


# --- 1. model calls that do not continue the conversation ------------------------------------------


def test_a_classifier_run_on_the_answer_is_left_out_of_the_conversation() -> None:
    """An output guardrail (a chat span after the answering one, under an agent span without an
    output) became the final turn: response 'SAFE', the guardrail's model, its system prompt
    first and the real answer shown as a user message."""
    guard = json.dumps([{"type": "text", "content": "Classify the text as SAFE or UNSAFE."}])
    spans = [
        _agent(),
        _chat("c1", 1, [QUESTION], [ANSWER], **{"gen_ai.system_instructions": SYSTEM, "gen_ai.request.model": "4o"}),
        _chat("c2", 2, [_text("user", "Go to Settings > Security > Reset password.")], [_text("assistant", "SAFE")],
              **{"gen_ai.system_instructions": guard, "gen_ai.request.model": "gpt-4o-mini"}),
        # A judge given the finished conversation continues nothing either.
        _chat("c3", 3, [QUESTION, ANSWER], [_text("assistant", "safe")], **{"gen_ai.request.model": "llama-guard"}),
    ]  # fmt: skip
    record, episode = _episode(spans)
    assert _shape(record) == [
        ("system", "You are Acme support."),
        ("user", "How do I reset my password?"),
        ("assistant", "Go to Settings > Security > Reset password."),
    ]
    assert episode.response == "Go to Settings > Security > Reset password."
    assert record["model"] == "4o"
    assert record["metadata"]["auxiliary_calls"] == 2


def test_the_conversation_follows_the_calls_that_continue_it() -> None:
    """An input check sent the user's message as it is, then the agent loop: the loop's calls
    carry the conversation (the later try at the first turn, then the one continuing it); the
    root's answer is the final turn, and the model is the last carrying call's."""
    call = _call("call_1", "lookup", user="me")
    result = _result("call_1", "reset link sent")
    spans = [
        _agent(**{"gen_ai.input.messages": json.dumps([QUESTION]), "gen_ai.output.messages": json.dumps([ANSWER])}),
        _chat("check", 1, [QUESTION], [_text("assistant", "ALLOWED")], **{"gen_ai.request.model": "mini"}),
        _chat("c1", 2, [QUESTION], [call], **{"gen_ai.request.model": "big"}),
        _tool("t1", 3, "lookup", "reset link sent", "call_1"),
        _chat("title", 4, [_text("user", "Title for: How do I reset my password?")], [_text("assistant", "Reset")],
              **{"gen_ai.request.model": "mini"}),
        _chat("c2", 5, [QUESTION, call, result], [ANSWER], **{"gen_ai.request.model": "big"}),
    ]  # fmt: skip
    record, _ = _episode(spans)
    assert _shape(record) == [
        ("user", "How do I reset my password?"),
        ("assistant", None, ("call_1",)),
        ("tool", "reset link sent", "call_1"),
        ("assistant", "Go to Settings > Security > Reset password."),
    ]
    assert record["model"] == "big"
    assert record["metadata"]["auxiliary_calls"] == 2


def test_calls_that_record_only_their_answers_all_carry_the_conversation() -> None:
    """Model spans without ``gen_ai.input.messages`` (an instrumentation that records outputs only):
    nothing tells a continuation from a guardrail, so every call's answer is kept, in order. A retry
    test on their empty inputs kept the first call and dropped the next one's text and arguments."""
    first = _span(
        "b1",
        {
            "gen_ai.operation.name": "chat",
            "gen_ai.output.messages": json.dumps(
                [
                    {
                        "role": "assistant",
                        "parts": [
                            _text("assistant", "Let me look that up.")["parts"][0],
                            _call("call_1", "weather", city="Paris")["parts"][0],
                        ],
                    }
                ]
            ),
        },
        1,
    )
    last = _span("b3", {"gen_ai.operation.name": "chat", "gen_ai.output.messages": json.dumps([ANSWER])}, 3)
    root = _agent(**{"gen_ai.input.messages": json.dumps([QUESTION]), "gen_ai.output.messages": json.dumps([ANSWER])})
    record, _ = _episode([root, first, _tool("b2", 2, "weather", "21", "call_1"), last])
    assert _shape(record) == [
        ("user", "How do I reset my password?"),
        ("assistant", "Let me look that up.", ("call_1",)),
        ("tool", "21", "call_1"),
        ("assistant", "Go to Settings > Security > Reset password."),
    ]
    (call,) = record["messages"][1]["tool_calls"]
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    assert "auxiliary_calls" not in record["metadata"]


def test_a_call_sent_only_its_tool_results_continues_the_conversation() -> None:
    """A stateful API (the Responses API's previous_response_id) is sent only what follows the
    answer: the results of its tool calls. That call carries the conversation too."""
    spans = [
        _agent(),
        _chat("c1", 1, [QUESTION], [_call("call_1", "lookup", user="me")]),
        _tool("t1", 2, "lookup", "reset link sent", "call_1"),
        _chat("c2", 3, [_result("call_1", "reset link sent")], [ANSWER]),
    ]
    record, episode = _episode(spans)
    assert [m["role"] for m in record["messages"]] == ["user", "assistant", "tool", "assistant"]
    assert episode.response == ANSWER["parts"][0]["content"]
    assert "auxiliary_calls" not in record["metadata"]


def test_calls_whose_input_differs_from_the_agents_still_make_the_conversation() -> None:
    """The agent span's input written otherwise than its calls' (here: with the instructions in
    it as a user message): the first call begins the conversation rather than none carrying it."""
    agent_input = [_text("user", "Acme support. How do I reset my password?")]
    spans = [_agent(**{"gen_ai.input.messages": json.dumps(agent_input)}), _chat("c1", 1, [QUESTION], [ANSWER])]
    record, episode = _episode(spans)
    assert episode.response == ANSWER["parts"][0]["content"]
    assert "auxiliary_calls" not in record["metadata"]


# --- 2. OpenLLMetry's Anthropic instrumentation ---------------------------------------------------------


def _anthropic(sid: str, attrs: dict[str, Any]) -> Span:
    return _span(sid, {"gen_ai.system": "Anthropic", "llm.request.type": "chat", **attrs}, 1, parent="")


def test_openllmetry_anthropic_tool_blocks_become_tool_calls_and_results() -> None:
    """A tool_result block came as a user turn of raw JSON and the assistant's turn held its
    blocks' JSON: the tool_errors and tool_output_share signals read 0 though the tool failed."""
    assistant = [
        {"type": "thinking", "thinking": "The user wants weather.", "signature": "x"},
        {"type": "text", "text": "Let me check."},
        {"type": "tool_use", "id": "toolu_01", "name": "get_weather", "input": {"city": "Paris"}},
    ]
    results = [
        {"type": "tool_result", "tool_use_id": "toolu_01", "content": "Error: upstream timeout", "is_error": True}
    ]
    span = _anthropic(
        "d100000000000001",
        {
            "gen_ai.prompt.0.role": "user",
            "gen_ai.prompt.0.content": "Weather in Paris?",
            "gen_ai.prompt.1.role": "assistant",
            "gen_ai.prompt.1.content": json.dumps(assistant),
            # The instrumentation lists the tool_use blocks as tool calls too: each is kept once.
            "gen_ai.prompt.1.tool_calls.0.id": "toolu_01",
            "gen_ai.prompt.1.tool_calls.0.name": "get_weather",
            "gen_ai.prompt.1.tool_calls.0.arguments": json.dumps({"city": "Paris"}),
            "gen_ai.prompt.2.role": "user",
            "gen_ai.prompt.2.content": json.dumps(results),
            "gen_ai.completion.0.role": "assistant",
            "gen_ai.completion.0.content": "Sorry, the weather service is down.",
        },
    )
    record, episode = _episode([span])
    assert _shape(record) == [
        ("user", "Weather in Paris?"),
        ("assistant", "Let me check.", ("toolu_01",)),
        ("tool", "Error: upstream timeout", "toolu_01"),
        ("assistant", "Sorry, the weather service is down."),
    ]
    stats = conversation_stats(episode.messages)
    assert stats["tool_errors"] == 1 and stats["tool_output_share"] > 0


def test_openllmetry_anthropic_thinking_completion_is_not_a_turn() -> None:
    """Extended thinking is written as a completion with role 'thinking': refused as an invalid role."""
    span = _anthropic(
        "d100000000000002",
        {
            "gen_ai.prompt.0.role": "user",
            "gen_ai.prompt.0.content": "Is 91 prime?",
            "gen_ai.completion.0.role": "thinking",
            "gen_ai.completion.0.content": "91 = 7 * 13.",
            "gen_ai.completion.1.role": "assistant",
            "gen_ai.completion.1.content": "No, 91 = 7 x 13.",
        },
    )
    record, _ = _episode([span])
    assert _shape(record) == [("user", "Is 91 prime?"), ("assistant", "No, 91 = 7 x 13.")]
    assert "extra_choices" not in record["metadata"]


def test_text_that_only_looks_like_blocks_stays_text() -> None:
    """Only JSON of exactly the Messages API's block shape is read as blocks."""
    texts = [
        json.dumps([{"type": "text", "text": "hi"}]),  # text blocks only: the instrumentation joins those itself
        json.dumps([{"type": "tool_use", "id": "t", "name": "f", "input": {}}]),  # a tool_use is the assistant's
        json.dumps([{"type": "tool_result", "tool_use_id": "t", "content": 5}]),  # content neither text nor blocks
        '[{"type": "tool_result", "tool_use_id": "t"',  # not JSON
        "[1, 2]",
    ]
    for i, text in enumerate(texts):
        span = _anthropic(f"e00000000000000{i}", {
            "gen_ai.prompt.0.role": "user", "gen_ai.prompt.0.content": text,
            "gen_ai.completion.0.role": "assistant", "gen_ai.completion.0.content": "ok"})  # fmt: skip
        record, _ = _episode([span])
        assert _shape(record) == [("user", text), ("assistant", "ok")], text


# --- 3. valid convention spans that were refused ---------------------------------------------------


def test_tool_calls_and_results_without_ids_get_stable_ids() -> None:
    """tool_call parts may come without an id (Gemini): refused as 'tool_calls[0].id must be a
    string'. The call, shown again in the next call's input, and the tool span are one call."""
    question = _text("user", "Weather in Paris and Rome?")
    calls = {"role": "assistant", "parts": [
        {"type": "tool_call", "name": "get_weather", "arguments": {"city": "Paris"}},
        {"type": "tool_call", "name": "get_weather", "arguments": {"city": "Rome"}}]}  # fmt: skip
    results = [_result(None, "21C"), _result(None, "25C")]
    final = _text("assistant", "21 C in Paris, 25 C in Rome.")
    spans = [
        _agent(**{"gen_ai.input.messages": json.dumps([question])}),
        _chat("c1", 1, [question], [calls]),
        _tool("t1", 2, "get_weather", "21C"),
        _tool("t2", 3, "get_weather", "25C"),
        _chat("c2", 4, [question, calls, *results], [final]),
    ]
    record, episode = _episode(spans)
    ids = ("call_c1_1", "call_c1_2")
    assert _shape(record) == [
        ("user", "Weather in Paris and Rome?"),
        ("assistant", None, ids),
        ("tool", "21C", ids[0]),
        ("tool", "25C", ids[1]),
        ("assistant", "21 C in Paris, 25 C in Rome."),
    ]
    assert conversation_stats(episode.messages)["tool_calls"] == 2
    assert _episode(spans)[0] == record  # the same spans, the same ids


def test_a_media_only_turn_reads_as_its_placeholder() -> None:
    """A user turn that is only an image was refused ('messages[0].content is required')."""
    parts = [
        {"type": "uri", "modality": "image", "uri": "https://example.com/cat.png"},
        {"type": "blob", "modality": "audio", "mime_type": "audio/wav", "content": "UklGRg=="},
        {"type": "file", "modality": "video", "file_id": "file-1"},
        {"type": "reasoning", "content": "not said"},
    ]
    openai_parts = [{"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]
    span = _chat("c1", 0, [{"role": "user", "parts": parts}, {"role": "user", "content": openai_parts}],
                 [_text("assistant", "A cat.")])  # fmt: skip
    record, _ = _episode([span])
    assert _shape(record) == [("user", "[image]\n[audio]\n[file]"), ("user", "[image]"), ("assistant", "A cat.")]


def test_a_tool_result_given_as_result_is_kept() -> None:
    """A tool_call_response part with ``result`` (a draft of the conventions' schema) in place
    of ``response`` gave an empty tool result."""
    question = _text("user", "Weather in Paris?")
    span = _chat("c1", 0, [question, _call("call_1", "get_weather"), _result("call_1", "rainy", key="result")],
                 [_text("assistant", "Rainy.")])  # fmt: skip
    record, _ = _episode([span])
    assert record["messages"][2] == {"role": "tool", "tool_call_id": "call_1", "content": "rainy"}


# --- 4. execute_tool spans without gen_ai.tool.call.id ---------------------------------------------


def test_a_tool_span_without_a_call_id_runs_the_models_call() -> None:
    """An execute_tool span without gen_ai.tool.call.id got an id of its own: the call and its
    result appeared twice and the tool_calls signal doubled. It answers the oldest call of its
    tool not answered yet."""
    question = _text("user", "Weather in Paris, then search for Rome?")
    calls = {"role": "assistant", "parts": [
        {"type": "tool_call", "id": "call_1", "name": "get_weather", "arguments": {"city": "Paris"}},
        {"type": "tool_call", "id": "call_2", "name": "search", "arguments": {"q": "Rome"}}]}  # fmt: skip
    spans = [
        _agent(**{"gen_ai.output.messages": json.dumps([_text("assistant", "Done.")])}),
        _chat("c1", 1, [question], [calls]),
        _tool("t1", 2, "search", "Rome is in Italy."),
        _tool("t2", 3, "get_weather", "21C"),
        _tool("t3", 4, "get_weather", "22C"),  # no call of the model left to answer: a call of its own
    ]
    record, episode = _episode(spans)
    assert _shape(record) == [
        ("user", "Weather in Paris, then search for Rome?"),
        ("assistant", None, ("call_1", "call_2")),
        ("tool", "Rome is in Italy.", "call_2"),
        ("tool", "21C", "call_1"),
        ("assistant", None, ("call_t3",)),
        ("tool", "22C", "call_t3"),
        ("assistant", "Done."),
    ]
    assert conversation_stats(episode.messages)["tool_calls"] == 3


# --- 5. several choices -----------------------------------------------------------------------------


def test_several_choices_keep_one() -> None:
    """An n=2 completion was stored as two consecutive assistant turns. The first is kept,
    unless the conversation goes on from another."""
    question = _text("user", "Name a colour.")
    two = [_text("assistant", "Red."), _text("assistant", "Blue.")]
    single = _chat("c1", 0, [question], two)
    record, _ = _episode([single])
    assert _shape(record) == [("user", "Name a colour."), ("assistant", "Red.")]
    assert record["metadata"]["extra_choices"] == 1
    follow = _text("user", "Another?")
    spans = [
        _agent(),
        _chat("c1", 1, [question], two),
        _chat("c2", 2, [question, two[1], follow], [_text("assistant", "Green.")]),
    ]
    record, _ = _episode(spans)
    assert _shape(record) == [
        ("user", "Name a colour."),
        ("assistant", "Blue."),
        ("user", "Another?"),
        ("assistant", "Green."),
    ]


# --- 6. token counts --------------------------------------------------------------------------------


def test_tokens_are_the_agents_totals_else_its_model_calls() -> None:
    """An agent span carrying the run's totals had its model calls' counts added to them: twice the tokens."""
    usage = {"gen_ai.usage.input_tokens": 100, "gen_ai.usage.output_tokens": 10}
    children = [
        _chat("c1", 1, [QUESTION], [ANSWER], **usage),
        _chat("c2", 2, [_text("user", "Go to Settings > Security > Reset password.")], [_text("assistant", "SAFE")],
              **{"gen_ai.usage.input_tokens": 20, "gen_ai.usage.output_tokens": 1}),
    ]  # fmt: skip
    totals = {"gen_ai.usage.input_tokens": 120, "gen_ai.usage.output_tokens": 11}
    record, _ = _episode([_agent(**totals), *children])
    assert (record["metadata"]["input_tokens"], record["metadata"]["output_tokens"]) == (120, 11)
    record, _ = _episode([_agent(), *children])  # the guardrail's tokens were spent too
    assert (record["metadata"]["input_tokens"], record["metadata"]["output_tokens"]) == (120, 11)
