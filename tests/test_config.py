"""Configuration: YAML, environment, --set precedence; unknown keys are errors; secrets."""

from __future__ import annotations

from pathlib import Path

import pytest

from monitor.config import DEV_SAMPLING_KEY, ConfigError, load_settings


def test_required_keys_exist_with_defaults() -> None:
    s = load_settings(None, [])
    assert s.sampling.human.rate == 0.01 and s.sampling.human.floor == 0.001
    assert s.sampling.rm.rate == 0.1 and s.sampling.drift.rate == 0.05


def test_precedence_set_over_env_over_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("sampling:\n  human: {rate: 0.2, floor: 0.01}\n  rm: {rate: 0.3}\n  drift: {rate: 0.4}\n")
    s = load_settings(cfg, [])
    assert (s.sampling.human.rate, s.sampling.human.floor, s.sampling.rm.rate) == (0.2, 0.01, 0.3)
    monkeypatch.setenv("OVERSIGHT_SAMPLING__RM__RATE", "0.5")
    monkeypatch.setenv("OVERSIGHT_SAMPLING__HUMAN__RATE", "0.25")
    s = load_settings(cfg, ["sampling.human.rate=0.05"])
    assert s.sampling.human.rate == 0.05  # --set beats env
    assert s.sampling.rm.rate == 0.5  # env beats YAML
    assert s.sampling.human.floor == 0.01  # YAML kept where nothing overrides
    assert s.sampling.drift.rate == 0.4


@pytest.mark.parametrize(
    "overrides",
    [["sampling.humna.rate=0.1"], ["nope=1"], ["sampling.human.rate=1.5"], ["sampling.human.floor=0"], ["database"]],
)
def test_bad_overrides_are_errors(overrides: list[str]) -> None:
    with pytest.raises(ConfigError):
        load_settings(None, overrides)


def test_unknown_yaml_and_env_keys_are_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("sampling:\n  human:\n    rat: 0.1\n")
    with pytest.raises(ConfigError, match=r"sampling\.human\.rat: unknown key"):
        load_settings(cfg, [])
    cfg.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_settings(cfg, [])
    monkeypatch.setenv("OVERSIGHT_SAMPLNG__HUMAN__RATE", "0.1")
    with pytest.raises(ConfigError, match="OVERSIGHT_SAMPLNG"):
        load_settings(None, [])
    monkeypatch.delenv("OVERSIGHT_SAMPLNG__HUMAN__RATE")


def test_environment_variables_are_checked_in_any_case_and_depth(monkeypatch: pytest.MonkeyPatch) -> None:
    """pydantic-settings reads them in any case: a lower-case typo must be refused like an upper-case
    one, and a key below a plain value (dropped by the reader) must not pass for a setting."""
    monkeypatch.setenv("oversight_dev", "true")  # read, in any case
    assert load_settings(None, []).dev is True
    monkeypatch.setenv("oversight_bogus", "1")
    with pytest.raises(ConfigError, match="oversight_bogus: unknown key"):
        load_settings(None, [])
    monkeypatch.delenv("oversight_bogus")
    monkeypatch.setenv("OVERSIGHT_DEV__X", "1")
    with pytest.raises(ConfigError, match="OVERSIGHT_DEV__X: dev is a value, not a section"):
        load_settings(None, [])
    monkeypatch.delenv("OVERSIGHT_DEV__X")
    monkeypatch.setenv("OVERSIGHT_DRIFT__EMBEDDING__BOGUS", "1")  # below a section: the model refuses it
    with pytest.raises(ConfigError, match=r"drift\.embedding\.bogus: unknown key"):
        load_settings(None, [])


def test_a_configuration_that_would_fail_later_is_refused_when_loaded(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("dev: true\nsampling:\n  human: {rate: 0.2}\ndev: false\n")
    with pytest.raises(ConfigError, match="'dev' is given twice"):  # the safe loader kept the last
        load_settings(cfg, [])
    # A merge key's values may be overridden: that is what it is for.
    cfg.write_text("sampling:\n  human:\n    <<: {rate: 0.2, floor: 0.01}\n    rate: 0.3\n")
    assert load_settings(cfg, []).sampling.human.rate == 0.3
    cfg.write_text("1: 2\n")
    with pytest.raises(ConfigError, match="top-level key 1 is not a setting"):
        load_settings(cfg, [])
    cfg.write_text("dev: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ConfigError, match="nested too deeply"):
        load_settings(cfg, [])
    for override, where in [
        ("database.url=postgresql://u@[::1", "database.url"),
        ("kafka.bootstrap_servers=[]", "kafka.bootstrap_servers"),
        ("source.max_episode_bytes=100000000000000000000000", "source.max_episode_bytes"),
        ("pipeline.batch_timeout_ms=100000000000000000", "pipeline.batch_timeout_ms"),
        ("pipeline.drain_timeout_s=1e300", "pipeline.drain_timeout_s"),
        ("database.retention.days=1e308", "database.retention.days"),
    ]:
        with pytest.raises(ConfigError, match=where.replace(".", r"\.")):
            load_settings(None, [override])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        # Infinite or NaN floats passed every bound (inf > 10): a detector with an infinite ERT never alarms.
        ("drift.ert=inf", "drift.ert: Input should be a finite number"),
        ("drift.ert=1e400", "drift.ert: Input should be a finite number"),
        ("sampling.human.rate=nan", "sampling.human.rate: Input should be a finite number"),
        ("drift.windows_s=[0, 3600]", "drift.windows_s.0: Input should be greater than 0"),
        # Unknown detectors and parameters failed every build of every stream instead, leaving signals unwatched.
        ("drift.signals.refusal=[cusm]", "unknown detector 'cusm' (in drift.signals.refusal)"),
        ("drift.embedding.detectors=[kmd]", "unknown detector 'kmd' (in drift.embedding.detectors)"),
        (
            "drift.detector_params.cusum.kk=0.2",
            "drift.detector_params.cusum.kk: detector 'cusum' has no such parameter",
        ),
        ("drift.detector_params.cusum.ert=50", "drift.detector_params.cusum.ert: detector 'cusum' has no such"),
        ("drift.signal_params.refusal.cusum.modes=up", "drift.signal_params.refusal.cusum.modes: detector 'cusum'"),
        ("drift.detector_params.pagehinkley.delta=1", "unknown detector 'pagehinkley' (in drift.detector_params"),
    ],
)
def test_settings_that_would_fail_at_run_time_are_refused_when_read(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_settings(None, [override])
    assert message in str(e.value), str(e.value)


def test_known_detector_parameters_and_json_env_values_load(monkeypatch: pytest.MonkeyPatch) -> None:
    s = load_settings(None, ["drift.detector_params.cusum.k=0.4", "drift.signal_params.refusal.cusum.mode=up"])
    assert s.drift.detector_params["cusum"]["k"] == 0.4
    monkeypatch.setenv("OVERSIGHT_DRIFT__SIGNALS", "{")  # a complex value that is not JSON: one line, not a crash
    with pytest.raises(ConfigError, match="set it to JSON"):
        load_settings(None, [])
    monkeypatch.setenv("OVERSIGHT_DRIFT__SIGNALS", '{"refusal": ["cusum"]}')
    assert load_settings(None, []).drift.signals == {"refusal": ["cusum"]}


def test_null_in_the_environment_unsets_an_optional_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    """As ``null`` does in the file and in --set; before, it was refused as a number that does not parse."""
    assert load_settings(None, []).quality.window_days == 30.0
    monkeypatch.setenv("OVERSIGHT_QUALITY__WINDOW_DAYS", "null")
    monkeypatch.setenv("OVERSIGHT_DATABASE__RETENTION__DAYS", "null")
    s = load_settings(None, [])
    assert s.quality.window_days is None and s.database.retention.days is None
    monkeypatch.setenv("OVERSIGHT_QUALITY__WINDOW_DAYS", "7")
    assert load_settings(None, []).quality.window_days == 7.0
    monkeypatch.setenv("OVERSIGHT_SAMPLING__HUMAN__RATE", "null")  # a setting that may not be null: refused
    with pytest.raises(ConfigError, match=r"sampling\.human\.rate"):
        load_settings(None, [])


def test_sampling_key_required_outside_dev(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match=r"sampling\.key"):
        load_settings(None, []).sampling_key()
    with pytest.raises(ConfigError, match="dev key"):
        load_settings(None, [f"sampling.key={DEV_SAMPLING_KEY}"]).sampling_key()
    assert load_settings(None, ["dev=true"]).sampling_key() == DEV_SAMPLING_KEY.encode()
    monkeypatch.setenv("OVERSIGHT_SAMPLING__KEY", "s3cret-value-8f1d4c7a2e9b")
    s = load_settings(None, [])
    assert s.sampling_key() == b"s3cret-value-8f1d4c7a2e9b"
    assert "s3cret" not in str(s.redacted()) and "s3cret" not in repr(s)


def test_stream_overrides_inherit_unset_fields() -> None:
    s = load_settings(None, ["sampling.human.floor=0.02", "sampling.streams.vip.human.rate=0.5"])
    pol = s.sampling_policy()
    assert pol.channel("vip", "human").rate == 0.5 and pol.channel("vip", "human").floor == 0.02
    assert pol.channel("other", "human").rate == 0.01


def test_budget_config_reaches_policy() -> None:
    s = load_settings(None, ["sampling.human_budget_per_hour=60", "sampling.streams.b.human_budget_per_hour=6"])
    pol = s.sampling_policy()
    assert pol.budget("a") == 60 and pol.budget("b") == 6


def test_an_empty_dead_letter_path_is_refused_where_the_configuration_is_checked() -> None:
    """``config check`` said "configuration is valid"; ``run`` then failed on the empty path."""
    with pytest.raises(ConfigError, match=r"dead_letter\.path"):
        load_settings(None, ["dead_letter.path="])
