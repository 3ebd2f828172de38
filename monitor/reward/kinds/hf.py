"""A local Hugging Face ``AutoModelForSequenceClassification`` checkpoint as the reward model.

Input. With a tokenizer that has a chat template, the conversation (the episode's messages, or
the prompt as one user turn) plus the response as the assistant turn, rendered by the template:
that is the format chat reward models (Llama-, Gemma-, Skywork-style) were trained on. Each
message's content is its text as the flattening reads it (parts' texts, ``[image]`` and the like
for the others; a tool call's null content is ""), tool calls go as ``tool_calls`` with
``function.name`` and ``function.arguments`` (an object where the JSON is one) and a tool result
with its ``tool_call_id`` and the function's ``name``, as transformers' chat templates take them.
A template that raises on those, or leaves the calls out of its text, gets the tool calls and
results as text instead, as the flattening writes them (:func:`text_turns`). Without a
template, the **documented flattening**: the tokenizer's pair encoding of (prompt, response), as
``[CLS] prompt [SEP] response [SEP]`` for BERT/DeBERTa, cut ``longest_first`` to ``max_length``.
An item longer than ``max_length`` tokens is cut (chat template: the tokenizer's
``truncation_side``, right by default) and recorded as truncated, per item and in
``oversight_rm_backend_truncated_total{kind="hf"}``.

Score: the logit at ``label_index`` (a reward model has ``num_labels=1``). bf16 on CUDA, fp32 on
the CPU. Items are batched longest first, so a batch wastes little on padding.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from monitor.episodes.conversation import content_text, flatten
from monitor.inference.pairs import CHARS_PER_TOKEN
from monitor.retry import first_line
from monitor.reward.kinds.base import BackendError, Item, Score
from monitor.reward.kinds.config import HfConfig
from monitor.reward.kinds.resilience import BackendMetrics

log = logging.getLogger(__name__)
#: The longest a checkpoint's chat template may take to render the registration's probe
#: conversation (:func:`check_template`); a sound one takes milliseconds.
TEMPLATE_LIMIT_S = 5.0
#: The probe conversation's user/assistant turn pairs.
TEMPLATE_PROBE_TURNS = 4

# No token is shorter than a character and English averages ~4: this many characters per kept
# token always suffice, and a 100 kB response is not tokenized whole to keep its first tokens.


# The weights of a checkpoint as save_pretrained writes them: one file, or an index of shards.
WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def check_checkpoint(cfg: HfConfig) -> None:
    """What registering a checkpoint checks, without loading its weights (a Llama-sized reward model
    is many GB; loading is the first use's work): ``config.json`` parses and describes a sequence
    classifier with the configured label, the tokenizer loads, and the weights are there, every
    safetensors file with a readable header. A broken checkpoint used to register (and activate)
    fine and then leave every rm-sampled episode unscored; :class:`BackendError` names the problem."""
    from transformers import AutoConfig, AutoTokenizer

    path = Path(cfg.path)
    try:
        # Never a checkpoint's own code (config.json's auto_map): transformers asks on stdin
        # whether to run it when this is not said, and runs it on a "y".
        conf = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except Exception as e:  # OSError, ValueError, and a refused auto_map's own kinds
        raise BackendError(f"hf checkpoint {path}: its config does not load: {first_line(e, 300)}") from None
    archs = list(getattr(conf, "architectures", None) or [])
    if archs and not any(a.endswith("ForSequenceClassification") for a in archs):
        # AutoModelForSequenceClassification would load it with a freshly initialised (random) head.
        raise BackendError(
            f"hf checkpoint {path}: config.json's architectures {archs} hold no *ForSequenceClassification:"
            " not a reward model (its score head would be random)"
        )
    labels = int(getattr(conf, "num_labels", 0))
    if cfg.label_index >= labels:
        raise BackendError(f"hf checkpoint {path}: label_index {cfg.label_index} but config.json has {labels} labels")
    for f in _weight_files(path):
        _check_weights(f)
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)  # type: ignore[no-untyped-call, unused-ignore]
    except Exception as e:  # tokenizer loaders raise many kinds on a broken file
        raise BackendError(f"hf checkpoint {path}: its tokenizer does not load: {first_line(e, 300)}") from None
    limit = position_limit(conf, tok)
    if limit is not None and cfg.max_length > limit:
        # Every item longer than the model's positions failed its whole batch ("The expanded size
        # of the tensor (905) must match the existing size (512)").
        raise BackendError(
            f"hf checkpoint {path}: max_length {cfg.max_length} but the model reads at most {limit} tokens;"
            f" set max_length to {limit} or less"
        )
    if getattr(tok, "chat_template", None):
        check_template(tok, path, cfg.max_length)


def check_template(tok: Any, path: Path, max_length: int) -> None:
    """Render the checkpoint's chat template on a user turn and an answer, then on a conversation
    of turns as long as the scorer passes (``max_length`` tokens' worth of text each), within
    :data:`TEMPLATE_LIMIT_S`. A template is a program the checkpoint brings, rendered once for
    every item scored: one that raises failed every item, and one that loops (nested ``range``
    loops pass Jinja's sandbox) held registration, and then every scoring round, for good. The
    render runs on a daemon thread: one past the limit is left behind, and the version refused."""
    cap = max_length * CHARS_PER_TOKEN
    long_text = ("word " * (cap // 5 + 1))[:cap]
    short = [{"role": "user", "content": "Hello?"}, {"role": "assistant", "content": "Hello."}]
    long = [{"role": r, "content": long_text} for _ in range(TEMPLATE_PROBE_TURNS) for r in ("user", "assistant")]
    outcome: list[BaseException | None] = []

    def render() -> None:
        try:
            for turns in (short, long):
                tok.apply_chat_template(turns, tokenize=False)
        except Exception as e:  # a template is a program: it may raise, on its own terms
            outcome.append(e)
        else:
            outcome.append(None)

    thread = threading.Thread(target=render, name="chat-template-check", daemon=True)
    thread.start()
    thread.join(TEMPLATE_LIMIT_S)
    if not outcome:
        raise BackendError(
            f"hf checkpoint {path}: its chat template took more than {TEMPLATE_LIMIT_S:g} s to render one"
            f" conversation ({2 * TEMPLATE_PROBE_TURNS} turns of {max_length} tokens' text); it is rendered"
            " for every item scored"
        )
    if outcome[0] is not None:
        raise BackendError(
            f"hf checkpoint {path}: its chat template fails on a user turn and an answer: {first_line(outcome[0], 300)}"
        )


def position_limit(conf: Any, tokenizer: Any) -> int | None:
    """The most tokens the model reads in one item: the tokenizer's ``model_max_length`` where it is
    a real limit (tokenizers without one say 1e30), and the position embeddings (less RoBERTa's
    two offset positions); None when neither is known."""
    known: list[int] = []
    tmax = getattr(tokenizer, "model_max_length", None)
    if isinstance(tmax, int) and 0 < tmax < 10**7:
        known.append(tmax)
    pmax = getattr(conf, "max_position_embeddings", None)
    if isinstance(pmax, int) and pmax > 0:
        known.append(pmax - 2 if "roberta" in str(getattr(conf, "model_type", "")) else pmax)
    return min(known) if known else None


def _weight_files(path: Path) -> list[Path]:
    """The weight files of a checkpoint: the single file, or every shard its index names."""
    for name in WEIGHTS:
        f = path / name
        if not f.is_file():
            continue
        if not name.endswith(".index.json"):
            return [f]
        try:
            shards = sorted(set(json.loads(f.read_text(encoding="utf-8"))["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise BackendError(f"hf checkpoint {path}: {name} is not a weight index: {first_line(e, 300)}") from None
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise BackendError(f"hf checkpoint {path}: {name} names missing shards: {', '.join(missing[:3])}")
        return [path / s for s in shards]
    raise BackendError(f"hf checkpoint {path}: no weights ({' or '.join(WEIGHTS[::2])})")


def _check_weights(f: Path) -> None:
    """A safetensors file's header parses (the weights themselves are not read); a pickled ``.bin``
    loads the way scoring will load it, as tensors only (``weights_only``: a pickle that needs
    anything else is refused there, and registered fine before), mapped rather than read."""
    if f.suffix != ".safetensors":
        import torch

        try:
            try:
                torch.load(str(f), map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                torch.load(str(f), map_location="cpu", weights_only=True)  # the pre-1.6 format maps nothing
        except Exception as e:  # UnpicklingError, RuntimeError, OSError: not tensors alone
            raise BackendError(f"hf checkpoint weights {f}: do not load as tensors: {first_line(e, 300)}") from None
        return
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(f), "pt"):
            pass
    except (SafetensorError, OSError) as e:
        raise BackendError(f"hf checkpoint weights {f}: {first_line(e, 300)}") from None


def _render(tokenizer: Any, turns: list[dict[str, Any]]) -> str:
    return str(tokenizer.apply_chat_template(turns, tokenize=False))


def _holds_tools(msg: Mapping[str, Any]) -> bool:
    return msg["role"] == "tool" or bool(msg.get("tool_calls"))


def _shows_calls(text: str, messages: Sequence[Mapping[str, Any]]) -> bool:
    """Whether a rendered conversation names every tool call's function (a template that renders
    ``tool_calls`` writes the name; one that ignores them leaves it out)."""
    return all(c["function"]["name"] in text for m in messages for c in m.get("tool_calls") or ())


def _note_calls(msg: Mapping[str, Any], names: dict[str, str]) -> None:
    """Remember the function each tool call of ``msg`` names, by call id (a result names its call)."""
    for c in msg.get("tool_calls") or ():
        names[c["id"]] = c["function"]["name"]


def _tool_name(msg: Mapping[str, Any], names: Mapping[str, str]) -> str:
    """A tool result's tool, as the flattening names it: the message's name, else its call's function."""
    return str(msg.get("name") or names.get(msg["tool_call_id"], msg["tool_call_id"]))


def _arguments(text: str, cap: int) -> Any:
    """A tool call's arguments as chat templates take them: the object the JSON holds (templates
    write it with ``tojson``; a JSON string would come out quoted twice), else the text as it is."""
    if len(text) <= cap:
        try:
            value = json.loads(text)
        except (ValueError, RecursionError):  # not JSON, or nested past the parser
            return text
        if isinstance(value, dict):
            return value
    return text[-cap:]


def _chat_turn(msg: Mapping[str, Any], names: Mapping[str, str], cap: int) -> dict[str, Any]:
    turn: dict[str, Any] = {"role": msg["role"], "content": content_text(msg.get("content"))[-cap:]}
    if msg["role"] == "tool":
        turn["tool_call_id"] = msg["tool_call_id"]
        turn["name"] = _tool_name(msg, names)
    elif msg.get("name"):
        turn["name"] = msg["name"]
    if msg.get("tool_calls"):
        turn["tool_calls"] = [
            {
                "id": c["id"],
                "type": "function",
                "function": {"name": c["function"]["name"], "arguments": _arguments(c["function"]["arguments"], cap)},
            }
            for c in msg["tool_calls"]
        ]
    return turn


def chat_turns(messages: Sequence[Mapping[str, Any]], cap: int) -> list[dict[str, Any]]:
    """Validated schema-v2 messages as a chat template takes them (transformers' tool-use format):
    the content as its text (:func:`content_text`: parts' texts, placeholders for the others, ""
    for a tool call's null), tool calls as ``tool_calls`` with ``function.name`` and
    ``function.arguments``, a tool result with ``tool_call_id`` and the ``name`` of its function.
    Each text keeps its last ``cap`` characters, as the flattened prompt is cut from the left."""
    names: dict[str, str] = {}
    turns = []
    for msg in messages:
        _note_calls(msg, names)
        turns.append(_chat_turn(msg, names, cap))
    return turns


def text_turns(messages: Sequence[Mapping[str, Any]], cap: int) -> list[dict[str, Any]]:
    """As :func:`chat_turns`, for a template that refuses tool calls or results: those turns go as
    the documented flattening writes them, an assistant's calls as an assistant turn and each run of
    results as one user turn (blocks joined by a blank line, as in the flattening; two user turns in
    a row break the templates that want roles to alternate)."""
    names: dict[str, str] = {}
    turns: list[dict[str, Any]] = []
    results: list[Mapping[str, Any]] = []
    for msg in messages:
        _note_calls(msg, names)
        if msg["role"] == "tool":
            results.append({**msg, "name": _tool_name(msg, names)})
            continue
        if results:
            turns.append({"role": "user", "content": flatten(results)[-cap:]})
            results = []
        if msg.get("tool_calls"):
            turns.append({"role": "assistant", "content": flatten([msg])[-cap:]})
        else:
            turns.append(_chat_turn(msg, names, cap))
    if results:
        turns.append({"role": "user", "content": flatten(results)[-cap:]})
    return turns


class HfBackend:
    kind = "hf"
    remote = False

    def __init__(self, cfg: HfConfig, version: str | None, metrics: BackendMetrics, device: str | None = None):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        self.cfg = cfg
        self.version = version
        self.metrics = metrics
        dev = cfg.device or device
        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if dev in (None, "auto") else str(dev)
        try:
            torch.device(self.device)
        except RuntimeError as e:
            raise BackendError(f"device {self.device!r}: {first_line(e, 200)}") from None
        self.dtype = torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(cfg.path, local_files_only=True, trust_remote_code=False)  # type: ignore[no-untyped-call, unused-ignore]
            self.model = AutoModelForSequenceClassification.from_pretrained(
                cfg.path, local_files_only=True, dtype=self.dtype, trust_remote_code=False
            )
        except Exception as e:  # OSError, ValueError, an UnpicklingError of weights that are not tensors alone
            raise BackendError(f"cannot load the checkpoint {cfg.path}: {first_line(e, 300)}") from None
        limit = position_limit(self.model.config, self.tokenizer)
        self.max_length = cfg.max_length if limit is None else min(cfg.max_length, limit)
        if self.max_length < cfg.max_length:  # a version registered before registration checked it
            log.warning("hf %s: max_length %d cut to the model's %d tokens", version, cfg.max_length, limit)
        if cfg.label_index >= int(self.model.config.num_labels):
            raise BackendError(f"label_index {cfg.label_index} but the model has {self.model.config.num_labels} labels")
        if self.tokenizer.pad_token is None:
            # Decoder reward models often ship without one; padding with EOS is the usual choice.
            self.tokenizer.pad_token = self.tokenizer.eos_token
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        try:
            self.model.to(self.device).eval()
        except Exception as e:  # "cuda" on a machine without one, an out-of-memory
            raise BackendError(f"cannot place the checkpoint on {self.device}: {first_line(e, 200)}") from None

    @property
    def uses_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def _text(self, item: Item) -> str:
        cap = self.max_length * CHARS_PER_TOKEN
        answer = {"role": "assistant", "content": item.response[:cap]}
        if not item.messages:
            return _render(self.tokenizer, [{"role": "user", "content": item.prompt[-cap:]}, answer])
        history = item.messages[:-1]
        try:
            text = _render(self.tokenizer, [*chat_turns(history, cap), answer])
        except Exception as e:  # a template is a program: it raises on its own terms
            if not any(_holds_tools(m) for m in history):
                raise
            # Many templates know no tool role ("roles must alternate"): the conversation then
            # goes as plain turns, the tools' part as the flattening writes it.
            log.debug("hf: the chat template refused tool turns (%s); rendering them as text", first_line(e, 200))
        else:
            if _shows_calls(text, history):
                return text
            # A template that reads only role and content renders a call as an empty turn:
            # the model would judge an answer built on a call it never saw.
            log.debug("hf: the chat template leaves tool calls out; rendering them as text")
        return _render(self.tokenizer, [*text_turns(history, cap), answer])

    def encode(self, items: Sequence[Item]) -> list[tuple[list[int], bool]]:
        """Token ids per item and whether they were cut."""
        tok, n = self.tokenizer, self.max_length
        cap = n * CHARS_PER_TOKEN
        if self.uses_chat_template:
            texts = [self._text(i) for i in items]
            full = tok(texts, add_special_tokens=False, verbose=False)["input_ids"]
            cut = tok(texts, add_special_tokens=False, truncation=True, max_length=n)["input_ids"]
        else:
            firsts = [i.prompt[-cap:] for i in items]
            seconds = [i.response[:cap] for i in items]
            full = tok(firsts, seconds, verbose=False)["input_ids"]
            cut = tok(firsts, seconds, truncation="longest_first", max_length=n)["input_ids"]
        capped = [len(i.prompt) > cap or len(i.response) > cap for i in items]
        return [(list(c), len(f) > len(c) or k) for f, c, k in zip(full, cut, capped, strict=True)]

    def score(self, items: Sequence[Item]) -> list[Score]:
        """One score per item. An item that fails (its conversation refused by the chat template,
        a tensor the model refuses) is a failed score alone: the batch is scored again an item at
        a time. Before, it failed every item scored with it, and where scoring runs inline
        (replay, simulate) it ended the command."""
        try:
            return self._score(items)
        except Exception as e:
            if len(items) <= 1:
                log.debug("hf: an item failed: %s", first_line(e, 200))
                return [Score.failed(f"hf: {type(e).__name__}: {first_line(e, 200)}")] * len(items)
            log.warning("hf: a batch of %d failed (%s); scoring it an item at a time", len(items), first_line(e, 200))
            return [s for item in items for s in self.score([item])]

    def _score(self, items: Sequence[Item]) -> list[Score]:
        import torch

        if not items:
            return []
        encs = self.encode(items)
        order = sorted(range(len(encs)), key=lambda i: -len(encs[i][0]))
        out: list[Score] = [Score.failed("not scored")] * len(items)
        pad = int(self.tokenizer.pad_token_id or 0)
        with torch.inference_mode():
            for s in range(0, len(order), self.cfg.batch_size):
                idx = order[s : s + self.cfg.batch_size]
                t0 = time.perf_counter()
                logits = self._forward([encs[i][0] for i in idx], pad)
                self.metrics.latency.labels(self.kind).observe(time.perf_counter() - t0)
                for j, i in enumerate(idx):
                    ids, truncated = encs[i]
                    out[i] = Score(float(logits[j]), truncated=truncated, tokens=len(ids))
        n_tokens = sum(len(ids) for ids, _ in encs)
        self.metrics.tokens.labels(self.kind, "input").inc(n_tokens)
        self.metrics.truncated.labels(self.kind).inc(sum(1 for _, t in encs if t))
        return out

    def _forward(self, batch: list[list[int]], pad: int) -> list[float]:
        import torch

        width = max(len(ids) for ids in batch)
        left = self.tokenizer.padding_side == "left"
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, row in enumerate(batch):
            sl = slice(width - len(row), width) if left else slice(0, len(row))
            ids[j, sl] = torch.tensor(row)
            mask[j, sl] = 1
        logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
        return [float(v) for v in logits[:, self.cfg.label_index].float().cpu()]

    def close(self) -> None:
        return None
