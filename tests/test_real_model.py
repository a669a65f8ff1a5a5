"""The real-model run's pieces: SmolLM2 converted from its GGUF, records that keep their identity and
metadata (a Spider ``db_id``) into the evaluation samples, and SQL scored on each record's own database."""

from __future__ import annotations

import json
import sqlite3

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from qloraflow import assets


@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory):
    """SmolLM2-135M-Instruct as an HF folder, built here from the pinned GGUF (about 25 s)."""
    from qloraflow.realmodel import smollm2_model

    if not assets.is_fetched("smollm2-gguf"):
        try:
            assets.fetch("smollm2-gguf")
        except Exception as e:  # no network and no cached copy: nothing real to test on
            pytest.skip(f"the SmolLM2 asset could not be fetched ({e}); run `python -m qloraflow.assets smollm2-gguf`")
    return smollm2_model(tmp_path_factory.mktemp("real") / "smollm2")


def test_converted_model_folder_loads_and_answers(smollm2_dir):
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qloraflow.evaluate import generate_greedy

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.bfloat16).eval()
    with safe_open(str(smollm2_dir / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert not hasattr(model.config, "quantization_config")  # a plain model: bitsandbytes and vLLM can load it
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.eos_token == "<|im_end|>" and model.generation_config.eos_token_id == end
    assert "<|im_start|>" in tokenizer.chat_template

    ids = tokenizer("The capital of France is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert tokenizer.decode(out[0, ids["input_ids"].shape[1]:]).strip().startswith("Paris")

    chat = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                         tokenize=False, add_generation_prompt=True)
    assert chat.startswith("<|im_start|>system\n") and chat.endswith("<|im_start|>assistant\n")
    gen = generate_greedy(model, tokenizer, [chat], max_new_tokens=24, batch_size=1)
    assert "Paris" in gen.answers[0] and gen.ended == [True]  # stopped at <|im_end|>, before the token limit


def test_a_complete_folder_is_not_rebuilt_and_a_damaged_one_is_not_complete(smollm2_dir):
    from qloraflow.realmodel import is_complete, smollm2_model

    weights = smollm2_dir / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert is_complete(smollm2_dir) and smollm2_model(smollm2_dir) == smollm2_dir
    assert weights.stat().st_mtime_ns == before
    config = smollm2_dir / "config.json"
    text = config.read_text()
    try:
        config.write_text(text.replace('"num_hidden_layers": 30', '"num_hidden_layers": 29'))
        assert not is_complete(smollm2_dir)  # the manifest no longer matches: a rebuild would follow
    finally:
        config.write_text(text)
    assert is_complete(smollm2_dir)


# ------------------------------------------------------------------------------ identity and metadata

SCHEMAS = {"shop": "CREATE TABLE customers (id INTEGER, name TEXT, city TEXT);"
                   "INSERT INTO customers VALUES (1, 'Ana', 'Paris'), (2, 'Ben', 'Lyon');",
           "zoo": "CREATE TABLE animals (id INTEGER, species TEXT, legs INTEGER);"}  # empty, as Spider's are


def spider_like(db_id: str, question: str, sql: str) -> dict:
    return {"instruction": f"Write a SQLite query for database {db_id}.", "input": question, "output": sql,
            "db_id": db_id}


RECORDS = [spider_like("shop", "Who lives in Paris?", "SELECT name FROM customers WHERE city = 'Paris'"),
           spider_like("zoo", "How many animals are there?", "SELECT count(*) FROM animals"),
           spider_like("zoo", "Which species have four legs?", "SELECT species FROM animals WHERE legs = 4")]


@pytest.fixture()
def databases(tmp_path):
    folder = tmp_path / "databases"
    folder.mkdir()
    for name, script in SCHEMAS.items():
        with sqlite3.connect(folder / f"{name}.sqlite") as c:
            c.executescript(script)
    return folder


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_data_stage_keeps_db_id_as_meta_outside_the_records_identity(tmp_path):
    from qloraflow.config import DataConfig
    from qloraflow.data import prepare_dataset, record_id
    from qloraflow.ingest import to_messages

    same_content_other_db = {**RECORDS[1], "db_id": "shop"}
    cfg = DataConfig(train_files=[_jsonl(tmp_path / "train.jsonl", [RECORDS[0], same_content_other_db])],
                     test_files=[_jsonl(tmp_path / "test.jsonl", RECORDS[1:])], validation_fraction=0.0)
    report = prepare_dataset(cfg, tmp_path / "out", seed=0)
    test = pq.read_table(tmp_path / "out" / "test.parquet").to_pylist()
    assert [json.loads(r["meta"]) for r in test] == [{"db_id": "zoo"}, {"db_id": "zoo"}]
    # the id is the content's: metadata changes neither it nor what counts as a duplicate
    assert [r["id"] for r in test] == [record_id(to_messages(r, "alpaca")) for r in RECORDS[1:]]
    assert report["rejected_by_reason"] == {"exact_duplicate": 1}  # the train copy with another db_id


def test_samples_carry_the_record_id_and_meta_and_sql_runs_on_each_records_database(tmp_path, databases,
                                                                                    tiny_model_dir):
    """The evaluation stage on a tiny model: every sample names its record; SQL runs on its own database."""
    from qloraflow.config import TokenizeConfig, config_from_dict
    from qloraflow.data import record_id
    from qloraflow.evaluate import evaluate_model
    from qloraflow.ingest import meta_json, to_messages
    from qloraflow.tokenize import tokenize_dataset

    data = tmp_path / "data"
    data.mkdir()
    rows = [{"id": record_id(to_messages(r, "alpaca")), "source": f"test.jsonl:{n}", "format": "alpaca",
             "messages": to_messages(r, "alpaca"), "meta": meta_json({"db_id": r["db_id"], "hardness": "easy"})}
            for n, r in enumerate(RECORDS, 1)]
    for split, part in (("train", rows[:1]), ("validation", rows[:1]), ("test", rows)):
        message = pa.struct([("role", pa.string()), ("content", pa.string())])
        schema = pa.schema([("id", pa.string()), ("source", pa.string()), ("format", pa.string()),
                            ("messages", pa.list_(message)), ("meta", pa.string())])
        pq.write_table(pa.Table.from_pylist(part, schema=schema), data / f"{split}.parquet")
    tokenize_dataset(TokenizeConfig(sequence_len=128, packing=False), data, tiny_model_dir, tmp_path / "tok")
    cfg = config_from_dict({"data": {"train_files": ["unused.jsonl"]}, "model": {"base_model": str(tiny_model_dir)},
                            "eval": {"metrics": ["exact_match", "execution_accuracy"], "sqlite_db": str(databases),
                                     "gate_metric": "execution_accuracy", "max_new_tokens": 4, "batch_size": 3}})
    result = evaluate_model(cfg, str(tiny_model_dir), data, tmp_path / "tok")
    assert [s["id"] for s in result.samples] == [r["id"] for r in rows]
    assert [s["meta"] for s in result.samples] == [{"db_id": r["db_id"], "hardness": "easy"} for r in RECORDS]
    assert [s["reference"] for s in result.samples] == [r["output"] for r in RECORDS]
    # a random 2-layer model writes no SQL that runs: every SQL metric is 0, none raised
    assert result.metrics["sql_runs"] == 0.0 and result.metrics["execution_accuracy"] == 0.0

    bad = {**json.loads(rows[2]["meta"]), "db_id": "aquarium"}
    pq.write_table(pa.Table.from_pylist([{**rows[2], "meta": json.dumps(bad)}]), data / "test.parquet")
    with pytest.raises(Exception, match="aquarium.sqlite does not exist"):  # before any generation
        evaluate_model(cfg, str(tiny_model_dir), data, tmp_path / "tok")


def test_execution_metrics_on_each_records_own_database(databases):
    """Hand-made answers, with negative controls: a wrong query scores 0, one that does not run 0 for sql_runs."""
    from qloraflow.evaluate import record_databases, score

    records = [{"id": str(n), "meta": json.dumps({"db_id": r["db_id"]})} for n, r in enumerate(RECORDS)]
    dbs = record_databases(records, str(databases), "db_id")
    assert dbs == [str(databases / f"{r['db_id']}.sqlite") for r in RECORDS]
    refs = [r["output"] for r in RECORDS]
    metrics = ["exact_match", "execution_accuracy"]

    def scored(answers: list[str], where=dbs) -> dict[str, float]:
        return score(answers, refs, [True] * 3, metrics, where)

    right = ["SELECT name FROM customers WHERE city='Paris';", "select COUNT(*) from animals",
             "SELECT species FROM animals WHERE legs = 4"]
    assert scored(right) == {"eos_rate": 1.0, "exact_match": 1 / 3, "execution_accuracy": 1.0, "sql_runs": 1.0,
                             "sql_exact_match": 2 / 3}
    wrong = ["SELECT name FROM customers WHERE city = 'Lyon'",  # runs, other rows: execution 0
             "SELECT count(*) FROM customers",  # the other database's table: does not run on zoo
             "SELECT species FROM animal WHERE legs = 4"]  # no such table
    assert scored(wrong) == {"eos_rate": 1.0, "exact_match": 0.0, "execution_accuracy": 0.0, "sql_runs": 1 / 3,
                             "sql_exact_match": 0.0}
    # one database for all (the demo's setting) would run zoo's queries on shop: they fail there
    shop = str(databases / "shop.sqlite")
    assert scored(right, shop)["sql_runs"] == 1 / 3 and scored(right, shop)["execution_accuracy"] == 1 / 3
