"""The data splits as MLflow datasets: which runs read which data, by content digest.

MLflow draws its data -> run -> model lineage from the dataset inputs of each run. The data stage
describes its splits once, in ``datasets.json`` beside them: per split the sha256 of its Parquet file
(the dataset's digest), its rows and columns, and the dataset hash of the input files. The tokenize
stage copies that file into its own output, so the train task, which reads only tokenized data, logs
the very datasets the data stage wrote::

    splits = describe_splits(out, dataset_hash=settings.data_digest)   # the data stage
    write_atomic(out / DATASETS_FILE, json.dumps(splits))
    tracker.log_inputs(dataset_inputs(splits, ["train", "validation"], "tiny-sql", data_folder))

A dataset is logged by reference (no rows are copied into MLflow): a digest, a source and a profile.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional, Sequence

from qloraflow.files import sha256_file, write_atomic

DATASETS_FILE = "datasets.json"
SPLITS = ("train", "validation", "test")
# MLflow's input contexts, shown beside each dataset of a run.
CONTEXTS = {"train": "training", "validation": "validation", "test": "evaluation"}
DIGEST_CHARS = 16  # MLflow stores at most 36 characters of a dataset digest


def describe_splits(folder: str | os.PathLike, dataset_hash: str,
                    sources: Optional[dict[str, dict[str, Any]]] = None) -> dict[str, Any]:
    """What the data stage wrote in ``folder``: each split's digest, rows and columns (``datasets.json``).

    Args:
        folder: the data stage's output (``train.parquet``, ``validation.parquet``, ``test.parquet``).
        dataset_hash: content digest of the input files (the runs' ``dataset.hash`` tag).
        sources: the data report's per-input-file counts (``read``, ``kept``, ``rejected``).
    """
    import pyarrow.parquet as pq

    splits = {}
    for split in SPLITS:
        path = Path(folder) / f"{split}.parquet"
        if not path.exists():
            continue
        meta = pq.read_metadata(path)
        splits[split] = {"file": path.name, "digest": sha256_file(path)[:DIGEST_CHARS],
                         "rows": meta.num_rows, "columns": {f.name: str(f.type) for f in meta.schema.to_arrow_schema()}}
    counts = {src: {k: c.get(k) for k in ("read", "kept", "rejected")} for src, c in (sources or {}).items()}
    return {"dataset_hash": dataset_hash, "sources": counts, "splits": splits}


def write_description(folder: str | os.PathLike, dataset_hash: str,
                      sources: Optional[dict[str, dict[str, Any]]] = None) -> dict[str, Any]:
    """:func:`describe_splits` written to ``folder/datasets.json``; returns it."""
    splits = describe_splits(folder, dataset_hash, sources)
    write_atomic(Path(folder) / DATASETS_FILE, json.dumps(splits, indent=1))
    return splits


def read_description(folder: str | os.PathLike) -> Optional[dict[str, Any]]:
    """``datasets.json`` of a data (or tokenize) output folder; None for a folder written before it existed."""
    path = Path(folder) / DATASETS_FILE
    return json.loads(path.read_text()) if path.exists() else None


def copy_description(data_dir: str | os.PathLike, out: str | os.PathLike) -> None:
    """Carry ``datasets.json`` from the data stage's folder into a later stage's output folder."""
    if (Path(data_dir) / DATASETS_FILE).exists():
        shutil.copyfile(Path(data_dir) / DATASETS_FILE, Path(out) / DATASETS_FILE)


def dataset_inputs(description: Optional[dict[str, Any]], splits: Sequence[str], prefix: str,
                   folder: str | os.PathLike) -> list[Any]:
    """MLflow dataset inputs (``mlflow.entities.DatasetInput``) for ``splits``, named ``<prefix>-<split>``.

    The same split gives the same dataset (name and digest) in every run that logs it, which is what
    MLflow links runs by; MLflow keeps the source (``folder``/``<split>.parquet``) of the first run
    that logged it, the data stage's. The description holds no paths, so a cached folder stays the
    same bytes wherever it was written.
    """
    from mlflow.entities import Dataset, DatasetInput, InputTag

    if not description:
        return []
    out = []
    for split in splits:
        d = description["splits"].get(split)
        if d is None:
            continue
        dataset = Dataset(name=f"{prefix}-{split}", digest=d["digest"], source_type="local",
                          source=json.dumps({"uri": str(Path(folder) / d["file"])}),
                          profile=json.dumps({"num_rows": d["rows"], "columns": d["columns"],
                                              "dataset_hash": description["dataset_hash"]}))
        out.append(DatasetInput(dataset, tags=[InputTag("mlflow.data.context", CONTEXTS[split])]))
    return out
