"""Label masking with real tokenizers and official chat templates (Llama 3.1, Llama 3.2, Qwen3).

The Llama 3 tokenizer is built from Meta's reference files; the Qwen3 template runs on it with Qwen's
special tokens added (no Qwen3 tokenizer is on PyPI): what is under test is the template's behaviour.
Every test decodes the trained tokens and compares them with the assistant answers plus the
template's end-of-turn token; nothing of the prompt may be trained.
"""

from __future__ import annotations

import copy
import datetime
import json

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from qloraflow import assets, shard
from qloraflow.config import TokenizeConfig
from qloraflow.errors import TemplateError
from qloraflow.templates import build_llama3_tokenizer, render
from qloraflow.tokenize import (IGNORE_INDEX, encode_records, merge_tokenize_shards, tokenize_dataset, tokenize_shard,
                                unpack_examples)

pytestmark = pytest.mark.skipif(not (assets.is_fetched("llama3-tokenizer") and assets.is_fetched("llama-cpp")),
                                reason="real tokenizer assets not fetched: run `make assets-real`")

EOT, IM_END = "<|eot_id|>", "<|im_end|>"
SYSTEM = {"role": "system", "content": "You write SQLite queries."}
Q1 = {"role": "user", "content": "How many customers live in Paris?"}
A1 = {"role": "assistant", "content": "SELECT COUNT(*) FROM customers WHERE city = 'Paris';"}
Q2 = {"role": "user", "content": "And in Lyon?"}
A2 = {"role": "assistant", "content": "SELECT COUNT(*) FROM customers WHERE city = 'Lyon';"}
REASONING = "The city is a column of customers; count its rows."
A1_THINKING = {"role": "assistant", "content": f"<think>\n{REASONING}\n</think>\n\n{A1['content']}"}


def official(name: str) -> str:
    return (assets.fetch("llama-cpp") / "models" / "templates" / f"{name}.jinja").read_text()


@pytest.fixture(scope="module")
def llama3():
    """Llama 3 Instruct's tokenizer: eos <|eot_id|>."""
    return build_llama3_tokenizer(assets.fetch("llama3-tokenizer"))


@pytest.fixture(scope="module")
def qwen_tokens(llama3):
    """The Llama 3 tokenizer with Qwen's chat tokens, as Qwen3's tokenizer has them (eos <|im_end|>)."""
    from tokenizers import AddedToken

    tok = copy.deepcopy(llama3)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", IM_END]})
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ("<think>", "</think>")])
    tok.eos_token = IM_END
    return tok


def trained_spans(row: dict, tok) -> list[str]:
    """Each run of trained tokens, decoded."""
    spans, cur = [], []
    for t, label in zip(row["input_ids"], row["labels"]):
        if label >= 0:
            assert label == t
            cur.append(t)
        elif cur:
            spans.append(tok.decode(cur))
            cur = []
    return spans + ([tok.decode(cur)] if cur else [])


def examples_of(record: dict, tok, template: str) -> list[dict]:
    rows = encode_records([record], tok, template, "completions")
    assert len(rows) == 1  # one row per record: the sharded stage relies on it
    return unpack_examples(rows)[0]


def untrained_text(row: dict, tok) -> str:
    return tok.decode([t for t, label in zip(row["input_ids"], row["labels"]) if label == IGNORE_INDEX])


def write_split(data_dir, records: list[dict], split: str = "train") -> None:
    """A split as the data stage writes it."""
    message = pa.struct([("role", pa.string()), ("content", pa.string())])
    schema = pa.schema([("id", pa.string()), ("source", pa.string()), ("format", pa.string()),
                        ("messages", pa.list_(message))])
    rows = [{"id": str(i), "source": f"data/{split}.jsonl:{i + 1}", "format": "messages", **r}
            for i, r in enumerate(records)]
    data_dir.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), data_dir / f"{split}.parquet")


def base_model(path, tok, template: str):
    tok = copy.deepcopy(tok)
    tok.chat_template = template
    tok.save_pretrained(path)
    return path


def saved_rows(out_dir, split: str = "train") -> list[dict]:
    """The saved rows, cut back into their examples by position_ids."""
    rows = []
    for r in datasets.load_from_disk(str(out_dir / split)).to_list():
        starts = [i for i, p in enumerate(r["position_ids"]) if p == 0] + [len(r["input_ids"])]
        rows += [{"input_ids": r["input_ids"][a:b], "labels": r["labels"][a:b]} for a, b in zip(starts, starts[1:])]
    return rows


# ----------------------------------------------------------------------------------------------- Llama 3


def test_llama3_tokenizer_has_the_reference_vocabulary(llama3):
    assert len(llama3) == 128_256
    assert llama3.convert_tokens_to_ids(["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>",
                                         "<|reserved_special_token_245|>"]) == [128000, 128001, 128009, 128255]
    assert llama3("Hello world!", add_special_tokens=False)["input_ids"] == [9906, 1917, 0]
    assert llama3.bos_token == "<|begin_of_text|>" and llama3.eos_token == EOT


@pytest.mark.parametrize("record", [[Q1, A1], [SYSTEM, Q1, A1, Q2, A2], [SYSTEM, Q1, A1_THINKING, Q2, A2]],
                         ids=["single", "multi-turn", "reasoning"])
def test_llama31_template_trains_exactly_each_answer_and_eot(llama3, record):
    template = official("meta-llama-Llama-3.1-8B-Instruct")
    (row,) = examples_of({"messages": record}, llama3, template)
    answers = [m["content"] for m in record if m["role"] == "assistant"]
    assert trained_spans(row, llama3) == [a + EOT for a in answers]  # Llama 3.1 keeps history as it was
    assert llama3.decode(row["input_ids"]) == render(llama3, template, record, False)
    prompt = untrained_text(row, llama3)
    assert "<|start_header_id|>assistant<|end_header_id|>\n\n" in prompt and "Today Date: 26 Jul 2024" in prompt
    assert all(m["content"] in prompt for m in record if m["role"] != "assistant")


def test_llama32_template_inserts_todays_date_and_masks_exactly(llama3, tmp_path):
    template = official("meta-llama-Llama-3.2-3B-Instruct")
    record = [SYSTEM, Q1, A1, Q2, A2]
    write_split(tmp_path / "data", [{"messages": record}, {"messages": [Q1, A1]}])
    report = tokenize_dataset(TokenizeConfig(sequence_len=512), tmp_path / "data",
                              base_model(tmp_path / "base", llama3, template), tmp_path / "tok")
    assert report["masking"]["method"] == "append"
    assert any("strftime_now" in n for n in report["notes"])
    rows = saved_rows(tmp_path / "tok")
    assert sorted(trained_spans(r, llama3) for r in rows) == sorted(
        [[A1["content"] + EOT, A2["content"] + EOT], [A1["content"] + EOT]])
    today = datetime.date.today().strftime("%d %b %Y")
    assert all(f"Today Date: {today}\n\n" in untrained_text(r, llama3) for r in rows)


@pytest.mark.parametrize("instruct", [True, False], ids=["instruct-eos", "base-eos"])
def test_every_answer_ends_with_a_stop_token_of_generate_and_vllm(tmp_path, instruct):
    """The stop ids merge writes to generation_config.json (what generate and vLLM stop on) end every answer."""
    from transformers import AutoTokenizer

    from qloraflow.merge import _eos_ids

    tok = build_llama3_tokenizer(assets.fetch("llama3-tokenizer"), instruct=instruct)
    write_split(tmp_path / "data", [{"messages": [SYSTEM, Q1, A1, Q2, A2]}])
    tokenize_dataset(TokenizeConfig(sequence_len=512), tmp_path / "data",
                     base_model(tmp_path / "base", tok, official("meta-llama-Llama-3.1-8B-Instruct")), tmp_path / "tok")
    saved = AutoTokenizer.from_pretrained(tmp_path / "tok" / "tokenizer")
    stops = _eos_ids(saved, None)
    assert 128009 in stops and saved.eos_token == (EOT if instruct else "<|end_of_text|>")
    (row,) = saved_rows(tmp_path / "tok")
    spans = trained_spans(row, tok)
    # each answer ends with <|eot_id|>; the base tokenizer's own EOS is taught once, at the end
    assert spans == [A1["content"] + EOT, A2["content"] + EOT + ("" if instruct else "<|end_of_text|>")]
    ends = [i for i, (t, label) in enumerate(zip(row["input_ids"], row["labels"])) if label == 128009]
    assert len(ends) == 2 and all(row["input_ids"][i] in stops for i in ends)


# ----------------------------------------------------------------------------------------------- Qwen3


def test_qwen3_single_turn_trains_the_answer_and_im_end(qwen_tokens):
    template = official("Qwen-Qwen3-0.6B")
    (row,) = examples_of({"messages": [SYSTEM, Q1, A1]}, qwen_tokens, template)
    assert trained_spans(row, qwen_tokens) == [A1["content"] + IM_END]
    # the prompt is what a server renders, then the template's empty think block (context, not trained)
    prompt = render(qwen_tokens, template, [SYSTEM, Q1], True)
    assert untrained_text(row, qwen_tokens).startswith(prompt + "<think>\n\n</think>\n\n")


@pytest.mark.parametrize("first", [A1, A1_THINKING], ids=["plain", "earlier-turn-reasoning"])
def test_qwen3_multi_turn_is_one_example_per_assistant_turn(qwen_tokens, first):
    """Qwen3 drops earlier turns' reasoning from history: each turn is trained against the history it gets."""
    template = official("Qwen-Qwen3-0.6B")
    record = [SYSTEM, Q1, first, Q2, A2]
    one, two = examples_of({"messages": record, "source": "data/train.jsonl:9"}, qwen_tokens, template)

    expected_first = (f"<think>\n{REASONING}\n</think>\n\n" if first is A1_THINKING else "") + A1["content"] + IM_END
    assert trained_spans(one, qwen_tokens) == [expected_first]
    assert trained_spans(two, qwen_tokens) == [A2["content"] + IM_END]
    # each example is the conversation up to its turn, exactly as the template renders it
    assert qwen_tokens.decode(one["input_ids"]) == render(qwen_tokens, template, record[:3], False)
    assert qwen_tokens.decode(two["input_ids"]) == render(qwen_tokens, template, record, False)
    # the second example's history is the first answer as Qwen3 shows it later: no reasoning, untrained
    history = untrained_text(two, qwen_tokens)
    assert history.startswith(render(qwen_tokens, template, record[:4], True))
    assert f"<|im_start|>assistant\n{A1['content']}{IM_END}" in history and REASONING not in history


def test_qwen3_dataset_report_packing_stop_tokens_and_shards(qwen_tokens, tmp_path):
    from transformers import AutoTokenizer

    from qloraflow.merge import _eos_ids

    template = official("Qwen-Qwen3-0.6B")
    records = [{"messages": [SYSTEM, Q1, A1_THINKING, Q2, A2]}, {"messages": [Q1, A1]},
               {"messages": [Q1, A1, Q2, A2]}]
    write_split(tmp_path / "data", records)
    base = base_model(tmp_path / "base", qwen_tokens, template)
    cfg = TokenizeConfig(sequence_len=1024, packing=True)
    report = tokenize_dataset(cfg, tmp_path / "data", base, tmp_path / "tok")

    assert report["masking"]["method"] == "per_turn" and "earlier turns" in report["masking"]["why"]
    train = report["splits"]["train"]
    assert (train["examples"], train["per_turn_records"], train["per_turn_examples"]) == (3, 2, 4)
    assert train["rows"] == 1  # five examples packed into one row, each with its own position ids
    spans = sorted(s for r in saved_rows(tmp_path / "tok") for s in trained_spans(r, qwen_tokens))
    assert spans == sorted([f"<think>\n{REASONING}\n</think>\n\n{A1['content']}{IM_END}", A2["content"] + IM_END,
                            A1["content"] + IM_END, A1["content"] + IM_END, A2["content"] + IM_END])
    assert json.loads((tmp_path / "tok" / "report.json").read_text())["masking"] == report["masking"]
    stops = _eos_ids(AutoTokenizer.from_pretrained(tmp_path / "tok" / "tokenizer"), None)
    ends = [r["input_ids"][i] for r in saved_rows(tmp_path / "tok") for i in range(len(r["labels"]))
            if r["labels"][i] != IGNORE_INDEX and (i + 1 == len(r["labels"]) or r["labels"][i + 1] == IGNORE_INDEX)]
    assert len(ends) == 5 and set(ends) == {qwen_tokens.convert_tokens_to_ids(IM_END)} <= set(stops)

    plan = shard.plan_tokenize_shards(tmp_path / "data", 2)
    parts = [tokenize_shard(cfg, s, tmp_path / "data", base, tmp_path / f"part-{k}") for k, s in enumerate(plan)]
    assert len(plan) == 2
    assert merge_tokenize_shards(cfg, parts, tmp_path / "data", base, tmp_path / "sharded") == report
    assert (datasets.load_from_disk(str(tmp_path / "sharded" / "train")).to_list()
            == datasets.load_from_disk(str(tmp_path / "tok" / "train")).to_list())


# ---------------------------------------------------------------------------------------- refusals


def test_a_template_whose_generation_prompt_is_not_its_answer_start_is_refused(llama3, tmp_path):
    """DeepSeek-R1-Distill prompts with '<think>\\n' but renders answers without it: no correct mask exists."""
    write_split(tmp_path / "data", [{"messages": [Q1, A1]}])
    base = base_model(tmp_path / "base", llama3, official("deepseek-ai-DeepSeek-R1-Distill-Llama-8B"))
    with pytest.raises(TemplateError, match=r"chat template of .*base cannot be trained on.*generation prompt.*"
                                            r"Set 'tokenize.chat_template'"):
        tokenize_dataset(TokenizeConfig(), tmp_path / "data", base, tmp_path / "tok")


def test_a_record_whose_reasoning_the_template_drops_is_refused_naming_the_record(qwen_tokens):
    # ChatML that, like DeepSeek-R1's templates, strips <think> reasoning even from the turn being trained
    drops_reasoning = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'].split('</think>')[-1].lstrip() "
        "+ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    (row,) = examples_of({"messages": [Q1, A1]}, qwen_tokens, drops_reasoning)  # plain records still train
    assert trained_spans(row, qwen_tokens) == [A1["content"] + IM_END]
    with pytest.raises(TemplateError, match=r"data/train.jsonl:4: turn 1: .*reasoning .* is dropped.*fix the record"):
        encode_records([{"messages": [Q1, A1_THINKING], "source": "data/train.jsonl:4"}], qwen_tokens,
                       drops_reasoning, "completions")


def test_a_record_the_template_renders_with_another_prompt_is_refused(llama3):
    """Mistral Nemo's template drops the system message from a conversation that ends with the assistant."""
    template = official("mistralai-Mistral-Nemo-Instruct-2407")
    (row,) = examples_of({"messages": [Q1, A1]}, llama3, template)
    assert trained_spans(row, llama3) == [A1["content"] + llama3.eos_token]
    with pytest.raises(TemplateError, match=r"data/train.jsonl:2: turn 2: the chat template's generation prompt"):
        encode_records([{"messages": [SYSTEM, Q1, A1], "source": "data/train.jsonl:2"}], llama3, template,
                       "completions")
