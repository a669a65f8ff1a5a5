"""The offline demo assets: deterministic, valid SQL, a held-out test split, exactly the planted
problems, and a tokenizer and tiny Llama that transformers loads like any Hub model."""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import sqlite3
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from qloraflow import demo, tinymodel

N_TRAIN, N_TEST, SEED = 300, 40, 7
SQL = "SELECT name, price FROM products WHERE category = 'kitchen' AND price < 42.5 ORDER BY price DESC LIMIT 3;"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return out, demo.generate_demo_assets(out, seed=SEED, n_train=N_TRAIN, n_test=N_TEST)


@pytest.fixture(scope="module")
def train_lines(assets):
    out, _ = assets
    text = (out / "data" / "train.jsonl").read_text(encoding="utf-8")
    assert text.endswith("\n")
    return text[:-1].split("\n")


def parse_lines(lines):
    """(line number, kind, record) for every line, classified independently of the generator."""
    parsed = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            parsed.append((number, "empty_lines", None))
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            parsed.append((number, "invalid_json", None))
            continue
        if "output" not in rec:
            parsed.append((number, "missing_output", rec))
        elif not isinstance(rec["output"], str):
            parsed.append((number, "non_string_output", rec))
        else:
            parsed.append((number, "valid", rec))
    return parsed


def read_test(out):
    return [json.loads(line) for line in (out / "data" / "test.jsonl").read_text().splitlines()]


def test_same_seed_gives_identical_files_and_reuses_them(assets, tmp_path, capsys):
    out, first = assets
    again = demo.generate_demo_assets(tmp_path, seed=SEED, n_train=N_TRAIN, n_test=N_TEST)
    assert not again["reused"]
    for rel in ("data/shop.sqlite", "data/schema.sql", "data/train.jsonl", "data/test.jsonl",
                "base-model/tokenizer.json", "base-model/model.safetensors", "base-model/config.json"):
        assert sha256(tmp_path / rel) == sha256(out / rel) == first["files"][rel], rel
    assert again["files"] == first["files"] and again["planted"] == first["planted"]

    # A complete folder is reused untouched; the CLI says so in one line.
    mtime = (tmp_path / "base-model" / "model.safetensors").stat().st_mtime_ns
    reused = demo.main(["--out", str(tmp_path), "--seed", str(SEED), "--n-train", str(N_TRAIN),
                        "--n-test", str(N_TEST)])
    assert reused["reused"] and (tmp_path / "base-model" / "model.safetensors").stat().st_mtime_ns == mtime
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and "reused" in lines[0] and f"{N_TRAIN} train" in lines[0]

    # A damaged file or a missing manifest means incomplete: generated again, identically.
    (tmp_path / "data" / "train.jsonl").write_text("truncated")
    fixed = demo.generate_demo_assets(tmp_path, seed=SEED, n_train=N_TRAIN, n_test=N_TEST)
    assert not fixed["reused"] and sha256(tmp_path / "data" / "train.jsonl") == first["files"]["data/train.jsonl"]
    (tmp_path / "MANIFEST.json").unlink()
    assert not demo.generate_demo_assets(tmp_path, seed=SEED, n_train=N_TRAIN, n_test=N_TEST)["reused"]

    # Another seed: other data, other weights, and the old manifest does not count.
    other = demo.generate_demo_assets(tmp_path, seed=SEED + 1, n_train=N_TRAIN, n_test=N_TEST)
    assert not other["reused"] and other["seed"] == SEED + 1
    for rel in ("data/train.jsonl", "data/shop.sqlite", "base-model/model.safetensors"):
        assert other["files"][rel] != first["files"][rel], rel


def test_every_output_runs_on_the_database(assets, train_lines):
    out, manifest = assets
    records = [r for _, kind, r in parse_lines(train_lines) if kind == "valid"] + read_test(out)
    con = sqlite3.connect(out / "data" / "shop.sqlite")
    try:
        counts = {t: con.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]
                  for t in ("customers", "products", "orders")}
        assert counts == {k: manifest["counts"][k] for k in counts}
        assert all(50 <= n <= 200 for n in counts.values())
        for rec in records:
            rows = con.execute(rec["output"]).fetchall()  # raises on invalid SQL
            assert rows and rows != [(0,)], rec  # informative answers only
    finally:
        con.close()
    assert (out / "data" / "schema.sql").read_text() == demo.SCHEMA_SQL


def test_test_split_is_held_out(assets, train_lines):
    out, _ = assets
    test = read_test(out)
    train = [r for _, kind, r in parse_lines(train_lines) if kind == "valid"]
    assert len(test) == N_TEST and all(set(r) == {"instruction", "input", "output"} and r["input"] == "" for r in test)
    assert len({(r["instruction"], r["output"]) for r in test}) == N_TEST
    assert not {(r["instruction"], r["output"]) for r in test} & {(r["instruction"], r["output"]) for r in train}
    assert not {r["instruction"] for r in test} & {r["instruction"] for r in train}


def test_planted_problems_are_exactly_what_the_file_holds(assets, train_lines):
    _, manifest = assets
    planted = manifest["planted"]
    parsed = parse_lines(train_lines)
    for kind in ("empty_lines", "invalid_json", "missing_output", "non_string_output"):
        assert [n for n, k, _ in parsed if k == kind] == planted[kind], kind
    assert [len(planted[k]) for k in ("exact_duplicates", "near_duplicates", "invalid_json", "missing_output",
                                      "non_string_output", "empty_lines")] == [5, 4, 2, 1, 1, 1]

    valid = [(n, r) for n, k, r in parsed if k == "valid"]
    first_line, exact = {}, []
    for n, r in valid:
        key = json.dumps(r, sort_keys=True)
        if key in first_line:
            exact.append({"line": n, "duplicate_of": first_line[key]})
        else:
            first_line[key] = n
    assert exact == planted["exact_duplicates"]
    unique = [(n, r) for n, r in valid if first_line[json.dumps(r, sort_keys=True)] == n]
    assert len(unique) == N_TRAIN + len(planted["near_duplicates"])
    assert len(train_lines) == manifest["counts"]["train_lines"] == N_TRAIN + manifest["counts"]["planted"]

    # Near duplicates by word 3-shingle Jaccard >= 0.8, over train and test together, on the
    # instruction alone and on the whole record: exactly the planted pairs. Templated records that
    # differ only in a value (Paris vs Lyon, 30 vs 31) stay below; those with the same numbers stay
    # at most 0.7, far enough for a MinHash estimate (std ~0.04 at 128 permutations) not to cross 0.8.
    others = [(-i, r) for i, r in enumerate(read_test(assets[0]), start=1)]  # test records: negative ids
    expected = {(p["duplicate_of"], p["line"]) for p in planted["near_duplicates"]}
    for text in (lambda r: r["instruction"], lambda r: r["instruction"] + "\n" + r["output"]):
        shingles = [(n, demo.word_shingles(text(r)), re.findall(r"\w*\d\w*", text(r))) for n, r in unique + others]
        found, closest_other = set(), 0.0
        for (na, a, digits_a), (nb, b, digits_b) in itertools.combinations(shingles, 2):
            similarity = len(a & b) / len(a | b)
            if similarity >= 0.8:
                found.add((min(na, nb), max(na, nb)))
            elif digits_a == digits_b:
                closest_other = max(closest_other, similarity)
        assert found == expected
        assert 0.5 < closest_other <= 0.7
    for p in planted["near_duplicates"]:
        orig, copy = json.loads(train_lines[p["duplicate_of"] - 1]), json.loads(train_lines[p["line"] - 1])
        assert p["duplicate_of"] < p["line"] and copy["output"] == orig["output"]
        assert copy["instruction"].split()[1:] == orig["instruction"].split()[1:]  # one word changed
        similarity = demo.jaccard(orig["instruction"], copy["instruction"])
        assert similarity == pytest.approx(p["jaccard_instruction"], abs=1e-4)
        assert p["jaccard_instruction"] >= 0.82 and p["jaccard_record"] >= 0.9


def test_tokenizer(assets):
    out, manifest = assets
    tok = AutoTokenizer.from_pretrained(out / "base-model")
    assert 2000 <= len(tok) <= 4096
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|begin_of_text|>", "<|im_end|>", "<|pad|>")
    assert tok.eos_token_id != tok.pad_token_id
    for special in tinymodel.SPECIAL_TOKENS:
        assert len(tok(special, add_special_tokens=False)["input_ids"]) == 1, special
    ids = tok(SQL, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == SQL and len(ids) < len(SQL) / 2  # merges learned, lossless
    assert tok("SELECT 1;")["input_ids"] == tok("SELECT 1;", add_special_tokens=False)["input_ids"]
    # Short enough for the CPU demo: prompt + answer under ~60 tokens.
    assert manifest["tokenizer"]["max_record_tokens"] <= 64
    longest = max(read_test(out), key=lambda r: len(r["instruction"] + r["output"]))
    assert len(tok(longest["instruction"] + longest["output"], add_special_tokens=False)["input_ids"]) <= 64


def test_chat_template_renders_chatml(assets):
    out, _ = assets
    tok = AutoTokenizer.from_pretrained(out / "base-model")
    chat = [{"role": "system", "content": "You write SQL."}, {"role": "user", "content": "count customers"}]
    prompt = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert prompt == ("<|im_start|>system\nYou write SQL.<|im_end|>\n<|im_start|>user\ncount customers<|im_end|>\n"
                      "<|im_start|>assistant\n")
    assert tok.apply_chat_template(chat, tokenize=False) == prompt[: -len("<|im_start|>assistant\n")]
    full = chat + [{"role": "assistant", "content": "SELECT COUNT(*) FROM customers;"}]
    text = tok.apply_chat_template(full, tokenize=False)
    assert text == prompt + "SELECT COUNT(*) FROM customers;<|im_end|>\n" and text.startswith(prompt)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    answer = tok("SELECT COUNT(*) FROM customers;", add_special_tokens=False)["input_ids"]
    end = ids.index(tok.eos_token_id, len(tok(prompt, add_special_tokens=False)["input_ids"]))
    assert ids[end - len(answer):end] == answer  # EOS right after the assistant content


def test_base_model_loads_in_bf16_and_runs(assets):
    out, manifest = assets
    tok = AutoTokenizer.from_pretrained(out / "base-model")
    model = AutoModelForCausalLM.from_pretrained(out / "base-model")
    cfg = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert json.loads((out / "base-model" / "config.json").read_text())["dtype"] == "bfloat16"
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.head_dim, cfg.max_position_embeddings) == (256, 4, 4, 4, 64, 512)
    assert cfg.vocab_size % 64 == 0 and len(tok) <= cfg.vocab_size < len(tok) + 64
    assert not cfg.tie_word_embeddings
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (tok.bos_token_id, tok.eos_token_id,
                                                                      tok.pad_token_id)
    gen = json.loads((out / "base-model" / "generation_config.json").read_text())
    assert (gen["eos_token_id"], gen["pad_token_id"]) == (tok.eos_token_id, tok.pad_token_id)
    assert manifest["model"]["params"] == sum(p.numel() for p in model.parameters())

    prompt = tok.apply_chat_template([{"role": "user", "content": read_test(out)[0]["instruction"]}],
                                     tokenize=False, add_generation_prompt=True)
    enc = tok(prompt, add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits
    assert logits.shape == (1, enc["input_ids"].shape[1], cfg.vocab_size)
    assert torch.isfinite(logits.float()).all()


def test_builders_make_small_reproducible_fixtures():
    corpus = [f"SELECT name FROM customers WHERE age > {n};" for n in range(200)] + ["hello world"] * 5
    tok = tinymodel.build_tokenizer(corpus, vocab_size=300)
    assert len(tok) <= 300 and tok.decode(tok("SELECT 7;", add_special_tokens=False)["input_ids"]) == "SELECT 7;"
    a = tinymodel.build_tiny_llama(tok, seed=3, num_hidden_layers=2, intermediate_size=128)
    b = tinymodel.build_tiny_llama(tok, seed=3, num_hidden_layers=2, intermediate_size=128)
    c = tinymodel.build_tiny_llama(tok, seed=4, num_hidden_layers=2, intermediate_size=128)
    assert a.config.num_hidden_layers == 2 and a.config.vocab_size == 320
    assert next(a.parameters()).dtype == torch.bfloat16
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.embed_tokens.weight"], sc["model.embed_tokens.weight"])


def test_asking_for_more_questions_than_exist_fails_clearly(tmp_path):
    with pytest.raises(ValueError, match="lower n_train"):
        demo.generate_demo_assets(tmp_path, seed=0, n_train=100_000, n_test=10)
    assert not (tmp_path / "MANIFEST.json").exists()


def test_a_folder_holding_other_files_is_left_alone(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "mine.csv").write_text("keep me")
    with pytest.raises(FileExistsError, match="mine.csv"):
        demo.generate_demo_assets(tmp_path, seed=0, n_train=50, n_test=5)
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--out", str(tmp_path)])
    assert exit_info.value.code == 2 and "another --out folder" in capsys.readouterr().err
    assert (tmp_path / "data" / "mine.csv").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["data", "mine.csv"]
