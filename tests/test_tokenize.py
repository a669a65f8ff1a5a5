"""Tokenization: labels decode to exactly the assistant content plus EOS; packing is exact."""

from __future__ import annotations

import copy

import pytest
import torch

from qloraflow.config import TokenizeConfig
from qloraflow.errors import TemplateError
from qloraflow.tokenize import (EXAMPLE_START, IGNORE_INDEX, TEMPLATES, apply_length_policy, encode_records,
                                ensure_pad_token, pack_rows, resolve_chat_template, tokenize_dataset, unpack_examples)

ALPACA = {"format": "alpaca", "messages": [
    {"role": "user", "content": "how many customers live in Paris?"},
    {"role": "assistant", "content": "SELECT COUNT(*) FROM customers WHERE city = 'Paris';"}]}
SHAREGPT = {"format": "sharegpt", "messages": [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Translate to French: good morning"},
    {"role": "assistant", "content": "bonjour"}]}
MULTI = {"format": "messages", "messages": [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Tell me a joke about cats."},
    {"role": "assistant", "content": "Cats are purrfect."},
    {"role": "user", "content": "Translate to French: good morning"},
    {"role": "assistant", "content": "bonjour"}]}
# ChatML that, like Qwen3, drops the <think> reasoning of assistant turns before the last one.
DROPS_OLD_REASONING = (
    "{% for m in messages %}{% set c = m['content'] %}"
    "{% if m['role'] == 'assistant' and not loop.last %}{% set c = c.split('</think>')[-1].lstrip() %}{% endif %}"
    "{{ '<|im_start|>' + m['role'] + '\n' + c + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
THINKING = {"format": "messages", "messages": [
    {"role": "user", "content": "Tell me a joke about cats."},
    {"role": "assistant", "content": "<think>cats purr</think>Cats are purrfect."},
    {"role": "user", "content": "Translate to French: good morning"},
    {"role": "assistant", "content": "bonjour"}]}


def trained_spans(row, tok):
    """Decode each run of trained tokens separately."""
    spans, cur = [], []
    for t, l in zip(row["input_ids"], row["labels"]):
        if l != IGNORE_INDEX:
            assert l == t
            cur.append(t)
        elif cur:
            spans.append(tok.decode(cur))
            cur = []
    if cur:
        spans.append(tok.decode(cur))
    return spans


@pytest.mark.parametrize("name", [None, "chatml", "alpaca", "llama-3"])
@pytest.mark.parametrize("record", [ALPACA, SHAREGPT, MULTI], ids=["alpaca", "sharegpt", "multi-turn"])
def test_labels_are_exactly_assistant_content_plus_eos(tiny_tokenizer, name, record):
    tok = copy.deepcopy(tiny_tokenizer)
    template = resolve_chat_template(tok, name)
    (row,) = encode_records([record], tok, template, "completions")
    answers = [m["content"] for m in record["messages"] if m["role"] == "assistant"]
    eos = tok.eos_token
    end_marker = {None: eos, "chatml": "<|im_end|>", "alpaca": eos, "llama-3": "<|eot_id|>"}[name]
    expected = [a + end_marker for a in answers]
    if end_marker != eos:  # the template ends turns with its own marker: EOS is taught once, at the end
        expected[-1] += eos
    assert trained_spans(row, tok) == expected
    # and nothing of the prompt, system or user turns is trained
    for m in record["messages"]:
        if m["role"] != "assistant":
            assert all(m["content"] not in span for span in trained_spans(row, tok))


def test_train_on_all_trains_every_token_but_the_first(tiny_tokenizer):
    (row,) = encode_records([MULTI], tiny_tokenizer, TEMPLATES["chatml"], "all")
    assert row["labels"][0] == IGNORE_INDEX
    assert row["labels"][1:] == row["input_ids"][1:]


def test_completion_records_train_raw_text_and_eos(tiny_tokenizer):
    rec = {"format": "completion", "messages": [{"role": "assistant", "content": "bonjour Paris"}]}
    (row,) = encode_records([rec], tiny_tokenizer, TEMPLATES["chatml"], "completions")
    assert tiny_tokenizer.decode(row["input_ids"]) == tiny_tokenizer.bos_token + "bonjour Paris" + tiny_tokenizer.eos_token
    assert trained_spans(row, tiny_tokenizer) == ["bonjour Paris" + tiny_tokenizer.eos_token]


def test_missing_template_is_a_clear_error(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = None
    with pytest.raises(TemplateError, match="set 'tokenize.chat_template' to one of"):
        resolve_chat_template(tok, None, "models/base")
    assert resolve_chat_template(tok, "alpaca") == TEMPLATES["alpaca"]


def test_missing_pad_token_gets_a_safe_default_and_eos_stays_trained(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.pad_token = None
    note = ensure_pad_token(tok)
    assert note and "pad" in note and tok.pad_token is not None
    (row,) = encode_records([ALPACA], tok, TEMPLATES["chatml"], "completions")
    trained = [l for l in row["labels"] if l != IGNORE_INDEX]
    assert trained[-1] == tok.eos_token_id  # EOS trained even if pad == eos: masks are by position
    assert ensure_pad_token(tok) is None


def test_length_policy_counts_truncated_dropped_and_all_masked():
    rows = [{"input_ids": list(range(10)), "labels": [IGNORE_INDEX] * 5 + list(range(5, 10))},
            {"input_ids": list(range(4)), "labels": [IGNORE_INDEX] * 4},
            {"input_ids": list(range(20)), "labels": [IGNORE_INDEX] * 10 + list(range(10, 20))}]
    kept, counts = apply_length_policy(copy.deepcopy(rows), 12, "truncate")
    assert counts == {"truncated": 1, "dropped_overlong": 0, "dropped_all_masked": 1}
    assert [len(r["input_ids"]) for r in kept] == [10, 12]
    kept, counts = apply_length_policy(copy.deepcopy(rows), 10, "truncate")  # truncation removes every label
    assert counts == {"truncated": 1, "dropped_overlong": 0, "dropped_all_masked": 2}
    kept, counts = apply_length_policy(copy.deepcopy(rows), 12, "drop")
    assert counts == {"truncated": 0, "dropped_overlong": 1, "dropped_all_masked": 1}


def test_packing_keeps_every_token_and_restarts_positions():
    rows = [{"input_ids": [i] * n, "labels": [i] * n} for i, n in enumerate([5, 3, 7, 2, 6, 1], start=1)]
    packed = pack_rows(rows, 8)
    assert all(len(p["input_ids"]) <= 8 for p in packed)
    assert sorted(t for p in packed for t in p["input_ids"]) == sorted(t for r in rows for t in r["input_ids"])
    for p in packed:
        starts = [i for i, pos in enumerate(p["position_ids"]) if pos == 0]
        assert starts[0] == 0 and all(p["input_ids"][s] != p["input_ids"][s - 1] for s in starts[1:])
    assert len(packed) == 3  # 24 tokens in bins of 8: first-fit-decreasing is optimal here


def test_packed_and_unpacked_batches_give_the_same_loss(tiny_tokenizer, tiny_model_dir):
    """Same examples, same loss: proves no attention crosses example boundaries when packed."""
    from transformers import AutoModelForCausalLM

    from qloraflow.train import Collator

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    rows = encode_records([ALPACA, SHAREGPT, MULTI], tiny_tokenizer, TEMPLATES["chatml"], "completions")
    packed = pack_rows(rows, 512)
    assert len(packed) == 1
    unpacked = Collator(tiny_tokenizer.pad_token_id, padding_free=False)(rows)
    flat = Collator(tiny_tokenizer.pad_token_id, padding_free=True)(packed)
    # Training runs without a KV cache (the trainer sets use_cache=False); transformers only reads packed
    # boundaries from position_ids then, so the test does the same.
    with torch.no_grad():
        loss_unpacked = model(**unpacked, use_cache=False).loss
        loss_packed = model(**flat, use_cache=False).loss
        # without position resets the examples would see each other, and the loss would differ
        leaky = dict(flat, position_ids=torch.arange(flat["input_ids"].shape[1])[None])
        loss_leaky = model(**leaky, use_cache=False).loss
    assert torch.allclose(loss_packed, loss_unpacked, atol=1e-5), (loss_packed, loss_unpacked)
    assert not torch.allclose(loss_leaky, loss_unpacked, atol=1e-3)


def test_collator_boundaries_are_the_examples_of_the_packed_row():
    """The host-side boundaries equal what position_ids say, in transformers' and in Unsloth's names."""
    from qloraflow.train import Collator

    rows = [{"input_ids": [5] * 7, "labels": [5] * 7, "position_ids": [0, 1, 2, 0, 1, 0, 1]},
            {"input_ids": [6] * 4, "labels": [6] * 4, "position_ids": [0, 1, 2, 3]}]
    flash = Collator(0, padding_free=True, boundaries="flash")(rows)
    assert flash["cu_seq_lens_q"].tolist() == flash["cu_seq_lens_k"].tolist() == [0, 3, 5, 7, 11]
    assert flash["cu_seq_lens_q"].dtype == torch.int32 and flash["max_length_q"] == flash["max_length_k"] == 4
    unsloth = Collator(0, padding_free=True, boundaries="unsloth")(rows)
    assert unsloth["packed_seq_lengths"].tolist() == [3, 2, 2, 4] and "cu_seq_lens_q" not in unsloth
    plain = Collator(0, padding_free=True)(rows)
    assert set(plain) == {"input_ids", "labels", "position_ids"}
    for batch in (flash, unsloth):
        assert all(torch.equal(batch[k], plain[k]) for k in plain)


def test_a_template_that_rewrites_history_trains_each_turn_in_its_own_example(tiny_tokenizer):
    (plain,) = encode_records([MULTI], tiny_tokenizer, DROPS_OLD_REASONING, "completions")
    assert EXAMPLE_START not in plain["labels"]  # no reasoning: the template appends, one example
    (row,) = encode_records([THINKING], tiny_tokenizer, DROPS_OLD_REASONING, "completions")
    assert row["labels"].count(EXAMPLE_START) == 2 and row["labels"][0] == EXAMPLE_START
    examples, counts = unpack_examples([plain, row])
    assert counts == {"per_turn_records": 1, "per_turn_examples": 2} and examples[0] is plain
    first, second = examples[1:]
    assert all(r["labels"][0] == IGNORE_INDEX and EXAMPLE_START not in r["labels"] for r in (first, second))
    assert trained_spans(first, tiny_tokenizer) == ["<think>cats purr</think>Cats are purrfect.<|im_end|>"]
    assert trained_spans(second, tiny_tokenizer) == ["bonjour<|im_end|>"]
    assert tiny_tokenizer.decode(second["input_ids"]) == tiny_tokenizer.apply_chat_template(
        THINKING["messages"], chat_template=DROPS_OLD_REASONING, tokenize=False)  # history without reasoning
    # train_on: all has no masks to get wrong: the conversation rendered whole, one example
    (whole,) = encode_records([THINKING], tiny_tokenizer, DROPS_OLD_REASONING, "all")
    assert EXAMPLE_START not in whole["labels"] and whole["labels"][1:] == whole["input_ids"][1:]


def test_the_report_records_the_masking_method_per_dataset(tiny_model_dir, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    message = pa.struct([("role", pa.string()), ("content", pa.string())])
    schema = pa.schema([("id", pa.string()), ("source", pa.string()), ("format", pa.string()),
                        ("messages", pa.list_(message))])
    rows = [{"id": str(i), "source": f"train.jsonl:{i + 1}", **r} for i, r in enumerate([MULTI, THINKING, ALPACA])]
    (tmp_path / "data").mkdir()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp_path / "data" / "train.parquet")
    report = tokenize_dataset(TokenizeConfig(sequence_len=256), tmp_path / "data", tiny_model_dir, tmp_path / "tok")
    assert report["masking"]["method"] == "append" and "continuation" in report["masking"]["why"]
    assert report["splits"]["train"]["per_turn_records"] == 0
