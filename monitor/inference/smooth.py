"""SmoothQuant for the int8 encoders: move activation outliers into the weights before export.

Dynamic int8 quantises each activation tensor with one scale (``DynamicQuantizeLinear``), set by its
largest value. A BERT-family encoder has a few input channels whose activations are tens of times
larger than the rest (after a LayerNorm), so the other channels get a handful of int8 levels.

SmoothQuant (Xiao et al., 2023) divides each input channel ``j`` of a linear layer by
``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)`` and multiplies the weight's input column by
``s_j``: the product is unchanged in exact arithmetic, the activations become flatter, and the
weights, quantised per output channel, absorb the range. ``max|X_j|`` comes from calibration texts
run through the fp32 encoder (:func:`input_absmax`; the callers encode
:func:`monitor.data.calibration_pairs`); nothing is trained.

Where the division goes, per encoder layer:

* q/k/v read the same hidden state: one ``s`` (from the largest weight column of the three), one
  division (a forward pre-hook on the self-attention), so the exported graph quantises that input once;
* the attention output projection reads the attention context, a per-channel linear function of the
  value projection: its division is folded into the value projection's rows and bias (no extra op);
* the feed-forward input projection: a division on its input (a pre-hook on ``intermediate``).

The feed-forward *output* projection is not smoothed. Its input, the GELU's output, has outlier
channels no worse than the feed-forward input's (largest channel 4-14x the median on real texts),
but it is mostly near zero with a long positive tail whose extent differs from token to token
(largest token 3-9x), and its error goes straight into the residual stream: smoothed and int8 with
one scale per tensor, the minimum cosine to PyTorch on held-out texts fell to 0.983 at alpha 0.7
(0.930 at 0.9). It is int8 with one scale per token instead (``monitor/inference/int8.py``,
``PerRow``), which needs no smoothing.

The hooks are traced into the ONNX graph as ``Mul`` nodes. Only the int8 build is smoothed; fp32
and PyTorch run the weights as they are.

>>> import torch
>>> lin = torch.nn.Linear(2, 1, bias=False)
>>> with torch.no_grad():
...     _ = lin.weight.copy_(torch.tensor([[1.0, 1.0]]))
>>> smoothing(torch.tensor([100.0, 1.0]), lin.weight.abs().amax(0), alpha=0.5).tolist()
[10.0, 1.0]
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

#: The migration strength. Minimum cosine to PyTorch on 966 texts of the 23 AlpacaEval models
#: (episodes, bare instructions, answers' first 40 characters): 0.9974 at 0.6, 0.9980 at 0.7,
#: 0.9973 at 0.8; without smoothing (q/k/v int8 only) 0.9945.
ALPHA = 0.7
# The sub-modules of one BERT-family layer (BERT, RoBERTa, XLM-R, ELECTRA, MiniLM) that are smoothed.
QKV = ("attention.self.query", "attention.self.key", "attention.self.value")
ATTENTION_OUT = "attention.output.dense"
FFN_IN = "intermediate.dense"
_MIN = 1e-5  # a channel that never fired (or a zero weight column) keeps a finite, positive scale


def smoothing(x_absmax: Any, w_absmax: Any, alpha: float = ALPHA) -> Any:
    """``s_j = max|X_j|^alpha / max|W_j|^(1-alpha)``, per input channel ``j``."""
    return (x_absmax.clamp(min=_MIN) ** alpha / w_absmax.clamp(min=_MIN) ** (1 - alpha)).clamp(min=_MIN)


def layers(encoder: Any) -> list[Any]:
    """The encoder's layers when each has the sub-modules above, else ``[]`` (not smoothed)."""
    found = getattr(getattr(encoder, "encoder", None), "layer", None)
    if found is None:
        return []
    out = list(found)
    for layer in out:
        for name in (*QKV, ATTENTION_OUT, FFN_IN):
            try:
                layer.get_submodule(name)
            except AttributeError:
                return []
    return out


def input_absmax(encoder: Any, batches: Iterable[tuple[Any, Any, Any]]) -> list[dict[str, Any]]:
    """Per layer, the largest absolute value of each input channel of the smoothed projections,
    over ``batches`` of ``(input_ids, attention_mask, token_type_ids)`` tensors. Padding positions
    count: at run time they are quantised with the rest of the tensor."""
    import torch

    found = layers(encoder)
    stats: list[dict[str, Any]] = [{} for _ in found]
    hooks = []
    for i, layer in enumerate(found):
        for name in (QKV[0], ATTENTION_OUT, FFN_IN):

            def record(_: Any, args: tuple[Any, ...], i: int = i, name: str = name) -> None:
                x = args[0].detach()
                m = x.abs().reshape(-1, x.shape[-1]).amax(0)
                stats[i][name] = torch.maximum(stats[i][name], m) if name in stats[i] else m

            hooks.append(layer.get_submodule(name).register_forward_pre_hook(record))
    try:
        with torch.no_grad():
            for ids, mask, types in batches:
                encoder(input_ids=ids, attention_mask=mask, token_type_ids=types)
    finally:
        for h in hooks:
            h.remove()
    return stats


def smooth(encoder: Any, stats: list[dict[str, Any]], alpha: float = ALPHA) -> int:
    """Smooth ``encoder`` in place with the calibration ``stats`` of :func:`input_absmax`; returns
    the number of layers smoothed (0 for an encoder of another shape: it is quantised as it is)."""
    import torch

    found = layers(encoder)
    if not found or len(stats) != len(found) or not all(stats):
        return 0
    with torch.no_grad():
        for layer, st in zip(found, stats, strict=True):
            qkv = [layer.get_submodule(n) for n in QKV]
            s = smoothing(st[QKV[0]], torch.stack([m.weight.abs().amax(0) for m in qkv]).amax(0), alpha)
            for m in qkv:
                m.weight.mul_(s)
            _divide_input(layer.get_submodule("attention.self"), s)

            # The context's channel j is a weighted sum of value channel j: divide the value
            # projection's output instead of adding an op.
            out, value = layer.get_submodule(ATTENTION_OUT), qkv[2]
            s = smoothing(st[ATTENTION_OUT], out.weight.abs().amax(0), alpha)
            out.weight.mul_(s)
            value.weight.div_(s[:, None])
            if value.bias is not None:
                value.bias.div_(s)

            ffn = layer.get_submodule(FFN_IN)
            s = smoothing(st[FFN_IN], ffn.weight.abs().amax(0), alpha)
            ffn.weight.mul_(s)
            _divide_input(layer.get_submodule("intermediate"), s)
    return len(found)


def _divide_input(module: Any, s: Any) -> None:
    """Divide ``module``'s first input (its hidden state) by ``s`` before every call; the other
    inputs (masks) pass as they are."""
    inverse = (1.0 / s).detach().clone()

    def pre(_: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        if args:
            return (args[0] * inverse, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": kwargs["hidden_states"] * inverse}

    module.register_forward_pre_hook(pre, with_kwargs=True)
