"""One typed config for the whole pipeline.

YAML files under ``configs/`` only set values; every field is declared and documented here.
``load_config`` reads a YAML file, applies dotted overrides and validates everything at once, so a
bad config fails at launch with the full list of problems, before any data is read or GPU requested::

    from qloraflow.config import load_config
    cfg = load_config("configs/tiny.yaml", overrides={"train.max_steps": 10})
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from qloraflow.errors import ConfigError


def _f(default: Any, help: str, *, execution_only: bool = False, **kw: Any) -> Any:
    """A dataclass field with its documentation attached (TRL's ``metadata={"help": ...}``).

    ``execution_only`` marks a setting that decides how the work is spread (processes, shards),
    never what it produces: cache keys and reports leave it out (see :func:`result_settings` and
    ``qloraflow.stages``, where such settings travel apart from each stage's settings).
    """
    metadata = {"help": help, **({"execution_only": True} if execution_only else {})}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=metadata, **kw)
    return field(default=default, metadata=metadata, **kw)


def result_settings(section: Any) -> dict[str, Any]:
    """A config section as a dict, less its ``execution_only`` settings: what decides the stage's result."""
    if not dataclasses.is_dataclass(section):
        return dict(vars(section))
    spread = {f.name for f in dataclasses.fields(section) if f.metadata.get("execution_only")}
    return {k: v for k, v in dataclasses.asdict(section).items() if k not in spread}


@dataclass
class DataConfig:
    """Ingest, clean, dedupe and split."""

    train_files: list[str] = _f([], "Input files (JSONL, JSON, Parquet, CSV) or `datasets` save_to_disk folders.")
    test_files: list[str] = _f([], "Held-out test files. Empty: the test split is carved out of train_files by hash.")
    format: str = _f("auto", "Record format: auto, alpaca, sharegpt, messages or completion.")
    validation_fraction: float = _f(0.05, "Share of records for the validation split (chosen by record hash).")
    test_fraction: float = _f(0.0, "Share of records for the test split when test_files is empty.")
    min_output_chars: int = _f(1, "Records whose answer is shorter than this (after cleaning) are rejected.")
    max_chars: int = _f(20000, "Records longer than this many characters in total are rejected.")
    max_repetition: float = _f(0.5, "Reject records in which more than this share of the words repeat a word "
                                          "3-gram said earlier in the same text (loops; a clause said twice scores <= 0.5).")
    max_tokens: Optional[int] = _f(None, "Reject records with more tokens than this (base model's tokenizer); None: no limit.")
    redact_pii: bool = _f(False, "Replace e-mail addresses and phone numbers by placeholders.")
    near_dup_threshold: float = _f(0.8, "Estimated Jaccard similarity above which two records are near duplicates.")
    minhash_num_perm: int = _f(128, "MinHash permutations (more: better estimate, slower).")
    shingle_size: int = _f(3, "Words per shingle for MinHash.")
    near_dup_distinct_numbers: bool = _f(True, "Records that differ only in digit-bearing words (templated examples) "
                                               "are never near duplicates.")
    near_dup_shared_line_records: int = _f(10, "Lines held verbatim (case aside) by at least this many records are "
                                               "shared text (a system prompt, a database schema, a template) and "
                                               "are left out when records are compared for near duplicates, so "
                                               "that what they share cannot make two different examples copies; a "
                                               "match must still reach near_dup_threshold on the full texts too. "
                                               "0: compare full texts.")
    near_dup_short_answer_words: int = _f(32, "Records whose answer (assistant turns) has fewer words than this are "
                                              "near duplicates only if their answers have the same words: in a "
                                              "short answer (a SQL query, a label) one word is another answer. "
                                              "0: off.")
    dedupe_workers: Optional[int] = _f(None, "Processes computing MinHash signatures; None: every CPU.",
                                       execution_only=True)
    num_shards: int = _f(1, "1: one data task. N > 1: a Flyte map task over up to N shards of the inputs (JSONL "
                            "files cut at line starts, other files whole) for the per-record work, then one task "
                            "that deduplicates and splits in input order; the output is the same.",
                         execution_only=True)
    max_reject_rate: float = _f(0.5, "Fail the stage when more than this share of records is rejected.")
    max_test_contamination: float = _f(0.5, "Fail the stage when more than this share of the test_files records "
                                            "have exact or near copies in train_files (the copies are removed from "
                                            "training either way; the report's 'contamination' lists them). 1: never fail.")
    quarantine_max_chars: int = _f(20000, "A rejected row longer than this many characters (as JSON) is copied "
                                          "into quarantine.jsonl cut to this length, with raw_chars (its full "
                                          "length) and raw_truncated: true, so that one huge row cannot fill the disk.")


@dataclass
class ModelConfig:
    """Base model and how it is loaded for training."""

    base_model: str = _f("", "Local folder or Hub id of the base causal LM.")
    revision: Optional[str] = _f(None, "Hub revision (commit) to pin; recorded in MLflow.")
    quantization: str = _f("4bit", "4bit (QLoRA, bitsandbytes NF4), 8bit, or none (16-bit LoRA).")
    bnb_4bit_quant_type: str = _f("nf4", "4-bit data type: nf4 or fp4.")
    double_quant: bool = _f(True, "Quantise the 4-bit quantisation constants too (QLoRA double quantisation).")
    compute_dtype: str = _f("bfloat16", "Compute and merge dtype: bfloat16, float16 or float32.")
    attn_implementation: str = _f("sdpa", "Attention kernel: sdpa, eager, flash_attention_2, or varlen (PyTorch's "
                                          "variable-length flash kernel over each packed example; CUDA only).")
    upcast_unquantized_fp32: bool = _f(True, "peft's prepare_model_for_kbit_training: keep embeddings, norms and "
                                             "lm_head in fp32 (stabler, more memory); false keeps them in the "
                                             "compute dtype, as TRL's QLoRA recipe does.")


@dataclass
class TokenizeConfig:
    """Prompt rendering, label masking and packing."""

    chat_template: Optional[str] = _f(None, "Named template (alpaca, chatml, llama-3); None: the tokenizer's own.")
    sequence_len: int = _f(2048, "Maximum tokens per training sequence.")
    train_on: str = _f("completions", "completions: loss on assistant turns only; all: on every token.")
    packing: bool = _f(True, "Pack several examples per sequence with per-example position ids.")
    overlong: str = _f("truncate", "What to do with examples longer than sequence_len: truncate or drop.")
    num_proc: int = _f(1, "Processes used to tokenize.", execution_only=True)
    num_shards: int = _f(1, "1: one tokenize task. N > 1: a Flyte map task encodes up to N shards of the records, "
                            "then one task packs each split in order; the output is the same.",
                         execution_only=True)


@dataclass
class LoraSettings:
    """LoRA adapter shape."""

    r: int = _f(16, "LoRA rank.")
    alpha: int = _f(32, "LoRA scaling numerator (scale = alpha / r, or alpha / sqrt(r) with rsLoRA).")
    dropout: float = _f(0.05, "Dropout on the LoRA input.")
    target_modules: Union[str, list[str]] = _f("all-linear", "Module names to adapt, or all-linear.")
    bias: str = _f("none", "Which biases train: none, all or lora_only.")
    use_rslora: bool = _f(False, "Rank-stabilised LoRA scaling.")
    use_dora: bool = _f(False, "Weight-decomposed LoRA (DoRA).")
    init_adapter: Optional[str] = _f(None, "A PEFT adapter folder to start from instead of a fresh LoRA "
                                           "initialisation (warm start; Axolotl's lora_model_dir).")


@dataclass
class TrainConfig:
    """Optimisation and checkpointing."""

    backend: str = _f("hf", "hf (transformers+peft+bitsandbytes+trl), unsloth, or auto (unsloth on CUDA if installed).")
    micro_batch_size: int = _f(2, "Sequences per device per forward pass.")
    gradient_accumulation_steps: int = _f(4, "Micro-batches per optimiser step.")
    num_epochs: float = _f(1.0, "Passes over the training split (ignored when max_steps > 0).")
    max_steps: int = _f(-1, "Stop after this many optimiser steps; -1: use num_epochs.")
    learning_rate: float = _f(2e-4, "Peak learning rate.")
    lr_scheduler: str = _f("cosine", "Schedule: cosine, linear, constant or constant_with_warmup.")
    warmup_ratio: float = _f(0.03, "Share of steps spent warming up.")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    max_grad_norm: float = _f(1.0, "Gradient clipping norm.")
    optimizer: str = _f("paged_adamw_8bit", "Optimiser name as transformers knows it (paged_adamw_8bit, adamw_torch, ...).")
    gradient_checkpointing: bool = _f(True, "Recompute activations in backward, on a CUDA GPU only in as many "
                                            "decoder layers as train.gpu_memory_gb requires (measured before "
                                            "training; see qloraflow.memory_budget).")
    gpu_memory_gb: Optional[float] = _f(None, "GPU memory the job may use, in GiB: layers skip recomputation while "
                                              "it allows. None: the card's memory (times the process's memory "
                                              "fraction); 0: recompute every layer.")
    liger_kernel: bool = _f(False, "hf backend on CUDA: Liger's Triton kernels (RMSNorm, RoPE, SwiGLU, fused "
                                   "linear cross-entropy that never materialises the logits).")
    activation_offloading: bool = _f(False, "hf backend on CUDA: TRL's offloading of the checkpointed activations "
                                            "to pinned CPU memory during the forward, back for the backward (less GPU "
                                            "memory at long sequences; Unsloth's backend always offloads).")
    logging_steps: int = _f(10, "Log metrics every N steps.")
    eval_steps: int = _f(100, "Evaluate on the validation split every N steps (0: never).")
    save_steps: int = _f(100, "Write a checkpoint every N steps.")
    save_total_limit: int = _f(3, "Complete checkpoints kept on disk.")
    preemption_grace_s: float = _f(30.0, "Seconds between SIGTERM and SIGKILL (Kubernetes' terminationGracePeriod"
                                         "Seconds, 30 by default): on SIGTERM the step in progress finishes, its "
                                         "checkpoint is saved and training stops with a retryable error, so the "
                                         "retry resumes there; the log says whether the save fit in this time.",
                                   execution_only=True)
    early_stopping_patience: Optional[int] = _f(None, "Stop after N evaluations without improvement; None: off.")
    use_cpu: bool = _f(False, "Train on the CPU even where a GPU exists (the demo).")
    num_gpus: int = _f(1, "GPUs of one node to train on. Above 1, Flyte runs the train step through torchrun "
                          "(flytekitplugins-kfpytorch Elastic), one process per GPU (with use_cpu: that many CPU "
                          "processes, over gloo); micro_batch_size and gradient_accumulation_steps stay per "
                          "process, so an optimiser step sees num_gpus times the sequences.")
    distributed: str = _f("ddp", "How num_gpus > 1 share the work: ddp (every GPU holds the 4-bit model, gradients "
                                 "all-reduced) or fsdp (parameters sharded; QLoRA stores 4-bit weights in the "
                                 "compute dtype so FSDP can shard them, for models that do not fit one GPU).",
                          execution_only=True)


@dataclass
class EvalConfig:
    """Held-out evaluation, identical for base and fine-tuned models."""

    metrics: list[str] = _f(["exact_match"], "Task metrics: exact_match, execution_accuracy (SQL; reported with "
                                             "sql_runs and sql_exact_match), rouge_l, chrf.")
    sqlite_db: Optional[str] = _f(None, "SQLite database that execution_accuracy runs queries against, or a folder "
                                        "of <name>.sqlite databases: each test record's queries then run on the one "
                                        "its metadata field db_field names.")
    db_field: str = _f("db_id", "Metadata field of a test record (an extra field of its input row) that names its "
                                "database in the eval.sqlite_db folder.")
    max_samples: int = _f(200, "Test records evaluated (first N of the frozen test split).")
    max_new_tokens: int = _f(64, "Generation limit per answer.")
    batch_size: int = _f(16, "Prompts per generation batch (and rows per held-out loss batch).")
    max_batch_tokens: Optional[int] = _f(None, "KV-cache positions per generation batch (longest prompt plus "
                                               "max_new_tokens, times the prompts); None: batch_size alone decides. "
                                               "Bounds the cache's memory: a Llama-3-8B position takes 128 KiB.")
    gate_metric: str = _f("exact_match", "Metric the promotion gate compares.")
    judge_base_url: Optional[str] = _f(None, "OpenAI-compatible endpoint of an LLM judge (e.g. http://host:8000/v1); "
                                             "None: no LLM-as-judge.")
    judge_model: str = _f("judge", "Model name the judge endpoint serves.")


@dataclass
class MergeConfig:
    """Merging the adapter into 16-bit base weights."""

    probe_samples: int = _f(8, "Held-out test rows whose answer positions the functional check compares "
                               "(base + adapter against the merged model, next-token distributions).")
    kl_factor: float = _f(4.0, "The merged model's mean KL divergence from base + adapter may be at most this many "
                               "times the KL that one more rounding of the adapted weights causes (measured in "
                               "the same check, see qloraflow/merge.py).")
    metric_tolerance: float = _f(0.02, "Largest allowed drop of the gate metric from adapter to merged model.")


@dataclass
class ServeConfig:
    """Local vLLM deployment and smoke test."""

    enabled: bool = _f(True, "Serve the merged model with vLLM and smoke-test it.")
    python: str = _f(".venv-serve/bin/python", "Python of the environment that has vLLM (kept apart from training).")
    host: str = _f("127.0.0.1", "Address the server binds.")
    port: int = _f(0, "Port; 0 picks a free one.")
    startup_timeout_s: float = _f(300.0, "Seconds to wait for /health before failing the stage.")
    kv_cache_memory_bytes: int = _f(268435456, "KV cache size (vLLM's CPU build needs it set).")
    max_model_len: int = _f(512, "Context length served.")
    dtype: str = _f("auto", "Dtype vLLM loads the weights in (auto: the saved dtype).")
    enforce_eager: bool = _f(False, "Skip vLLM's torch.compile/CUDA-graph warm-up: faster start, slower decode.")
    stop_grace_s: float = _f(20.0, "Seconds between SIGTERM and SIGKILL of the server's process group.")


@dataclass
class ExportConfig:
    """Exports for local runtimes after the merge (GGUF for llama.cpp and Ollama), each checked against it."""

    gguf: list[str] = _f([], "GGUF types to write: q8_0, f16 and bf16 come from llama.cpp's converter, q4_k_m "
                             "(and q4_k_s, q5_k_m, q6_k, q4_0) from its quantizer. Empty: no GGUF export.")
    python: str = _f(".venv-export/bin/python", "Python of the environment with the converter's needs and the "
                                                "llama_cpp binding (`make setup-export`).")
    probe_samples: int = _f(16, "Held-out test prompts (the merged model's evaluation samples, first by id) whose "
                                "greedy answers each export must reproduce.")
    max_new_tokens: int = _f(64, "Generation limit of the parity check; an answer that reaches it never hit the "
                                 "stop token and fails the check.")
    mlx: bool = _f(False, "Also write an MLX folder (mlx-lm conversion, for Apple Silicon) and check that it loads "
                          "and answers the held-out prompts.")
    mlx_quantize: bool = _f(False, "Quantize the MLX folder (mlx-lm's default 4-bit).")
    mlx_python: str = _f(".venv-mlx/bin/python", "Python of the environment with mlx[cpu]/mlx and mlx-lm.")
    min_agreement: dict[str, float] = _f({}, "Per GGUF type, the least share of prompts whose greedy answer must "
                                             "equal the merged model's token for token; types not listed use the "
                                             "defaults of qloraflow/export.py (q8_0: 0.95).")


@dataclass
class RegistryConfig:
    """MLflow model registry and promotion."""

    model_name: str = _f("qloraflow-model", "Registered model name.")
    promotion_margin: float = _f(0.0, "A candidate must beat base and champion on the gate metric by more than this: "
                                      "the lower end of the improvement's confidence interval must be above it.")
    confidence: Optional[float] = _f(0.95, "Confidence level of the gate's two-sided interval of the improvement, "
                                           "paired by record id on the same test records: McNemar's exact test for "
                                           "0/1 metrics (exact_match, execution_accuracy), a paired bootstrap for "
                                           "the others (qloraflow/paired.py). null: compare point estimates, no "
                                           "test (a difference on a small test set is then taken at face value).")


@dataclass
class TrackingConfig:
    """MLflow tracking."""

    experiment: str = _f("qloraflow", "MLflow experiment name.")
    tracking_uri: Optional[str] = _f(None, "Tracking URI; None: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db.")


@dataclass
class SweepConfig:
    """A search over config keys (``workflows/sweep.py``); the plain pipeline ignores this section."""

    method: str = _f("grid", "grid: every combination of the params' values; random: sweep.num_trials of those "
                             "combinations, drawn without repetition (seeded by the config's seed).")
    params: dict = _f({}, "Config keys to vary and the values to try, e.g. {train.learning_rate: [1.0e-4, 3.0e-4], "
                          "lora.r: [4, 8]}. Only lora.* and train.* keys (not the execution-only ones): trials "
                          "share the data and tokenize stages and are compared on one validation split.")
    metric: str = _f("eval_loss", "What picks the winner: eval_loss, each trial's best loss on the validation split "
                                  "(lower is better; needs train.eval_steps > 0 and data.validation_fraction > 0). "
                                  "Never a test metric: the winner is then gated on the test set it was not picked on.")
    num_trials: int = _f(0, "random: how many combinations to train (>= 1). grid: 0 (every combination).")


SWEEP_SECTIONS = ("lora", "train")
SWEEP_METRICS = ("eval_loss",)


@dataclass
class FinetuneConfig:
    """The whole pipeline: one section per stage."""

    name: str = _f("finetune", "Run name; also names the output folder.")
    seed: int = _f(42, "Seed for splits, LoRA initialisation, data order and dropout.")
    output_dir: str = _f("outputs", "Root folder for artifacts written outside Flyte's own storage.")
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def section_json(self, *names: str) -> str:
        """Canonical JSON of some sections."""
        d = self.to_dict()
        return json.dumps({n: d[n] for n in names}, sort_keys=True)

    def hash(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


CHOICES = {
    "data.format": {"auto", "alpaca", "sharegpt", "messages", "completion"},
    "model.quantization": {"4bit", "8bit", "none"},
    "model.bnb_4bit_quant_type": {"nf4", "fp4"},
    "model.compute_dtype": {"bfloat16", "float16", "float32"},
    "model.attn_implementation": {"sdpa", "eager", "flash_attention_2", "varlen"},
    "tokenize.chat_template": {None, "alpaca", "chatml", "llama-3"},
    "tokenize.train_on": {"completions", "all"},
    "tokenize.overlong": {"truncate", "drop"},
    "lora.bias": {"none", "all", "lora_only"},
    "train.backend": {"hf", "unsloth", "auto"},
    "train.distributed": {"ddp", "fsdp"},
    "train.lr_scheduler": {"cosine", "linear", "constant", "constant_with_warmup"},
    "sweep.method": {"grid", "random"},
    "sweep.metric": set(SWEEP_METRICS),
}
EVAL_METRICS = {"exact_match", "execution_accuracy", "rouge_l", "chrf"}


def _type_ok(value: Any, tp: Any) -> bool:
    """Whether a YAML value fits a field's annotation (ints count as floats; no silent str->int)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin in (Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(tp)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    if origin is dict:
        key, item = typing.get_args(tp)
        return isinstance(value, dict) and all(_type_ok(k, key) and _type_ok(v, item) for k, v in value.items())
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def _build(cls: type, raw: dict[str, Any], prefix: str, problems: list[str]) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        where = f"{prefix}{key}"
        if key not in hints:
            section = prefix.rstrip(".").split(".")[-1]
            bare = key[len(section) + 1:] if section and key.startswith(section + "_") else key
            close = difflib.get_close_matches(bare, names, n=1, cutoff=0.6)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f"; known keys: {', '.join(names)}"
            problems.append(f"unknown key '{where}'{hint}")
            continue
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                problems.append(f"'{where}' must be a mapping of settings, got {type(value).__name__}")
                continue
            kwargs[key] = _build(tp, value, f"{where}.", problems)
        elif not _type_ok(value, tp):
            problems.append(f"'{where}' must be {_type_name(tp)}, got {value!r}{_yaml_number_hint(value, tp)}")
        else:
            kwargs[key] = float(value) if tp is float else value
    return cls(**kwargs)


_EXPONENT = re.compile(r"^([+-]?(?:\d+\.?\d*|\.\d+))[eE]([+-]?\d+)$")


def _yaml_number_hint(value: Any, tp: Any) -> str:
    """Why a number came as a string: YAML 1.1 (PyYAML) reads ``2e-4`` and ``1e5`` as text, since its
    floats need a dot and a signed exponent. The fix, spelled so that YAML reads a float."""
    m = _EXPONENT.match(value.strip()) if isinstance(value, str) else None
    if m is None or not _type_ok(1.0, tp) and not _type_ok(1, tp):
        return ""
    mantissa, exponent = m.groups()
    mantissa = mantissa if "." in mantissa else mantissa + ".0"
    exponent = exponent if exponent[0] in "+-" else "+" + exponent
    if not _type_ok(1.0, tp):  # an int field: write the integer out
        return (f": YAML reads {value} as a string, not a number; write {int(float(value))}"
                if float(value).is_integer() else "")
    return (f": YAML reads {value} as a string, not a number (a YAML float needs a dot and a signed exponent); "
            f"write {mantissa}e{exponent}")


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is None and hasattr(tp, "__name__"):
        return tp.__name__
    return str(tp).replace("typing.", "").replace("NoneType", "None")


def validate(cfg: FinetuneConfig) -> list[str]:
    """Every semantic problem of a config (types were checked while building it)."""
    p: list[str] = []
    d = cfg.to_dict()
    for dotted, allowed in CHOICES.items():
        sec, key = dotted.split(".")
        if d[sec][key] not in allowed:
            opts = ", ".join(sorted(str(a) for a in allowed))
            p.append(f"'{dotted}' is {d[sec][key]!r}; choose one of: {opts}")
    if not cfg.data.train_files:
        p.append("'data.train_files' is empty; list at least one input file")
    for name, v in (("data.validation_fraction", cfg.data.validation_fraction),
                    ("data.test_fraction", cfg.data.test_fraction),
                    ("data.max_reject_rate", cfg.data.max_reject_rate),
                    ("data.max_test_contamination", cfg.data.max_test_contamination),
                    ("data.max_repetition", cfg.data.max_repetition),
                    ("data.near_dup_threshold", cfg.data.near_dup_threshold)):
        if not 0.0 <= v <= 1.0:
            p.append(f"'{name}' must be between 0 and 1, got {v}")
    if cfg.data.validation_fraction + cfg.data.test_fraction >= 1.0:
        p.append("'data.validation_fraction' + 'data.test_fraction' must be < 1; nothing would be left to train on")
    overlap = {os.path.normpath(f) for f in cfg.data.train_files} & {os.path.normpath(f) for f in cfg.data.test_files}
    if overlap:
        p.append(f"'data.test_files' overlaps 'data.train_files' ({', '.join(sorted(overlap))}): "
                 "the eval split would leak into training")
    if cfg.data.minhash_num_perm < 16:
        p.append(f"'data.minhash_num_perm' must be >= 16, got {cfg.data.minhash_num_perm}")
    if cfg.data.shingle_size < 1:
        p.append(f"'data.shingle_size' must be >= 1, got {cfg.data.shingle_size}")
    if cfg.data.quarantine_max_chars < 1:
        p.append(f"'data.quarantine_max_chars' must be >= 1, got {cfg.data.quarantine_max_chars}")
    if cfg.data.num_shards < 1:
        p.append(f"'data.num_shards' must be >= 1 (1: no map task), got {cfg.data.num_shards}")
    if not cfg.model.base_model:
        p.append("'model.base_model' is empty; give a local model folder or a Hub id")
    if cfg.tokenize.sequence_len < 16:
        p.append(f"'tokenize.sequence_len' must be >= 16, got {cfg.tokenize.sequence_len}")
    if cfg.tokenize.num_proc < 1:
        p.append(f"'tokenize.num_proc' must be >= 1, got {cfg.tokenize.num_proc}")
    if cfg.tokenize.num_shards < 1:
        p.append(f"'tokenize.num_shards' must be >= 1 (1: no map task), got {cfg.tokenize.num_shards}")
    if cfg.lora.r <= 0:
        p.append(f"'lora.r' must be > 0, got {cfg.lora.r}")
    if cfg.lora.alpha <= 0:
        p.append(f"'lora.alpha' must be > 0, got {cfg.lora.alpha}")
    if not 0.0 <= cfg.lora.dropout < 1.0:
        p.append(f"'lora.dropout' must be in [0, 1), got {cfg.lora.dropout}")
    t = cfg.train
    if t.learning_rate <= 0:
        p.append(f"'train.learning_rate' must be > 0, got {t.learning_rate}")
    for name, v in (("train.micro_batch_size", t.micro_batch_size),
                    ("train.gradient_accumulation_steps", t.gradient_accumulation_steps),
                    ("train.save_steps", t.save_steps), ("train.logging_steps", t.logging_steps),
                    ("train.save_total_limit", t.save_total_limit)):
        if v < 1:
            p.append(f"'{name}' must be >= 1, got {v}")
    if t.max_steps <= 0 and t.num_epochs <= 0:
        p.append("set 'train.max_steps' > 0 or 'train.num_epochs' > 0")
    if t.max_steps == 0 or t.max_steps < -1:
        p.append(f"'train.max_steps' must be -1 (use epochs) or > 0, got {t.max_steps}")
    if not 0.0 <= t.warmup_ratio < 1.0:
        p.append(f"'train.warmup_ratio' must be in [0, 1), got {t.warmup_ratio}")
    if t.weight_decay < 0:
        p.append(f"'train.weight_decay' must be >= 0, got {t.weight_decay}")
    if t.max_grad_norm <= 0:
        p.append(f"'train.max_grad_norm' must be > 0, got {t.max_grad_norm}")
    if t.gpu_memory_gb is not None and t.gpu_memory_gb < 0:
        p.append(f"'train.gpu_memory_gb' must be >= 0 (GiB; 0: recompute every layer), got {t.gpu_memory_gb}")
    if t.preemption_grace_s <= 0:
        p.append(f"'train.preemption_grace_s' must be > 0 (seconds), got {t.preemption_grace_s}")
    if t.eval_steps < 0:
        p.append(f"'train.eval_steps' must be >= 0, got {t.eval_steps}")
    if t.early_stopping_patience is not None and t.eval_steps == 0:
        p.append("'train.early_stopping_patience' needs 'train.eval_steps' > 0")
    if t.num_gpus < 1:
        p.append(f"'train.num_gpus' must be >= 1, got {t.num_gpus}")
    if t.liger_kernel and t.use_cpu:
        p.append("'train.liger_kernel' needs a CUDA GPU (Triton kernels); set it to false with 'train.use_cpu'")
    if t.liger_kernel and t.backend == "unsloth":
        p.append("'train.liger_kernel' is for the hf backend (Unsloth brings its own kernels); "
                 "set 'train.backend' to hf or 'train.liger_kernel' to false")
    if t.activation_offloading and t.use_cpu:
        p.append("'train.activation_offloading' needs a CUDA GPU (it moves activations to the CPU and back); "
                 "set it to false with 'train.use_cpu'")
    if t.activation_offloading and t.backend == "unsloth":
        p.append("'train.activation_offloading' is for the hf backend (Unsloth offloads its checkpointed "
                 "activations itself); set 'train.backend' to hf or 'train.activation_offloading' to false")
    if cfg.model.attn_implementation == "varlen" and t.use_cpu:
        p.append("'model.attn_implementation' varlen needs a CUDA GPU (flash attention); use sdpa with "
                 "'train.use_cpu'")
    if t.num_gpus > 1 and t.backend == "unsloth":
        p.append("'train.backend' unsloth trains on one GPU; use hf (or auto) with 'train.num_gpus' > 1")
    if t.distributed == "fsdp" and t.num_gpus != 1:  # one process shards nothing: the setting is inert there
        if cfg.model.quantization == "8bit":
            p.append("'train.distributed' fsdp cannot shard 8-bit bitsandbytes weights; "
                     "set 'model.quantization' to 4bit (QLoRA) or none")
        if cfg.model.quantization != "none" and cfg.model.upcast_unquantized_fp32:
            p.append("'train.distributed' fsdp flattens parameters of one dtype; "
                     "set 'model.upcast_unquantized_fp32' to false")
        if "8bit" in t.optimizer:
            p.append(f"'train.optimizer' {t.optimizer} cannot save FSDP checkpoints (bitsandbytes 8-bit state); "
                     "use adamw_torch with 'train.distributed' fsdp")
        if t.use_cpu:
            p.append("'train.distributed' fsdp needs GPUs; use ddp with 'train.use_cpu'")
    unknown = [m for m in cfg.eval.metrics if m not in EVAL_METRICS]
    if unknown:
        p.append(f"'eval.metrics' has unknown {unknown}; choose from {sorted(EVAL_METRICS)}")
    if cfg.eval.gate_metric not in cfg.eval.metrics:
        p.append(f"'eval.gate_metric' {cfg.eval.gate_metric!r} must be one of 'eval.metrics' {cfg.eval.metrics}")
    if "execution_accuracy" in cfg.eval.metrics and not cfg.eval.sqlite_db:
        p.append("'eval.metrics' has execution_accuracy but 'eval.sqlite_db' is not set")
    if cfg.eval.max_samples < 1 or cfg.eval.batch_size < 1 or cfg.eval.max_new_tokens < 1:
        p.append("'eval.max_samples', 'eval.batch_size' and 'eval.max_new_tokens' must be >= 1")
    if cfg.eval.max_batch_tokens is not None and cfg.eval.max_batch_tokens < 1:
        p.append(f"'eval.max_batch_tokens' must be >= 1 or null, got {cfg.eval.max_batch_tokens}")
    if cfg.merge.probe_samples < 1:
        p.append(f"'merge.probe_samples' must be >= 1, got {cfg.merge.probe_samples}")
    if cfg.merge.kl_factor <= 0:
        p.append(f"'merge.kl_factor' must be > 0, got {cfg.merge.kl_factor}")
    if cfg.registry.confidence is not None and not 0.0 < cfg.registry.confidence < 1.0:
        p.append(f"'registry.confidence' must be between 0 and 1 (e.g. 0.95) or null, got {cfg.registry.confidence}")
    if cfg.serve.startup_timeout_s <= 0:
        p.append(f"'serve.startup_timeout_s' must be > 0, got {cfg.serve.startup_timeout_s}")
    if not 0 <= cfg.serve.port < 65536:
        p.append(f"'serve.port' must be in [0, 65535], got {cfg.serve.port}")
    p += _export_problems(cfg.export)
    return p + sweep_problems(cfg)


def sweep_problems(cfg: FinetuneConfig) -> list[str]:
    """What is wrong with ``cfg.sweep``: keys that do not exist or may not vary, values of the wrong type or
    that would fail the config's own checks (each value tried alone), and the settings the metric needs."""
    s, p = cfg.sweep, []
    if not s.params:
        if s.num_trials:
            p.append("'sweep.num_trials' is set but 'sweep.params' is empty; list the keys to vary")
        return p
    plain = dataclasses.replace(cfg, sweep=SweepConfig())
    combinations = 1
    for dotted, values in s.params.items():
        where = f"'sweep.params.{dotted}'"
        sec, _, key = str(dotted).partition(".")
        section = getattr(cfg, sec, None) if sec in SWEEP_SECTIONS else None
        fields = {f.name: f for f in dataclasses.fields(section)} if section is not None else {}
        if sec not in SWEEP_SECTIONS:
            p.append(f"{where}: only {' and '.join(k + '.*' for k in SWEEP_SECTIONS)} keys can be swept (trials share "
                     "the data and tokenize stages and one validation split); write e.g. train.learning_rate")
            continue
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1, cutoff=0.6)
            p.append(f"{where}: '{sec}' has no key '{key}'" + (f" (did you mean '{sec}.{close[0]}'?)" if close
                                                                 else f"; its keys: {', '.join(fields)}"))
            continue
        if fields[key].metadata.get("execution_only") or dotted in ("train.num_gpus", "train.use_cpu"):
            p.append(f"{where}: says how the work is spread, not what it produces; it cannot be swept")
            continue
        if not isinstance(values, list) or not values:
            p.append(f"{where} must be a non-empty list of values, e.g. [1.0e-4, 3.0e-4], got {values!r}")
            continue
        combinations *= len(values)
        if len(set(map(json.dumps, values))) < len(values):
            p.append(f"{where} lists a value twice: {values}")
        tp = typing.get_type_hints(type(section))[key]
        for v in values:
            if not _type_ok(v, tp):
                p.append(f"{where}: {v!r} must be {_type_name(tp)}{_yaml_number_hint(v, tp)}")
                continue
            one = dataclasses.replace(plain, **{sec: dataclasses.replace(section, **{key: float(v) if tp is float else v})})
            p += [f"{where}: value {v!r} fails: {problem}" for problem in validate(one) if f"'{dotted}'" in problem]
    if s.method == "random" and not 1 <= s.num_trials <= combinations:
        p.append(f"'sweep.num_trials' must be between 1 and {combinations} (the combinations of 'sweep.params') "
                 f"with 'sweep.method' random, got {s.num_trials}")
    if s.method == "grid" and s.num_trials not in (0, combinations):
        p.append(f"'sweep.num_trials' is {s.num_trials} but a grid trains every combination ({combinations}); "
                 "leave it 0, or use 'sweep.method' random")
    if s.metric == "eval_loss" and (cfg.train.eval_steps < 1 or cfg.data.validation_fraction <= 0):
        p.append("'sweep.metric' eval_loss is the validation loss: set 'train.eval_steps' > 0 and "
                 "'data.validation_fraction' > 0")
    return p


GGUF_TYPES = ("f16", "bf16", "q8_0", "q4_k_m", "q4_k_s", "q5_k_m", "q6_k", "q4_0")


def _export_problems(e: ExportConfig) -> list[str]:
    p = [f"'export.gguf' has {t!r}; choose from {', '.join(GGUF_TYPES)}" for t in e.gguf if t not in GGUF_TYPES]
    if len(set(e.gguf)) != len(e.gguf):
        p.append(f"'export.gguf' lists a type twice: {e.gguf}")
    p += [f"'export.min_agreement' names {t!r}, which 'export.gguf' does not export" for t in e.min_agreement
          if t not in e.gguf]
    p += [f"'export.min_agreement.{t}' must be between 0 and 1, got {v}" for t, v in e.min_agreement.items()
          if not 0.0 <= v <= 1.0]
    if e.probe_samples < 1 or e.max_new_tokens < 1:
        p.append("'export.probe_samples' and 'export.max_new_tokens' must be >= 1")
    return p


def config_from_dict(raw: dict[str, Any], source: str = "<config>") -> FinetuneConfig:
    """Build and validate a config; raise one ConfigError listing every problem."""
    if not isinstance(raw, dict):
        raise ConfigError(source, [f"the top level must be a mapping of sections, got {type(raw).__name__}"])
    problems: list[str] = []
    model = raw.get("model")
    if isinstance(model, dict) and model.get("load_in_4bit") and model.get("load_in_8bit"):
        # The switches other tools use: name the conflict instead of two "unknown key" lines.
        problems.append("'model.load_in_4bit' and 'model.load_in_8bit' are both set; "
                        "use one 'model.quantization: 4bit' (or 8bit, or none)")
        raw = {**raw, "model": {k: v for k, v in model.items() if k not in ("load_in_4bit", "load_in_8bit")}}
    cfg = _build(FinetuneConfig, raw, "", problems)
    # Fields with a type error kept their defaults; do not report them a second time.
    bad = {p.split("'")[1] for p in problems if p.startswith("'")}
    problems += [p for p in validate(cfg) if not any(f"'{key}'" in p for key in bad)]
    if problems:
        raise ConfigError(source, problems)
    return cfg


def _set_dotted(raw: dict[str, Any], dotted: str, value: Any, source: str) -> None:
    node, where = raw, []
    *parents, leaf = dotted.split(".")
    for part in parents:
        where.append(part)
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(source, [f"override {dotted}={value!r}: '{'.'.join(where)}' is a "
                                       f"{type(node).__name__} in the file, not a mapping of settings; "
                                       f"write it as '{'.'.join(where)}:' followed by indented key: value lines"])
    node[leaf] = value


def parse_overrides(pairs: list[str], source: str = "--set") -> dict[str, Any]:
    """``["train.max_steps=5", ...]`` (command-line ``--set``) as ``{"train.max_steps": 5}``, values read as YAML.

    Raises:
        ConfigError: an item without ``=`` or a value that is not YAML.
    """
    overrides, problems = {}, []
    for pair in pairs:
        key, eq, text = pair.partition("=")
        if not eq or not key.strip():
            problems.append(f"--set {pair!r}: write KEY=VALUE, e.g. --set train.max_steps=5")
            continue
        try:
            overrides[key.strip()] = yaml.safe_load(text)
        except yaml.YAMLError as e:
            problems.append(f"--set {pair!r}: the value is not YAML ({e})")
    if problems:
        raise ConfigError(source, problems)
    return overrides


def load_config(path: str | os.PathLike, overrides: Optional[dict[str, Any]] = None) -> FinetuneConfig:
    """Load a YAML config, apply ``{"section.key": value}`` overrides, validate.

    Relative paths in ``data.*_files``, ``model.base_model`` and ``eval.sqlite_db`` stay as written:
    they are resolved against the working directory, like every other tool's config.

    Raises:
        ConfigError: the file is missing or not YAML, or the config has problems (all listed).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(str(path), ["file not found; pass a YAML file such as configs/tiny.yaml"])
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(str(path), [f"not valid YAML: {e}"]) from e
    if not isinstance(raw, dict):
        raise ConfigError(str(path), [f"the top level must be a mapping of sections (data:, model:, ...), got a "
                                      f"{type(raw).__name__}; write 'section:' lines, not '- item' lines"])
    for dotted, value in (overrides or {}).items():
        _set_dotted(raw, dotted, value, str(path))
    return config_from_dict(raw, source=str(path))


def config_to_yaml(cfg: FinetuneConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
