"""The local Hugging Face checkpoint kind, on a real BertForSequenceClassification built from the
bundled MiniLM weights: scores, batching, truncation per item, the chat template, and the registry
(register, content hash, gate, hot swap)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from monitor.config import load_settings
from monitor.reward.kinds import BackendError, Item, KindVersion, load_backend
from monitor.reward.kinds.config import HfConfig
from monitor.reward.kinds.hf import HfBackend
from monitor.reward.kinds.resilience import BackendMetrics
from monitor.reward.registry import Registry
from monitor.store import Store

# Loading a transformers checkpoint per test: tens of seconds on 2 shared cores.
pytestmark = pytest.mark.slow


def _backend(path: Path, **kw: Any) -> HfBackend:
    return HfBackend(HfConfig(path=str(path), **kw), "hf-test", BackendMetrics.on(CollectorRegistry()), device="cpu")


def test_scores_batched_and_truncation_recorded(hf_checkpoint: Path, alpaca_split: dict[str, Any]) -> None:
    pairs = alpaca_split["test"][:12]
    items = [Item(p["prompt"], p["chosen"]) for p in pairs] + [Item("Q?", "word " * 400)]
    one = _backend(hf_checkpoint, max_length=64, batch_size=1).score(items)
    many = _backend(hf_checkpoint, max_length=64, batch_size=8).score(items)
    assert all(s.ok for s in one)
    assert [s.value for s in many] == pytest.approx([s.value for s in one], abs=1e-4)
    assert many[-1].truncated and many[-1].tokens == 64
    short = _backend(hf_checkpoint, max_length=64).score([Item("Q?", "Yes.")])[0]
    assert not short.truncated and short.tokens < 64
    assert len({round(float(s.value or 0), 4) for s in one}) > 1  # a trained head, not a constant


def test_evaluates_through_the_gates_path(hf_checkpoint: Path, alpaca_split: dict[str, Any]) -> None:
    from monitor.reward.kinds import PairScorer
    from monitor.reward.train import evaluate

    result = evaluate(PairScorer(_backend(hf_checkpoint, max_length=64)), alpaca_split["test"][:80])  # type: ignore[arg-type]
    # The head saw 64 pairs for 4 steps: what matters here is that the gate's measure runs on this kind.
    assert result["n"] == 80 and result["version"] == "hf-test" and 0.0 <= result["pairwise_accuracy"] <= 1.0


def test_chat_template_used_when_present(hf_checkpoint: Path, tmp_path: Path) -> None:
    templated = tmp_path / "templated"
    shutil.copytree(hf_checkpoint, templated)
    b = _backend(templated)
    assert not b.uses_chat_template
    item = Item(
        "ignored",
        "the answer",
        messages=[{"role": "user", "content": "the question"}, {"role": "assistant", "content": "the answer"}],
    )
    plain = b.score([item])[0]
    b.tokenizer.chat_template = "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
    b.tokenizer.save_pretrained(templated)
    t = _backend(templated)
    assert t.uses_chat_template
    assert t._text(item) == "<|user|> the question <|assistant|> the answer "
    chat = t.score([item])[0]
    assert plain.ok and chat.ok and plain.value != chat.value


def test_register_versions_by_checkpoint_content_and_refuses_a_changed_one(hf_checkpoint: Path, tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    shutil.copytree(hf_checkpoint, ckpt)
    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    registry = Registry(store, tmp_path / "models")
    kv = KindVersion.create("hf", {"path": str(ckpt), "max_length": 64})
    v = registry.register(kv, data_window={}, metrics={})
    assert (
        v.startswith("hf-")
        and registry.register(
            KindVersion.create("hf", {"path": str(ckpt), "max_length": 64}), data_window={}, metrics={}
        )
        == v
    )
    assert KindVersion.create("hf", {"path": str(ckpt), "max_length": 128}).version != v
    backend = load_backend(registry.path_of(v), device="cpu")
    assert backend.kind == "hf" and backend.version == v
    (ckpt / "config.json").write_text((ckpt / "config.json").read_text() + "\n")
    with pytest.raises(BackendError, match="changed since it was registered"):
        load_backend(registry.path_of(v), device="cpu")
    store.close()


def test_hot_swap_from_builtin_to_hf_and_gate(
    hf_checkpoint: Path, tmp_path: Path, small_models: dict[str, Any]
) -> None:
    """The scorer picks up a promoted hf version at a batch boundary, like a built-in one."""
    from monitor.episodes import parse_episode
    from monitor.metrics import Metrics
    from monitor.reward.scorer import RewardScorer
    from sampling import Decision

    settings = load_settings(
        None, ["dev=true", "database.url=sqlite://", f"reward.models_dir={tmp_path / 'm'}", "reward.swap_poll_s=0.001"]
    )
    store = Store(settings.database.url)
    registry = Registry.for_settings(store, settings)
    registry.promote(registry.register(small_models["trained"], data_window={}, metrics={}))
    scorer = RewardScorer(settings.reward, registry, Metrics(CollectorRegistry()))
    ep = parse_episode(b'{"episode_id": "e1", "prompt": "2+2?", "response": "4"}', 1 << 20, now=0.0)
    d = Decision({"rm": 1.0}, {"rm": 1.0}, u_review=0.0, u_drift=0.5)
    scorer.observe(ep, d, 0)
    scorer.checkpoint()
    assert scorer.take_rows()[0]["version"].startswith("rm-")
    v = registry.register(
        KindVersion.create("hf", {"path": str(hf_checkpoint), "max_length": 64}), data_window={}, metrics={}
    )
    registry.promote(v)
    scorer.observe(ep, d, 0)
    scorer.checkpoint()
    [row] = scorer.take_rows()
    assert row["version"] == v and scorer.version == v
    scorer.close()
    store.close()


def test_an_item_that_fails_fails_alone(hf_checkpoint: Path, tmp_path: Path) -> None:
    """A Mistral-style template refuses a system turn, and a version registered before
    registration checked max_length reads past the model's 512 positions: each such item failed
    every item batched with it."""
    strict = tmp_path / "strict"
    shutil.copytree(hf_checkpoint, strict)
    b = _backend(strict, max_length=1024, batch_size=8)
    assert b.max_length == 512  # cut to the model's positions
    b.tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('roles must alternate') }}"
        "{% endif %}[{{ m['role'] }}] {{ m['content'] }} {% endfor %}"
    )
    b.tokenizer.save_pretrained(strict)
    b = _backend(strict, max_length=1024, batch_size=8)
    system = Item(
        "x", "the answer", messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q"}]
    )
    items = [Item("Q?", "Yes."), system, Item("Q?", "word " * 900), Item("Q?", "No.")]
    scores = b.score(items)
    assert [s.ok for s in scores] == [True, False, True, True]
    assert scores[1].error is not None and "roles must alternate" in scores[1].error
    assert scores[2].truncated and scores[2].tokens == 512


def test_a_scorer_that_raises_leaves_its_episodes_for_the_backlog(
    hf_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Scoring inline (replay, simulate, run without workers): an exception a backend did not catch
    went up through the batch's checkpoint and ended the command with the whole input's work lost."""
    from monitor.episodes import parse_episode
    from monitor.metrics import Metrics
    from monitor.reward.scorer import RewardScorer
    from sampling import Decision

    settings = load_settings(None, ["dev=true", "database.url=sqlite://", f"reward.models_dir={tmp_path / 'm'}"])
    store = Store(settings.database.url)
    registry = Registry.for_settings(store, settings)
    v = registry.register(
        KindVersion.create("hf", {"path": str(hf_checkpoint), "max_length": 64}), data_window={}, metrics={}
    )
    registry.promote(v)
    scorer = RewardScorer(settings.reward, registry, Metrics(CollectorRegistry()))

    def boom(self: HfBackend, items: Any) -> Any:
        raise RuntimeError("a failure nobody foresaw")

    ep = parse_episode(b'{"episode_id": "e1", "prompt": "2+2?", "response": "4"}', 1 << 20, now=0.0)
    d = Decision({"rm": 1.0}, {"rm": 1.0}, u_review=0.0, u_drift=0.5)
    scorer.observe(ep, d, 0)
    scorer.checkpoint()  # loads the version
    assert scorer.take_rows()[0]["version"] == v
    monkeypatch.setattr(HfBackend, "score", boom)
    scorer.observe(ep, d, 1)
    assert scorer.checkpoint() == {} and scorer.take_rows() == [] and scorer.unscored == 1
    assert "scoring 1 episodes failed, left for the backlog: RuntimeError" in caplog.text
    scorer.close()
    store.close()
