"""Hand-computed checks of headsparse.recipes.stats (bootstrap, McNemar, gain recovered) and metrics.aer."""
import math

import numpy as np
import pytest

from headsparse.recipes.metrics import aer
from headsparse.recipes.stats import bootstrap_ci, gain_recovered, mcnemar_p, paired_bootstrap_ci


# ------------------------------------------------------------------ mcnemar_p
def test_mcnemar_exact_value_with_concordant_items():
    # index 0: a right, b wrong (n10=1); indices 1-5: a wrong, b right (n01=5);
    # index 6 both right, index 7 both wrong (concordant, ignored).
    a = [1, 0, 0, 0, 0, 0, 1, 0]
    b = [0, 1, 1, 1, 1, 1, 1, 0]
    # n=6, k=1: p = 2 * (C(6,0) + C(6,1)) / 2^6 = 2 * 7 / 64 = 14/64 = 0.21875
    assert mcnemar_p(a, b) == pytest.approx(0.21875, abs=1e-12)


def test_mcnemar_symmetric_in_argument_order():
    a = [1, 0, 0, 0, 0, 0, 1, 0]
    b = [0, 1, 1, 1, 1, 1, 1, 0]
    assert mcnemar_p(a, b) == mcnemar_p(b, a)


def test_mcnemar_no_discordant_items_is_one():
    assert mcnemar_p([1, 0, 1], [1, 0, 1]) == 1.0


def test_mcnemar_one_sided_extreme():
    # n10=0, n01=10: p = 2 * C(10,0) / 2^10 = 2/1024
    assert mcnemar_p([0] * 10 + [1], [1] * 10 + [1]) == pytest.approx(2 / 1024, abs=1e-15)


def test_mcnemar_balanced_is_capped_at_one():
    # n10=n01=1: 2 * (C(2,0)+C(2,1)) / 4 = 1.5 -> capped to 1
    assert mcnemar_p([1, 0], [0, 1]) == 1.0


@pytest.mark.parametrize("a,b", [([1, 0], [1]), ([], [])])
def test_mcnemar_bad_lengths(a, b):
    with pytest.raises(ValueError, match="equally long and non-empty"):
        mcnemar_p(a, b)


# ------------------------------------------------------------------ bootstrap_ci
def test_bootstrap_estimate_is_mean_and_bracketed():
    v = [1, 0, 0, 1, 1, 0, 1, 1, 0, 1]  # mean 6/10
    ci = bootstrap_ci(v, n_boot=500)
    assert ci.estimate == pytest.approx(0.6)
    assert ci.low <= ci.estimate <= ci.high
    assert ci.low < ci.high  # a 0/1 vector with both values has a non-zero spread
    assert ci.confidence == 0.95


def test_bootstrap_constant_values_zero_width():
    ci = bootstrap_ci([0.5] * 30, n_boot=200)
    assert (ci.estimate, ci.low, ci.high) == (0.5, 0.5, 0.5)


def test_bootstrap_seeded():
    v = [1, 0, 0, 1, 1, 0, 1, 1, 0, 1, 0, 0, 1]
    assert bootstrap_ci(v, n_boot=300, seed=3) == bootstrap_ci(v, n_boot=300, seed=3)
    others = {(c.low, c.high) for c in (bootstrap_ci(v, n_boot=300, seed=s) for s in range(5))}
    assert len(others) > 1  # the seed actually drives the resampling


def test_bootstrap_half_width_matches_normal_approximation():
    v = [0, 1] * 200  # n=400, mean 0.5
    ci = bootstrap_ci(v, n_boot=4000, seed=0)
    # normal approximation: 1.96 * sqrt(0.5 * 0.5 / 400) = 1.96 * 0.025 = 0.049
    assert ci.estimate == 0.5
    assert (ci.high - ci.low) / 2 == pytest.approx(0.049, abs=0.01)


@pytest.mark.parametrize("values,kw,name", [
    ([], {}, "values"),
    ([0.1, float("nan")], {}, "values"),
    ([0.1, 0.2], {"n_boot": 0}, "n_boot"),
    ([0.1, 0.2], {"n_boot": True}, "n_boot"),
    ([0.1, 0.2], {"confidence": 1.5}, "confidence"),
    ([0.1, 0.2], {"confidence": 0.0}, "confidence"),
])
def test_bootstrap_bad_input(values, kw, name):
    with pytest.raises(ValueError, match=name):
        bootstrap_ci(values, **kw)


# ------------------------------------------------------------------ paired_bootstrap_ci
def test_paired_estimate_is_difference_of_means():
    a, b = [1, 1, 0, 1], [0, 1, 0, 0]  # 3/4 - 1/4 = 0.5
    ci = paired_bootstrap_ci(a, b, n_boot=300)
    assert ci.estimate == pytest.approx(0.5)
    assert ci.low <= 0.5 <= ci.high


def test_paired_identical_vectors_zero():
    a = [1, 0, 1, 1, 0]
    ci = paired_bootstrap_ci(a, a, n_boot=300)
    assert (ci.estimate, ci.low, ci.high) == (0.0, 0.0, 0.0)


def test_paired_constant_shift_is_a_point():
    a = [3.0, 1.0, 7.0, 2.0, 5.0]
    b = [x - 0.25 for x in a]  # every difference is exactly 0.25
    ci = paired_bootstrap_ci(a, b, n_boot=300)
    assert (ci.estimate, ci.low, ci.high) == (0.25, 0.25, 0.25)


def test_paired_narrower_than_separate_cis_when_correlated():
    a = [1, 0] * 100  # 200 items, mean 0.5
    b = list(a)
    ones = [i for i, v in enumerate(b) if v == 1][:10]
    for i in ones:  # b = a with 10 right answers turned wrong: mean 0.45, difference 0.05
        b[i] = 0
    paired = paired_bootstrap_ci(a, b, n_boot=2000)
    ca, cb = bootstrap_ci(a, n_boot=2000), bootstrap_ci(b, n_boot=2000)
    assert paired.estimate == pytest.approx(0.05)
    paired_w = paired.high - paired.low
    # separate CIs are ~2*1.96*sqrt(.25/200) ~ 0.14 wide; paired ~2*1.96*sqrt(.05*.95/200) ~ 0.06
    assert paired_w < 0.6 * min(ca.high - ca.low, cb.high - cb.low)
    assert paired.low > 0  # the pairing makes a consistent 10-item loss significant


def test_paired_length_mismatch():
    with pytest.raises(ValueError, match="same items"):
        paired_bootstrap_ci([1, 0, 1], [1, 0])


# ------------------------------------------------------------------ gain_recovered
def test_gain_recovered_values():
    assert gain_recovered(0.5, 0.2, 0.8) == pytest.approx(0.5)  # (0.5-0.2)/(0.8-0.2) = 0.3/0.6
    assert gain_recovered(0.2, 0.2, 0.8) == 0.0
    assert gain_recovered(0.1, 0.2, 0.8) == pytest.approx(-1 / 6)  # (0.1-0.2)/0.6
    assert gain_recovered(0.8, 0.2, 0.8) == pytest.approx(1.0)


@pytest.mark.parametrize("q_full", [0.2, 0.1])
def test_gain_recovered_nan_when_full_does_not_improve(q_full):
    assert math.isnan(gain_recovered(0.5, 0.2, q_full))


@pytest.mark.parametrize("args,name", [
    ((float("nan"), 0.2, 0.8), "q "), ((0.5, float("inf"), 0.8), "q_base"),
    ((0.5, 0.2, True), "q_full"), ((0.5, "0.2", 0.8), "q_base"),
])
def test_gain_recovered_bad_input(args, name):
    with pytest.raises(ValueError, match=name):
        gain_recovered(*args)


# ------------------------------------------------------------------ aer
def test_aer_hand_computed():
    p = aer(10, 20, 300, 0.5, 0.8, 0.2)
    assert p.cost_ratio == pytest.approx(0.1)  # (10 + 20) / 300
    assert p.gain_recovered == pytest.approx(0.5)  # (0.5 - 0.2) / (0.8 - 0.2)
    assert p.aer == pytest.approx(0.2)  # 0.1 / 0.5
    assert p.speedup == pytest.approx(10.0)  # 300 / 30
    assert p.quality_ratio == pytest.approx(0.625)  # 0.5 / 0.8
    assert p.aer_quality_ratio == pytest.approx(0.16)  # 0.1 / 0.625
    assert p.as_dict()["aer"] == pytest.approx(0.2)


def test_aer_no_op_arm_is_infinite_not_rewarded():
    p = aer(1, 2, 300, 0.75, 0.77, 0.75)  # cost 3/300 = 0.01, learnt nothing
    assert p.gain_recovered == 0.0
    assert p.aer == math.inf
    # old definition: 0.01 / (0.75 / 0.77) = 0.0102667 -- looks excellent
    assert p.aer_quality_ratio == pytest.approx(0.01 * 0.77 / 0.75)
    assert p.aer_quality_ratio < 0.011
    assert "inf" in str(p)


def test_aer_worse_than_base_is_infinite():
    p = aer(1, 2, 300, 0.6, 0.8, 0.7)
    assert p.gain_recovered == pytest.approx(-1.0)  # (0.6-0.7)/(0.8-0.7) = -0.1/0.1
    assert p.aer == math.inf


def test_aer_full_finetuning_against_itself():
    p = aer(0, 300, 300, 0.8, 0.8, 0.2)
    assert p.gain_recovered == pytest.approx(1.0)
    assert p.cost_ratio == 1.0
    assert p.aer == pytest.approx(1.0)
    assert p.speedup == 1.0


def test_aer_undefined_when_full_did_not_improve():
    p = aer(10, 20, 300, 0.5, 0.4, 0.4)
    assert math.isnan(p.gain_recovered) and math.isnan(p.aer)
    assert "undefined" in str(p)


def test_aer_zero_method_time_has_infinite_speedup():
    p = aer(0, 0, 300, 0.5, 0.8, 0.2)
    assert p.speedup == math.inf and p.aer == 0.0


@pytest.mark.parametrize("kw,name", [
    ({"t_full": 0}, "t_full"), ({"t_select": -1}, "t_select"), ({"t_train": float("nan")}, "t_train"),
    ({"q": -0.1}, "q "), ({"t_train": True}, "t_train"), ({"q_base": float("inf")}, "q_base"),
])
def test_aer_bad_input(kw, name):
    args = dict(t_select=10, t_train=20, t_full=300, q=0.5, q_full=0.8, q_base=0.2)
    args.update(kw)
    with pytest.raises(ValueError, match=name):
        aer(**args)


def test_numpy_scalars_are_numbers_and_outcomes_must_be_boolean():
    import numpy as np

    assert aer(np.int64(10), np.float32(20.0), 300, np.float32(0.5), 0.8, 0.2).aer == pytest.approx(0.2)
    assert gain_recovered(np.float32(0.5), 0.2, 0.8) == pytest.approx(0.5)
    assert mcnemar_p(np.array([True, False]), [0, 1]) == 1.0
    for bad in (["0", "1"], [0.5, 1.0], [2, 0]):
        with pytest.raises(ValueError, match="a_correct"):
            mcnemar_p(bad, [True, False])


def test_seed_interval_hand_computed():
    from headsparse.recipes.stats import seed_interval

    # values 0.762, 0.804, 0.766: mean 0.7773..., sd 0.023180 (ddof 1), t(2) = 4.303 -> half width 0.057587
    iv = seed_interval([0.762, 0.804, 0.766])
    assert iv.estimate == pytest.approx(0.777333, abs=1e-6)
    assert iv.high - iv.estimate == pytest.approx(4.303 * 0.0231805 / 3 ** 0.5, rel=1e-4)
    assert iv.estimate - iv.low == pytest.approx(iv.high - iv.estimate)
    assert seed_interval([0.5]).low == seed_interval([0.5]).high == 0.5
    with pytest.raises(ValueError, match="values"):
        seed_interval([])
