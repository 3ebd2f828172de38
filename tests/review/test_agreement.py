"""Agreement statistics against values computed by hand."""

from __future__ import annotations

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
