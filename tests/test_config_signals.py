"""Signal names in the settings (``drift.signals``, ``drift.signal_params``,
``reward.update.trigger_signals``) are checked when the settings are read, so every command refuses a
misspelt one: ``oversight config check`` used to pass a name that ``oversight run`` refused at start,
and the other two settings took any name and silently did nothing with it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from monitor.config import (
    CONVERSATION_SIGNAL_NAMES,
    DRIFT_SIGNAL_NAMES,
    EMBEDDING_SIGNAL,
    EVENT_SIGNAL_NAMES,
    FED_SIGNAL_NAMES,
    TEXT_SIGNAL_NAMES,
    ConfigError,
    load_settings,
)


def refused(*overrides: str) -> str:
    with pytest.raises(ConfigError) as e:
        load_settings(None, list(overrides))
    return str(e.value)


def test_the_names_are_the_signals_that_drift_detection_defines() -> None:
    """The settings hold the names (monitor/signals imports monitor.config, not the other way round):
    a signal added to the drift monitor without its name here would be refused by every command."""
    from monitor.drift import EMBEDDING
    from monitor.signals import CONVERSATION_SIGNALS, FED_SIGNALS, TEXT_SIGNALS

    assert sorted(TEXT_SIGNAL_NAMES) == sorted(TEXT_SIGNALS)
    assert sorted(CONVERSATION_SIGNAL_NAMES) == sorted(CONVERSATION_SIGNALS)
    assert sorted(FED_SIGNAL_NAMES) == sorted(FED_SIGNALS)
    assert EMBEDDING_SIGNAL == EMBEDDING
    assert {*TEXT_SIGNALS, *CONVERSATION_SIGNALS, *FED_SIGNALS} == DRIFT_SIGNAL_NAMES
    assert {*DRIFT_SIGNAL_NAMES, EMBEDDING} == EVENT_SIGNAL_NAMES


def test_an_unknown_signal_in_drift_signals_is_refused_when_read() -> None:
    message = refused("drift.signals={respone_log_chars: [cusum]}")
    assert "drift.signals: unknown signals ['respone_log_chars']; known: [" in message, message
    assert "'response_log_chars'" in message and "'tool_errors'" in message and "'rm_disagreement'" in message
    assert "'embedding'" not in message  # the embeddings are drift.embedding's, not a drift.signals key
    assert "drift.signals: unknown signals ['embedding']" in refused("drift.signals={embedding: [kmmd]}")


def test_an_unknown_signal_in_signal_params_is_refused_when_read() -> None:
    """It was accepted and had no effect: the typo'd signal's parameters were never looked up."""
    message = refused("drift.signal_params={respone_log_chars: {cusum: {k: 0.2}}}")
    assert "drift.signal_params: unknown signals ['respone_log_chars']; known: [" in message, message
    assert "'response_log_chars'" in message and "'embedding'" in message
    assert "unknown signals ['respone_log_chars']" in refused("drift.signal_params.respone_log_chars.cusum.k=0.2")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        # refusal is watched by cusum only (the default): adwin's parameters there would be unused.
        (
            ["drift.signal_params={refusal: {adwin: {delta: 0.1}}}"],
            "drift.signal_params.refusal.adwin: drift.signals.refusal does not list detector 'adwin' (it lists cusum)",
        ),
        (
            ["drift.signals={refusal: [adwin]}", "drift.signal_params.refusal.cusum.mode=up"],
            "drift.signal_params.refusal.cusum: drift.signals.refusal does not list detector 'cusum' (it lists adwin)",
        ),
        # A known signal that drift.signals does not watch (conversation signals are off by default).
        (
            ["drift.signal_params.tool_errors.cusum.k=0.2"],
            "drift.signal_params.tool_errors: tool_errors is not watched (drift.signals.tool_errors lists no detector)",
        ),
        (
            ["drift.signal_params.embedding.cusum.k=0.2"],
            "drift.signal_params.embedding.cusum: drift.embedding.detectors does not list detector 'cusum'"
            " (it lists kmmd)",
        ),
    ],
)
def test_signal_params_for_a_detector_that_does_not_watch_the_signal_are_refused(
    overrides: list[str], message: str
) -> None:
    got = refused(*overrides)
    assert message in got and "would have no effect" in got, got


def test_an_unknown_trigger_signal_is_refused_when_read() -> None:
    """It was accepted and left that signal's drift events without reward-model updates."""
    message = refused("reward.update.trigger_signals=[refusal, respone_log_chars]")
    assert "reward.update.trigger_signals: Value error, unknown signals ['respone_log_chars']; known: '*' or [" in (
        message
    ), message
    assert "'embedding'" in message and "'refusal'" in message
    assert "unknown signals ['any']" in refused("reward.update.trigger_signals=[any]")


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["reward.update.trigger_signals=['*']"],
        ["reward.update.trigger_signals=[embedding, refusal, rm_score, tool_errors]"],
        ["drift.signals={tool_errors: [cusum], rm_score: [adwin], refusal: [cusum, windowed]}"],
        # The default signal_params (rm_disagreement's one-sided CUSUM) with a drift.signals that leaves
        # rm_disagreement out, or watches it with another detector: not the operator's doing, not refused.
        ["drift.signals={refusal: [cusum]}"],
        ["drift.signals={rm_disagreement: [adwin]}"],
        ["drift.signal_params={refusal: {cusum: {mode: up}}, rm_disagreement: {cusum: {mode: up}}}"],
        ["drift.signal_params.embedding.kmmd={}"],
        ["drift.embedding.detectors=[kmmd]", "drift.signal_params={embedding: {kmmd: {}}}"],
        ["drift.signals={tool_errors: [cusum]}", "drift.signal_params.tool_errors.cusum.k=0.2"],
        ["drift.signal_params.tool_errors={}"],  # nothing in it: nothing that would be ignored
    ],
)
def test_known_signal_names_load(overrides: list[str]) -> None:
    load_settings(None, overrides)


SET = "drift.signals={respone_log_chars: [cusum]}"


def test_config_check_refuses_the_unknown_signal_that_run_refuses(tmp_path: Path) -> None:
    """The reproduction: `config check` said "configuration is valid" (rc 0) where `run` stopped."""
    db = f"sqlite:///{tmp_path / 'x.db'}"
    res = subprocess.run(
        [sys.executable, "-m", "monitor.cli", "config", "check", "--dev", "--db", db, "--set", SET],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert res.returncode == 2, res.stdout + res.stderr
    errors = [line for line in res.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "drift.signals: unknown signals ['respone_log_chars']; known: [" in errors[0]
    assert "configuration is valid" not in res.stdout
