"""The run-level statistics (``orchestrator/stats.py``) against closed forms, scipy and statsmodels.

Also the two properties the report exists for, on simulated grids with a training-run variance
that dominates the test-subject variance (as in issue 9's A/A measurement): identical arms are
called different about 5% of the time (the per-subject Wilcoxon calls them different almost
always), and a planted effect is found.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from orchestrator.stats import (
    MIN_RUNS, arm_estimate, compare_arms, conclusion, control_verdict, detectable_effect, holm,
)

statsmodels = pytest.importorskip("statsmodels", reason="statsmodels (dev extra) is the independent oracle")


def _grid(rng: np.random.Generator, runs: int, units: int, mean: float, run_sd: float, unit_effects: np.ndarray,
          resid_sd: float) -> np.ndarray:
    """``(runs, units)`` Dice-like values: mean + run effect + subject effect + residual."""
    return (mean + rng.normal(0, run_sd, size=(runs, 1)) + unit_effects[None, :]
            + rng.normal(0, resid_sd, size=(runs, units)))


# -- closed forms and independent implementations -------------------------------------------------


def test_arm_estimate_one_unit_is_the_t_interval_of_run_means() -> None:
    values = np.array([[0.71], [0.80], [0.76], [0.69]])
    est = arm_estimate(values)
    low, high = sps.t.interval(0.95, df=3, loc=values.mean(), scale=sps.sem(values[:, 0]))
    assert est.n_runs == 4 and est.df == 3
    assert est.mean == pytest.approx(values.mean())
    assert est.run_sd == pytest.approx(values[:, 0].std(ddof=1))
    assert (est.ci_low, est.ci_high) == pytest.approx((low, high))


def test_arm_estimate_variance_matches_a_crossed_mixed_model() -> None:
    """The closed form equals statsmodels' REML fit of y ~ 1 + (1|run) + (1|subject) (balanced design)."""
    import statsmodels.formula.api as smf

    rng = np.random.default_rng(3)
    units = 12
    values = _grid(rng, 5, units, 0.8, 0.05, rng.normal(0, 0.08, units), 0.03)
    frame = pd.DataFrame([{"y": values[r, j], "run": r, "unit": j} for r in range(5) for j in range(units)])
    frame["all"] = 1
    fit = smf.mixedlm("y ~ 1", frame, groups="all", re_formula="0",
                      vc_formula={"run": "0 + C(run)", "unit": "0 + C(unit)"}).fit(reml=True)
    est = arm_estimate(values)
    se_closed = (est.ci_high - est.mean) / sps.t.ppf(0.975, est.df)
    assert se_closed == pytest.approx(float(fit.bse["Intercept"]), rel=2e-3)
    assert est.mean == pytest.approx(float(fit.params["Intercept"]))


def test_one_subset_seed_is_the_two_sample_t_test() -> None:
    """No arm x subject interaction: the comparison is scipy's pooled two-sample t-test on run means."""
    rng = np.random.default_rng(0)
    units = rng.normal(0, 0.1, 10)
    arm = 0.85 + rng.normal(0, 0.04, (4, 1)) + units
    ref = 0.80 + rng.normal(0, 0.04, (3, 1)) + units
    result = compare_arms({0: arm}, {0: ref})
    expected = sps.ttest_ind(arm.mean(axis=1), ref.mean(axis=1), equal_var=True)
    assert result.tested and result.df == 5
    assert result.effect == pytest.approx(arm.mean() - ref.mean())
    assert result.t == pytest.approx(expected.statistic)
    assert result.p_value == pytest.approx(expected.pvalue)
    half = sps.t.ppf(0.975, 5) * result.se
    assert (result.ci_low, result.ci_high) == pytest.approx((result.effect - half, result.effect + half))


def test_one_run_per_subset_seed_is_the_paired_t_test() -> None:
    """The published design (3 subset seeds x 1 training seed): a paired t-test over subset seeds."""
    rng = np.random.default_rng(1)
    units = rng.normal(0, 0.1, 8)
    arm, ref = {}, {}
    for block in range(4):
        level = rng.normal(0.8, 0.05)
        arm[block] = level + 0.03 + rng.normal(0, 0.02) + units[None, :]
        ref[block] = level + rng.normal(0, 0.02) + units[None, :]
    result = compare_arms(arm, ref)
    expected = sps.ttest_rel([arm[b].mean() for b in arm], [ref[b].mean() for b in ref])
    assert result.df == 3
    assert result.t == pytest.approx(expected.statistic)
    assert result.p_value == pytest.approx(expected.pvalue)


def test_blocks_with_replicates_match_ols() -> None:
    """Several subset seeds with several training seeds: statsmodels OLS ``y ~ arm + C(block)`` on run means."""
    import statsmodels.formula.api as smf

    rng = np.random.default_rng(2)
    units = rng.normal(0, 0.1, 6)
    arm, ref, rows = {}, {}, []
    for block, (n_arm, n_ref) in enumerate([(3, 2), (2, 3), (2, 2)]):
        level = rng.normal(0.8, 0.05)
        arm[block] = level + 0.04 + rng.normal(0, 0.03, (n_arm, 1)) + units
        ref[block] = level + rng.normal(0, 0.03, (n_ref, 1)) + units
        rows += [{"y": v, "arm": 1, "block": block} for v in arm[block].mean(axis=1)]
        rows += [{"y": v, "arm": 0, "block": block} for v in ref[block].mean(axis=1)]
    fit = smf.ols("y ~ arm + C(block)", pd.DataFrame(rows)).fit()
    result = compare_arms(arm, ref)
    assert result.effect == pytest.approx(float(fit.params["arm"]))  # balanced arms per block: same estimate
    assert result.se == pytest.approx(float(fit.bse["arm"]))
    assert result.p_value == pytest.approx(float(fit.pvalues["arm"]))
    assert result.df == fit.df_resid


def test_subject_interaction_widens_the_interval() -> None:
    """An arm x subject interaction (the arm helps some subjects, hurts others) adds to the error."""
    rng = np.random.default_rng(4)
    units = rng.normal(0, 0.1, 20)
    noise = rng.normal(0, 0.02, (3, 1))
    ref = 0.8 + noise[:, :1] + units
    flat = 0.82 + rng.normal(0, 0.02, (3, 1)) + units
    mixed = flat + rng.normal(0, 0.08, 20)[None, :]  # same runs, plus a per-subject interaction
    assert compare_arms({0: mixed}, {0: ref}).se > compare_arms({0: flat}, {0: ref}).se


def test_holm_matches_statsmodels() -> None:
    from statsmodels.stats.multitest import multipletests

    p = [0.01, 0.04, 0.03, 0.005, 0.2, 0.5]
    assert holm(p) == pytest.approx(list(multipletests(p, method="holm")[1]))
    with_nan = holm([0.01, math.nan, 0.04])
    assert math.isnan(with_nan[1]) and with_nan[0] == pytest.approx(0.02) and with_nan[2] == pytest.approx(0.04)


@pytest.mark.parametrize("runs", [1, 2])
def test_not_enough_runs_gives_no_p_value(runs: int) -> None:
    arm = np.full((runs, 5), 0.9)
    ref = np.full((3, 5), 0.5)
    result = compare_arms({0: arm}, {0: ref})
    assert not result.tested and math.isnan(result.p_value) and math.isnan(result.ci_low)
    assert result.effect == pytest.approx(0.4)
    assert f"{runs} vs 3 run(s)" in result.note and f"{MIN_RUNS} or more" in result.note
    sentence = conclusion(result, math.nan)
    assert sentence.startswith("not enough runs") and "p =" not in sentence
    single = arm_estimate(np.full((1, 5), 0.9))
    assert math.isnan(single.ci_low) and single.n_runs == 1


def test_conclusion_sentences() -> None:
    rng = np.random.default_rng(5)
    units = rng.normal(0, 0.05, 10)
    ref = 0.7 + rng.normal(0, 0.01, (3, 1)) + units
    better = compare_arms({0: ref + 0.2 + rng.normal(0, 0.01, (3, 1))}, {0: ref})
    worse = compare_arms({0: ref - 0.2 + rng.normal(0, 0.01, (3, 1))}, {0: ref})
    assert conclusion(better, better.p_value).startswith("better than scratch: +0.")
    assert conclusion(worse, worse.p_value).startswith("worse than scratch: -0.")
    assert conclusion(better, 0.2).startswith("no detectable difference from scratch")
    assert conclusion(better, 0.2, detectable=0.0634).endswith(
        "; this comparison detects about 0.063 Dice or more with 80% power")


@pytest.mark.parametrize(("runs", "alpha"), [(3, 0.05), (3, 0.05 / 12), (5, 0.01), (10, 0.05)])
def test_detectable_effect_matches_statsmodels_power(runs: int, alpha: float) -> None:
    from statsmodels.stats.power import TTestIndPower

    sd = 0.02  # Dice sd of one run's mean
    ours = detectable_effect(sd * math.sqrt(2 / runs), 2 * runs - 2, alpha)
    d = TTestIndPower().solve_power(nobs1=runs, alpha=alpha, power=0.8, ratio=1.0, alternative="two-sided")
    assert ours == pytest.approx(d * sd, rel=1e-6)
    assert math.isnan(detectable_effect(0.0, 4, alpha)) and math.isnan(detectable_effect(math.nan, 4, alpha))


def test_an_effect_of_the_detectable_size_is_found_four_times_in_five() -> None:
    rng = np.random.default_rng(11)
    sd, runs, trials = 0.02, 3, 1500
    size = detectable_effect(sd * math.sqrt(2 / runs), 2 * runs - 2, 0.05)
    found = 0
    for _ in range(trials):
        ref = rng.normal(0.8, sd, (runs, 1))
        arm = rng.normal(0.8 + size, sd, (runs, 1))
        found += compare_arms({0: arm}, {0: ref}).p_value < 0.05
    assert found / trials == pytest.approx(0.8, abs=0.04)


def test_control_verdicts() -> None:
    rng = np.random.default_rng(6)
    units = rng.normal(0, 0.05, 10)
    ref = 0.7 + rng.normal(0, 0.01, (3, 1)) + units
    same = compare_arms({0: ref + rng.normal(0, 0.01, (3, 1))}, {0: ref})
    better = compare_arms({0: ref + 0.2 + rng.normal(0, 0.01, (3, 1))}, {0: ref})
    worse = compare_arms({0: ref - 0.2 + rng.normal(0, 0.01, (3, 1))}, {0: ref})
    assert control_verdict("method", better, better.p_value) is None
    assert control_verdict("reference", same, same.p_value) is None
    assert control_verdict("negative control", same, 0.5).startswith("A/A control held")
    assert control_verdict("negative control", better, better.p_value).startswith("A/A control FAILED")
    assert control_verdict("negative control", worse, worse.p_value).startswith("A/A control FAILED")
    assert control_verdict("positive control", better, better.p_value).startswith("positive control detected")
    # not significant after adjustment, or significantly worse: the grid did not show the known benefit
    assert control_verdict("positive control", better, 0.2).startswith("positive control NOT detected")
    assert "detects about 0.300 Dice or more" in control_verdict("positive control", better, 0.2, detectable=0.3)
    assert control_verdict("positive control", worse, worse.p_value).startswith("positive control NOT detected")
    few = compare_arms({0: ref[:2]}, {0: ref})
    assert control_verdict("positive control", few, math.nan).startswith("positive control not checked: descriptive only: 2 vs 3")


# -- calibration on simulated grids -----------------------------------------------------------


def _simulated_pair(rng: np.random.Generator, effect: float, runs: int = 3, units: int = 14):
    """Two arms on the same test subjects; training-run sd 0.08 dominates residual sd 0.02."""
    subject = rng.normal(0, 0.06, units)
    arm = _grid(rng, runs, units, 0.75 + effect, 0.08, subject, 0.02)
    ref = _grid(rng, runs, units, 0.75, 0.08, subject, 0.02)
    return arm, ref


def test_identical_arms_are_rarely_called_different() -> None:
    """A/A: about 5% false positives; the per-subject Wilcoxon of one run each flags most pairs."""
    rng = np.random.default_rng(11)
    trials = 400
    ours = wilcoxon = 0
    for _ in range(trials):
        arm, ref = _simulated_pair(rng, effect=0.0)
        ours += compare_arms({0: arm}, {0: ref}).p_value < 0.05
        wilcoxon += sps.wilcoxon(arm[0], ref[0]).pvalue < 0.05
    assert 0.01 <= ours / trials <= 0.09
    assert wilcoxon / trials > 0.6


def test_planted_effect_is_found() -> None:
    rng = np.random.default_rng(12)
    trials, hits, covered = 200, 0, 0
    for _ in range(trials):
        arm, ref = _simulated_pair(rng, effect=0.3)
        result = compare_arms({0: arm}, {0: ref})
        hits += result.p_value < 0.05 and result.effect > 0
        covered += result.ci_low <= 0.3 <= result.ci_high
    assert hits / trials > 0.8
    assert covered / trials >= 0.9


def test_arm_interval_covers_the_true_mean() -> None:
    rng = np.random.default_rng(13)
    trials, covered = 300, 0
    for _ in range(trials):
        values = _grid(rng, 3, 14, 0.75, 0.08, rng.normal(0, 0.06, 14), 0.02)
        est = arm_estimate(values)
        covered += est.ci_low <= 0.75 <= est.ci_high
    assert covered / trials >= 0.9


def test_arm_interval_stays_within_dice_range() -> None:
    """Three runs, one of which lost a class: the t interval is clipped to [0, 1], where a mean Dice lies."""
    values = np.array([[0.83, 0.85], [0.82, 0.80], [0.47, 0.45]])
    est = arm_estimate(values)
    raw = arm_estimate(values, bounds=None)
    assert raw.ci_high > 1.0 and est.ci_high == 1.0 and est.ci_low == pytest.approx(raw.ci_low)
