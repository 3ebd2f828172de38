"""ONNX Runtime encoders: accuracy gates against PyTorch on real texts, the checked cache, ``auto``.

The cache mechanics run on a tiny randomly initialised BERT (a real model, exported in a second);
the accuracy gates run on the bundled MiniLM and a reward model trained on the bundled pairs
(slow: each export takes seconds)."""

from __future__ import annotations

import gzip
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from monitor.inference.int8 import FULL_RANGE, weight_levels
from monitor.inference.onnx import ACTIVATION_FLOORS, CACHE_ENV, DIGEST, MODEL, load_encoder, resolve_backend

DATA = Path(__file__).resolve().parent.parent / "data"


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


def tiny_bert() -> Any:
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(  # type: ignore[no-untyped-call, unused-ignore]
        vocab_size=200, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    return BertModel(cfg).eval()  # type: ignore[no-untyped-call]


def tiny_inputs() -> tuple[Any, Any, Any]:
    ids = np.array([[1, 5, 6, 7, 8, 2], [1, 9, 2, 0, 0, 0]], dtype=np.int64)
    return ids, (ids != 0).astype(np.int64), np.zeros_like(ids)


def torch_pooled(model: Any, ids: Any, mask: Any, types: Any) -> Any:
    """The reference: ``model`` as loaded (transformers' default attention), mean-pooled over the
    mask at the embeddings and the last layer, written out here rather than through the export's
    own :func:`~monitor.inference.onnx.pooled_module`."""
    import torch

    with torch.no_grad():
        out = model(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            token_type_ids=torch.from_numpy(types),
            output_hidden_states=True,
        )
        m = torch.from_numpy(mask).unsqueeze(-1).float()
        return torch.cat([(out.hidden_states[i] * m).sum(1) / m.sum(1) for i in (0, -1)], dim=-1).numpy()


def onnx_ops(path: Path) -> list[str]:
    import onnx

    return [n.op_type for n in onnx.load(str(path)).graph.node]


def test_exported_encoder_matches_pytorch_and_handles_any_shape(cache: Path) -> None:
    model = tiny_bert()  # the reference; the export gets a model of its own (it switches attention)
    enc = load_encoder("tiny", tiny_bert, [0, -1], normalize=False, quantisation="fp32")
    ids, mask, types = tiny_inputs()
    np.testing.assert_allclose(enc.run(ids, mask, types), torch_pooled(model, ids, mask, types), atol=1e-4)
    # Dynamic axes: another batch size and sequence length than the trace's.
    longer = np.tile(np.arange(1, 40, dtype=np.int64), (5, 1))
    ones = np.ones_like(longer)
    np.testing.assert_allclose(enc.run(longer, ones, 0 * ones), torch_pooled(model, longer, ones, 0 * ones), atol=1e-4)


def test_the_export_traces_attention_without_the_sdpa_nan_guard(cache: Path) -> None:
    """The default attention traces a ``Where(IsNaN(p), 0, p)`` over every layer's attention
    probabilities, a quarter of the int8 encoder's run time; the export must not carry it, and
    must still compute what the default attention computes, padded rows included."""
    reference = tiny_bert()
    enc = load_encoder("tiny", tiny_bert, [0, -1], normalize=False, quantisation="fp32")
    ops = onnx_ops(enc.path)
    assert "IsNaN" not in ops and ops.count("Softmax") == 2  # one softmax per layer, unguarded
    ids = np.array([[1, 5, 2, 0, 0, 0, 0], [1, 7, 8, 9, 10, 11, 2]], dtype=np.int64)  # mostly padding
    mask = (ids != 0).astype(np.int64)
    np.testing.assert_allclose(
        enc.run(ids, mask, np.zeros_like(ids)), torch_pooled(reference, ids, mask, np.zeros_like(ids)), atol=1e-4
    )


@pytest.mark.parametrize("name", sorted(ACTIVATION_FLOORS))
def test_activation_floors_are_true_and_tight_lower_bounds(name: str) -> None:
    """The per-row scheme quantises the feed-forward output projection's input from its floor: a
    value below it would be clipped, a floor far below it wastes levels."""
    import torch
    from transformers.activations import ACT2FN

    x = torch.linspace(-20.0, 5.0, 2_000_001, dtype=torch.float64)
    lowest = float(ACT2FN[name](x).min())
    assert ACTIVATION_FLOORS[name] <= lowest <= ACTIVATION_FLOORS[name] + 0.002, lowest


def test_cache_hit_does_not_rebuild(cache: Path) -> None:
    calls: list[int] = []

    def make() -> Any:
        calls.append(1)
        return tiny_bert()

    first = load_encoder("tiny", make, [-1], normalize=True, quantisation="fp32")
    second = load_encoder("tiny", make, [-1], normalize=True, quantisation="fp32")
    assert calls == [1]
    assert first.path == second.path and (first.path.parent / DIGEST).is_file()
    assert not [p for p in first.path.parent.parent.iterdir() if p.name.startswith(".")]  # no temp folders left


@pytest.mark.parametrize("damage", ["truncate", "garbage_with_matching_digest", "missing_digest"])
def test_corrupt_cache_file_is_rebuilt(cache: Path, damage: str, caplog: pytest.LogCaptureFixture) -> None:
    model = tiny_bert()
    ids, mask, types = tiny_inputs()
    enc = load_encoder("tiny", lambda: model, [-1], normalize=True, quantisation="fp32")
    want = enc.run(ids, mask, types)
    path = enc.path
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:1000])
    elif damage == "garbage_with_matching_digest":
        import hashlib

        path.write_bytes(b"not an onnx model")
        (path.parent / DIGEST).write_text(hashlib.sha256(b"not an onnx model").hexdigest())
    else:
        (path.parent / DIGEST).unlink()
    with caplog.at_level(logging.WARNING, logger="monitor.inference.onnx"):
        again = load_encoder("tiny", lambda: model, [-1], normalize=True, quantisation="fp32")
    assert "rebuilding" in caplog.text
    np.testing.assert_allclose(again.run(ids, mask, types), want, atol=1e-5)
    assert (again.path.parent / MODEL).stat().st_size > 1000


@pytest.mark.parametrize(("gain", "on_cpu"), [(0.0, "onnx"), (2.0, "onnx"), (7.5, "torch")])
def test_auto_is_torch_on_cuda_and_amx_cpus_and_onnx_on_other_cpus(
    monkeypatch: pytest.MonkeyPatch, gain: float, on_cpu: str
) -> None:
    """``gain``: how many times as fast as fp32 a bf16 product runs (none, AVX512-BF16, AMX)."""
    import torch

    from monitor.inference import bf16

    monkeypatch.setattr(bf16, "bf16_gain", lambda: gain)
    cpu = "torch" if torch.cuda.is_available() else on_cpu
    assert resolve_backend("auto", "auto") == cpu
    # Asked for fp32, the CPU's fastest is ONNX int8 whatever bf16 does; asked for bf16, PyTorch runs it.
    plain = "torch" if torch.cuda.is_available() else "onnx"
    assert resolve_backend("auto") == resolve_backend("auto", "fp32") == plain
    assert resolve_backend("auto", "bf16") == "torch"
    assert resolve_backend("torch") == "torch"
    assert resolve_backend("onnx", "bf16") == "onnx"
    with pytest.raises(ValueError, match="unknown inference backend"):
        resolve_backend("tpu")


def real_texts() -> list[str]:
    """Drift-embedding inputs as the pipeline builds them, plus bare instructions and one-word
    texts (the ones int8 is least accurate on)."""
    from monitor.signals.embeddings import episode_text

    texts: list[str] = []
    for name in ("gpt-3.5-turbo-1106_verbose", "gpt-3.5-turbo-1106_concise", "NullModel"):
        with gzip.open(DATA / "alpaca_eval" / f"{name}.jsonl.gz", "rt", encoding="utf-8") as fh:
            rows = [json.loads(line) for line, _ in zip(fh, range(48), strict=False)]
        texts += [episode_text(r["instruction"], r["output"]) for r in rows]
        texts += [r["instruction"] for r in rows[:16]]
    return [*texts, "ok", "Sure!", "x", "I cannot help with that.", "What is 2+2?\n\n4"]


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    mp = pytest.MonkeyPatch()
    path = tmp_path_factory.mktemp("onnx-cache")
    mp.setenv(CACHE_ENV, str(path))
    yield path
    mp.undo()


def real_episodes() -> tuple[list[str], list[str]]:
    """Drift samples as the pipeline sees them (the default pair encoding), plus bare instructions
    with one-word answers and empty sides (the ones int8 is least accurate on)."""
    prompts: list[str] = []
    responses: list[str] = []
    for name in ("gpt-3.5-turbo-1106_verbose", "gpt-3.5-turbo-1106_concise", "NullModel"):
        with gzip.open(DATA / "alpaca_eval" / f"{name}.jsonl.gz", "rt", encoding="utf-8") as fh:
            rows = [json.loads(line) for line, _ in zip(fh, range(48), strict=False)]
        prompts += [r["instruction"] for r in rows] + [r["instruction"] for r in rows[:16]]
        responses += [r["output"] for r in rows] + ["Sure!"] * 16
    return [*prompts, "What is 2+2?", "", "x"], [*responses, "4", "I cannot help with that.", ""]


@pytest.mark.slow
@pytest.mark.parametrize("encoding", ["pair", "text"])
@pytest.mark.parametrize("quantisation", ["int8", "fp32"])
def test_embedding_cosine_gate_on_real_texts(shared_cache: Path, quantisation: str, encoding: str) -> None:
    from monitor.signals.embeddings import Embedder

    enc: Any = encoding
    if encoding == "pair":
        prompts, responses = real_episodes()
        ref = Embedder(backend="torch").embed_episodes(prompts, responses)
        onnx = Embedder(backend="onnx", quantisation="int8" if quantisation == "int8" else "fp32")
        got = onnx.embed_episodes(prompts, responses)
        texts = [f"{p[:40]!r} -> {r[:40]!r}" for p, r in zip(prompts, responses, strict=True)]
    else:
        texts = real_texts()
        ref = Embedder(backend="torch", encoding=enc).embed(texts)
        onnx = Embedder(backend="onnx", quantisation="int8" if quantisation == "int8" else "fp32", encoding=enc)
        got = onnx.embed(texts)
    assert onnx.resolved == "onnx" and got.shape == ref.shape
    cos = (got * ref).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
    worst = int(cos.argmin())
    assert cos.min() >= 0.99, (quantisation, encoding, float(cos.min()), texts[worst][:80])
    if quantisation == "int8":
        # The smoothed recipe, not the q/k/v fallback: 6 layers x (q, k, v, attention output, FFN
        # input, FFN output), with q/k/v's shared input per row over its own range (a ReduceMin and
        # a ReduceMax; MatMulIntegerToFloat) and the FFN output's per row from the floor (a ReduceMax),
        # where the weights have the full range; with the reduced one the FFN output stays fp32.
        ffn = 6 if weight_levels() == FULL_RANGE else 0
        built = sorted((shared_cache / "onnx").glob("int8-*/model.onnx"))
        assert built and all(onnx_ops(m).count("MatMulInteger") == 12 for m in built)
        assert all(onnx_ops(m).count("MatMulIntegerToFloat") == 18 + ffn for m in built)
        assert all(onnx_ops(m).count("ReduceMax") == 6 + ffn and onnx_ops(m).count("ReduceMin") == 6 for m in built)


@pytest.mark.slow
def test_reward_model_onnx_keeps_accuracy(shared_cache: Path, real_data: Path) -> None:
    from monitor.reward.data import alpaca_eval_pairs, split_of
    from monitor.reward.train import TrainConfig, evaluate, train

    pairs = alpaca_eval_pairs(real_data / "alpaca_eval", pairs_per_instruction=2)
    train_pairs = [p for p in pairs if split_of(p["group"]) == "train"][:240]
    test_pairs = [p for p in pairs if split_of(p["group"]) == "test"][:200]
    model, _ = train(
        train_pairs, TrainConfig(finetune_layers=0, max_length=128, epochs=3, seed=0, val_fraction=0.0), progress=False
    )
    prompts = [p["prompt"] for p in test_pairs] * 2
    responses = [p["chosen"] for p in test_pairs] + [p["rejected"] for p in test_pairs]
    torch_scores = np.array(model.score(prompts, responses))
    torch_acc = evaluate(model, test_pairs)["pairwise_accuracy"]
    for quantisation in ("fp32", "int8"):
        assert model.use_backend("onnx", quantisation) == "onnx"
        onnx_scores = np.array(model.score(prompts, responses))
        assert np.corrcoef(torch_scores, onnx_scores)[0, 1] > 0.99, quantisation
        # Within 0.5 points: one flipped pair of 200 is allowed (the epsilon: 0.9 - 0.895 in floats).
        assert abs(evaluate(model, test_pairs)["pairwise_accuracy"] - torch_acc) <= 0.005 + 1e-9, quantisation
    assert model.use_backend("torch") == "torch"
    np.testing.assert_allclose(model.score(prompts, responses), torch_scores, rtol=1e-5, atol=1e-5)


def test_auto_falls_back_to_torch_when_the_cache_is_unwritable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from monitor.signals.embeddings import DIM, Embedder

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv(CACHE_ENV, str(blocker / "cache"))
    auto = Embedder(backend="auto")
    vec = auto.embed(["hello"])
    assert auto.resolved == "torch" and vec.shape == (1, DIM)
    with pytest.raises(OSError):
        Embedder(backend="onnx").embed(["hello"])
