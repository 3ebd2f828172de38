"""sampling.key and review.secret_key must be real secrets outside dev mode: refused at load,
so every command (``config check`` included) fails closed with a message, never a traceback."""

from __future__ import annotations

import secrets
import subprocess
import sys

import pytest

from monitor.config import ConfigError, load_settings, secret_weakness

WEAK = {
    "k": "shorter than 16",
    "a" * 16: "one character repeated",
    "x" * 40: "one character repeated",
    "passwordpassword": "repeats a 8-character pattern",
    "ab" * 12: "repeats a 2-character pattern",
    "aaaaaaaabbbbbbbb": "too little entropy",
    "aaaaaaaaaaaaaab1": "too little entropy",
}


@pytest.mark.parametrize("key", ["sampling.key", "review.secret_key"])
@pytest.mark.parametrize(("value", "why"), WEAK.items(), ids=list(WEAK))
def test_weak_secrets_are_refused_outside_dev(key: str, value: str, why: str) -> None:
    with pytest.raises(ConfigError, match=f"{key} .*{why}.*openssl rand"):
        load_settings(None, [f"{key}={value}"])
    # Dev mode accepts anything: it allows the public built-in keys already.
    assert load_settings(None, ["dev=true", f"{key}={value}"]).dev


def test_random_secrets_are_accepted() -> None:
    for _ in range(200):
        sampling, review = secrets.token_hex(16), secrets.token_urlsafe(24)
        s = load_settings(None, [f"sampling.key={sampling}", f"review.secret_key={review}"])
        assert (s.sampling_key(), s.review_secret()) == (sampling.encode(), review.encode())
    assert secret_weakness("correct horse battery staple") is None


def test_a_weak_key_stops_every_command_with_a_message() -> None:
    res = subprocess.run(
        [sys.executable, "-m", "monitor.cli", "config", "check", "--set", "sampling.key=x"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert res.returncode == 2, res.stderr
    assert "sampling.key is shorter than 16 characters" in res.stderr and "Traceback" not in res.stderr
