"""The promotion gate on constructed answer sets, against a real MLflow server on 127.0.0.1.

Candidate, base and champion answer the same 100 test records (matched by record id). The answer
sets are built so that the candidate is significantly better than the champion, better by point
estimate only, or worse; the gate's interval and p-value are checked against scipy's exact binomial
test (McNemar) and against a written-out paired bootstrap. The decision must reach the version's
tags, the summary text and the Deck section in the same numbers.
"""

from __future__ import annotations

import uuid

import numpy as np
import pytest

from qloraflow import registry
from qloraflow.comparison import gate_html
from qloraflow.tracking import MlflowTracker

scipy_stats = pytest.importorskip("scipy.stats")

N = 100
IDS = [f"rec{k:03d}" for k in range(N)]


def answers(right: set[int]) -> dict[str, float]:
    """0/1 verdicts per record id: 1 on the records in ``right``."""
    return {rid: float(k in right) for k, rid in enumerate(IDS)}


BASE = answers(set(range(20)))  # 0.20
CHAMPION = answers(set(range(80)))  # 0.80
# Against the champion: 15 wins and no loss (0.95); 6 wins, 2 losses (0.84); 2 wins, 6 losses (0.76).
SIGNIFICANT = answers(set(range(95)))
POINT_ONLY = answers(set(range(2, 86)))
WORSE = answers(set(range(6, 82)))


def register(uri: str, name: str, verdicts: dict[str, float], tmp, metric: str = "exact_match") -> str:  # noqa: ANN001
    """A version whose run keeps its per-record verdicts, as the register task stores them."""
    tracker = MlflowTracker("gate-tests", uri, run_name=f"{name}-{uuid.uuid4().hex[:4]}", fallback_dir=str(tmp))
    doc = registry.verdicts_document({rid: {"scores": {metric: v}} for rid, v in verdicts.items()}, "k")
    tracker.log_dict(doc, "gate/verdicts.json")
    tracker.close()
    mean = sum(verdicts.values()) / len(verdicts)
    return registry.register_model(registry.client_for(uri), name, f"runs:/{tracker.run_id}/gate", tracker.run_id,
                                   {f"metric.{metric}": mean, "eval_key": "k",
                                    registry.VERDICTS_TAG: f"runs:/{tracker.run_id}/gate/verdicts.json"})


def gate(client, name: str, version: str, verdicts: dict[str, float], confidence: float = 0.95) -> dict:  # noqa: ANN001
    """The register task's call: promote, then the decision's tags on the version."""
    mean = sum(verdicts.values()) / len(verdicts)
    decision = registry.promote(client, name, version, {"exact_match": mean}, {"exact_match": 0.2}, "exact_match",
                                0.0, True, verdicts=verdicts, base_verdicts=BASE, confidence=confidence)
    for key, value in registry.decision_tags(decision).items():
        client.set_model_version_tag(name, version, key, value)
    return decision


def mcnemar_reference(a: dict[str, float], b: dict[str, float], confidence: float) -> tuple[float, float, float]:
    """scipy's exact binomial test on the discordant records: (lower, upper, p) of the accuracy difference."""
    wins = sum(a[i] > b[i] for i in a)
    losses = sum(a[i] < b[i] for i in a)
    m = wins + losses
    test = scipy_stats.binomtest(wins, m, 0.5)
    ci = test.proportion_ci(confidence_level=confidence, method="exact")
    return m * (2 * ci.low - 1) / len(a), m * (2 * ci.high - 1) / len(a), test.pvalue


@pytest.fixture(scope="module")
def gated(mlflow_server, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gate")
    name = f"gate-{uuid.uuid4().hex[:6]}"
    client = registry.client_for(mlflow_server)
    v1 = register(mlflow_server, name, CHAMPION, tmp)
    first = gate(client, name, v1, CHAMPION)
    out = {"client": client, "name": name, "v1": v1, "first": first}
    for case, verdicts in (("point_only", POINT_ONLY), ("worse", WORSE), ("significant", SIGNIFICANT)):
        version = register(mlflow_server, name, verdicts, tmp)
        out[case] = (version, gate(client, name, version, verdicts), registry.champion(client, name).version)
    return out


def test_the_first_version_beats_the_base_significantly_and_is_promoted(gated):
    d = gated["first"]
    assert d["promoted"] and d["champion"] == gated["v1"]
    assert d["tests"]["base"]["source"] == "paired by record id" and d["tests"]["base"]["lower"] > 0


def test_better_by_point_estimate_only_is_registered_not_promoted_and_says_why(gated):
    version, d, champion_after = gated["point_only"]
    vs = d["tests"]["champion"]
    assert (vs["wins"], vs["losses"], vs["n"]) == (6, 2, N)
    assert vs["difference"] == pytest.approx(0.04) and vs["lower"] < 0 < vs["upper"]
    assert not d["promoted"] and champion_after == gated["v1"]
    assert "point estimate only" in d["reason"] and "not significantly" in d["reason"]
    assert d["tests"]["base"]["passed"]  # it does beat the base: the champion is what holds it back
    versions = [v["version"] for v in registry.list_versions(gated["client"], gated["name"])]
    assert version in versions  # registered all the same


def test_worse_is_not_promoted(gated):
    _, d, champion_after = gated["worse"]
    assert not d["promoted"] and champion_after == gated["v1"]
    assert d["tests"]["champion"]["difference"] == pytest.approx(-0.04)
    assert "does not beat champion" in d["reason"] and "point estimate only" not in d["reason"]


def test_significantly_better_is_promoted(gated):
    version, d, champion_after = gated["significant"]
    vs = d["tests"]["champion"]
    assert d["promoted"] and champion_after == version
    assert (vs["wins"], vs["losses"]) == (15, 0) and vs["lower"] > 0 and vs["p_value"] < 0.001
    assert vs["source"] == "paired by record id"  # the champion's stored verdicts, read from its run


@pytest.mark.parametrize("case", ["point_only", "worse", "significant"])
def test_interval_and_p_value_match_scipys_exact_binomial(gated, case):
    verdicts = {"point_only": POINT_ONLY, "worse": WORSE, "significant": SIGNIFICANT}[case]
    vs = gated[case][1]["tests"]["champion"]
    lower, upper, p = mcnemar_reference(verdicts, CHAMPION, 0.95)
    assert (vs["lower"], vs["upper"], vs["p_value"]) == pytest.approx((lower, upper, p), abs=1e-9)
    assert vs["method"] == "mcnemar_exact" and vs["confidence"] == 0.95


def test_the_confidence_level_changes_the_interval():
    from qloraflow.paired import paired_test

    wide = paired_test(POINT_ONLY, CHAMPION, binary=True, confidence=0.99)
    narrow = paired_test(POINT_ONLY, CHAMPION, binary=True, confidence=0.5)
    assert wide.lower < narrow.lower < 0.04 < narrow.upper < wide.upper
    assert (narrow.lower, narrow.upper) == pytest.approx(mcnemar_reference(POINT_ONLY, CHAMPION, 0.5)[:2], abs=1e-9)


def test_the_decision_reaches_the_version_tags_summary_and_deck(gated):
    from tasks.register import _gate_lines

    client, name = gated["client"], gated["name"]
    version, d, _ = gated["point_only"]
    tags = client.get_model_version(name, version).tags
    vs = d["tests"]["champion"]
    assert tags["gate.promoted"] == "False" and "point estimate only" in tags["gate.reason"]
    for key in ("difference", "lower", "upper", "p_value", "n", "confidence", "method"):
        assert tags[f"gate.vs_champion.{key}"] == str(vs[key]), key
    line = next(x for x in _gate_lines(d["tests"]) if "vs champion" in x)
    assert f"[{vs['lower']:+.4f}, {vs['upper']:+.4f}] at 95%" in line and f"n={N}" in line and "NOT passed" in line
    page = gate_html(d, "exact_match")
    assert "not promoted" in page and "point estimate only" in page
    assert f"{vs['lower']:.4g}" in page and f"{vs['p_value']:.4g}" in page and f"<td>{N}</td>" in page


def test_paired_bootstrap_matches_a_written_out_reference_and_scipys():
    """A continuous metric: the gate's percentile interval is the same resampling written out here, and
    within resampling noise of ``scipy.stats.bootstrap``'s percentile interval."""
    from qloraflow.paired import paired_test

    rng = np.random.default_rng(3)
    b = {rid: float(v) for rid, v in zip(IDS, rng.uniform(0.3, 0.9, N))}
    a = {rid: min(1.0, b[rid] + float(e)) for rid, e in zip(IDS, rng.normal(0.03, 0.08, N))}
    test = paired_test(a, b, binary=False, confidence=0.9, resamples=4000, seed=11)

    d = np.array([a[i] - b[i] for i in IDS])
    draw = np.random.default_rng(11)
    means = np.array([d[draw.integers(0, N, size=N)].mean() for _ in range(4000)])
    lower, upper = np.quantile(means, [0.05, 0.95])
    p = min(1.0, 2 * min(np.mean(means <= 0), np.mean(means >= 0)))
    assert (test.lower, test.upper, test.p_value) == pytest.approx((lower, upper, p), abs=1e-12)
    assert test.difference == pytest.approx(d.mean())

    ref = scipy_stats.bootstrap((d,), np.mean, confidence_level=0.9, n_resamples=20000, method="percentile",
                                random_state=np.random.default_rng(5)).confidence_interval
    assert (test.lower, test.upper) == pytest.approx((ref.low, ref.high), abs=0.004)


def test_bootstrap_gate_promotes_only_a_significant_continuous_gain(mlflow_server, tmp_path):
    """rouge_l (continuous): a clear gain over the champion promotes, a gain inside the noise does not."""
    name = f"gate-rouge-{uuid.uuid4().hex[:6]}"
    client = registry.client_for(mlflow_server)
    rng = np.random.default_rng(0)
    champ = {rid: float(v) for rid, v in zip(IDS, rng.uniform(0.4, 0.6, N))}
    base = {rid: v - 0.3 for rid, v in champ.items()}
    noise = rng.normal(0, 0.1, N)
    noisy = {rid: v + float(e) for (rid, v), e in zip(champ.items(), noise - noise.mean() + 0.01)}  # +0.01 on average
    clear = {rid: v + 0.05 + float(e) for (rid, v), e in zip(champ.items(), rng.normal(0, 0.02, N))}
    mean = lambda x: sum(x.values()) / N  # noqa: E731

    def run(verdicts: dict[str, float]) -> dict:  # the champion's verdicts: the ones stored with it
        version = register(mlflow_server, name, verdicts, tmp_path, metric="rouge_l")
        return registry.promote(client, name, version, {"rouge_l": mean(verdicts)}, {"rouge_l": mean(base)},
                                "rouge_l", 0.0, True, verdicts=verdicts, base_verdicts=base, confidence=0.95)

    assert run(champ)["promoted"]
    d = run(noisy)
    assert mean(noisy) > mean(champ) and not d["promoted"], d["reason"]
    assert d["tests"]["champion"]["method"] == "paired_bootstrap" and d["tests"]["champion"]["lower"] < 0
    d = run(clear)
    assert d["promoted"] and d["tests"]["champion"]["lower"] > 0
