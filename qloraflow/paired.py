"""Two models on the same test records, matched by record id: the answers lined up, and the paired tests.

Every stage that compares answers (evaluation rows, merge's check, vLLM against Hugging Face, the
promotion gate) keys them by the record id given at ingest (``qloraflow.data.record_id``), never by
list position: a shuffled or shortened side is then matched correctly or refused by name::

    from qloraflow.paired import match_ids, paired_test
    ids = match_ids(candidate, champion, "candidate", "champion")   # raises naming a missing id
    test = paired_test(candidate, champion, binary=True, confidence=0.95)
    test.lower > margin   # the gate's rule

The paired tests, on per-record scores ``a[id]`` (candidate) and ``b[id]`` (the other model):

- **0/1 scores** (exact match, execution accuracy): McNemar's exact test. Only discordant records
  tell the models apart: ``wins`` (a right, b wrong) and ``losses``; given their number
  ``m = wins + losses``, ``wins ~ Binomial(m, p)`` and ``p = 1/2`` when the models are equally good.
  The p-value is the two-sided exact binomial test of ``wins`` (scipy's ``binomtest``), and the
  interval of the accuracy difference ``(wins - losses) / n = m (2p - 1) / n`` maps the Clopper-Pearson
  interval of ``p`` (the exact binomial interval) through that line.
- **continuous scores** (ROUGE-L, chrF): a paired bootstrap of the mean difference: ``resamples``
  draws of ``n`` records with replacement (``numpy.random.default_rng(seed)``), the percentile
  interval, and as p-value the smallest two-sided level at which that interval excludes 0.

Both intervals are two-sided at ``confidence``; promotion asks for the lower end above the margin.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Hashable, Mapping, Optional, Sequence

from qloraflow.errors import QloraflowError

# Metrics that score each record 0 or 1 (qloraflow.evaluate.record_scores): tested with McNemar's exact
# test; the others (rouge_l, chrf) with a paired bootstrap.
BINARY_METRICS = ("exact_match", "execution_accuracy", "sql_runs", "sql_exact_match")


class RecordMismatchError(QloraflowError, ValueError):
    """Two sides of a comparison do not hold the same record ids."""


def by_id(items: Sequence[Mapping[str, Any]], what: str, key: str = "id") -> dict[str, Mapping[str, Any]]:
    """``{item[key]: item}``, refusing items without an id or with an id twice (naming them)."""
    out: dict[str, Mapping[str, Any]] = {}
    for k, item in enumerate(items):
        rid = item.get(key)
        if not rid:
            raise RecordMismatchError(f"{what}[{k}] has no record id ('{key}'); every answer must carry the id "
                                      "of its test record (qloraflow.data.record_id)")
        if rid in out:
            raise RecordMismatchError(f"{what}: record id {rid} appears twice ({what}[{k}]); answers are keyed by id")
        out[str(rid)] = item
    return out


def match_ids(left: Mapping[Hashable, Any], right: Mapping[Hashable, Any], left_name: str = "left",
              right_name: str = "right") -> list[Hashable]:
    """The record ids of two keyed answer sets, in ``left``'s order, when both hold exactly the same ids.

    Raises:
        RecordMismatchError: an id is on one side only (the first few are named), or both are empty.
    """
    only_left = [k for k in left if k not in right]
    only_right = [k for k in right if k not in left]
    if only_left or only_right:
        parts = [f"{len(ids)} record id(s) only in {name}: {', '.join(map(str, ids[:5]))}"
                 + (" ..." if len(ids) > 5 else "") for ids, name in ((only_left, left_name), (only_right, right_name)) if ids]
        raise RecordMismatchError(f"{left_name} and {right_name} must answer the same test records; " + "; ".join(parts))
    if not left:
        raise RecordMismatchError(f"{left_name} and {right_name} hold no answers to compare")
    return list(left)


# ------------------------------------------------------------------------------------------- tests

@dataclass
class PairedTest:
    """The difference ``mean(a) - mean(b)`` over the paired records, its interval and p-value."""

    method: str
    """``mcnemar_exact`` or ``paired_bootstrap``."""
    n: int
    difference: float
    lower: float
    upper: float
    p_value: float
    confidence: float
    wins: Optional[int] = None
    """McNemar: records the first model gets right and the second wrong."""
    losses: Optional[int] = None
    resamples: Optional[int] = None
    """Bootstrap: the number of resamples."""

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


def paired_test(a: Mapping[Hashable, float], b: Mapping[Hashable, float], *, binary: bool, confidence: float = 0.95,
                resamples: int = 10_000, seed: int = 0, names: tuple[str, str] = ("candidate", "reference")
                ) -> PairedTest:
    """McNemar's exact test (``binary``) or a paired bootstrap of ``a - b``, matched by record id.

    Raises:
        RecordMismatchError: the two sides do not hold the same ids.
        ValueError: ``binary`` scores that are not 0 or 1.
    """
    ids = match_ids(a, b, *names)
    x, y = [float(a[i]) for i in ids], [float(b[i]) for i in ids]
    if binary:
        bad = [i for i, u, v in zip(ids, x, y) if u not in (0.0, 1.0) or v not in (0.0, 1.0)]
        if bad:
            raise ValueError(f"McNemar's test needs 0/1 scores; record {bad[0]} has {a[bad[0]]} and {b[bad[0]]}")
        wins = sum(u > v for u, v in zip(x, y))
        losses = sum(u < v for u, v in zip(x, y))
        return mcnemar_exact(wins, losses, len(ids), confidence)
    return paired_bootstrap([u - v for u, v in zip(x, y)], confidence, resamples, seed)


def mcnemar_exact(wins: int, losses: int, n: int, confidence: float = 0.95) -> PairedTest:
    """McNemar's exact test on ``wins`` and ``losses`` among ``n`` paired records (see the module docstring)."""
    m = wins + losses
    if m == 0:  # the two models agree on every record: no evidence either way
        return PairedTest("mcnemar_exact", n, 0.0, 0.0, 0.0, 1.0, confidence, wins, losses)
    p_low, p_high = clopper_pearson(wins, m, confidence)
    return PairedTest("mcnemar_exact", n, (wins - losses) / n, m * (2 * p_low - 1) / n, m * (2 * p_high - 1) / n,
                      binomial_two_sided_p(wins, m), confidence, wins, losses)


def paired_bootstrap(differences: Sequence[float], confidence: float = 0.95, resamples: int = 10_000,
                     seed: int = 0) -> PairedTest:
    """Percentile interval of the mean of per-record differences, resampling records with replacement."""
    import numpy as np

    d = np.asarray(differences, dtype=np.float64)
    n = len(d)
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for r in range(resamples):  # one draw of n indices at a time: memory stays O(n) for any test set
        means[r] = d[rng.integers(0, n, size=n)].mean()
    alpha = 1 - confidence
    lower, upper = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    p = min(1.0, 2 * min(float(np.mean(means <= 0)), float(np.mean(means >= 0))))
    return PairedTest("paired_bootstrap", n, float(d.mean()), float(lower), float(upper), p, confidence,
                      resamples=resamples)


# --------------------------------------------------------------------- the exact binomial, without scipy

def _log_pmf(k: int, n: int, p: float) -> float:
    if p <= 0.0:
        return 0.0 if k == 0 else -math.inf
    if p >= 1.0:
        return 0.0 if k == n else -math.inf
    return (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)
            + k * math.log(p) + (n - k) * math.log1p(-p))


def binomial_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p), summed in log space (no underflow for large n)."""
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    logs = [_log_pmf(i, n, p) for i in range(k + 1)]
    top = max(logs)
    return 0.0 if top == -math.inf else min(1.0, math.exp(top) * sum(math.exp(v - top) for v in logs))


def binomial_two_sided_p(k: int, n: int) -> float:
    """The exact two-sided p-value of ``k`` successes in ``n`` trials against p = 1/2 (symmetric)."""
    return min(1.0, 2 * binomial_cdf(min(k, n - k), n, 0.5))


def clopper_pearson(k: int, n: int, confidence: float) -> tuple[float, float]:
    """The exact (Clopper-Pearson) interval of a binomial proportion, by bisection on the binomial CDF."""
    alpha = 1 - confidence

    def solve(f: Any) -> float:  # f is decreasing in p from positive to negative
        lo, hi = 0.0, 1.0
        for _ in range(200):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if f(mid) > 0 else (lo, mid)
            if hi - lo < 1e-15:
                break
        return (lo + hi) / 2

    # lower: P(X >= k | p) = alpha/2, i.e. 1 - cdf(k-1) rises with p; upper: cdf(k | p) = alpha/2 falls with p.
    lower = 0.0 if k == 0 else solve(lambda p: alpha / 2 - (1 - binomial_cdf(k - 1, n, p)))
    upper = 1.0 if k == n else solve(lambda p: binomial_cdf(k, n, p) - alpha / 2)
    return lower, upper
