"""``oversight rm register --kind judge|http`` as users run it (subprocesses, a real database)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

OVERSIGHT = [sys.executable, "-m", "monitor.cli"]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*OVERSIGHT, *args], capture_output=True, text=True, timeout=120, check=False)


def test_register_judge_version_activate_and_list(tmp_path: Path) -> None:
    db, models = f"sqlite:///{tmp_path / 'db.sqlite'}", tmp_path / "models"
    cfg = tmp_path / "judge.yaml"
    cfg.write_text("base_url: http://127.0.0.1:9/v1\nmodel: judge-a\napi_key_env: JUDGE_KEY\n")
    common = ["--dev", "--db", db, "--set", f"reward.models_dir={models}"]
    r = run("rm", "register", "--kind", "judge", "--kind-config", str(cfg), "--activate", *common)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["version"].startswith("judge-") and out["active"] is True
    rec = json.loads((models / out["version"] / "kind.json").read_text())
    assert rec["identity"]["model"] == "judge-a" and rec["config"]["api_key_env"] == "JUDGE_KEY"
    # Same endpoint, another model: another version; the same again: the same version.
    r2 = run("rm", "register", "--kind", "judge", "--kind-config", str(cfg), "--kind-set", "model=judge-b", *common)
    again = run("rm", "register", "--kind", "judge", "--kind-config", str(cfg), *common)
    assert json.loads(r2.stdout)["version"] != out["version"] == json.loads(again.stdout)["version"]
    listed = [json.loads(line) for line in run("rm", "versions", "--dev", "--db", db).stdout.splitlines()]
    assert [v["active"] for v in listed if v["version"] == out["version"]] == [True]


def test_bad_kind_config_is_one_line_exit_2(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'db.sqlite'}"
    r = run(
        "rm",
        "register",
        "--kind",
        "judge",
        "--kind-set",
        "base_url=ftp://x",
        "--kind-set",
        "model=m",
        "--dev",
        "--db",
        db,
        "--set",
        f"reward.models_dir={tmp_path / 'm'}",
    )
    assert r.returncode == 2 and "base_url" in r.stderr and "Traceback" not in r.stderr
    r = run("rm", "register", "--kind", "hf", "--dev", "--db", db)
    assert r.returncode == 2 and "--model" in r.stderr and "Traceback" not in r.stderr
    # A value that is not YAML, and a checkpoint folder that is not a reward model: one line each.
    r = run("rm", "register", "--kind", "judge", "--kind-set", "model=[", "--dev", "--db", db)
    assert r.returncode == 2 and "--kind-set 'model=[': the value is not YAML" in r.stderr, r.stderr
    assert "unexpected" not in r.stderr
    # A dotted key under a key already set to a value ("unexpected TypeError" before).
    r = run("rm", "register", "--kind", "judge", "--kind-set", "resilience=5", "--kind-set", "resilience.timeout_s=1")
    assert r.returncode == 2 and "resilience is already set to a value, not a mapping" in r.stderr, r.stderr
    (tmp_path / "not-a-rm").mkdir()
    (tmp_path / "not-a-rm" / "config.json").write_text("{bad")
    r = run("rm", "register", "--kind", "hf", "--model", str(tmp_path / "not-a-rm"), "--dev", "--db", db)
    assert r.returncode == 2 and "its config does not load" in r.stderr and "Traceback" not in r.stderr
    listed = run("rm", "versions", "--dev", "--db", db).stdout
    assert "hf-" not in listed  # nothing was registered
