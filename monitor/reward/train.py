"""Pairwise (Bradley-Terry) training of a ``RewardModel``, designed for a 2-core CPU.

Loss: ``-log sigmoid(score(chosen) - score(rejected))`` averaged over a batch of pairs.

Why it fits a CPU: full fine-tuning of MiniLM at 256 tokens costs ~10 s per 8-pair step on two
cores (~50 min an epoch over 2,500 pairs). Here the embeddings and the lower encoder layers stay
frozen, so their output for every distinct (prompt, response) is computed **once**, in inference
mode, and cached (float16); afterwards only the top ``finetune_layers`` layers and the head run,
forward and backward. Scores of the trained model are computed by the very same layer code
(``RewardModel.run_layers``), so training and serving agree.

By default ``finetune_layers`` is 0: the whole encoder is frozen, the cache holds the head's pooled
input, and training is the cache pass plus seconds of head epochs. Fine-tuning the top layer after
the head never beat the head alone on validation (early stopping kept the phase-1 state), while it
took most of the ~14 minutes that 2,500 AlpacaEval pairs needed on two busy cores. Sequences are
128 tokens: on held-out AlpacaEval pairs 256 tokens did not score better (head on frozen states,
mean of 3 seeds: 0.874 either way; the explicit features carry what the cut hides) and cost twice
as much.

Head settings (dropout 0.3, 32 pairs a batch): with ~2,250 training pairs the head over 1,152
pooled dimensions plus the features overfits fast at dropout 0.1 and 16-pair batches (best
validation loss after 0.5-2 epochs), and early stopping on ~250 validation pairs then picks a noisy
state. Head on frozen states, v3 features, pooled layers 6/4/2: held-out AlpacaEval accuracy 0.881
(mean of 3 seeds) -> 0.886 (mean of 5, every seed >= 0.883). ``lr_head`` 3e-4 did as well on 2,500
pairs (0.888) but undertrains the small sets an update sees (300 pairs: 0.575 held out). An MLP
prior over the features, a wider or narrower head, an ensemble of heads (same or different
validation splits), more epochs, batches of 64, weighting pairs by the judge's margin, refitting on
the validation pairs too, and weight decay 0.1 did not do better.

Two phases (the second only with ``finetune_layers`` > 0):

1. ``head_epochs`` epochs train the head alone on the frozen encoder's pooled states (one pass of
   the top layers, then seconds an epoch);
2. ``epochs`` epochs fine-tune the top layers together with that head (a fresh head would push
   large, noisy gradients into pretrained layers).

Validation: a ``val_fraction`` of the training pairs, split by group (instruction or first
dialogue turn) so validation prompts are unseen, is evaluated ``evals_per_epoch`` times an epoch;
the state with the best validation loss over both phases is kept (so phase 2 is dropped when it
does not help), and a phase stops after ``patience`` evaluations without improvement. Everything
random (head init, split, batch order, dropout) follows ``seed``.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, Literal

from pydantic import ConfigDict, Field

from monitor.reward.data import Pair, group_of, split_of
from monitor.reward.model import ModelConfig, RewardModel, default_device, pad_batch

log = logging.getLogger(__name__)


class TrainConfig(ModelConfig):
    """Training settings (architecture keys inherited from ``ModelConfig``); ``--set KEY=VALUE`` overrides."""

    model_config = ConfigDict(extra="forbid")

    seed: int = 0
    head_epochs: int = Field(
        10, ge=0, description="phase 1: epochs training the head on the frozen encoder's pooled states (cheap)"
    )
    epochs: int = Field(2, ge=0, description="phase 2: epochs fine-tuning the top layers with the head")
    batch_size: int = Field(32, ge=1, description="pairs per optimisation step")
    lr_head: float = Field(1e-3, gt=0)
    lr_encoder: float = Field(5e-5, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_fraction: float = Field(0.06, ge=0, lt=1)
    max_grad_norm: float = Field(1.0, gt=0)
    val_fraction: float = Field(0.1, ge=0, lt=1, description="training pairs held out (by group) for early stopping")
    min_val_pairs: int = Field(10, ge=1, description="fewer validation pairs than this: no early stopping")
    evals_per_epoch: int = Field(2, ge=1)
    patience: int = Field(3, ge=1, description="evaluations without a better validation loss before stopping")
    cache_batch_size: int = Field(32, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"


MODEL_KEYS = frozenset(ModelConfig.model_fields)


def load_train_config(config_file: str | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """A YAML mapping (optional) plus ``KEY=VALUE`` overrides; unknown keys are errors (ConfigError)."""
    from pathlib import Path

    import yaml
    from pydantic import ValidationError

    from monitor.config import ConfigError, parse_override

    data: dict[str, Any] = {}
    if config_file is not None:
        try:
            loaded = yaml.safe_load(Path(config_file).read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"cannot read training config {config_file}: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"training config {config_file} must hold a mapping")
        data.update(loaded)
    for item in overrides:
        parts, value = parse_override(item)
        data[".".join(parts)] = value
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = ".".join(str(p) for p in err["loc"])
            lines.append(f"  {loc}: {'unknown key' if err['type'] == 'extra_forbidden' else err['msg']}")
        raise ConfigError("invalid training configuration:\n" + "\n".join(lines)) from None


def model_config_of(cfg: TrainConfig) -> ModelConfig:
    return ModelConfig.model_validate({k: getattr(cfg, k) for k in MODEL_KEYS})


def length_baseline(pairs: Sequence[Pair]) -> float:
    """Accuracy of "the longer response wins" (characters; ties count half)."""
    if not pairs:
        return float("nan")
    wins = sum(
        1.0 if len(p["chosen"]) > len(p["rejected"]) else 0.5 if len(p["chosen"]) == len(p["rejected"]) else 0.0
        for p in pairs
    )
    return wins / len(pairs)


def pair_texts(p: Pair) -> tuple[tuple[str, str], tuple[str, str]]:
    """((prompt, chosen), (prompt, rejected)); a pair across prompts (absolute ratings) names the
    rejected response's own prompt in ``rejected_prompt``."""
    return (p["prompt"], p["chosen"]), (p.get("rejected_prompt") or p["prompt"], p["rejected"])


def _text_index(pairs: Sequence[Pair]) -> tuple[list[tuple[str, str]], list[tuple[int, int]]]:
    texts: dict[tuple[str, str], int] = {}
    idx = []
    for p in pairs:
        chosen, rejected = pair_texts(p)
        c = texts.setdefault(chosen, len(texts))
        r = texts.setdefault(rejected, len(texts))
        idx.append((c, r))
    return list(texts), idx


def _accuracy(scores: Sequence[float] | dict[int, float], idx: Sequence[tuple[int, int]]) -> tuple[float, float]:
    """(pairwise accuracy with ties as half, mean Bradley-Terry loss)."""
    acc = 0.0
    loss = 0.0
    for c, r in idx:
        d = scores[c] - scores[r]
        acc += 1.0 if d > 0 else 0.5 if d == 0 else 0.0
        # log(1 + e^-d), stable for large |d|.
        loss += max(-d, 0.0) + math.log1p(math.exp(-abs(d)))
    n = max(len(idx), 1)
    return acc / n, loss / n


def evaluate(model: RewardModel, pairs: Sequence[Pair], batch_size: int = 32) -> dict[str, Any]:
    """Held-out metrics: pairwise accuracy, Bradley-Terry loss, the length baseline, n."""
    texts, idx = _text_index(pairs)
    scores = model.score([t[0] for t in texts], [t[1] for t in texts], batch_size=batch_size) if texts else []
    acc, loss = _accuracy(scores, idx)
    return {
        "pairwise_accuracy": round(acc, 4),
        "bt_loss": round(loss, 4),
        "length_baseline": round(length_baseline(pairs), 4),
        "n": len(pairs),
        "version": model.version,
    }


def _describe(pairs: Sequence[Pair], description: str | None) -> dict[str, Any]:
    h = hashlib.sha256()
    for p in pairs:
        for k in ("prompt", "chosen", "rejected"):
            h.update(p[k].encode())
            h.update(b"\x00")
    out: dict[str, Any] = {
        "n_pairs": len(pairs),
        "n_groups": len({group_of(p) for p in pairs}),
        "sources": dict(sorted(Counter(str(p.get("source", "unknown")) for p in pairs).items())),
        "pairs_sha256": h.hexdigest(),
    }
    stamps = sorted(str(p["timestamp"]) for p in pairs if p.get("timestamp") is not None)
    if stamps:
        out["window"] = {"from": stamps[0], "to": stamps[-1]}
    if description:
        out["description"] = description
    return out


def train(
    pairs: Sequence[Pair],
    cfg: TrainConfig | None = None,
    base: RewardModel | None = None,
    progress: bool = True,
    *,
    description: str | None = None,
) -> tuple[RewardModel, dict[str, Any]]:
    """Train a reward model on ``pairs``; from ``base`` (a copy; its architecture, feature scaling
    and already trained layers are kept, ``cfg``'s architecture keys are ignored) or from the
    base encoder. Returns the new version (its ``version`` set, ``parent`` = base's) and metrics."""
    import torch

    cfg = cfg or TrainConfig()
    t_start = time.perf_counter()
    if not pairs:
        raise ValueError("no training pairs")
    device = default_device() if cfg.device == "auto" else cfg.device
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)

    if base is None:
        model = RewardModel.create(model_config_of(cfg), seed=cfg.seed, device=device)
        prior_layers: list[int] = []
    else:
        model = copy.copy(base)
        model.encoder = copy.deepcopy(base.encoder)
        model.head = copy.deepcopy(base.head)
        model.metadata = {}
        model.device = device
        model._to_device()
        prior_layers = list(base.trained_layers)
        ignored = {k for k in MODEL_KEYS if getattr(cfg, k) != getattr(base.config, k) and k != "finetune_layers"}
        if ignored:
            log.warning("training from %s: architecture keys %s come from the base", base.version, sorted(ignored))
    mcfg = model.config
    n_layers = model.n_layers
    k = cfg.finetune_layers
    if k > n_layers:
        raise ValueError(f"finetune_layers={k} but the encoder has {n_layers} layers")
    start = n_layers - k

    # Validation split by group, keyed on the seed so another seed gives another split.
    train_pairs: list[Pair] = []
    val_pairs: list[Pair] = []
    for p in pairs:
        is_val = cfg.val_fraction > 0 and split_of(group_of(p), cfg.val_fraction, seed=cfg.seed + 7919) == "test"
        (val_pairs if is_val else train_pairs).append(p)
    if len(val_pairs) < cfg.min_val_pairs or not train_pairs:
        train_pairs, val_pairs = list(pairs), []

    texts, _ = _text_index(train_pairs + val_pairs)
    tindex = {t: i for i, t in enumerate(texts)}

    def pair_ids(p: Pair) -> tuple[int, int]:
        c, r = pair_texts(p)
        return tindex[c], tindex[r]

    tr_idx = [pair_ids(p) for p in train_pairs]
    va_idx = [pair_ids(p) for p in val_pairs]
    prompts = [t[0] for t in texts]
    responses = [t[1] for t in texts]

    feats = model.features(prompts, responses)
    if base is None and mcfg.features:
        train_texts = sorted({i for pair in tr_idx for i in pair})
        ft = feats[train_texts]
        model.feat_mean = ft.mean(0).to(device)
        # Binary features that never vary in training would divide by zero.
        model.feat_std = ft.std(0).clamp(min=1e-2).to(device)

    # Cache the frozen part once.
    for p in model.encoder.parameters():
        p.requires_grad_(False)
    trainable_layers = list(range(start, n_layers))
    layers = model.encoder.encoder.layer
    for i in trainable_layers:
        for p in layers[i].parameters():
            p.requires_grad_(True)
    for p in model.head.parameters():
        p.requires_grad_(True)
    encs = model.encode(prompts, responses)
    cache = _cache(model, encs, start, cfg.cache_batch_size, progress)
    t_cache = time.perf_counter() - t_start

    def pooled_batch(text_ids: Sequence[int]) -> Any:
        """The head's pooled input, running the trainable layers on the cached states."""
        if start == n_layers:
            return torch.stack([cache[i] for i in text_ids]).to(device, torch.float32)
        hidden, mask = _stack([cache[i][0] for i in text_ids], device)
        early = {k: torch.stack([cache[i][1][k] for i in text_ids]).to(device) for k in cache[text_ids[0]][1]}
        return model.pooled_from(hidden, mask, start, early)

    frozen_pooled: dict[int, Any] = {}

    def forward(text_ids: Sequence[int], frozen: bool) -> Any:
        f = feats[list(text_ids)].to(device)
        if frozen and start < n_layers:
            return model.head_score(torch.stack([frozen_pooled[i] for i in text_ids]), f)
        return model.head_score(pooled_batch(text_ids), f)

    def by_length(text_ids: Sequence[int]) -> list[list[int]]:
        ordered = sorted(text_ids, key=lambda i: len(encs[i][0]))
        return [ordered[s : s + cfg.cache_batch_size] for s in range(0, len(ordered), cfg.cache_batch_size)]

    def val_metrics(frozen: bool) -> tuple[float, float]:
        model.encoder.eval()
        model.head.eval()
        sc: dict[int, float] = {}
        with torch.inference_mode():
            for chunk in by_length(sorted({i for pair in va_idx for i in pair})):
                sc.update(zip(chunk, forward(chunk, frozen).tolist(), strict=True))
        return _accuracy(sc, va_idx)

    head_params = list(model.head.parameters())
    enc_params = [p for i in trainable_layers for p in layers[i].parameters()]
    steps_per_epoch = math.ceil(len(tr_idx) / cfg.batch_size)
    # Phase 1 trains the head on the frozen encoder's pooled states (seconds an epoch); phase 2
    # fine-tunes the top layers together with that head. A fresh head would otherwise push large,
    # noisy gradients into the pretrained layers, and early stopping can keep the phase-1 state
    # when fine-tuning does not help on validation.
    phases: list[tuple[str, int]] = []
    if cfg.head_epochs > 0 or start == n_layers:
        phases.append(("head", cfg.head_epochs if start < n_layers else max(cfg.head_epochs, cfg.epochs)))
    if start < n_layers and cfg.epochs > 0:
        phases.append(("finetune", cfg.epochs))
    total = sum(steps_per_epoch * e for _, e in phases)
    eval_every = max(1, steps_per_epoch // cfg.evals_per_epoch)

    if phases[0][0] == "head" and start < n_layers:
        model.encoder.eval()
        # no_grad, not inference_mode: the head's backward needs these as saved inputs.
        with torch.no_grad():
            for chunk in by_length(list(range(len(texts)))):
                frozen_pooled.update(zip(chunk, pooled_batch(chunk), strict=True))

    def snapshot() -> dict[str, Any]:
        return {
            "head": copy.deepcopy(model.head.state_dict()),
            "layers": {i: copy.deepcopy(layers[i].state_dict()) for i in trainable_layers},
        }

    untrained_val = val_metrics(frozen=True) if va_idx else (float("nan"), float("nan"))
    best = (untrained_val[1], 0, untrained_val[0])
    best_state = snapshot()
    history: list[dict[str, Any]] = []
    step = 0
    stopped_early = False
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, desc="rm train", unit="step", dynamic_ncols=True)
    running = 0.0
    try:
        for phase, epochs in phases:
            frozen = phase == "head"
            if not frozen and va_idx:
                # Continue from the best head of phase 1, not from where it overfitted.
                model.head.load_state_dict(best_state["head"])
            params = head_params if frozen else head_params + enc_params
            groups: list[dict[str, Any]] = [{"params": head_params, "lr": cfg.lr_head}]
            if not frozen and enc_params:
                groups.append({"params": enc_params, "lr": cfg.lr_encoder})
            opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
            n_steps = steps_per_epoch * epochs
            sched = torch.optim.lr_scheduler.LambdaLR(
                opt, _schedule(max(1, int(n_steps * cfg.warmup_fraction)), n_steps)
            )
            bad_evals = 0
            phase_step = 0
            for _epoch in range(epochs):
                order = list(range(len(tr_idx)))
                rng.shuffle(order)
                for s in range(0, len(order), cfg.batch_size):
                    batch = [tr_idx[i] for i in order[s : s + cfg.batch_size]]
                    ids = sorted({i for pair in batch for i in pair})
                    pos = {t: j for j, t in enumerate(ids)}
                    model.head.train()
                    for i in trainable_layers:
                        layers[i].train()
                    sc = forward(ids, frozen)
                    c = torch.tensor([pos[a] for a, _ in batch], device=device)
                    r = torch.tensor([pos[b] for _, b in batch], device=device)
                    loss = -torch.nn.functional.logsigmoid(sc[c] - sc[r]).mean()
                    opt.zero_grad(set_to_none=True)
                    loss.backward()  # type: ignore[no-untyped-call]
                    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                    opt.step()
                    sched.step()
                    step += 1
                    phase_step += 1
                    lv = float(loss.item())
                    running = 0.9 * running + 0.1 * lv if step > 1 else lv
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(phase=phase, loss=f"{running:.3f}", val_acc=f"{best[2]:.3f}")
                    if va_idx and (phase_step % eval_every == 0 or phase_step == n_steps):
                        acc, vloss = val_metrics(frozen)
                        history.append(
                            {"phase": phase, "step": step, "val_accuracy": round(acc, 4), "val_loss": round(vloss, 4)}
                        )
                        if vloss < best[0] - 1e-4:
                            best = (vloss, step, acc)
                            best_state = snapshot()
                            bad_evals = 0
                        else:
                            bad_evals += 1
                            if bad_evals >= cfg.patience:
                                break
                if bad_evals >= cfg.patience:
                    stopped_early = True
                    if bar is not None:
                        bar.update(n_steps - phase_step)
                    break
    finally:
        if bar is not None:
            bar.close()
    if va_idx:
        model.head.load_state_dict(best_state["head"])
        for i in trainable_layers:
            layers[i].load_state_dict(best_state["layers"][i])
    model.encoder.eval()
    model.head.eval()
    for p in model.encoder.parameters():
        p.requires_grad_(False)
    for p in model.head.parameters():
        p.requires_grad_(False)
    model.trained_layers = sorted(set(prior_layers) | set(trainable_layers))

    seconds = time.perf_counter() - t_start
    metrics: dict[str, Any] = {
        "n_train": len(tr_idx),
        "n_val": len(va_idx),
        "val_accuracy": round(best[2], 4) if va_idx else None,
        "val_loss": round(best[0], 4) if va_idx else None,
        "val_accuracy_untrained": round(untrained_val[0], 4) if va_idx else None,
        "val_length_baseline": round(length_baseline(val_pairs), 4) if va_idx else None,
        "best_step": best[1] if va_idx else step,
        "steps": step,
        "stopped_early": stopped_early,
        "history": history,
        "seconds": round(seconds, 1),
        "seconds_cache": round(t_cache, 1),
        "device": device,
    }
    model.metadata = {
        "version": None,
        "parent": base.version if base is not None else None,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "training": _describe(pairs, description),
        "metrics": {k: v for k, v in metrics.items() if k != "history"},
        "train_config": cfg.model_dump(),
    }
    model.metadata["version"] = model.content_id()
    log.info(
        "trained %s in %.0f s: val accuracy %s (untrained %s, length %s)",
        model.version,
        seconds,
        metrics["val_accuracy"],
        metrics["val_accuracy_untrained"],
        metrics["val_length_baseline"],
    )
    return model, metrics


def _schedule(warm: int, total: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (total - step) / max(1, total - warm))

    return f


def _cache(model: RewardModel, encs: Sequence[tuple[list[int], list[int]]], start: int, bs: int, progress: bool) -> Any:
    """Per text, what the frozen layers give: the hidden state entering layer ``start`` (float16,
    unpadded) and the pooled states of frozen pooling layers below it; with nothing to fine-tune,
    just the head's pooled input (float32)."""
    import torch

    out: list[Any] = [None] * len(encs)
    order = sorted(range(len(encs)), key=lambda i: len(encs[i][0]))
    below = frozenset(i for i in model.pool_indices() if i < start)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(encs), desc="rm cache", unit="text", dynamic_ncols=True)
    model.encoder.eval()
    try:
        with torch.inference_mode():
            for s in range(0, len(order), bs):
                idx = order[s : s + bs]
                ids, types, mask = pad_batch([encs[i] for i in idx], model.device)
                hidden, early = model.run_layers(model.embed(ids, types), mask, 0, start, below)
                if start == model.n_layers:
                    pooled = model.pooled_from(hidden, mask, start, early).float().cpu()
                    for j, i in enumerate(idx):
                        out[i] = pooled[j].clone()
                else:
                    lengths = mask.sum(1).tolist()
                    half = hidden.to(torch.float16).cpu()
                    early_cpu = {k: v.float().cpu() for k, v in early.items()}
                    for j, i in enumerate(idx):
                        out[i] = (half[j, : int(lengths[j])].clone(), {k: v[j].clone() for k, v in early_cpu.items()})
                if bar is not None:
                    bar.update(len(idx))
    finally:
        if bar is not None:
            bar.close()
    return out


def _stack(states: Sequence[Any], device: str) -> tuple[Any, Any]:
    import torch

    width = max(int(s.shape[0]) for s in states)
    dim = int(states[0].shape[1])
    hidden = torch.zeros((len(states), width, dim), dtype=torch.float32, device=device)
    mask = torch.zeros((len(states), width), dtype=torch.long, device=device)
    for j, s in enumerate(states):
        n = int(s.shape[0])
        hidden[j, :n] = s.to(device, torch.float32)
        mask[j, :n] = 1
    return hidden, mask
