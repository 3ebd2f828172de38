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
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

from pydantic import ConfigDict, Field, model_validator

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

    @model_validator(mode="after")
    def _something_to_train(self) -> TrainConfig:
        # With layers to fine-tune, phase 1 runs only for head_epochs and phase 2 only for
        # epochs (see plan_phases): both 0 would leave no phase at all.
        if self.finetune_layers > 0 and self.head_epochs == 0 and self.epochs == 0:
            raise ValueError("finetune_layers > 0 needs head_epochs > 0 or epochs > 0: nothing would train")
        return self


MODEL_KEYS = frozenset(ModelConfig.model_fields)


def load_train_config(config_file: str | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """A YAML mapping (optional) plus ``KEY=VALUE`` overrides; unknown keys are errors (ConfigError)."""

    import yaml
    from pydantic import ValidationError

    from monitor.config import ConfigError, load_yaml, parse_override
    from monitor.fileio import FileTooLarge, read_text_limited

    data: dict[str, Any] = {}
    if config_file is not None:
        try:
            loaded = load_yaml(read_text_limited(config_file)) or {}
        except (OSError, yaml.YAMLError, UnicodeDecodeError, FileTooLarge) as e:
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


def length_outcomes(pairs: Sequence[Pair]) -> list[float]:
    """Per pair, "the longer response wins" (characters): 1 when it orders the pair as labelled,
    0.5 on a tie, 0 when not."""
    return [
        1.0 if len(p["chosen"]) > len(p["rejected"]) else 0.5 if len(p["chosen"]) == len(p["rejected"]) else 0.0
        for p in pairs
    ]


def length_baseline(pairs: Sequence[Pair]) -> float:
    """Accuracy of "the longer response wins" (characters; ties count half)."""
    if not pairs:
        return float("nan")
    return sum(length_outcomes(pairs)) / len(pairs)


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
    if not pairs:
        raise ValueError("no training pairs")
    return Trainer(cfg or TrainConfig(), base, progress).run(pairs, description)


class Phase(NamedTuple):
    """``head``: the head alone on the frozen encoder's pooled states; ``finetune``: the top layers
    together with the head."""

    name: Literal["head", "finetune"]
    epochs: int

    @property
    def frozen(self) -> bool:
        return self.name == "head"


def plan_phases(cfg: TrainConfig, finetuning: bool) -> list[Phase]:
    """Phase 1 trains the head on the frozen encoder's pooled states (seconds an epoch); phase 2
    fine-tunes the top layers together with that head. A fresh head would otherwise push large,
    noisy gradients into the pretrained layers, and early stopping can keep the phase-1 state when
    fine-tuning does not help on validation. With nothing to fine-tune, ``epochs`` count as head
    epochs too."""
    phases: list[Phase] = []
    if cfg.head_epochs > 0 or not finetuning:
        phases.append(Phase("head", cfg.head_epochs if finetuning else max(cfg.head_epochs, cfg.epochs)))
    if finetuning and cfg.epochs > 0:
        phases.append(Phase("finetune", cfg.epochs))
    return phases


def split_validation(pairs: Sequence[Pair], cfg: TrainConfig) -> tuple[list[Pair], list[Pair]]:
    """(training, validation) pairs, split by group and keyed on the seed so another seed gives
    another split; too few validation pairs for a meaningful early stop: all pairs train."""
    train_pairs: list[Pair] = []
    val_pairs: list[Pair] = []
    for p in pairs:
        is_val = cfg.val_fraction > 0 and split_of(group_of(p), cfg.val_fraction, seed=cfg.seed + 7919) == "test"
        (val_pairs if is_val else train_pairs).append(p)
    if len(val_pairs) < cfg.min_val_pairs or not train_pairs:
        return list(pairs), []
    return train_pairs, val_pairs


def start_model(cfg: TrainConfig, base: RewardModel | None, device: str) -> RewardModel:
    """A fresh model from the base encoder (head seeded by ``cfg.seed``), or a copy of ``base``."""
    if base is None:
        return RewardModel.create(model_config_of(cfg), seed=cfg.seed, device=device)
    ignored = {k for k in MODEL_KEYS if getattr(cfg, k) != getattr(base.config, k) and k != "finetune_layers"}
    if ignored:
        log.warning("training from %s: architecture keys %s come from the base", base.version, sorted(ignored))
    return base.clone(device)


@dataclass
class Best:
    """Early-stopping bookkeeping: the lowest validation loss so far (over both phases), its step
    and accuracy, the weights at that point, and evaluations since without improvement."""

    loss: float
    step: int
    accuracy: float
    state: dict[str, Any]
    patience: int
    bad_evals: int = 0

    def offer(self, loss: float, accuracy: float, step: int, snapshot: Callable[[], dict[str, Any]]) -> bool:
        """Record one evaluation; True when ``patience`` evaluations in a row did not improve."""
        if loss < self.loss - 1e-4:
            self.loss, self.step, self.accuracy = loss, step, accuracy
            self.state = snapshot()
            self.bad_evals = 0
            return False
        self.bad_evals += 1
        return self.bad_evals >= self.patience


@dataclass
class PhaseRun:
    """One phase in progress: its optimiser, schedule, the parameters it clips, and its steps."""

    phase: Phase
    opt: Any
    sched: Any
    params: list[Any]
    n_steps: int
    step: int = 0


class Trainer:
    """One run of ``train``, as named steps sharing the run's state: :meth:`prepare` (validation
    split, text index, features), :meth:`cache_frozen` (the frozen layers, once), then per phase
    :meth:`optimiser` and :meth:`epoch` (:meth:`optimisation_step`, :meth:`validate` with the
    :class:`Best` bookkeeping), and :meth:`finalise` (best weights back, frozen, metadata)."""

    def __init__(self, cfg: TrainConfig, base: RewardModel | None = None, progress: bool = True) -> None:
        import torch

        self.cfg = cfg
        self.base = base
        self.progress = progress
        self.t_start = time.perf_counter()
        self.device = default_device() if cfg.device == "auto" else cfg.device
        # Seeded before the head is initialised: head, dropout and batch order all follow the seed.
        torch.manual_seed(cfg.seed)
        self.rng = random.Random(cfg.seed)
        self.model = start_model(cfg, base, self.device)
        self.prior_layers = list(base.trained_layers) if base is not None else []
        n_layers = self.model.n_layers
        if cfg.finetune_layers > n_layers:
            raise ValueError(f"finetune_layers={cfg.finetune_layers} but the encoder has {n_layers} layers")
        self.start = n_layers - cfg.finetune_layers
        self.finetuning = self.start < n_layers
        self.trainable_layers = list(range(self.start, n_layers))
        self.layers = self.model.encoder.encoder.layer
        self.phases = plan_phases(cfg, self.finetuning)
        self.train_pairs: list[Pair] = []
        self.val_pairs: list[Pair] = []
        self.texts: list[tuple[str, str]] = []
        self.tr_idx: list[tuple[int, int]] = []
        self.va_idx: list[tuple[int, int]] = []
        self.feats: Any = None
        self.encs: list[tuple[list[int], list[int]]] = []
        self.cache: list[Any] = []
        self.frozen_pooled: dict[int, Any] = {}
        self.t_cache = 0.0
        self.step = 0
        self.running = 0.0
        self.history: list[dict[str, Any]] = []
        self.stopped_early = False

    def run(self, pairs: Sequence[Pair], description: str | None = None) -> tuple[RewardModel, dict[str, Any]]:
        from tqdm import tqdm

        self.prepare(pairs)
        self.cache_frozen()
        untrained = self.val_metrics(self.phases[0].frozen) if self.va_idx else (math.nan, math.nan)
        best = Best(untrained[1], 0, untrained[0], self.snapshot(), self.cfg.patience)
        total = sum(self.steps_per_epoch * ph.epochs for ph in self.phases)
        with tqdm(total=total, desc="rm train", unit="step", dynamic_ncols=True, disable=not self.progress) as bar:
            for phase in self.phases:
                self.run_phase(phase, best, bar)
        self.finalise(best)
        seconds = time.perf_counter() - self.t_start
        metrics = self.metrics(best, untrained, seconds)
        self.model.metadata = self.metadata(pairs, description, metrics)
        log.info(
            "trained %s in %.0f s: val accuracy %s (untrained %s, length %s)",
            self.model.version,
            seconds,
            metrics["val_accuracy"],
            metrics["val_accuracy_untrained"],
            metrics["val_length_baseline"],
        )
        return self.model, metrics

    # --- data ----------------------------------------------------------------------------------

    def prepare(self, pairs: Sequence[Pair]) -> None:
        """Validation split, one index over the distinct texts, their features (and, for a fresh
        model, the feature scaling fitted on the training side)."""
        self.train_pairs, self.val_pairs = split_validation(pairs, self.cfg)
        self.texts, idx = _text_index(self.train_pairs + self.val_pairs)
        self.tr_idx, self.va_idx = idx[: len(self.train_pairs)], idx[len(self.train_pairs) :]
        self.feats = self.model.features([t[0] for t in self.texts], [t[1] for t in self.texts])
        # A base's scaling is kept so the child's scores stay on the parent's scale.
        if self.base is None and self.model.config.features:
            self.fit_feature_scaling()

    def fit_feature_scaling(self) -> None:
        ft = self.feats[sorted({i for pair in self.tr_idx for i in pair})]
        self.model.feat_mean = ft.mean(0).to(self.device)
        # Binary features that never vary in training would divide by zero.
        self.model.feat_std = ft.std(0).clamp(min=1e-2).to(self.device)

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.tr_idx) / self.cfg.batch_size)

    @property
    def eval_every(self) -> int:
        return max(1, self.steps_per_epoch // self.cfg.evals_per_epoch)

    # --- the frozen part -------------------------------------------------------------------------

    def cache_frozen(self) -> None:
        """Run the frozen layers once over every text (see :func:`frozen_states`); when phase 1
        trains the head alone, also the top layers once, so its epochs touch the head only."""
        self.set_trainable()
        self.encs = self.model.encode([t[0] for t in self.texts], [t[1] for t in self.texts])
        self.cache = frozen_states(self.model, self.encs, self.start, self.cfg.cache_batch_size, self.progress)
        self.t_cache = time.perf_counter() - self.t_start
        if self.phases[0].frozen and self.finetuning:
            self.pool_frozen()

    def set_trainable(self) -> None:
        """Gradients for the top ``finetune_layers`` layers and the head only."""
        for p in self.model.encoder.parameters():
            p.requires_grad_(False)
        for i in self.trainable_layers:
            for p in self.layers[i].parameters():
                p.requires_grad_(True)
        for p in self.model.head.parameters():
            p.requires_grad_(True)

    def pool_frozen(self) -> None:
        import torch

        self.model.encoder.eval()
        # no_grad, not inference_mode: the head's backward needs these as saved inputs.
        with torch.no_grad():
            for chunk in self.by_length(list(range(len(self.texts)))):
                self.frozen_pooled.update(zip(chunk, self.pooled_batch(chunk), strict=True))

    def by_length(self, text_ids: Sequence[int]) -> list[list[int]]:
        """Chunks of similar token length, so little of a batch is padding."""
        ordered = sorted(text_ids, key=lambda i: len(self.encs[i][0]))
        bs = self.cfg.cache_batch_size
        return [ordered[s : s + bs] for s in range(0, len(ordered), bs)]

    def pooled_batch(self, text_ids: Sequence[int]) -> Any:
        """The head's pooled input, running the trainable layers on the cached states."""
        import torch

        cache = self.cache
        if not self.finetuning:
            return torch.stack([cache[i] for i in text_ids]).to(self.device, torch.float32)
        hidden, mask = stack_states([cache[i][0] for i in text_ids], self.device)
        early = {k: torch.stack([cache[i][1][k] for i in text_ids]).to(self.device) for k in cache[text_ids[0]][1]}
        return self.model.pooled_from(hidden, mask, self.start, early)

    def forward(self, text_ids: Sequence[int], frozen: bool) -> Any:
        """Scores of ``text_ids``; ``frozen``: from the top layers' output pooled once."""
        import torch

        f = self.feats[list(text_ids)].to(self.device)
        if frozen and self.finetuning:
            return self.model.head_score(torch.stack([self.frozen_pooled[i] for i in text_ids]), f)
        return self.model.head_score(self.pooled_batch(text_ids), f)

    # --- training --------------------------------------------------------------------------------

    def run_phase(self, phase: Phase, best: Best, bar: Any) -> None:
        if not phase.frozen and self.va_idx:
            # Continue from the best head of phase 1, not from where it overfitted.
            self.model.head.load_state_dict(best.state["head"])
        run = self.optimiser(phase)
        best.bad_evals = 0
        for _epoch in range(phase.epochs):
            if self.epoch(run, best, bar):
                self.stopped_early = True
                bar.update(run.n_steps - run.step)
                return

    def optimiser(self, phase: Phase) -> PhaseRun:
        """AdamW (the encoder's layers at their own, lower rate) with linear warm-up and decay."""
        import torch

        head_params = list(self.model.head.parameters())
        enc_params = [p for i in self.trainable_layers for p in self.layers[i].parameters()]
        groups: list[dict[str, Any]] = [{"params": head_params, "lr": self.cfg.lr_head}]
        if not phase.frozen and enc_params:
            groups.append({"params": enc_params, "lr": self.cfg.lr_encoder})
        opt = torch.optim.AdamW(groups, weight_decay=self.cfg.weight_decay)
        n_steps = self.steps_per_epoch * phase.epochs
        warm = max(1, int(n_steps * self.cfg.warmup_fraction))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(warm, n_steps))
        params = head_params if phase.frozen else head_params + enc_params
        return PhaseRun(phase, opt, sched, params, n_steps)

    def epoch(self, run: PhaseRun, best: Best, bar: Any) -> bool:
        """One shuffled pass over the training pairs; True when early stopping ended the phase."""
        order = list(range(len(self.tr_idx)))
        self.rng.shuffle(order)
        for s in range(0, len(order), self.cfg.batch_size):
            loss = self.optimisation_step([self.tr_idx[i] for i in order[s : s + self.cfg.batch_size]], run)
            self.running = 0.9 * self.running + 0.1 * loss if self.step > 1 else loss
            bar.update(1)
            bar.set_postfix(phase=run.phase.name, loss=f"{self.running:.3f}", val_acc=f"{best.accuracy:.3f}")
            if self.validate(run, best):
                return True
        return False

    def optimisation_step(self, batch: Sequence[tuple[int, int]], run: PhaseRun) -> float:
        """One Bradley-Terry step over ``batch`` (chosen, rejected) text ids; returns its loss."""
        import torch

        ids = sorted({i for pair in batch for i in pair})
        pos = {t: j for j, t in enumerate(ids)}
        self.model.head.train()
        for i in self.trainable_layers:
            self.layers[i].train()
        sc = self.forward(ids, run.phase.frozen)
        c = torch.tensor([pos[a] for a, _ in batch], device=self.device)
        r = torch.tensor([pos[b] for _, b in batch], device=self.device)
        loss = -torch.nn.functional.logsigmoid(sc[c] - sc[r]).mean()
        run.opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        torch.nn.utils.clip_grad_norm_(run.params, self.cfg.max_grad_norm)
        run.opt.step()
        run.sched.step()
        self.step += 1
        run.step += 1
        return float(loss.item())

    # --- validation and early stopping -----------------------------------------------------------

    def validate(self, run: PhaseRun, best: Best) -> bool:
        """Evaluate ``evals_per_epoch`` times an epoch and at the phase's end; True: stop the phase."""
        if not self.va_idx or not (run.step % self.eval_every == 0 or run.step == run.n_steps):
            return False
        acc, vloss = self.val_metrics(run.phase.frozen)
        self.history.append(
            {"phase": run.phase.name, "step": self.step, "val_accuracy": round(acc, 4), "val_loss": round(vloss, 4)}
        )
        return best.offer(vloss, acc, self.step, self.snapshot)

    def val_metrics(self, frozen: bool) -> tuple[float, float]:
        """(accuracy, Bradley-Terry loss) on the validation pairs, in eval mode."""
        import torch

        self.model.encoder.eval()
        self.model.head.eval()
        sc: dict[int, float] = {}
        with torch.inference_mode():
            for chunk in self.by_length(sorted({i for pair in self.va_idx for i in pair})):
                sc.update(zip(chunk, self.forward(chunk, frozen).tolist(), strict=True))
        return _accuracy(sc, self.va_idx)

    def snapshot(self) -> dict[str, Any]:
        return {
            "head": copy.deepcopy(self.model.head.state_dict()),
            "layers": {i: copy.deepcopy(self.layers[i].state_dict()) for i in self.trainable_layers},
        }

    # --- the result ------------------------------------------------------------------------------

    def finalise(self, best: Best) -> None:
        """The best validated weights back (without validation: the last), frozen, in eval mode."""
        model = self.model
        if self.va_idx:
            model.head.load_state_dict(best.state["head"])
            for i in self.trainable_layers:
                self.layers[i].load_state_dict(best.state["layers"][i])
        model.encoder.eval()
        model.head.eval()
        for p in model.encoder.parameters():
            p.requires_grad_(False)
        for p in model.head.parameters():
            p.requires_grad_(False)
        model.trained_layers = sorted(set(self.prior_layers) | set(self.trainable_layers))

    def metrics(self, best: Best, untrained: tuple[float, float], seconds: float) -> dict[str, Any]:
        val = bool(self.va_idx)
        return {
            "n_train": len(self.tr_idx),
            "n_val": len(self.va_idx),
            "val_accuracy": round(best.accuracy, 4) if val else None,
            "val_loss": round(best.loss, 4) if val else None,
            "val_accuracy_untrained": round(untrained[0], 4) if val else None,
            "val_length_baseline": round(length_baseline(self.val_pairs), 4) if val else None,
            "best_step": best.step if val else self.step,
            "steps": self.step,
            "stopped_early": self.stopped_early,
            "history": self.history,
            "seconds": round(seconds, 1),
            "seconds_cache": round(self.t_cache, 1),
            "device": self.device,
        }

    def metadata(self, pairs: Sequence[Pair], description: str | None, metrics: dict[str, Any]) -> dict[str, Any]:
        """Lineage, data, metrics and settings; ``version`` is the content id of the final weights."""
        md: dict[str, Any] = {
            "version": None,
            "parent": self.base.version if self.base is not None else None,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "training": _describe(pairs, description),
            "metrics": {k: v for k, v in metrics.items() if k != "history"},
            "train_config": self.cfg.model_dump(),
        }
        md["version"] = self.model.content_id()
        return md


def _schedule(warm: int, total: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (total - step) / max(1, total - warm))

    return f


def frozen_states(
    model: RewardModel, encs: Sequence[tuple[list[int], list[int]]], start: int, bs: int, progress: bool
) -> list[Any]:
    """Per text, what the frozen layers give: the hidden state entering layer ``start`` (float16,
    unpadded) and the pooled states of frozen pooling layers below it; with nothing to fine-tune,
    just the head's pooled input (float32)."""
    import torch
    from tqdm import tqdm

    out: list[Any] = [None] * len(encs)
    order = sorted(range(len(encs)), key=lambda i: len(encs[i][0]))
    below = frozenset(i for i in model.pool_indices() if i < start)
    model.encoder.eval()
    with (
        tqdm(total=len(encs), desc="rm cache", unit="text", dynamic_ncols=True, disable=not progress) as bar,
        torch.inference_mode(),
    ):
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
            bar.update(len(idx))
    return out


def stack_states(states: Sequence[Any], device: str) -> tuple[Any, Any]:
    """Cached unpadded hidden states as one zero-padded float32 batch and its attention mask."""
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
