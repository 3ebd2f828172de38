"""What the brought-in reward models read of a schema-v2 conversation: the judge the documented
flattening (``monitor.episodes.conversation.flatten``), against the STAND-IN chat-completions
server; the ``hf`` kind's chat template the messages in transformers' tool-use format, on a real
BertForSequenceClassification built from the bundled MiniLM weights. Both used to read the raw
content: a tool call as "None", a tool result without its tool, and a list of parts as a Python
repr whose image data filled the judge's ``max_chars`` and the model's tokens."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import orjson
import pytest
from prometheus_client import CollectorRegistry
from standin import StandIn

from monitor.episodes import Episode, parse_episode
from monitor.reward.kinds import Item
from monitor.reward.kinds.config import HfConfig, JudgeConfig
from monitor.reward.kinds.hf import HfBackend
from monitor.reward.kinds.judge import JudgeBackend
from monitor.reward.kinds.resilience import BackendMetrics

# A PNG's worth of base64 (about 22 KB): data a model must never read as text.
IMAGE = "data:image/png;base64," + base64.b64encode(bytes(range(256)) * 64).decode()
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}


def _record(system: bool = True, result: str = '{"temp_c": 21}') -> dict[str, Any]:
    """The README's v2 example: parts with an image, a tool call, its result, the answer."""
    messages: list[dict[str, Any]] = [
        {
            "role": "user",
            "content": [{"type": "text", "text": "Weather here?"}, {"type": "image_url", "image_url": {"url": IMAGE}}],
        },
        {"role": "assistant", "content": None, "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "call_1", "content": result},
        {"role": "assistant", "content": "It is 21 C in Paris."},
    ]
    if system:
        messages.insert(0, {"role": "system", "content": "You are a weather assistant."})
    return {"schema_version": 2, "episode_id": "c-1", "stream": "agents", "model": "gpt-4o", "messages": messages}


def _episode(record: dict[str, Any]) -> Episode:
    return parse_episode(orjson.dumps(record), 1 << 20, now=0.0)


def _item(ep: Episode) -> Item:
    return Item(ep.prompt, ep.response, ep.messages)


# The judge.


def _judge(standin: StandIn, **kw: Any) -> JudgeBackend:
    cfg = JudgeConfig(base_url=f"{standin.url}/v1", model="stand-in-judge", resilience={"max_attempts": 1}, **kw)
    return JudgeBackend(cfg, "judge-test", BackendMetrics.on(CollectorRegistry()))


def _sent_conversation(standin: StandIn) -> str:
    user = standin.script.bodies[-1]["messages"][1]["content"]
    return str(user.split("<<<CONVERSATION\n", 1)[1].split("\nCONVERSATION>>>", 1)[0])


def test_the_judge_reads_the_documented_flattening(judge_standin: StandIn) -> None:
    ep = _episode(_record())
    [score] = _judge(judge_standin).score([_item(ep)])
    assert score.ok and not score.truncated
    sent = _sent_conversation(judge_standin)
    assert sent == ep.prompt
    assert 'assistant called get_weather({"city": "Paris"})' in sent
    assert 'tool get_weather returned: {"temp_c": 21}' in sent
    assert "user: Weather here?\n[image]" in sent
    assert "None" not in sent and "base64" not in sent


def test_an_image_does_not_fill_the_judges_max_chars(judge_standin: StandIn) -> None:
    """The repr of the parts, image data and all, was cut to max_chars from the left: the system
    prompt and the question were gone, and the item was recorded as truncated."""
    [score] = _judge(judge_standin, max_chars=300).score([_item(_episode(_record()))])
    assert score.ok and not score.truncated
    assert _sent_conversation(judge_standin).startswith("system: You are a weather assistant.\n\nuser: Weather here?")


def test_the_judge_still_cuts_a_long_conversation_from_the_left(judge_standin: StandIn) -> None:
    ep = _episode(_record(result="x" * 5000 + " the end"))
    [score] = _judge(judge_standin, max_chars=1000).score([_item(ep)])
    assert score.ok and score.truncated
    sent = _sent_conversation(judge_standin)
    assert sent == ep.prompt[-1000:] and sent.endswith("x the end")  # the turns next to the answer are kept


# The hf kind's chat template.

# Tool calls and results as Llama-3.1- or Qwen-style templates write them (arguments with tojson).
TOOL_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>"
    "{% if m['role'] == 'tool' %}[{{ m['name'] }} #{{ m['tool_call_id'] }}] {% endif %}{{ m['content'] }}"
    "{% if m['tool_calls'] %}{% for c in m['tool_calls'] %}<call>{{ c['function']['name'] }}"
    "{{ c['function']['arguments'] | tojson }}</call>{% endfor %}{% endif %}{{ '\\n' }}{% endfor %}"
)
# Roles must alternate user/assistant, as Gemma's and Mistral's templates insist: a tool turn raises.
ALTERNATING_TEMPLATE = (
    "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "<{{ m['role'] }}> {{ m['content'] }}{{ '\\n' }}{% endfor %}"
)
# Role and content only: a tool call's turn renders empty.
CONTENT_ONLY_TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }}{{ '\\n' }}{% endfor %}"


MAX_LENGTH = 128


@pytest.fixture(scope="module")
def hf_backend(hf_checkpoint: Path) -> HfBackend:
    """One load of the checkpoint for the module (tens of seconds on 2 shared cores); each test
    sets the tokenizer's template it needs."""
    return HfBackend(
        HfConfig(path=str(hf_checkpoint), max_length=MAX_LENGTH),
        "hf-test",
        BackendMetrics.on(CollectorRegistry()),
        device="cpu",
    )


def _with_template(backend: HfBackend, template: str) -> HfBackend:
    backend.tokenizer.chat_template = template
    return backend


@pytest.mark.slow
def test_hf_template_gets_tool_calls_and_content_text(hf_backend: HfBackend) -> None:
    b = _with_template(hf_backend, TOOL_TEMPLATE)
    text = b._text(_item(_episode(_record())))
    assert text == (
        "<|system|>You are a weather assistant.\n"
        "<|user|>Weather here?\n[image]\n"
        '<|assistant|><call>get_weather{"city": "Paris"}</call>\n'
        '<|tool|>[get_weather #call_1] {"temp_c": 21}\n'
        "<|assistant|>It is 21 C in Paris.\n"
    )
    [score] = b.score([_item(_episode(_record()))])
    assert score.ok and not score.truncated


@pytest.mark.slow
def test_hf_template_that_refuses_tool_turns_reads_them_as_the_flattening(hf_backend: HfBackend) -> None:
    b = _with_template(hf_backend, ALTERNATING_TEMPLATE)
    item = _item(_episode(_record(system=False)))
    assert b._text(item) == (
        "<user> Weather here?\n[image]\n"
        '<assistant> assistant called get_weather({"city": "Paris"})\n'
        '<user> tool get_weather returned: {"temp_c": 21}\n'
        "<assistant> It is 21 C in Paris.\n"
    )
    # A refusal that is not about the tools (a system turn) is the item's alone, as before.
    refused = _item(_episode(_record(system=True)))
    scores = b.score([item, refused])
    assert scores[0].ok and not scores[1].ok
    assert scores[1].error is not None and "roles must alternate" in scores[1].error


@pytest.mark.slow
def test_hf_template_that_leaves_tool_calls_out_reads_them_as_the_flattening(hf_backend: HfBackend) -> None:
    b = _with_template(hf_backend, CONTENT_ONLY_TEMPLATE)
    text = b._text(_item(_episode(_record())))
    assert '<|assistant|> assistant called get_weather({"city": "Paris"})\n' in text
    assert '<|user|> tool get_weather returned: {"temp_c": 21}\n' in text
    assert "None" not in text and "base64" not in text


@pytest.mark.slow
def test_hf_template_truncation_recorded_per_item(hf_backend: HfBackend) -> None:
    """An image's data no longer counts against max_length (its repr took every token and made
    every such item truncated); a long tool result still is cut, and recorded, item by item."""
    b = _with_template(hf_backend, TOOL_TEMPLATE)
    long_result = _record(result="lots of weather data " * 200)
    short, long = b.score([_item(_episode(_record())), _item(_episode(long_result))])
    assert short.ok and not short.truncated and short.tokens < MAX_LENGTH
    assert long.ok and long.truncated and long.tokens == MAX_LENGTH
