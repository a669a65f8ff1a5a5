"""Each stage's Deck page shows that stage's own numbers (what a person reads in the Flyte console)."""

from qloraflow.reports import deploy_html, latency_percentiles, line_chart_svg, merge_html, tokenize_html, train_html
from qloraflow.tokenize import length_summary


def test_training_page_has_both_curves_and_the_speed():
    history = [{"step": 1, "loss": 3.0, "learning_rate": 1e-4}, {"step": 2, "loss": 2.0, "learning_rate": 2e-4},
               {"step": 2, "eval_loss": 2.5}]
    page = train_html({"global_step": 2, "tokens_per_s": 1234.5, "cpu_max_rss_gib": 7.5}, history)
    assert page.count("<polyline") == 3  # train loss, eval loss, learning rate
    assert "1234" in page and "7.5" in page and "eval loss" in page


def test_a_chart_without_points_says_so():
    assert "no points" in line_chart_svg({"loss": []}, "loss")


def test_tokenize_page_is_a_table_per_split_with_the_masking_method():
    page = tokenize_html({"splits": {"train": {"rows": 3, "tokens": 900, "packing_efficiency": 0.97}},
                          "masking": {"method": "per_turn", "why": "history re-rendered"}})
    assert "<td>train</td>" in page and "0.97" in page and "per_turn" in page


def test_tokenize_page_has_a_length_histogram_per_split_not_a_json_dump():
    lengths = length_summary([10, 12, 30, 128, 128], sequence_len=128, bins=4)
    assert lengths["length_histogram"] == {"edges": [0, 32, 64, 96, 128], "counts": [3, 0, 0, 2]}
    assert (lengths["length_p50"], lengths["length_max"]) == (30, 128)
    page = tokenize_html({"splits": {"train": {"rows": 5, "truncated": 2, "packing_efficiency": 0.9, **lengths}}})
    assert page.count("<rect") == 4 and "<td>2</td>" in page and "{" not in page


def test_merge_page_shows_the_check_against_its_rounding_floor():
    info = {"bytes": 10, "dtype": "bfloat16", "verify": {"kl_bound": 3.4e-4, "weights": {"worst_ulps": 0.5},
                                                          "outputs": {"mean_kl": 7.7e-5}, "rounding": {"mean_kl": 8.6e-5}},
            "metrics": {"exact_match": 0.8}}
    page = merge_html(info)
    assert "0.00034" in page and "7.7e-05" in page and "8.6e-05" in page and "one more rounding" in page


def test_deploy_page_gives_latency_percentiles_or_says_it_was_skipped():
    page = deploy_html({"passed": True, "latency": {"chat_s": [0.1, 0.2, 0.3, 0.4], "ttft_s": 0.05},
                        "hf_agreement": {"share": 1.0}, "chat_answers": ["SELECT 1"]})
    assert "chat_p50_s" in page and "chat_p95_s" in page and "SELECT 1" in page and "passed" in page
    assert latency_percentiles({"chat_s": [0.4, 0.1, 0.3, 0.2], "ttft_s": 0.05}) == {
        "chat_p50_s": 0.3, "chat_p95_s": 0.4, "chat_requests": 4, "ttft_s": 0.05}
    assert "skipped" in deploy_html({"skipped": "serve.enabled is false"})
