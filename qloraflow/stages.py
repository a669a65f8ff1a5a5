"""What crosses between the pipeline's stages: per stage, the settings that decide its result and the
result it hands on (litgpt's ``args.py`` dataclasses; Flyte passes them as typed task inputs and outputs).

A stage's settings hold exactly what its output depends on: its config sections with the
``execution_only`` fields at their defaults, and the digests of the files it reads. Flyte's cache key
of a stage is then its settings plus the folders of the stages before it, and nothing else. How the
work is spread (:class:`ExecutionSettings`) and where it is logged (:class:`RunContext`) travel apart,
as inputs the cache ignores::

    from qloraflow.config import load_config
    from qloraflow.stages import stage_settings
    cfg = load_config("configs/tiny.yaml")
    settings = stage_settings(cfg, fingerprints)  # the files' digests: tasks/resolve.py input_fingerprints
    settings.train.config(settings.execution)     # the FinetuneConfig that train_adapter takes
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Optional

from qloraflow.config import (DataConfig, EvalConfig, ExportConfig, FinetuneConfig, LoraSettings, MergeConfig,
                              ModelConfig, ServeConfig, TokenizeConfig, TrainConfig)
from qloraflow.paired import by_id


@dataclass
class RunContext:
    """Where a stage logs: bookkeeping that never changes a result (ignored by the cache)."""

    pipeline_run_id: str
    """The pipeline's MLflow run; each stage's run is nested under it."""
    name: str
    """The config's name (MLflow datasets are named ``<name>-<split>``)."""
    experiment: str
    """MLflow experiment."""
    tracking_uri: Optional[str] = None
    """MLflow tracking URI; None: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db."""
    run_name: str = ""
    """The pipeline run's name, one per execution (``<name>-<yyyymmdd-hhmmss>``); stage runs are called
    ``<run_name>-<stage>``."""
    tags: dict[str, str] = field(default_factory=dict)
    """Tags every run of the execution carries: MLflow's source, user and git columns."""


@dataclass
class ExecutionSettings:
    """How the work is spread: the config's ``execution_only`` fields (ignored by the cache)."""

    data_dedupe_workers: Optional[int] = None
    """data.dedupe_workers: processes computing MinHash signatures."""
    data_num_shards: int = 1
    """data.num_shards: shards of the data stage's map task."""
    tokenize_num_proc: int = 1
    """tokenize.num_proc: processes used to tokenize."""
    tokenize_num_shards: int = 1
    """tokenize.num_shards: shards of the tokenize stage's map task."""
    train_distributed: str = "ddp"
    """train.distributed: how several GPUs share the training (ddp or fsdp)."""
    train_preemption_grace_s: float = 30.0
    """train.preemption_grace_s: seconds between SIGTERM and SIGKILL that the preemption checkpoint fits in."""

    @classmethod
    def of(cls, cfg: FinetuneConfig) -> "ExecutionSettings":
        return cls(**{f.name: getattr(getattr(cfg, section), name)
                      for f in dataclasses.fields(cls) for section, name in [f.name.split("_", 1)]})

    def apply(self, section_name: str, section: Any) -> Any:
        """``section`` (``cfg.<section_name>``) with its execution-only fields set from these settings."""
        prefix = f"{section_name}_"
        return dataclasses.replace(section, **{f.name[len(prefix):]: getattr(self, f.name)
                                               for f in dataclasses.fields(self) if f.name.startswith(prefix)})


def result_section(section: Any) -> Any:
    """A config section with its ``execution_only`` fields at their defaults: what decides a result."""
    defaults = type(section)()
    return dataclasses.replace(section, **{f.name: getattr(defaults, f.name) for f in dataclasses.fields(section)
                                           if f.metadata.get("execution_only")})


@dataclass
class DataSettings:
    """Ingest, clean, dedupe and split (``qloraflow.data.prepare_dataset``)."""

    data: DataConfig
    seed: int
    data_digest: str
    """Content digest of data.train_files and data.test_files."""
    base_model: str = ""
    """With data.max_tokens, the model whose tokenizer counts the tokens; else empty."""
    revision: Optional[str] = None
    tokenizer_digest: str = ""
    """With data.max_tokens, the tokenizer's digest; else empty."""


@dataclass
class TokenizeSettings:
    """Chat template, label masking and packing (``qloraflow.tokenize.tokenize_dataset``)."""

    tokenize: TokenizeConfig
    base_model: str
    """The folder the tokenizer and its chat template are read from."""
    tokenizer_digest: str


@dataclass
class TrainSettings:
    """QLoRA training (``qloraflow.train.train_adapter``)."""

    model: ModelConfig
    lora: LoraSettings
    train: TrainConfig
    tokenize: TokenizeConfig
    """Read for packing (padding-free batches); any change also re-runs tokenize, so it costs no cache hit."""
    seed: int
    model_digest: str
    """The base model's fingerprint: small files by content, weights by name and size."""

    def config(self, execution: ExecutionSettings) -> FinetuneConfig:
        return FinetuneConfig(seed=self.seed, model=self.model, lora=self.lora, tokenize=self.tokenize,
                              train=execution.apply("train", self.train))


@dataclass
class EvalSettings:
    """Base and candidate on the frozen test split (``qloraflow.evaluate.evaluate_base_and_candidate``)."""

    eval: EvalConfig
    model: ModelConfig
    """The base model (a change re-runs training first)."""
    sqlite_digest: str = ""
    """Content digest of eval.sqlite_db; empty without one."""

    def config(self) -> FinetuneConfig:
        return FinetuneConfig(model=self.model, eval=self.eval)


@dataclass
class MergeSettings:
    """Merge, verify, and evaluate the merged model (``qloraflow.merge.merge_and_verify``)."""

    merge: MergeConfig
    model: ModelConfig
    eval: EvalConfig
    """The evaluation the merged model gets (a change re-runs evaluate first)."""

    def config(self) -> FinetuneConfig:
        return FinetuneConfig(model=self.model, eval=self.eval, merge=self.merge)


@dataclass
class DeploySettings:
    """vLLM deployment and smoke test (``qloraflow.serve``)."""

    serve: ServeConfig
    served_model_name: str
    """registry.model_name: the name the server answers to."""
    max_new_tokens: int
    """eval.max_new_tokens: the same generation limit as the evaluation's."""


@dataclass
class ExportSettings:
    """GGUF exports of the merged model, each checked under llama.cpp (``qloraflow.export.export_gguf``)."""

    export: ExportConfig
    converter_sha256: str = ""
    """The pinned llama-cpp-python sdist the converter and quantizer come from (a new pin re-exports)."""

    @property
    def enabled(self) -> bool:
        return bool(self.export.gguf) or self.export.mlx


@dataclass
class RegisterSettings:
    """Registration and the promotion gate: the whole config (never cached) and the stages' identities."""

    config: FinetuneConfig
    data_digest: str
    """Digest of :class:`DataSettings`: which data the model was trained and tested on."""
    train_digest: str
    eval_digest: str
    dataset_hash: str = ""
    """Content digest of the input data files: the ``dataset.hash`` tag of the pipeline run and the version."""


@dataclass
class DataResult:
    """The data stage's counts; the whole report is ``report.json`` in its folder."""

    read: int
    kept: int
    rejected: int
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    mlflow_run_id: str = ""
    report_html: str = ""
    """This stage's report page (its Deck tabs), which the register task keeps under ``outputs/<name>/``."""


@dataclass
class TokenizeResult:
    """Tokens per split; the whole report is ``report.json`` in its folder."""

    tokens: dict[str, int]
    trained_tokens: dict[str, int]
    packing_efficiency: dict[str, float]
    mlflow_run_id: str = ""
    report_html: str = ""
    """This stage's report page (its Deck tabs), which the register task keeps under ``outputs/<name>/``."""


@dataclass
class TrainResult:
    """What training did (``train_result.json`` in the folder holds these and the memory figures)."""

    backend: str
    global_step: int
    train_loss_first: Optional[float]
    train_loss_last: Optional[float]
    best_eval_loss: Optional[float]
    train_seconds: float
    tokens_seen: int
    trainable_params: int
    world_size: int
    adapter_sha256: str
    adapter_sha256_by_rank: list[str]
    resumed_from: Optional[str] = None
    mlflow_run_id: str = ""
    report_html: str = ""
    """This stage's report page (its Deck tabs), which the register task keeps under ``outputs/<name>/``."""

    @classmethod
    def of(cls, summary: dict[str, Any], mlflow_run_id: str = "", report_html: str = "") -> "TrainResult":
        """The fields of ``train_adapter``'s summary."""
        names = {f.name for f in dataclasses.fields(cls)} - {"mlflow_run_id", "report_html"}
        values = {k: summary.get(k) for k in names}
        values.update(tokens_seen=int(values["tokens_seen"] or 0), trainable_params=int(values["trainable_params"]))
        return cls(**values, mlflow_run_id=mlflow_run_id, report_html=report_html)


@dataclass
class Sample:
    """One test record answered by a model."""

    messages: list[dict[str, str]]
    prompt: str
    reference: str
    answer: str
    ended_with_eos: bool
    id: str = ""
    """The record's id from ingest (``qloraflow.data.record_id``): samples of one record share it."""
    meta: dict[str, str] = field(default_factory=dict)
    """The record's extra input fields (e.g. ``db_id``), as text."""
    scores: dict[str, float] = field(default_factory=dict)
    """The answer's score on each task metric (0/1 for exact match and execution accuracy)."""

    @classmethod
    def of(cls, sample: dict[str, Any]) -> "Sample":
        return cls(messages=[{k: str(v) for k, v in m.items()} for m in sample["messages"]], prompt=sample["prompt"],
                   reference=sample["reference"], answer=sample["answer"], ended_with_eos=bool(sample["ended_with_eos"]),
                   id=str(sample.get("id", "")), meta={k: str(v) for k, v in (sample.get("meta") or {}).items()},
                   scores={k: float(v) for k, v in (sample.get("scores") or {}).items()})

    @classmethod
    def keyed(cls, samples: list[dict[str, Any]]) -> dict[str, "Sample"]:
        """``{record id: Sample}`` of an evaluation's samples (in their order); an id missing or twice is an error."""
        return {rid: cls.of(dict(s)) for rid, s in by_id(samples, "samples").items()}


@dataclass
class EvalResult:
    """Metrics of ``base`` and ``candidate`` (base + adapter) and their answers."""

    metrics: dict[str, dict[str, float]]
    samples: dict[str, dict[str, Sample]]
    """Per model, its answers by record id."""
    mlflow_run_id: str = ""
    report_html: str = ""
    """This stage's report page (its Deck tabs), which the register task keeps under ``outputs/<name>/``."""


@dataclass
class MergeCheck:
    """The merged model against base + adapter (``qloraflow.merge.verify_merge``)."""

    worst_ulps: float
    delta_lost_share: float
    mean_kl: float
    kl_bound: float
    greedy_agreement: float


@dataclass
class MergeResult:
    """The merged model's identity, check and metrics, and the test answers it gave."""

    sha256: str
    bytes: int
    dtype: str
    check: MergeCheck
    metrics: dict[str, float]
    metric_drop: float
    samples: dict[str, Sample]
    """The merged model's answers by record id."""
    mlflow_run_id: str = ""
    report_html: str = ""
    """This stage's report page (its Deck tabs), which the register task keeps under ``outputs/<name>/``."""


@dataclass
class ExportResult:
    """The exports written and their checks; ``skipped`` says why none was written."""

    skipped: Optional[str] = None
    gguf: dict[str, float] = field(default_factory=dict)
    """Greedy agreement with the merged model per GGUF type (every one passed its check); ``mlx`` for the MLX folder."""
    files: dict[str, str] = field(default_factory=dict)
    """File name -> sha256 of each GGUF and Modelfile in the export folder."""
    mlflow_run_id: str = ""
    report_html: str = ""


@dataclass
class DeployResult:
    """The smoke test of the served model; ``skipped`` says why nothing was served."""

    passed: bool
    skipped: Optional[str] = None
    hf_agreement: Optional[float] = None
    """Share of the server's greedy answers identical to Hugging Face generate's."""
    chat_answers: dict[str, str] = field(default_factory=dict)
    """The server's chat answers by record id."""
    latency: dict[str, float] = field(default_factory=dict)
    """The scalar latency figures (time to first token, tokens per second, ...)."""
    port: Optional[int] = None
    pid: Optional[int] = None
    mlflow_run_id: str = ""
    report_html: str = ""
    """This stage's report page (its Deck tabs), which the register task keeps under ``outputs/<name>/``."""


class StageSettings(NamedTuple):
    data: DataSettings
    tokenize: TokenizeSettings
    train: TrainSettings
    evaluate: EvalSettings
    merge: MergeSettings
    deploy: DeploySettings
    export: ExportSettings
    register: RegisterSettings
    execution: ExecutionSettings


def _converter_pin() -> str:
    from qloraflow.assets import ASSETS

    return ASSETS["llama-cpp"].sha256


def digest(settings: Any) -> str:
    """A short content digest of a settings object (registry tags name the data and training this way)."""
    return hashlib.sha256(json.dumps(dataclasses.asdict(settings), sort_keys=True, default=str).encode()).hexdigest()[:16]


def stage_settings(cfg: FinetuneConfig, fingerprints: dict[str, str]) -> StageSettings:
    """Every stage's settings from the validated config and the input files' digests.

    Args:
        cfg: the loaded config (``qloraflow.config.load_config``).
        fingerprints: ``data``, ``model``, ``tokenizer`` and ``sqlite_db`` digests of the files the run reads.
    """
    counts_tokens = cfg.data.max_tokens is not None  # then the data stage reads the base model's tokenizer
    data = DataSettings(data=result_section(cfg.data), seed=cfg.seed, data_digest=fingerprints["data"],
                        base_model=cfg.model.base_model if counts_tokens else "",
                        revision=cfg.model.revision if counts_tokens else None,
                        tokenizer_digest=fingerprints["tokenizer"] if counts_tokens else "")
    train = TrainSettings(model=cfg.model, lora=cfg.lora, train=result_section(cfg.train),
                          tokenize=result_section(cfg.tokenize), seed=cfg.seed, model_digest=fingerprints["model"])
    evaluate = EvalSettings(eval=cfg.eval, model=cfg.model, sqlite_digest=fingerprints["sqlite_db"])
    return StageSettings(
        data=data,
        tokenize=TokenizeSettings(tokenize=result_section(cfg.tokenize), base_model=cfg.model.base_model,
                                  tokenizer_digest=fingerprints["tokenizer"]),
        train=train, evaluate=evaluate,
        merge=MergeSettings(merge=cfg.merge, model=cfg.model, eval=cfg.eval),
        deploy=DeploySettings(serve=cfg.serve, served_model_name=cfg.registry.model_name,
                              max_new_tokens=cfg.eval.max_new_tokens),
        export=ExportSettings(export=cfg.export, converter_sha256=_converter_pin() if cfg.export.gguf else ""),
        register=RegisterSettings(config=cfg, data_digest=digest(data), train_digest=digest(train),
                                  eval_digest=digest(evaluate), dataset_hash=fingerprints["data"]),
        execution=ExecutionSettings.of(cfg))
