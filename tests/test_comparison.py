"""What a person reads of an evaluation: one axis per metric, the samples table with verdicts, the page."""

from __future__ import annotations

import json

from PIL import Image

from qloraflow.comparison import comparison_figure, comparison_png, evaluation_html, samples_table

RESULTS = {"base": {"heldout_loss": 13.29, "exact_match": 0.0, "eos_rate": 0.1},
           "candidate": {"heldout_loss": 0.41, "exact_match": 0.8, "eos_rate": 1.0},
           "merged": {"heldout_loss": 0.42, "exact_match": 0.8, "eos_rate": 1.0}, "champion": {}}


def _sample(i: str, answer: str, reference: str = "SELECT 1;") -> dict:
    return {"id": i, "meta": {}, "messages": [{"role": "system", "content": "be brief"},
                                              {"role": "user", "content": f"question {i}?"}],
            "prompt": f"<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nquestion {i}?<|im_end|>",
            "reference": reference, "answer": answer, "ended_with_eos": True}


def test_each_metric_has_its_own_axis_and_nothing_is_clipped(tmp_path):
    fig = comparison_figure(RESULTS)
    assert [ax.get_title() for ax in fig.axes] == ["eos_rate", "exact_match", "heldout_loss"]
    loss = fig.axes[2]
    assert loss.get_ylim()[1] > 13.29  # on a fixed 0-1 axis the base's loss was cut off
    assert [t.get_text() for t in loss.get_xticklabels()] == ["base", "candidate", "merged"]  # no champion yet
    assert "13.3" in [t.get_text() for t in loss.texts]  # every bar carries its value
    path = comparison_png(RESULTS, tmp_path / "c.png")
    meta = json.loads(Image.open(path).text["Description"])
    assert meta == {"metrics": ["eos_rate", "exact_match", "heldout_loss"],
                    "models": ["base", "candidate", "merged"], "axes": 3}


def test_samples_table_has_the_question_reference_answers_and_a_verdict_per_model():
    samples = {"candidate": [_sample("a", "SELECT  1"), _sample("b", "SELECT 2")],
               "base": [_sample("b", "nope"), _sample("a", "SELECT 1;")]}  # another order: matched by id
    table = samples_table(samples)
    assert list(table) == ["id", "question", "reference", "base answer", "base verdict",
                           "candidate answer", "candidate verdict"]
    assert table["id"] == ["b", "a"] and table["question"] == ["question b?", "question a?"]  # not the template
    assert table["base answer"] == ["nope", "SELECT 1;"]
    assert table["base verdict"] == ["mismatch", "match"]
    assert table["candidate verdict"] == ["mismatch", "match"]  # whitespace and the final ';' folded


def test_evaluation_page_wraps_and_scrolls_inside_the_samples_box():
    table = samples_table({"base": [_sample(str(i), "x" * 2000) for i in range(3)]})
    page = evaluation_html(RESULTS, table, b"\x89PNG")
    assert "data:image/png;base64," in page and "overflow: auto" in page and "table-layout: fixed" in page
    assert "overflow-wrap: anywhere" in page and 'class="mismatch"' in page and "question 0?" in page
