"""A built-in reward model scored in bf16 on the CPU (``monitor/inference/bf16.py``): the same
ranking as fp32 on held-out pairs, and ``reward.precision`` reaching the scoring backend."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from monitor.inference.traced import TracedEncoder


def accuracy(scores: Any, n: int) -> float:
    """Pairwise accuracy of scores for ``n`` chosen answers then their ``n`` rejected ones, ties as
    half, rounded as ``evaluate`` rounds it."""
    d = scores[:n] - scores[n:]
    return round(float(((d > 0) + 0.5 * (d == 0)).mean()), 4)


def test_a_reward_model_scores_in_bf16_as_in_fp32(small_models: dict[str, Any], alpaca_split: Any) -> None:
    from monitor.reward.train import evaluate

    model = small_models["trained"].clone()
    pairs = alpaca_split["test"]
    n = len(pairs)
    prompts = [p["prompt"] for p in pairs] * 2
    responses = [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]
    ref = np.array(model.score(prompts, responses))
    ref_acc = evaluate(model, pairs)["pairwise_accuracy"]
    # evaluate's accuracy (ties as half) from the scores in hand: a second bf16 pass over the same
    # texts costs a minute where bf16 is emulated (a CPU without AVX512-BF16 or AMX). evaluate scores
    # each distinct text once, in other batches: a near-tie may come out the other way, one pair.
    assert abs(accuracy(ref, n) - ref_acc) <= 1 / n + 1e-9
    assert model.use_backend("torch", precision="bf16") == "torch" and isinstance(model.runner, TracedEncoder)
    assert model.runner.precision == "bf16"
    assert model.runner.attention == "sdpa" and model.runner.traced  # fused attention, no interpreter lock
    got = np.array(model.score(prompts, responses))
    assert np.corrcoef(ref, got)[0, 1] > 0.999
    # Within 0.5 points, the ONNX gate's tolerance (one flipped pair of 160 would be 0.625).
    assert abs(accuracy(got, n) - accuracy(ref, n)) <= 0.005 + 1e-9
    # fp32 on the CPU: a traced copy too (it frees the interpreter lock), the same scores as eager.
    assert model.use_backend("torch", precision="fp32") == "torch"
    fp32: TracedEncoder = model.runner
    assert fp32.precision == "fp32" and fp32.traced
    np.testing.assert_allclose(model.score(prompts, responses), ref, rtol=1e-5, atol=1e-5)
    assert model.use_backend("torch", precision="fp32", eager=True) == "torch" and model.runner is None
    np.testing.assert_allclose(model.score(prompts, responses), ref, rtol=1e-6, atol=1e-6)


def test_reward_precision_reaches_the_scoring_backend(small_models: dict[str, Any], tmp_path: Path) -> None:
    from monitor.config import load_settings
    from monitor.reward.scorer import load_version

    small_models["trained"].save(tmp_path / "v1")
    for precision in ("bf16", "fp32"):
        settings = load_settings(None, ["dev=true", f"reward.precision={precision}"])
        backend: Any = load_version(settings.reward, tmp_path / "v1", None)
        assert isinstance(backend.model.runner, TracedEncoder) and backend.model.runner.precision == precision
        assert len(backend.model.score(["What is 2+2?"], ["4"])) == 1
