"""Statistics of a fine-tuning grid with the training run as the unit of replication.

A cell (arm x label budget) is trained ``R`` times: subset seeds x training seeds. Every run is
evaluated on the same ``J`` test subject-phases, so one arm at one budget is a ``(R, J)`` matrix of
Dice values. Two sources of variance matter: the training run (initialisation, data order,
augmentation draws; the dominant one in this study) and the test subjects. A per-subject test that
pairs the subject-phases of one run against one run of another arm sees only the second, which is
why it calls two identical recipes "different" at p = 1e-4 (issue 9).

Model (per arm and budget): ``y_rj = mu + a_r + b_j + e_rj`` with run effects ``a_r ~ N(0, s_a^2)``,
subject-phase effects ``b_j ~ N(0, s_b^2)`` and residuals ``e_rj ~ N(0, s_e^2)``: a linear mixed
model with crossed random intercepts for run and subject. For this balanced design the ANOVA
(method-of-moments) estimators equal REML whenever they are non-negative (Searle, Casella and
McCulloch 1992, *Variance Components*, ch. 4), so the model is estimated in closed form:

- ``arm_estimate``: ``Var(mean) = (MS_run + MS_subject - MS_residual) / (R J)``, never below the run
  level alone (``var(run means) / R``), with a t interval on ``R - 1`` degrees of freedom. Using the
  run count, not the subject count, keeps the interval honest when there are 3 runs and 140
  subjects: the subjects cannot make up for missing runs.
- ``compare_arms``: the effect (arm minus reference) is estimated on run means by least squares with
  one fixed effect per subset seed (block), so runs are paired by subset seed and test subjects;
  with one block this is the two-sample t-test, with one run per arm and block the paired t-test.
  The arm x subject variance of the paired per-subject differences (its residual part removed) is
  added to the squared standard error, so a new sample of test subjects is covered too. t on the
  least-squares residual degrees of freedom (conservative: the subject term has many more).
- A test runs only when both arms have at least ``MIN_RUNS`` runs; otherwise the comparison is
  descriptive (effect only, no interval, no p-value).
- ``holm``: Holm's step-down adjustment (Holm 1979) over a family of comparisons.

Pure functions on numpy arrays; no I/O. The report (``orchestrator/report.py``) builds the matrices.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

#: Fewest training runs per arm for a test (and an interval); below it a comparison is descriptive.
MIN_RUNS = 3
ALPHA = 0.05


@dataclass(frozen=True)
class ArmEstimate:
    """Mean Dice of one arm at one budget over its runs, with the two-level 95% interval.

    ``mean`` is the grand mean over runs and subject-phases; ``run_sd`` the sd (ddof 1) of the
    per-run means; ``ci_low``/``ci_high`` NaN below two runs. ``n_runs`` = R, ``n_units`` = J.
    """

    mean: float
    run_sd: float
    ci_low: float
    ci_high: float
    n_runs: int
    n_units: int
    df: float


@dataclass(frozen=True)
class Comparison:
    """Arm minus reference at one budget: effect (Dice points, -1..1), its 95% CI and the test.

    ``tested`` is False when either arm has fewer than ``MIN_RUNS`` runs (or no residual degrees of
    freedom): then only ``effect`` (difference of run means) is set and ``note`` says why.
    """

    effect: float
    ci_low: float
    ci_high: float
    se: float
    df: float
    t: float
    p_value: float
    n_runs: int
    n_runs_ref: int
    tested: bool
    note: str = ""


def _two_way(matrix: np.ndarray) -> tuple[float, float, float]:
    """Mean squares (run, subject, residual) of a balanced ``(R, J)`` two-way layout without replication."""
    runs, units = matrix.shape
    grand = matrix.mean()
    row = matrix.mean(axis=1)
    col = matrix.mean(axis=0)
    ms_run = units * float(((row - grand) ** 2).sum()) / (runs - 1) if runs > 1 else math.nan
    ms_unit = runs * float(((col - grand) ** 2).sum()) / (units - 1) if units > 1 else math.nan
    resid = matrix - row[:, None] - col[None, :] + grand
    df_resid = (runs - 1) * (units - 1)
    ms_resid = float((resid**2).sum()) / df_resid if df_resid > 0 else math.nan
    return ms_run, ms_unit, ms_resid


def arm_estimate(
    matrix: np.ndarray, alpha: float = ALPHA, bounds: tuple[float, float] | None = (0.0, 1.0)
) -> ArmEstimate:
    """Two-level estimate of one arm's mean Dice.

    Args:
        matrix: ``(R, J)`` Dice of R runs on the same J test subject-phases.
        alpha: 1 - confidence level of the interval.
        bounds: the range the mean cannot leave (Dice: 0 to 1); the interval is clipped to it.
    """
    from scipy.stats import t as student_t

    values = np.asarray(matrix, dtype=float)
    if values.ndim != 2 or values.size == 0:
        raise ValueError(f"expected a non-empty (runs, subject-phases) matrix, got shape {values.shape}")
    runs, units = values.shape
    run_means = values.mean(axis=1)
    mean = float(values.mean())
    if runs < 2:
        return ArmEstimate(mean, math.nan, math.nan, math.nan, runs, units, math.nan)
    run_var = float(run_means.var(ddof=1))
    variance = run_var / runs
    if units > 1:
        ms_run, ms_unit, ms_resid = _two_way(values)
        variance = max(variance, (ms_run + ms_unit - ms_resid) / (runs * units))
    df = runs - 1
    half = float(student_t.ppf(1 - alpha / 2, df)) * math.sqrt(variance)
    low, high = mean - half, mean + half
    if bounds is not None:
        low, high = max(low, bounds[0]), min(high, bounds[1])
    return ArmEstimate(mean, math.sqrt(run_var), low, high, runs, units, float(df))


def _residual_variance(groups: Sequence[np.ndarray]) -> float | None:
    """Pooled run x subject residual variance of the groups with 2+ runs (None when none has)."""
    ss, df = 0.0, 0
    for matrix in groups:
        runs, units = matrix.shape
        if runs < 2 or units < 2:
            continue
        _, _, ms_resid = _two_way(matrix)
        ss += ms_resid * (runs - 1) * (units - 1)
        df += (runs - 1) * (units - 1)
    return ss / df if df else None


def compare_arms(
    arm: Mapping[object, np.ndarray], reference: Mapping[object, np.ndarray], alpha: float = ALPHA
) -> Comparison:
    """Arm minus reference, runs as the unit, blocked by subset seed and paired by test subject.

    Args:
        arm: block (subset seed) -> ``(R_b, J)`` Dice of the arm's runs in that block.
        reference: the same for the reference arm (scratch); the J columns of both must be the
            same subject-phases in the same order.
        alpha: 1 - confidence level.

    Returns:
        A ``Comparison``; descriptive only when either arm has fewer than ``MIN_RUNS`` runs in the
        blocks both share, or the least-squares fit leaves no residual degree of freedom.
    """
    from scipy.stats import t as student_t

    blocks = [b for b in arm if b in reference]
    a = {b: np.atleast_2d(np.asarray(arm[b], dtype=float)) for b in blocks}
    r = {b: np.atleast_2d(np.asarray(reference[b], dtype=float)) for b in blocks}
    n_a = sum(m.shape[0] for m in a.values())
    n_r = sum(m.shape[0] for m in r.values())
    if not blocks:
        return Comparison(math.nan, math.nan, math.nan, math.nan, math.nan, math.nan, math.nan, 0, 0, False,
                          "no run shares a subset seed with the reference")
    for b in blocks:
        if a[b].shape[1] != r[b].shape[1]:
            raise ValueError(f"block {b}: {a[b].shape[1]} vs {r[b].shape[1]} subject-phases; they must be the same")
    # Difference of the block means, averaged over blocks (equal weight per subset seed).
    effect = float(np.mean([a[b].mean() - r[b].mean() for b in blocks]))
    if min(n_a, n_r) < MIN_RUNS:
        note = f"descriptive only: {n_a} vs {n_r} run(s); a test needs {MIN_RUNS} or more per arm"
        return Comparison(effect, math.nan, math.nan, math.nan, math.nan, math.nan, math.nan, n_a, n_r, False, note)

    # Least squares on run means: y = beta * [arm] + gamma_block.
    y, design = [], []
    for i, b in enumerate(blocks):
        for matrix, is_arm in ((a[b], 1.0), (r[b], 0.0)):
            for value in matrix.mean(axis=1):
                row = [is_arm] + [0.0] * len(blocks)
                row[1 + i] = 1.0
                design.append(row)
                y.append(value)
    x = np.asarray(design)
    yv = np.asarray(y)
    df = len(yv) - x.shape[1]
    if df < 1:
        note = f"descriptive only: {n_a} vs {n_r} runs in {len(blocks)} subset seed(s) leave no degree of freedom"
        return Comparison(effect, math.nan, math.nan, math.nan, math.nan, math.nan, math.nan, n_a, n_r, False, note)
    coef, *_ = np.linalg.lstsq(x, yv, rcond=None)
    resid = yv - x @ coef
    sigma2 = float(resid @ resid) / df
    xtx_inv = np.linalg.inv(x.T @ x)
    var_runs = sigma2 * float(xtx_inv[0, 0])
    beta = float(coef[0])

    # Test-subject level: variance of the paired per-subject differences, less its residual part.
    per_unit = np.mean([a[b].mean(axis=0) - r[b].mean(axis=0) for b in blocks], axis=0)
    var_subjects = 0.0
    units = per_unit.size
    if units > 1:
        ms_diff = float(per_unit.var(ddof=1))
        resid_var = _residual_variance([*a.values(), *r.values()])
        noise = 0.0
        if resid_var is not None:
            noise = resid_var * float(np.mean([1 / a[b].shape[0] + 1 / r[b].shape[0] for b in blocks])) / len(blocks)
        var_subjects = max(0.0, ms_diff - noise) / units
    se = math.sqrt(var_runs + var_subjects)
    if se == 0.0:
        p_value = 1.0 if beta == 0.0 else 0.0
        t_value = 0.0 if beta == 0.0 else math.copysign(math.inf, beta)
        return Comparison(beta, beta, beta, 0.0, float(df), t_value, p_value, n_a, n_r, True, "no variance between runs")
    t_value = beta / se
    p_value = float(2 * student_t.sf(abs(t_value), df))
    half = float(student_t.ppf(1 - alpha / 2, df)) * se
    return Comparison(beta, beta - half, beta + half, se, float(df), t_value, p_value, n_a, n_r, True)


#: Power at which ``detectable_effect`` states the smallest effect a comparison would find.
POWER = 0.8


def detectable_effect(se: float, df: float, alpha: float, power: float = POWER) -> float:
    """The smallest true effect (Dice points, > 0) that a two-sided t-test at level ``alpha`` with
    standard error ``se`` on ``df`` degrees of freedom finds with probability ``power``.

    Exact under the t model: solves ``P(|T| > t_{1-alpha/2, df}) = power`` for the non-centrality
    ``delta`` of a non-central t and returns ``delta * se``. Pass the family's Bonferroni level
    (``alpha / m``: the level Holm applies to its first step) to state what the corrected table
    could detect. NaN when ``se`` or ``df`` is not finite and positive.
    """
    from scipy.optimize import brentq
    from scipy.stats import nct
    from scipy.stats import t as student_t

    if not (se > 0 and df > 0 and math.isfinite(se) and math.isfinite(df)):
        return math.nan
    crit = float(student_t.ppf(1 - alpha / 2, df))

    def shortfall(delta: float) -> float:
        lower_tail = float(nct.cdf(-crit, df, delta))  # negligible for delta > 0; scipy can return NaN there
        return float(nct.sf(crit, df, delta)) + (lower_tail if math.isfinite(lower_tail) else 0.0) - power

    upper = crit + 10.0
    while shortfall(upper) < 0:
        upper *= 2
    return float(brentq(shortfall, 0.0, upper, xtol=1e-10)) * se


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (NaN entries stay NaN and do not count in the family)."""
    values = [float(p) for p in p_values]
    order = sorted((p, i) for i, p in enumerate(values) if not math.isnan(p))
    m = len(order)
    adjusted = [math.nan] * len(values)
    running = 0.0
    for rank, (p, i) in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[i] = running
    return adjusted


def conclusion(
    comparison: Comparison, p_adjusted: float, reference: str = "scratch", alpha: float = ALPHA,
    detectable: float = math.nan,
) -> str:
    """One sentence on what can be concluded: better, worse, no detectable difference, not enough runs.

    ``detectable`` (``detectable_effect`` at the family's corrected level) is appended to "no
    detectable difference", which says little without it.
    """
    if not comparison.tested:
        effect = "" if math.isnan(comparison.effect) else f" (difference of means {comparison.effect:+.3f})"
        return f"not enough runs: {comparison.note}{effect}"
    interval = f"{comparison.effect:+.3f} Dice, 95% CI {comparison.ci_low:+.3f} to {comparison.ci_high:+.3f}"
    if not math.isnan(p_adjusted) and p_adjusted < alpha:
        word = "better than" if comparison.effect > 0 else "worse than"
        return f"{word} {reference}: {interval}, Holm-adjusted p = {p_adjusted:.2g}"
    sentence = f"no detectable difference from {reference}: {interval}, Holm-adjusted p = {p_adjusted:.2g}"
    return sentence + _detectable_clause(detectable)


def _detectable_clause(detectable: float) -> str:
    if math.isnan(detectable):
        return ""
    return f"; this comparison detects about {detectable:.3f} Dice or more with {POWER:.0%} power"


def control_verdict(
    role: str, comparison: Comparison, p_adjusted: float, alpha: float = ALPHA, detectable: float = math.nan
) -> str | None:
    """What a control arm's comparison with scratch says about the comparison itself, or ``None``
    for an arm that is not a control.

    - ``negative control`` (A/A: scratch again with other training seeds): it *holds* when it is not
      called different; when it is, the grid calls identical recipes different and its other
      conclusions are not to be trusted.
    - ``positive control`` (an initialisation trained with the labels): it is *detected* when it is
      significantly better; when it is not, the grid could not show a benefit that is known to
      exist (or that the task leaves no room for, e.g. scratch already at the ceiling), so a "no
      detectable difference" for a method at that budget is no evidence of no effect.
    """
    if role not in ("negative control", "positive control"):
        return None
    if not comparison.tested:
        return f"{role} not checked: {comparison.note}"
    significant = not math.isnan(p_adjusted) and p_adjusted < alpha
    interval = f"{comparison.effect:+.3f} Dice, 95% CI {comparison.ci_low:+.3f} to {comparison.ci_high:+.3f}"
    if role == "negative control":
        if significant:
            return (f"A/A control FAILED: two sets of scratch runs were called different ({interval}, Holm-adjusted "
                    f"p = {p_adjusted:.2g}); the other conclusions at this budget are not to be trusted")
        return f"A/A control held: two sets of scratch runs were not called different ({interval})"
    if significant and comparison.effect > 0:
        return f"positive control detected: better than scratch ({interval})"
    return (f"positive control NOT detected ({interval}{_detectable_clause(detectable)}): this grid did not show "
            f"the benefit of a supervised initialisation, so \"no detectable difference\" for a method at this "
            f"budget is no evidence of no effect")

