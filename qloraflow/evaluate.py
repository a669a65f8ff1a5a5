"""Evaluate: the same frozen test split, the same prompts, for base, candidate and champion.

Held-out loss and perplexity come from the tokenized test split (assistant tokens only); task
metrics come from batched greedy generation on the test records' prompts, rendered with the chat
template saved by the tokenize stage::

    from qloraflow.evaluate import evaluate_model
    result = evaluate_model(cfg, model_dir="base-model", data_dir="out/data", tok_dir="out/tok",
                            adapter_dir="out/train/adapter")
    result.metrics, result.samples, result.tokens_per_s

Everything runs on the GPU when the task has one (the CPU otherwise): answers are generated greedily
in batches with a KV cache, longest prompts first, each batch bounded by ``eval.batch_size`` prompts
and ``eval.max_batch_tokens`` cache positions.

Task metrics:
- ``exact_match``: the answer equals the reference after whitespace folding (case kept: SQL string
  literals are case-sensitive).
- ``execution_accuracy``: the answer, run read-only against the SQLite database, returns the same
  rows as the reference (order-insensitive unless the reference has ORDER BY). ``eval.sqlite_db`` is
  one database, or a folder of ``<db_id>.sqlite`` files: then each record's answer and reference run
  on the database its ``meta`` names (``eval.db_field``, e.g. Spider's ``db_id``). On empty databases
  (Spider's schemas without rows) it only compares result shapes; two companions are reported with it:
  - ``sql_runs``: the answer is one statement that parses and runs on the record's database.
  - ``sql_exact_match``: the answer equals the reference as SQL text: keywords and identifiers
    case-folded (quoted literals kept), whitespace folded, a final semicolon dropped.
- ``rouge_l`` (rouge-score) and ``chrf`` (sacrebleu), for free text, averaged per answer, in [0, 1].
- ``eos_rate``: share of generations that end with EOS before the token limit (always reported).
"""

from __future__ import annotations

import json
import math
import os
import re
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch

from qloraflow.config import FinetuneConfig
from qloraflow.errors import DataValidationError
from qloraflow.paired import BINARY_METRICS, by_id  # noqa: F401 - BINARY_METRICS: the metrics scored 0/1
from qloraflow.precision import DTYPES, accelerator, release_memory
from qloraflow.tokenize import IGNORE_INDEX


def normalize_answer(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().rstrip(";").strip()


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def _run_sql(db: str, sql: str, timeout_s: float = 2.0) -> Optional[list[tuple]]:
    """Rows of a query on a read-only connection, or None if it fails or runs too long."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    deadline = time.monotonic() + timeout_s

    def guard() -> int:  # sqlite calls this every N instructions; non-zero aborts the query
        return int(time.monotonic() > deadline)

    conn.set_progress_handler(guard, 1000)
    try:
        return conn.execute(sql).fetchall()
    except (sqlite3.Error, sqlite3.Warning, ValueError):
        return None
    finally:
        conn.close()


def execution_match(prediction: str, reference: str, db: str) -> float:
    want = _run_sql(db, reference)
    got = _run_sql(db, prediction)
    if want is None or got is None:
        return 0.0
    if "order by" in reference.lower():
        return float(got == want)
    return float(sorted(map(repr, got)) == sorted(map(repr, want)))


def sql_runs(prediction: str, db: str) -> float:
    """1.0 when the answer is one SQL statement that parses and runs (read-only) on ``db``."""
    if not prediction.strip().rstrip(";").strip():
        return 0.0  # sqlite runs an empty statement without complaint
    return float(_run_sql(db, prediction) is not None)


# A quoted literal or identifier ('...', "..." with doubled quotes inside), or a run of other text.
_SQL_PART = re.compile(r"""'(?:[^']|'')*'|"(?:[^"]|"")*"|[^'"]+|['"]""")


def normalize_sql(sql: str) -> str:
    """SQL text compared as SQL: outside quotes lower-cased and whitespace folded (none around
    parentheses and commas); quoted text kept as written; a final semicolon dropped."""
    parts = []
    for part in _SQL_PART.findall(sql.strip().rstrip(";")):
        if part[0] in "'\"" and len(part) > 1:
            parts.append(part)
        else:
            text = re.sub(r"\s+", " ", part.lower())
            parts.append(re.sub(r"\s*([(),])\s*", r"\1", text))
    return "".join(parts).strip()


def sql_exact_match(prediction: str, reference: str) -> float:
    return float(normalize_sql(prediction) == normalize_sql(reference))


def record_databases(records: list[dict], sqlite_db: Optional[str], db_field: str) -> list[Optional[str]]:
    """The SQLite database each record's SQL runs on: ``sqlite_db`` itself, or, when it is a folder,
    ``<folder>/<meta[db_field]>.sqlite``.

    Raises:
        DataValidationError: A record names no database, or one the folder does not hold (raised
            before any generation starts; the first five such records are named).
    """
    if not sqlite_db or not Path(sqlite_db).is_dir():
        return [sqlite_db] * len(records)
    folder, paths, problems = Path(sqlite_db), [], []
    for r in records:
        name = row_meta(r).get(db_field)
        path = folder / f"{name}.sqlite"
        if not isinstance(name, str) or not name or Path(name).name != name:
            problems.append(f"record {r.get('id')} ({r.get('source')}) has no database name in its meta "
                            f"('{db_field}': {name!r})")
        elif not path.is_file():
            problems.append(f"record {r.get('id')} ({r.get('source')}): {path} does not exist")
        paths.append(str(path))
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise DataValidationError(
            f"eval.sqlite_db {sqlite_db} is a folder of <{db_field}>.sqlite databases, but " + "; ".join(problems[:5])
            + f"{more}. Give every test record a '{db_field}' field naming its database (eval.db_field), "
            "or set eval.sqlite_db to one database file")
    return paths


def row_meta(record: dict) -> dict[str, Any]:
    """A split row's metadata (the ``meta`` JSON column; {} for splits written without one)."""
    meta = record.get("meta")
    return json.loads(meta) if isinstance(meta, str) and meta else dict(meta or {})


# ------------------------------------------------------------------------------------------- models

def load_for_eval(model_dir: str, adapter_dir: Optional[str], dtype: torch.dtype, device: Optional[str] = None) -> Any:
    """A 16-bit model for evaluation on ``device`` (default: the GPU when there is one): the base, or
    base + unmerged adapter."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, device_map={"": device or accelerator()})
    if adapter_dir:
        model = attach_adapter(model, adapter_dir)
    return model.eval()


def attach_adapter(model: Any, adapter_dir: str | os.PathLike) -> Any:
    """The loaded base with a LoRA adapter applied, unmerged (PEFT wraps the base in place)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(adapter_dir)).eval()


def _vocab_size(model: Any) -> int:
    return int(model.get_output_embeddings().weight.shape[0])


@torch.no_grad()
def heldout_loss(model: Any, rows: Any, batch_size: int, pad_id: int,
                 max_logit_bytes: int = 2**30) -> dict[str, float]:
    """Mean loss per trained (assistant) token over the tokenized test rows, and its perplexity.

    Logits are computed only where the next token is trained (``logits_to_keep``): all positions of
    a batch of long rows over a 128k vocabulary would need tens of GiB. Batches hold at most
    ``batch_size`` rows and about ``max_logit_bytes`` of 16-bit logits.
    """
    device, vocab = model.device, _vocab_size(model)
    total, count = 0.0, 0
    lengths = [len(x) for x in rows["input_ids"]]
    start = 0
    while start < len(lengths):
        stop = start + 1
        while (stop < len(lengths) and stop - start < batch_size
               and (stop + 1 - start) * max(lengths[start:stop + 1]) * vocab * 2 <= max_logit_bytes):
            stop += 1
        batch = rows[start:stop]
        start = stop
        width = max(len(x) for x in batch["input_ids"])
        ids = torch.full((len(batch["input_ids"]), width), pad_id)
        labels = torch.full_like(ids, IGNORE_INDEX)
        mask = torch.zeros_like(ids)
        for j, (x, y) in enumerate(zip(batch["input_ids"], batch["labels"])):
            ids[j, :len(x)], labels[j, :len(y)], mask[j, :len(x)] = torch.tensor(x), torch.tensor(y), 1
        # Position t predicts token t + 1: keep the positions whose next token is trained in any row.
        keep = (labels[:, 1:] != IGNORE_INDEX).any(0).nonzero().squeeze(1)
        if keep.numel() == 0:
            continue
        targets = labels[:, keep + 1].to(device)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                       logits_to_keep=keep.to(device)).logits
        for j in range(logits.shape[0]):  # one row at a time in fp32
            total += torch.nn.functional.cross_entropy(logits[j].float(), targets[j], ignore_index=IGNORE_INDEX,
                                                       reduction="sum").item()
        count += int((targets != IGNORE_INDEX).sum())
    mean = total / max(count, 1)
    return {"loss": mean, "perplexity": math.exp(min(mean, 50.0))}


def prompt_messages(records: list[dict]) -> tuple[list[list[dict]], list[str]]:
    """Each record's turns before its last answer, and that answer (the reference)."""
    chats, refs = [], []
    for r in records:
        msgs = [{"role": m["role"], "content": m["content"]} for m in r["messages"]]
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        chats.append(msgs[:last])
        refs.append(msgs[last]["content"])
    return chats, refs


@dataclass
class Generation:
    """Greedy answers in prompt order, whether each ended with EOS, and what producing them cost."""

    answers: list[str]
    ended: list[bool]
    new_tokens: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds else 0.0


def generation_batches(lengths: list[int], max_new_tokens: int, batch_size: int,
                       max_batch_tokens: Optional[int]) -> list[list[int]]:
    """Prompt indices in batches, longest prompts first, so that little of each batch is padding.

    A batch holds at most ``batch_size`` prompts and, with ``max_batch_tokens``, at most that many
    KV-cache positions (prompts padded to the longest, plus ``max_new_tokens`` each).
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    for i in order:
        if batches:
            last = batches[-1]
            width = lengths[last[0]] + max_new_tokens  # the batch's first prompt is its longest
            if len(last) < batch_size and (max_batch_tokens is None or (len(last) + 1) * width <= max_batch_tokens):
                last.append(i)
                continue
        batches.append([i])
    return batches


@torch.no_grad()
def generate_greedy(model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int, batch_size: int,
                    max_batch_tokens: Optional[int] = None) -> Generation:
    """Batched greedy answers with a KV cache on the model's device, returned in prompt order."""
    eos_ids = _eos_ids(model, tokenizer)
    tokenizer.padding_side = "left"  # generation appends on the right: pad on the left
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    answers: list[str] = [""] * len(prompts)
    ended: list[bool] = [False] * len(prompts)
    new_tokens, started = 0, time.perf_counter()
    for batch in generation_batches([len(e) for e in encoded], max_new_tokens, batch_size, max_batch_tokens):
        enc = tokenizer.pad({"input_ids": [encoded[i] for i in batch]}, return_tensors="pt").to(model.device)
        out = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos_ids,
                             pad_token_id=tokenizer.pad_token_id)
        for i, row in zip(batch, out[:, enc["input_ids"].shape[1]:].tolist()):
            stop = next((k for k, t in enumerate(row) if t in eos_ids), None)
            ended[i] = stop is not None
            new_tokens += stop + 1 if stop is not None else len(row)
            answers[i] = tokenizer.decode(row[:stop] if stop is not None else row, skip_special_tokens=True)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return Generation(answers, ended, new_tokens, time.perf_counter() - started)


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None) or tokenizer.eos_token_id
    return sorted(set(ids if isinstance(ids, list) else [ids]))


def rouge_l(predictions: list[str], references: list[str]) -> float:
    return _mean(rouge_l_scores(predictions, references))


def rouge_l_scores(predictions: list[str], references: list[str]) -> list[float]:
    from rouge_score.rouge_scorer import RougeScorer

    scorer = RougeScorer(["rougeL"], use_stemmer=False)
    return [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)]


def chrf(predictions: list[str], references: list[str]) -> float:
    return _mean(chrf_scores(predictions, references))


def chrf_scores(predictions: list[str], references: list[str]) -> list[float]:
    from sacrebleu.metrics import CHRF

    metric = CHRF()
    return [metric.sentence_score(p, [r]).score / 100 for p, r in zip(predictions, references)]


def _mean(values: list[float]) -> float:
    return sum(values) / max(len(values), 1)


def record_scores(answers: list[str], refs: list[str], metrics: list[str],
                  sqlite_db: Union[None, str, list[Optional[str]]]) -> dict[str, list[float]]:
    """Each task metric's score of every answer, in answer order (the verdicts the gate pairs by record id).

    Args:
        sqlite_db: The database of execution_accuracy: one for all answers, or one per answer
            (:func:`record_databases`).
    """
    out: dict[str, list[float]] = {}
    if "exact_match" in metrics:
        out["exact_match"] = [exact_match(a, r) for a, r in zip(answers, refs)]
    if "execution_accuracy" in metrics:
        dbs = sqlite_db if isinstance(sqlite_db, list) else [sqlite_db] * len(refs)
        out["execution_accuracy"] = [execution_match(a, r, d) for a, r, d in zip(answers, refs, dbs)]
        out["sql_runs"] = [sql_runs(a, d) for a, d in zip(answers, dbs)]
        out["sql_exact_match"] = [sql_exact_match(a, r) for a, r in zip(answers, refs)]
    if "rouge_l" in metrics:
        out["rouge_l"] = rouge_l_scores(answers, refs)
    if "chrf" in metrics:
        out["chrf"] = chrf_scores(answers, refs)
    return out


def score(answers: list[str], refs: list[str], ended: list[bool], metrics: list[str],
          sqlite_db: Union[None, str, list[Optional[str]]]) -> dict[str, float]:
    """The task metrics of answers against references (the means of :func:`record_scores`); ``eos_rate`` always."""
    n = max(len(refs), 1)
    return {"eos_rate": sum(ended) / n,
            **{k: sum(v) / n for k, v in record_scores(answers, refs, metrics, sqlite_db).items()}}


@dataclass
class Evaluation:
    """One model's result on the test split: metrics, a sample per record, and the generation's cost.

    Each sample holds its record's ``id``, and ``scores``: its own score on every task metric.
    """

    metrics: dict[str, float]
    samples: list[dict]
    generation_seconds: float = 0.0
    generated_tokens: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.generation_seconds if self.generation_seconds else 0.0

    @property
    def answers(self) -> dict[str, str]:
        """``{record id: answer}``."""
        return {rid: s["answer"] for rid, s in by_id(self.samples, "samples").items()}

    def verdicts(self, metric: str) -> dict[str, float]:
        """``{record id: score}`` on one task metric (what the promotion gate pairs)."""
        return {rid: float(s["scores"][metric]) for rid, s in by_id(self.samples, "samples").items()}


def evaluate_model(cfg: FinetuneConfig, model_dir: str, data_dir: str | os.PathLike, tok_dir: str | os.PathLike,
                   adapter_dir: Optional[str] = None, model: Any = None) -> Evaluation:
    """Loss, perplexity and task metrics of one model on the frozen test split, on the GPU when there is one.

    Args:
        cfg: the pipeline config (``eval`` and ``model.compute_dtype`` are used).
        model_dir: a base or merged model folder.
        data_dir: the data stage's output (``test.parquet``).
        tok_dir: the tokenize stage's output (``test/`` rows and ``tokenizer/`` with the template).
        adapter_dir: a LoRA adapter applied on top of ``model_dir`` (not merged).
        model: the model already loaded (``model_dir`` and ``adapter_dir`` are then not read).

    Returns:
        The metrics, and a sample per test record: its ``id`` and ``meta``, prompt, reference, answer and
        ``scores`` (its score on each task metric).
    """
    import datasets
    from transformers import AutoTokenizer

    e = cfg.eval
    tokenizer = AutoTokenizer.from_pretrained(str(Path(tok_dir) / "tokenizer"))
    owned = model is None
    if owned:
        model = load_for_eval(model_dir, adapter_dir, DTYPES[cfg.model.compute_dtype])
    rows = datasets.load_from_disk(str(Path(tok_dir) / "test")).select_columns(["input_ids", "labels"])
    rows = rows.select(range(min(len(rows), e.max_samples)))
    metrics = {f"heldout_{k}": v for k, v in heldout_loss(model, rows, e.batch_size, tokenizer.pad_token_id).items()}
    records = datasets.Dataset.from_parquet(str(Path(data_dir) / "test.parquet")).to_list()[: e.max_samples]
    databases = record_databases(records, e.sqlite_db, e.db_field) if "execution_accuracy" in e.metrics else None
    chats, refs = prompt_messages(records)
    prompts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]
    gen = generate_greedy(model, tokenizer, prompts, e.max_new_tokens, e.batch_size, e.max_batch_tokens)
    per_record = record_scores(gen.answers, refs, e.metrics, databases)
    metrics["eos_rate"] = sum(gen.ended) / max(len(refs), 1)
    metrics.update({k: sum(v) / max(len(refs), 1) for k, v in per_record.items()})
    if e.judge_base_url:
        questions = [c[-1]["content"] for c in chats]
        judged = judge_answers(e.judge_base_url, e.judge_model, questions, refs, gen.answers)
        if judged["judge_score"] is not None:
            metrics["judge_score"] = judged["judge_score"]
    # Each sample keeps its record's id and metadata, so an answer can be traced to its input row.
    samples = [{"id": rec["id"], "meta": row_meta(rec), "messages": c, "prompt": p, "reference": r, "answer": a,
                "ended_with_eos": d, "scores": {k: v[i] for k, v in per_record.items()}}
               for i, (rec, c, p, r, a, d) in enumerate(zip(records, chats, prompts, refs, gen.answers, gen.ended))]
    if owned:
        del model
        release_memory()
    return Evaluation(metrics, samples, gen.seconds, gen.new_tokens)


def evaluate_base_and_candidate(cfg: FinetuneConfig, data_dir: str | os.PathLike, tok_dir: str | os.PathLike,
                                adapter_dir: str | os.PathLike) -> dict[str, Evaluation]:
    """``base`` (the 16-bit base model) and ``candidate`` (the same base + the adapter, unmerged).

    The base is loaded once, on the GPU when there is one, and the adapter attached to it after the
    base's turn: one 16-bit model on the card at any time.
    """
    model = load_for_eval(cfg.model.base_model, None, DTYPES[cfg.model.compute_dtype])
    results = {"base": evaluate_model(cfg, cfg.model.base_model, data_dir, tok_dir, model=model)}
    results["candidate"] = evaluate_model(cfg, cfg.model.base_model, data_dir, tok_dir,
                                          model=attach_adapter(model, adapter_dir))
    del model
    release_memory()
    return results


JUDGE_PROMPT = (
    "You grade answers. Question:\n{question}\n\nReference answer:\n{reference}\n\nCandidate answer:\n{answer}\n\n"
    "How well does the candidate answer the question, given the reference? Reply with one line "
    "'SCORE: N' where N is 1 (wrong) to 5 (fully correct).")


def judge_answers(base_url: str, model: str, questions: list[str], references: list[str], answers: list[str],
                  timeout_s: float = 60.0, api_key: Optional[str] = None) -> dict[str, Any]:
    """LLM-as-judge through any OpenAI-compatible endpoint (off unless ``eval.judge_base_url`` is set).

    Returns:
        ``{"scores": [1..5 or None], "judge_score": mean of the parsed scores scaled to [0, 1] (or None),
        "unparsed": replies without a 'SCORE: N' line}``.
    """
    from openai import OpenAI

    key = api_key or os.environ.get("OPENAI_API_KEY", "EMPTY")  # a keyed vLLM judge: VllmServer.api_key
    client = OpenAI(base_url=base_url, api_key=key, timeout=timeout_s,
                    max_retries=1)
    scores: list[Optional[int]] = []
    for q, r, a in zip(questions, references, answers):
        reply = client.chat.completions.create(
            model=model, temperature=0.0, max_tokens=16,
            messages=[{"role": "user", "content": JUDGE_PROMPT.format(question=q, reference=r, answer=a)}])
        m = re.search(r"SCORE:\s*([1-5])", reply.choices[0].message.content or "")
        scores.append(int(m.group(1)) if m else None)
    parsed = [x for x in scores if x is not None]
    return {"scores": scores, "unparsed": len(scores) - len(parsed),
            "judge_score": (sum(parsed) / len(parsed) - 1) / 4 if parsed else None}
