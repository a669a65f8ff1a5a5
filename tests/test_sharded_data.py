"""The data and tokenize stages over shards write, byte for byte, what one process writes.

Library level on the demo data (planted exact and near duplicates that fall across shard
boundaries, malformed lines), on inputs of every kind and on random JSONL; then Flyte level: the
sharded sub-workflows run locally through flytekit's map task against the single tasks.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qloraflow import data, shard, tokenize
from qloraflow.config import DataConfig, TokenizeConfig, config_from_dict
from qloraflow.data import prepare_dataset
from qloraflow.dedupe import dedupe_signatures, dedupe_texts, record_signatures
from qloraflow.demo import generate_demo_assets
from qloraflow.errors import DataValidationError
from qloraflow.ingest import read_source
from qloraflow.tokenize import tokenize_dataset

DATA_FILES = ("train.parquet", "validation.parquet", "test.parquet", "quarantine.jsonl", "report.json")


def assert_same_files(a: Path, b: Path) -> None:
    """The same files under both folders, with the same bytes."""
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files and files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f


def run_sharded(cfg: DataConfig, num_shards: int, root: Path, **options) -> tuple[list[str], dict]:
    plan = shard.plan_data_shards(cfg, num_shards)
    parts = [data.prepare_data_shard(cfg, s, root / f"part-{k}", **options) for k, s in enumerate(plan)]
    return plan, data.merge_data_shards(cfg, parts, root / "out", seed=3, **options)


def line_shards(plan: list[str], path: Path) -> dict[int, int]:
    """The shard each line of a JSONL file went to."""
    data = path.read_bytes()
    spans = [(k, *p["span"]) for k, s in enumerate(plan) for p in json.loads(s) if p["source"] == str(path)]
    starts = [0, *(m.end() for m in re.finditer(b"\n", data))]
    return {n: next(k for k, a, b in spans if a <= at < b) for n, at in enumerate(starts, 1) if at < len(data)}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    return root, generate_demo_assets(root, seed=0, n_train=600, n_test=40)


@pytest.fixture(scope="module")
def demo_cfg(demo):
    root, _ = demo
    return DataConfig(train_files=[str(root / "data/train.jsonl")], test_files=[str(root / "data/test.jsonl")],
                      validation_fraction=0.1)


@pytest.fixture(scope="module")
def prepared(demo_cfg, tmp_path_factory):
    """The demo data through the single-process data stage."""
    out = tmp_path_factory.mktemp("single")
    return out, prepare_dataset(demo_cfg, out, seed=3)


def test_sharded_data_stage_writes_what_one_process_writes(demo, demo_cfg, prepared, tmp_path):
    root, manifest = demo
    single, report = prepared
    plan, sharded_report = run_sharded(demo_cfg, 3, tmp_path)

    assert len(plan) == 3
    assert sharded_report == report
    for name in DATA_FILES:
        assert (tmp_path / "out" / name).read_bytes() == (single / name).read_bytes(), name

    # Not vacuous: the planted problems are all there, and duplicates whose original went to another
    # shard were found and point at that original.
    planted = manifest["planted"]
    assert report["dedupe"]["exact_duplicates"] == len(planted["exact_duplicates"])
    assert report["dedupe"]["near_duplicates"] == len(planted["near_duplicates"])
    assert report["rejected_by_reason"]["invalid_json"] == len(planted["invalid_json"])
    owner = line_shards(plan, root / "data/train.jsonl")
    quarantine = {q["line"]: q for q in map(json.loads, (tmp_path / "out/quarantine.jsonl").read_text().splitlines())
                  if q["source"].endswith("train.jsonl")}
    for kind, reason in (("exact_duplicates", "exact_duplicate"), ("near_duplicates", "near_duplicate")):
        crossing = [p for p in planted[kind] if owner[p["line"]] != owner[p["duplicate_of"]]]
        assert crossing, f"no planted {kind} pair falls across a shard boundary"
        for p in crossing:
            assert quarantine[p["line"]]["reason"] == reason
            assert quarantine[p["line"]]["duplicate_of"].endswith(f"train.jsonl:{p['duplicate_of']}")


def test_sharded_tokenize_stage_saves_what_one_process_saves(demo, prepared, tmp_path):
    root, _ = demo
    data_dir, _ = prepared
    cfg = TokenizeConfig(sequence_len=256, packing=True)
    single = tokenize_dataset(cfg, data_dir, root / "base-model", tmp_path / "single")

    plan = shard.plan_tokenize_shards(data_dir, 3)
    parts = [tokenize.tokenize_shard(cfg, s, data_dir, root / "base-model", tmp_path / f"part-{k}")
             for k, s in enumerate(plan)]
    sharded = tokenize.merge_tokenize_shards(cfg, parts, data_dir, root / "base-model", tmp_path / "sharded")

    assert [p["split"] for p in json.loads(plan[0])] == ["train"]  # the train split is cut between shards
    assert sharded == single
    assert single["splits"]["train"]["rows"] < single["splits"]["train"]["examples"]  # packing did pack
    assert_same_files(tmp_path / "single", tmp_path / "sharded")


def calls_during(run, *watched):
    """``run()``, and the name and arguments of each call of a ``watched`` function while it ran.

    A profile hook observes the calls; nothing is replaced, so the stage runs as it always does.
    """
    names = {fn.__code__: fn.__name__ for fn in watched}
    calls = []

    def hook(frame, event, arg):
        if event == "call" and frame.f_code in names:
            calls.append((names[frame.f_code], dict(frame.f_locals)))

    sys.setprofile(hook)
    try:
        result = run()
    finally:
        sys.setprofile(None)
    return result, calls


def test_the_one_process_stages_are_the_sharded_ones_with_one_shard(demo, demo_cfg, prepared, tmp_path):
    """One implementation: the one-process data and tokenize stages run the shard functions on one shard."""
    root, _ = demo
    single, report = prepared
    again, calls = calls_during(lambda: prepare_dataset(demo_cfg, tmp_path / "data", seed=3),
                                data.work_data_shard, data.merge_data_shards, dedupe_texts, read_source)
    assert [name for name, _ in calls] == ["work_data_shard", "merge_data_shards"]  # no other reading or dedupe
    assert [calls[0][1]["shard"]] == shard.plan_data_shards(demo_cfg, 1)
    assert calls[1][1]["parts"][0].pieces and again == report
    for name in DATA_FILES:
        assert (tmp_path / "data" / name).read_bytes() == (single / name).read_bytes(), name

    cfg = TokenizeConfig(sequence_len=256)
    _, calls = calls_during(lambda: tokenize_dataset(cfg, single, root / "base-model", tmp_path / "tok"),
                            tokenize.encode_shard, tokenize.save_splits)
    assert [name for name, _ in calls] == ["encode_shard", "save_splits"]
    assert [calls[0][1]["shard"]] == shard.plan_tokenize_shards(single, 1)

    # Negative control: the hook does see a call that takes another path (a generator: once per item).
    _, calls = calls_during(lambda: list(read_source(str(root / "data/test.jsonl"), "jsonl")), read_source)
    assert calls and {name for name, _ in calls} == {"read_source"}


@pytest.fixture
def every_kind(tmp_path):
    """Test and train inputs of every kind: JSONL of mixed formats (CRLF, BOM), CSV, Parquet, JSON, a folder."""
    alpaca = [{"instruction": f"Question number {w} about the shop database tables", "output": f"Answer {w}."}
              for w in "abcdefghij"]
    chat = [{"messages": [{"role": "user", "content": f"chat {w}"}, {"role": "assistant", "content": "ok"}]}
            for w in "xyz"]
    (tmp_path / "test.jsonl").write_text(json.dumps(alpaca[0]) + "\n")
    folder = tmp_path / "folder"
    folder.mkdir()
    # Chat rows first, alpaca the majority: a shard holding only the first lines guesses wrong.
    lines = [json.dumps(r) for r in chat + alpaca[1:]] + [json.dumps(alpaca[0]), '{"broken": ', "",
                                                          json.dumps({"instruction": "typed", "output": 4}),
                                                          json.dumps({**alpaca[2], "instruction": "Question number c "
                                                                      "about the shop database tables!"})]
    (folder / "a.jsonl").write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode())
    (folder / "b.csv").write_text('text\n"completion one"\n"completion one"\n')
    pq.write_table(pa.Table.from_pylist([{"text": "parquet text", "blob": b"\x00\x01", "day": None},
                                         {"text": None, "blob": b"\xff", "day": 3}]), tmp_path / "c.parquet")
    (tmp_path / "d.json").write_text(json.dumps([alpaca[3], alpaca[4]]))  # two records on line 1
    # Its one test record has a train copy on purpose: the contamination limit is off here.
    return DataConfig(train_files=[str(folder), str(tmp_path / "c.parquet"), str(tmp_path / "d.json")],
                      test_files=[str(tmp_path / "test.jsonl")], validation_fraction=0.3, max_reject_rate=0.9,
                      max_test_contamination=1.0)


@pytest.mark.parametrize("num_shards", [2, 5])
def test_inputs_of_every_kind_give_the_same_output(every_kind, num_shards, tmp_path):
    single = prepare_dataset(every_kind, tmp_path / "single", seed=3)
    plan, sharded = run_sharded(every_kind, num_shards, tmp_path / "sharded")

    assert len(plan) > 1
    assert sharded == single
    for name in DATA_FILES:
        assert (tmp_path / "sharded/out" / name).read_bytes() == (tmp_path / "single" / name).read_bytes(), name
    reasons = {q["reason"] for q in map(json.loads, (tmp_path / "single/quarantine.jsonl").read_text().splitlines())}
    assert {"exact_duplicate", "near_duplicate", "invalid_json", "missing_field", "wrong_type"} <= reasons
    assert single["formats"]["alpaca"] > 0 and single["dedupe"]["train_copies_of_test_removed"] == 1


LINES = [json.dumps({"instruction": "a b c d e f g h", "output": "x y z"}),
         json.dumps({"instruction": "a b c d e f g i", "output": "x y z"}),  # near copy of the first
         json.dumps({"instruction": "rows where age > 30", "output": "SELECT 30"}),
         json.dumps({"instruction": "rows where age > 31", "output": "SELECT 31"}),
         json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}),
         json.dumps({"text": "one two three four five"}), json.dumps({"instruction": "no output"}),
         json.dumps({"instruction": "Ｆｕｌｌ width", "output": "buy now " * 20}), '{"cut": ', "", "  ",
         "\ufeff" + json.dumps({"instruction": "bom", "output": "ok"})]


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(files=st.lists(st.lists(st.sampled_from(LINES), max_size=14), min_size=1, max_size=3),
       num_shards=st.integers(2, 8), crlf=st.booleans(), fmt=st.sampled_from(["auto", "alpaca"]))
def test_random_jsonl_gives_the_same_output_in_any_number_of_shards(tmp_path_factory, files, num_shards, crlf, fmt):
    tmp = tmp_path_factory.mktemp("random")
    paths = []
    for k, lines in enumerate(files):
        paths.append(tmp / f"f{k}.jsonl")
        paths[-1].write_text(("\r\n" if crlf else "\n").join(lines), encoding="utf-8")
    cfg = DataConfig(train_files=[str(p) for p in paths], format=fmt, validation_fraction=0.3, max_reject_rate=1.0)
    outcomes = []
    for out, run in ((tmp / "single", lambda: prepare_dataset(cfg, tmp / "single", seed=3)),
                     (tmp / "sharded/out", lambda: run_sharded(cfg, num_shards, tmp / "sharded")[1])):
        try:
            outcomes.append(run())
        except DataValidationError as e:  # nothing left to train on: the same error, the same files
            outcomes.append(str(e).replace(str(out), "<out>"))
    assert outcomes[0] == outcomes[1]
    for name in DATA_FILES:
        single, sharded = tmp / "single" / name, tmp / "sharded/out" / name
        assert single.exists() == sharded.exists(), name
        if single.exists():  # a failed run's report names its own folder in the error
            assert (single.read_bytes().replace(str(tmp / "single").encode(), b"<out>")
                    == sharded.read_bytes().replace(str(tmp / "sharded/out").encode(), b"<out>")), name


def test_signatures_made_in_pieces_dedupe_as_the_texts_do():
    texts = [f"record {w} about the customers of the shop and their orders" for w in "abcdefgh"]
    texts += [texts[1], texts[2] + " today", texts[6] + "!"]  # exact, near, near
    whole = dedupe_texts(texts)
    pieces = [record_signatures(texts[a:b]) for a, b in ((0, 4), (4, 9), (9, len(texts)))]
    stacked = dedupe_signatures(texts, *(np.concatenate(arrays) for arrays in zip(*pieces)))
    assert whole.reason.count("exact_duplicate") == 1 and whole.reason.count("near_duplicate") == 2
    assert stacked.reason == whole.reason and stacked.lsh_params == whole.lsh_params
    assert (stacked.duplicate_of == whole.duplicate_of).all() and (stacked.similarity == whole.similarity).all()


def test_merge_refuses_an_incomplete_plan_or_other_settings(demo_cfg, tmp_path):
    plan = shard.plan_data_shards(demo_cfg, 3)
    parts = [data.prepare_data_shard(demo_cfg, s, tmp_path / f"part-{k}") for k, s in enumerate(plan)]
    with pytest.raises(ValueError, match="pass every shard of one plan"):
        data.merge_data_shards(demo_cfg, [parts[0], parts[2]], tmp_path / "out")
    other = DataConfig(**{**vars(demo_cfg), "minhash_num_perm": 64})
    with pytest.raises(ValueError, match="minhash_num_perm"):
        data.merge_data_shards(other, parts, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------
# Flyte level: the sub-workflows through flytekit's local executor, map task and cache included


def test_flyte_sharded_data_and_tokenize_match_the_single_tasks(demo, tmp_path):
    from qloraflow.stages import RunContext, stage_settings
    from qloraflow.tracking import MlflowTracker
    from tasks.data import prepare_data
    from tasks.resolve import input_fingerprints
    from tasks.tokenize import tokenize_data
    from workflows.sharded import sharded_data, sharded_tokenize

    root, _ = demo
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = config_from_dict({
        "data": {"train_files": [str(root / "data/train.jsonl")], "test_files": [str(root / "data/test.jsonl")],
                 "num_shards": 3},
        "model": {"base_model": str(root / "base-model")}, "tokenize": {"sequence_len": 256, "num_shards": 3},
        "tracking": {"tracking_uri": uri, "experiment": "sharded"}})
    run_id = MlflowTracker("sharded", uri, run_name="pipeline").run_id
    key = uuid.uuid4().hex  # this test's own cache entries
    settings = stage_settings(cfg, input_fingerprints(cfg))
    data = dataclasses.replace(settings.data, data_digest=f"{settings.data.data_digest}-{key}")
    tok = dataclasses.replace(settings.tokenize, tokenizer_digest=f"{settings.tokenize.tokenizer_digest}-{key}")
    common = dict(execution=settings.execution, context=RunContext(pipeline_run_id=run_id, name=cfg.name,
                                                                   experiment="sharded", tracking_uri=uri))

    one = prepare_data(settings=data, **common)
    three = sharded_data(settings=data, num_shards=3, **common)
    assert_same_files(Path(one.data_dir.path), Path(three.data_dir.path))
    reports = [json.loads((Path(out.data_dir.path) / "report.json").read_text()) for out in (one, three)]
    assert reports[0] == reports[1] and reports[0]["dedupe"]["near_duplicates"] > 0
    assert one.result.mlflow_run_id != three.result.mlflow_run_id  # each logged its own stage run
    assert dataclasses.replace(one.result, mlflow_run_id="") == dataclasses.replace(three.result, mlflow_run_id="")
    assert one.result.read == reports[0]["read"] and one.result.kept == reports[0]["kept"]

    tok_one = tokenize_data(settings=tok, data_dir=one.data_dir, **common)
    tok_three = sharded_tokenize(settings=tok, data_dir=three.data_dir, num_shards=3, **common)
    assert_same_files(Path(tok_one.tok_dir.path), Path(tok_three.tok_dir.path))
    assert tok_one.result.tokens == tok_three.result.tokens

    again = sharded_data(settings=data, num_shards=3, **common)  # every task of it comes from the cache
    assert again.data_dir.path == three.data_dir.path and again.result == three.result
