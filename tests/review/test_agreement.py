"""Agreement statistics against values computed by hand."""

from __future__ import annotations

import random

import pytest

from monitor.quality.labels import cohen_kappa, krippendorff_alpha_interval


def test_krippendorff_alpha_interval_known_values() -> None:
    # Perfect agreement with variation between units.
    assert krippendorff_alpha_interval([[1, 1], [4, 4], [7, 7]]) == pytest.approx(1.0)
    # Hand computation: units [1,2],[3,3]: D_o = ((1-2)^2*2/1 + 0)/4 = 0.5;
    # pooled values 1,2,3,3: sum over ordered pairs of squared differences = 2*(1+4+4+1+1+0) = 22,
    # D_e = 22 / (4*3) = 1.8333; alpha = 1 - 0.5/1.8333 = 0.72727
    assert krippendorff_alpha_interval([[1, 2], [3, 3]]) == pytest.approx(1 - 0.5 / (22 / 12))
    # Systematic disagreement is worse than chance.
    systematic = krippendorff_alpha_interval([[1, 7], [7, 1], [1, 7]])
    assert systematic is not None and systematic < 0
    # Units with a single rating do not count; no variation at all is undefined.
    assert krippendorff_alpha_interval([[3], [5]]) is None
    assert krippendorff_alpha_interval([[4, 4], [4, 4]]) is None


def test_cohen_kappa_known_values() -> None:
    # po = 0.75; pa = pb = 0.5; pe = 0.5; kappa = 0.5
    pairs = [(True, True), (False, False), (True, False), (False, True)] + [(True, True), (False, False)] * 2
    assert cohen_kappa(pairs) == pytest.approx((0.75 - 0.5) / 0.5)
    assert cohen_kappa([(True, True), (False, False)]) == pytest.approx(1.0)
    assert cohen_kappa([(False, False)] * 5) is None  # never used: not measurable
    assert cohen_kappa([]) is None


def _pairwise_alpha(units: list[list[float]]) -> float | None:
    """The definition, pair by pair (quadratic): the oracle of the one-pass form."""
    units = [u for u in units if len(u) >= 2]
    n = sum(len(u) for u in units)
    d_o = sum(
        sum((a - b) ** 2 for i, a in enumerate(u) for j, b in enumerate(u) if i != j) / (len(u) - 1) for u in units
    )
    values = [v for u in units for v in u]
    d_e = sum((a - b) ** 2 for i, a in enumerate(values) for j, b in enumerate(values) if i != j)
    return None if n < 2 or d_e == 0 else 1.0 - (d_o / n) / (d_e / (n * (n - 1)))


@pytest.mark.parametrize("seed", range(5))
def test_krippendorff_alpha_is_the_pairwise_definition(seed: int) -> None:
    rng = random.Random(seed)
    units = [[float(rng.randint(1, 7)) for _ in range(rng.choice((1, 2, 2, 3)))] for _ in range(60)]
    got, want = krippendorff_alpha_interval(units), _pairwise_alpha(units)
    assert got is not None and want is not None and got == pytest.approx(want, rel=1e-12)


class _Counted(float):
    """A rating that counts the differences taken of it."""

    taken = 0

    def __sub__(self, other: float) -> float:
        _Counted.taken += 1
        return float(self) - float(other)

    def __rsub__(self, other: float) -> float:
        _Counted.taken += 1
        return float(other) - float(self)


def test_krippendorff_alpha_takes_a_difference_per_value_not_per_pair() -> None:
    """The admin page computes it over every item reviewed twice (10% by default), for ever: it
    must cost what the labels are, not their square (36,000 values, 70 s per view, before)."""
    units = [[_Counted(1 + i % 7), _Counted(1 + (i * 3) % 7)] for i in range(2_000)]
    _Counted.taken = 0
    assert krippendorff_alpha_interval(units) is not None  # type: ignore[arg-type]
    assert _Counted.taken <= 4 * 4_000, _Counted.taken  # pairwise: 4,000 x 3,999 differences
