"""Each stage's Deck page shows that stage's own numbers (what a person reads in the Flyte console)."""

from qloraflow.reports import deploy_html, line_chart_svg, merge_html, tokenize_html, train_html


def test_training_page_has_both_curves_and_the_speed():
    history = [{"step": 1, "loss": 3.0, "learning_rate": 1e-4}, {"step": 2, "loss": 2.0, "learning_rate": 2e-4},
               {"step": 2, "eval_loss": 2.5}]
    page = train_html({"global_step": 2, "tokens_per_s": 1234.5, "peak_memory_gib": 7.5}, history)
    assert page.count("<polyline") == 3  # train loss, eval loss, learning rate
    assert "1234" in page and "7.5" in page and "eval loss" in page


def test_a_chart_without_points_says_so():
    assert "no points" in line_chart_svg({"loss": []}, "loss")


def test_tokenize_page_is_a_table_per_split_with_the_masking_method():
    page = tokenize_html({"splits": {"train": {"rows": 3, "tokens": 900, "packing_efficiency": 0.97}},
                          "masking": {"method": "per_turn", "why": "history re-rendered"}})
    assert "<td>train</td>" in page and "0.97" in page and "per_turn" in page


def test_merge_page_shows_the_check_against_its_rounding_floor():
    info = {"bytes": 10, "dtype": "bfloat16", "verify": {"kl_bound": 3.4e-4, "weights": {"worst_ulps": 0.5},
                                                          "outputs": {"mean_kl": 7.7e-5}, "rounding": {"mean_kl": 8.6e-5}},
            "metrics": {"exact_match": 0.8}}
    page = merge_html(info)
    assert "0.00034" in page and "7.7e-05" in page and "8.6e-05" in page and "one more rounding" in page


def test_deploy_page_gives_latency_percentiles_or_says_it_was_skipped():
    page = deploy_html({"passed": True, "latency": {"chat_s": [0.1, 0.2, 0.3, 0.4], "ttft_s": 0.05},
                        "hf_agreement": {"share": 1.0}, "chat_answers": ["SELECT 1"]})
    assert "chat_s p50" in page and "chat_s p95" in page and "SELECT 1" in page and "passed" in page
    assert "skipped" in deploy_html({"skipped": "serve.enabled is false"})
