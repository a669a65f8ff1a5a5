"""How the data and tokenize stages are cut into shards: the plans, and nothing else.

A plan is a list of shards, each a JSON string (what a Flyte map task hands to one pod). The data
stage cuts its inputs into shards of about equal bytes (JSONL files at line starts, other inputs
whole); the tokenize stage cuts the prepared splits' rows into shards of about equal rows. Each stage
runs every plan the same way, one shard being the one-process run (``qloraflow.data``,
``qloraflow.tokenize``)::

    from qloraflow.shard import plan_data_shards, plan_tokenize_shards
    plan_data_shards(cfg.data, num_shards=8)        # pieces of the inputs: {"input", "source", "kind", "test", "span"}
    plan_tokenize_shards("outputs/data", num_shards=8)  # rows of the splits: {"split", "start", "stop"}
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import json
import os
from pathlib import Path
from typing import Any, Union

from qloraflow.config import DataConfig
from qloraflow.readers import check_inputs_exist, input_files
from qloraflow.splits import SPLITS

PathLike = Union[str, os.PathLike]


def shard_name(shard: str) -> str:
    """A short name for a shard of a plan, to tell shards' folders apart."""
    return hashlib.sha256(shard.encode()).hexdigest()[:12]


def plan_data_shards(cfg: DataConfig, num_shards: int) -> list[str]:
    """Cut the inputs into at most ``num_shards`` shards of about equal bytes, in input order.

    A JSONL file is cut at line starts; any other input (JSON, Parquet, CSV, ``datasets``
    folder, Hub name) stays whole in one shard. Only a few bytes around each cut are read.

    Args:
        cfg: The ``data`` section.
        num_shards: Most shards wanted (fewer come back when the inputs cannot be cut finer).

    Returns:
        One JSON string per shard: its pieces, each ``{"input", "source", "kind", "test"}`` plus
        ``"span": [start, stop]`` bytes for JSONL.

    Raises:
        DataValidationError: An input is missing.
    """
    check_inputs_exist(list(cfg.test_files) + list(cfg.train_files))
    inputs = [(source, kind, is_test) for is_test, specs in ((True, cfg.test_files), (False, cfg.train_files))
              for spec in specs for source, kind in input_files(spec)]
    sizes = [_input_size(source, kind) for source, kind, _ in inputs]
    starts = list(itertools.accumulate(sizes, initial=0))
    total = starts[-1]
    offsets = {k * total // num_shards for k in range(1, num_shards)} - {0, total}
    cuts = sorted({_snap(inputs, starts, x) for x in offsets} - {total})
    shards: list[list[dict[str, Any]]] = [[] for _ in range(len(cuts) + 1)]
    for n, ((source, kind, is_test), begin, end) in enumerate(zip(inputs, starts, starts[1:])):
        edges = [begin, *(c for c in cuts if begin < c < end), end]
        for a, b in zip(edges, edges[1:]):
            piece: dict[str, Any] = {"input": n, "source": source, "kind": kind, "test": is_test}
            if kind == "jsonl":
                piece["span"] = [a - begin, b - begin]
            shards[bisect.bisect_right(cuts, a)].append(piece)
    return [json.dumps(s) for s in shards if s]


def _input_size(source: str, kind: str) -> int:
    if kind == "hub":
        return 0
    path = Path(source)
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def _snap(inputs: list[tuple[str, str, bool]], starts: list[int], offset: int) -> int:
    """The cut nearest after ``offset`` (over all inputs end to end) that splits no row."""
    k = bisect.bisect_right(starts, offset) - 1
    source, kind, _ = inputs[k]
    local = offset - starts[k]
    if local == 0:
        return offset
    if kind != "jsonl":
        return starts[k + 1]
    with open(source, "rb") as f:  # the line start at or after `local`: one past the next newline
        f.seek(local - 1)
        pos = local - 1
        while block := f.read(1 << 16):
            newline = block.find(b"\n")
            if newline >= 0:
                return starts[k] + pos + newline + 1
            pos += len(block)
    return starts[k + 1]


def plan_tokenize_shards(data_dir: PathLike, num_shards: int) -> list[str]:
    """Cut the prepared splits' rows into at most ``num_shards`` shards of about equal rows, in split order.

    Returns:
        One JSON string per shard: its pieces ``{"split", "start", "stop"}`` (rows of that split).
    """
    import pyarrow.parquet as pq

    sizes = [(split, pq.ParquetFile(path).metadata.num_rows) for split in SPLITS
             if (path := Path(data_dir) / f"{split}.parquet").exists()]
    total = sum(n for _, n in sizes)
    cuts = sorted({k * total // num_shards for k in range(1, num_shards)} - {0, total})
    shards: list[list[dict[str, Any]]] = [[] for _ in range(len(cuts) + 1)]
    begin = 0
    for split, n in sizes:
        edges = [begin, *(c for c in cuts if begin < c < begin + n), begin + n]
        for a, b in zip(edges, edges[1:]):
            if b > a:
                shards[bisect.bisect_right(cuts, a)].append({"split": split, "start": a - begin, "stop": b - begin})
        begin += n
    return [json.dumps(s) for s in shards if s] or [json.dumps([])]
