"""A plan before launch: predicted peak GPU memory, tokens/s, time and cost of a config's training
(the train stage only: evaluation and the merge are not counted).

An analytic model of one QLoRA training step, calibrated on measured runs
(``benchmarks/plan_calibration.json``; ``python benchmarks/plan_error.py`` prints its error)::

    qloraflow plan configs/llama3-8b-qlora-a10g.yaml --gpu a10g [--price-per-hour 1.0] [--tokenized DIR]

    from qloraflow.plan import plan_config
    plan = plan_config(load_config("configs/llama3-8b-qlora-a10g.yaml"), "a10g")
    plan.reserved_gib, plan.tokens_per_s, plan.gpu_hours, plan.cost

Memory (bytes; ``T`` = tokens of one micro-batch, ``d`` hidden size, ``L`` layers):
  * weights: NF4 0.5 byte a parameter of every decoder linear layer, plus its quantisation constants
    (an 8-bit absmax per 64 weights and an fp32 one per 256 of those with double quantisation, an fp32
    absmax per 64 without); embeddings, lm_head (unless tied) and norms in bf16.
  * LoRA: parameters and gradients in fp32, optimiser states (8-bit AdamW: 2 bytes, AdamW: 8).
  * activations: with gradient checkpointing each layer's input (2d bytes a token per layer, none on
    the GPU when offloaded: Unsloth's checkpointing, ``train.activation_offloading``) plus the working
    set of the layer being recomputed; without it every layer's working set. A layer's working set is
    2 bytes per element of what its backward keeps (6d + 2 kv + 4 intermediate a token, fp32 norm
    inputs) and 1 byte per input element of each adapted module when LoRA dropout is on.
  * attention mask: SDPA with packed (or padded) rows materialises a boolean/additive mask over each
    row (``MASK_BYTES`` a position pair); the flash kernels (``varlen``, Unsloth) do not.
  * logits: the project's losses are fused (TRL's chunked LM head, Liger, Unsloth): one tile of
    1024 tokens x 32768 vocabulary; a loss over the full logits would hold T x vocab in bf16 plus
    two fp32 copies (10 bytes an element).
  * a fitted allocator overhead (reserved minus allocated, cuBLAS workspace), and the CUDA context
    (outside what torch reserves, counted for the fit against the card).

Time of one micro-batch: matmul FLOPs (2 a parameter a token forward, 2 for the input gradient, 2 more
for the recomputed forward; LoRA's weight gradient too) over the GPU's bf16 dense TFLOP/s times the
backend's efficiency; attention FLOPs (causal within each example on the flash kernels, the whole
row under SDPA's mask) over the attention kernel's efficiency; the NF4 dequantisation traffic (read
0.5, write and read 2 bytes a parameter, each pass) over memory bandwidth; a fixed time a micro-batch
per backend (kernel launches, the Trainer's Python). The efficiencies, fixed times and memory
factors are the free constants in :data:`CONSTANTS`.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

from qloraflow.config import FinetuneConfig
from qloraflow.errors import ConfigError

GIB = 2**30


@dataclass(frozen=True)
class GPU:
    """One accelerator: memory as torch reports it (``total_memory``), dense bf16 peak, bandwidth, price."""

    name: str
    memory_gib: float
    bf16_tflops: float
    bandwidth_tbs: float
    price_per_hour: float  # USD, on-demand, one GPU (an 8-GPU instance's price / 8); override with --price-per-hour


# Memory: torch.cuda.get_device_properties(0).total_memory (what its OOM messages call "total capacity").
# Prices: AWS on-demand list prices (us-east-1, 2025) per GPU: g5, g6, p4d, p4de, p5, p5en.
GPUS = {g.name: g for g in [
    GPU("a10g", 22.19, 70.0, 0.60, 1.01),
    GPU("l4", 22.03, 121.0, 0.30, 0.80),
    GPU("a100-40gb", 39.39, 312.0, 1.56, 4.10),
    GPU("a100-80gb", 79.15, 312.0, 2.04, 5.12),
    GPU("h100", 79.11, 989.0, 3.35, 6.88),
    GPU("h200", 139.8, 989.0, 4.80, 7.91),
]}

# The free constants, fitted on benchmarks/plan_calibration.json by `python benchmarks/plan_error.py --fit`.
CONSTANTS: dict[str, float] = {
    "matmul_eff.hf": 0.3274, "matmul_eff.unsloth": 0.5627,  # share of the bf16 peak the decoder's matmuls reach
    "attn_eff.masked": 0.3419, "attn_eff.flash": 0.4355,     # SDPA over a masked row; flash (varlen) kernels
    "micro_s.hf": 0.0153, "micro_s.unsloth": 0.1199,         # fixed seconds a micro-batch
    "working_sets.hf": 1.0362, "working_sets.unsloth": 0.788,  # layer working sets alive at the peak
    "overhead_gib": 0.524,                                   # allocator and workspaces
}
CUDA_CONTEXT_GIB = 0.5
DDP_EFFICIENCY = 0.91   # tokens/s a GPU on 2 GPUs vs 1 (benchmarks/train_elastic.py --gpus 2, README)
MASK_BYTES = 8.0        # bytes a (query, key) pair of an SDPA mask over a packed row, its temporaries included
LOSS_TILE = 1024 * 32768 * 6  # a fused LM head's tile: bf16 logits and their fp32 statistics
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# --------------------------------------------------------------------------------------- the model

@dataclass(frozen=True)
class ModelShape:
    """What the plan reads from a model's ``config.json``."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool

    @classmethod
    def from_config(cls, c: dict[str, Any]) -> "ModelShape":
        c = c.get("text_config", c)  # multimodal configs nest the language model's
        heads = c["num_attention_heads"]
        return cls(hidden=c["hidden_size"], layers=c["num_hidden_layers"], heads=heads,
                   kv_heads=c.get("num_key_value_heads") or heads,
                   head_dim=c.get("head_dim") or c["hidden_size"] // heads, intermediate=c["intermediate_size"],
                   vocab=c["vocab_size"], tied=bool(c.get("tie_word_embeddings", False)))

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear module of one decoder layer."""
        d, q, kv, f = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
                "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)}

    @property
    def layer_params(self) -> int:  # quantised parameters of one decoder layer
        return sum(i * o for i, o in self.linears().values())


# The published shapes (config.json) of the models the example configs name, for a plan on a machine that
# cannot read them (gated on the Hub, offline): the plan says it used this table.
_LLAMA3_8B = {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
              "intermediate_size": 14336, "vocab_size": 128256, "tie_word_embeddings": False}
KNOWN_SHAPES: dict[str, dict[str, Any]] = {
    "meta-llama/Meta-Llama-3-8B": _LLAMA3_8B, "meta-llama/Meta-Llama-3-8B-Instruct": _LLAMA3_8B,
    "meta-llama/Llama-3.1-8B": _LLAMA3_8B, "meta-llama/Llama-3.1-8B-Instruct": _LLAMA3_8B,
}


def read_model_shape(base_model: str, revision: Optional[str] = None) -> Optional[ModelShape]:
    """The shape of ``model.base_model``: its folder's config.json, else the Hugging Face cache's, else
    the Hub's (unless ``HF_HUB_OFFLINE``); None when none can be read."""
    path = Path(base_model).expanduser() / "config.json"
    if path.is_file():
        return ModelShape.from_config(json.loads(path.read_text()))
    try:
        from huggingface_hub import hf_hub_download, try_to_load_from_cache

        cached = try_to_load_from_cache(base_model, "config.json", revision=revision)
        if not isinstance(cached, str) and os.environ.get("HF_HUB_OFFLINE", "0") in ("0", ""):
            cached = hf_hub_download(base_model, "config.json", revision=revision)
        return ModelShape.from_config(json.loads(Path(cached).read_text())) if isinstance(cached, str) else None
    except Exception:  # noqa: BLE001 - gated, offline, not a Hub id: the plan says it cannot see the shape
        return None


@dataclass(frozen=True)
class Workload:
    """The settings of one micro-batch that decide its memory and time (from a config: :func:`workload`)."""

    seq: int
    micro_batch: int
    backend: str = "hf"                 # hf or unsloth
    checkpointing: bool = True
    offload: bool = False               # checkpointed activations in CPU memory
    packing: bool = True
    attention: str = "sdpa"             # sdpa, eager, flash_attention_2, varlen
    example_tokens: Optional[float] = None  # token-weighted mean example length (sum n^2 / sum n); None: seq
    lora_r: int = 16
    lora_targets: tuple[str, ...] = ALL_LINEAR
    lora_dropout: float = 0.0
    quantization: str = "4bit"
    double_quant: bool = True
    optimizer: str = "paged_adamw_8bit"
    liger: bool = False
    full_logits: bool = False           # a loss over materialised logits (none of the project's backends)

    @property
    def tokens(self) -> int:
        return self.seq * self.micro_batch

    @property
    def masked(self) -> bool:
        """SDPA/eager attention over a mask of each (packed or padded) row, rather than a flash kernel."""
        return self.backend == "hf" and self.attention in ("sdpa", "eager")


def workload(cfg: FinetuneConfig, example_tokens: Optional[float] = None) -> Workload:
    """The :class:`Workload` a config trains with (``train.backend: auto`` planned as ``unsloth``)."""
    targets = cfg.lora.target_modules
    targets = [targets] if isinstance(targets, str) and targets != "all-linear" else targets
    targets = ALL_LINEAR if targets == "all-linear" else tuple(t for t in targets if t in ALL_LINEAR)
    backend = "unsloth" if cfg.train.backend in ("unsloth", "auto") else "hf"
    ckpt = cfg.train.gradient_checkpointing
    return Workload(seq=cfg.tokenize.sequence_len, micro_batch=cfg.train.micro_batch_size, backend=backend,
                    checkpointing=ckpt, offload=ckpt and (backend == "unsloth" or cfg.train.activation_offloading),
                    packing=cfg.tokenize.packing, attention=cfg.model.attn_implementation,
                    example_tokens=example_tokens, lora_r=cfg.lora.r, lora_targets=targets,
                    lora_dropout=cfg.lora.dropout, quantization=cfg.model.quantization,
                    double_quant=cfg.model.double_quant, optimizer=cfg.train.optimizer,
                    liger=cfg.train.liger_kernel and backend == "hf")


def lora_params(shape: ModelShape, w: Workload) -> int:
    return shape.layers * sum(w.lora_r * (i + o) for n, (i, o) in shape.linears().items() if n in w.lora_targets)


def memory_gib(shape: ModelShape, w: Workload, k: dict[str, float] = CONSTANTS) -> dict[str, float]:
    """Predicted peak memory torch reserves, by part (GiB); ``reserved`` is their sum."""
    d, L, T = shape.hidden, shape.layers, w.tokens
    n_quant = L * shape.layer_params
    per_param = {"4bit": 0.5 + (1 / 64 + 4 / (64 * 256) if w.double_quant else 4 / 64), "8bit": 1.0 + 4 / 4096,
                 "none": 2.0}[w.quantization]
    embeddings = shape.vocab * d * (1 if shape.tied else 2) * 2 + (2 * L + 1) * d * 2
    n_lora = lora_params(shape, w)
    lora = n_lora * (4 + 4 + (2 if "8bit" in w.optimizer else 8))
    kv = shape.kv_heads * shape.head_dim
    # Liger's fused RMSNorm keeps no fp32 inputs and its fused SwiGLU no activation output.
    layer = 2 * (6 * d + 2 * kv + 4 * shape.intermediate) - (2 * shape.intermediate if w.liger else -2 * 4 * d)
    if w.lora_dropout > 0:
        layer += sum(shape.linears()[n][0] for n in w.lora_targets)
    working = k[f"working_sets.{w.backend}"] * layer * T
    if w.checkpointing:
        activations = working + (0 if w.offload else 2 * d * L * T)
    else:
        activations = L * layer * T
    rows = [w.tokens] if w.packing else [w.seq] * w.micro_batch  # padding-free packing: one row a micro-batch
    mask = MASK_BYTES * sum(r * r for r in rows) if w.masked else 0.0
    if w.masked and w.attention == "eager":
        mask += shape.heads * sum(r * r for r in rows) * (2 + 4 + 2)  # scores, fp32 softmax, probabilities
    logits = T * shape.vocab * 10 if w.full_logits else LOSS_TILE
    parts = {"weights": n_quant * per_param + embeddings, "lora_and_optimizer": lora, "activations": activations,
             "attention_mask": mask, "logits": logits, "overhead": k["overhead_gib"] * GIB}
    out = {name: v / GIB for name, v in parts.items()}
    out["reserved"] = sum(out.values())
    return out


def step_seconds(shape: ModelShape, w: Workload, gpu: GPU, k: dict[str, float] = CONSTANTS) -> dict[str, float]:
    """Predicted seconds of one micro-batch (forward and backward), by part; ``total`` is their sum."""
    T, passes = w.tokens, 3 if w.checkpointing else 2  # forward, input gradient (, recomputed forward)
    n_layers = shape.layers * shape.layer_params
    n_head = shape.vocab * shape.hidden
    matmul = 2 * n_layers * passes * T + 2 * n_head * 2 * T + 2 * lora_params(shape, w) * (passes + 1) * T
    attn_width = shape.heads * shape.head_dim * shape.layers
    if w.masked:  # the whole row under the mask: no causal skipping
        pairs = sum(r * r for r in ([w.tokens] if w.packing else [w.seq] * w.micro_batch))
    else:  # causal within each example (flash varlen), or within each row
        span = w.example_tokens if (w.packing and w.example_tokens) else w.seq
        pairs = T * span / 2
    attention = 4 * attn_width * pairs * (1 + 2.5 + (1 if w.checkpointing else 0))  # flash backward ~2.5x forward
    peak = gpu.bf16_tflops * 1e12
    dequant = passes * n_layers * 4.5 / (gpu.bandwidth_tbs * 1e12) if w.quantization == "4bit" else 0.0
    eff_attn = k["attn_eff.masked" if w.masked else "attn_eff.flash"]
    out = {"matmul": matmul / (peak * k[f"matmul_eff.{w.backend}"]), "attention": attention / (peak * eff_attn),
           "dequantize": dequant, "fixed": k[f"micro_s.{w.backend}"]}
    out["total"] = sum(out.values())
    out["tokens"] = T
    return out


# ---------------------------------------------------------------------------------------- the data

@dataclass
class DataTokens:
    """The training split's size in tokens, read from the tokenize report or estimated from the data files."""

    examples: int
    tokens: int
    rows: Optional[int]          # packed rows, when the tokenize report says
    example_tokens: Optional[float]  # token-weighted mean example length
    source: str


def tokens_from_report(report: dict[str, Any], where: str) -> DataTokens:
    """The train split of a tokenize report (``report.json`` of the tokenize stage)."""
    split = report["splits"]["train"]
    hist = split.get("length_histogram") or {}
    edges, counts = hist.get("edges", []), hist.get("counts", [])
    mids = [(a + b) / 2 for a, b in zip(edges, edges[1:])]
    total = sum(c * m for c, m in zip(counts, mids))
    span = sum(c * m * m for c, m in zip(counts, mids)) / total if total else None
    return DataTokens(examples=split["examples"], tokens=split["tokens"], rows=split.get("rows"),
                      example_tokens=span, source=f"tokenize report {where}")


def estimate_tokens(cfg: FinetuneConfig, chars_per_token: float = 4.0, sample: int = 256) -> DataTokens:
    """Tokens of the training split estimated from ``data.train_files``: characters of every record's
    messages over the base tokenizer's characters a token (measured on ``sample`` records when the base
    model is a local folder with a tokenizer, else ``chars_per_token``), plus 8 template tokens a turn."""
    from qloraflow.ingest import Record, read_source
    from qloraflow.readers import input_files

    lengths, texts = [], []
    for spec in cfg.data.train_files:
        for source, kind in input_files(spec):
            for r in read_source(source, kind, cfg.data.format):
                if isinstance(r, Record):
                    lengths.append((sum(len(m["content"]) for m in r.messages), len(r.messages)))
                    if len(texts) < sample:
                        texts.append("\n".join(m["content"] for m in r.messages))
    ratio, how = chars_per_token, f"{chars_per_token} characters a token"
    if texts and (Path(cfg.model.base_model) / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(cfg.model.base_model)
        n = sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts)
        ratio, how = sum(map(len, texts)) / max(n, 1), f"the base tokenizer on {len(texts)} records"
    keep = 1 - cfg.data.validation_fraction - (0 if cfg.data.test_files else cfg.data.test_fraction)
    seq = cfg.tokenize.sequence_len
    per = [min(seq, c / ratio + 8 * turns) for c, turns in lengths]
    span = sum(n * n for n in per) / sum(per) if per else None
    return DataTokens(examples=int(len(per) * keep), tokens=int(sum(per) * keep), rows=None, example_tokens=span,
                      source=f"estimated from {len(per)} records of data.train_files ({how})")


def data_tokens(cfg: FinetuneConfig, tokenized: Optional[str] = None) -> DataTokens:
    """From ``tokenized`` (the tokenize stage's folder or its report.json) when given, else estimated."""
    if tokenized:
        path = Path(tokenized)
        path = path / "report.json" if path.is_dir() else path
        return tokens_from_report(json.loads(path.read_text()), str(path))
    return estimate_tokens(cfg)


# ---------------------------------------------------------------------------------------- the plan

@dataclass
class Plan:
    """A config's predicted memory (GiB, by part), micro-batch time (s, by part), steps, hours and cost."""
    gpu: GPU
    workload: Workload
    memory: dict[str, float]
    step: dict[str, float]
    data: Optional[DataTokens]
    num_gpus: int = 1
    accumulation: int = 1
    price_per_hour: float = 0.0
    steps_per_epoch: Optional[int] = None
    optimizer_steps: Optional[int] = None
    notes: list[str] = field(default_factory=list)

    @property
    def reserved_gib(self) -> float:  # what torch reserves at the peak
        return self.memory["reserved"]

    @property
    def device_gib(self) -> float:
        """What the card must hold: torch's reserved memory plus the CUDA context."""
        return self.reserved_gib + CUDA_CONTEXT_GIB

    @property
    def fits(self) -> bool:
        return self.device_gib <= self.gpu.memory_gib

    @property
    def tokens_per_s(self) -> float:
        """Tokens (row slots, padding included) a second on one GPU."""
        return self.step["tokens"] / self.step["total"]

    def _hours(self, steps: Optional[int]) -> Optional[float]:
        return None if steps is None else steps * self.accumulation * self.step["total"] / 3600

    @property
    def hours(self) -> Optional[float]:
        """Wall-clock hours of the whole training (every GPU working at once)."""
        return self._hours(self.optimizer_steps)

    @property
    def epoch_hours(self) -> Optional[float]:
        return self._hours(self.steps_per_epoch)

    @property
    def gpu_hours(self) -> Optional[float]:
        return None if self.hours is None else self.hours * self.num_gpus

    @property
    def cost(self) -> Optional[float]:
        return None if self.gpu_hours is None else self.gpu_hours * self.price_per_hour


def plan_config(cfg: FinetuneConfig, gpu: str, *, shape: Optional[ModelShape] = None,
                data: Optional[DataTokens] = None, price_per_hour: Optional[float] = None,
                constants: dict[str, float] = CONSTANTS) -> Plan:
    """The plan of ``cfg`` on one ``gpu`` (a key of :data:`GPUS`) per training process.

    Raises:
        ConfigError: an unknown GPU, or a base model whose config.json cannot be read.
    """
    if gpu not in GPUS:
        raise ConfigError("--gpu", [f"unknown GPU {gpu!r}; one of {', '.join(GPUS)}"])
    from_table = False
    shape = shape or read_model_shape(cfg.model.base_model, cfg.model.revision)
    if shape is None and cfg.model.base_model in KNOWN_SHAPES:
        shape, from_table = ModelShape.from_config(KNOWN_SHAPES[cfg.model.base_model]), True
    if shape is None:
        raise ConfigError("model.base_model", [
            f"'model.base_model': cannot read the config.json of {cfg.model.base_model!r} (not a local folder, "
            "not in the Hugging Face cache, Hub unreachable or gated); download it, or pass --model-config"])
    w = workload(cfg, data.example_tokens if data else None)
    g = GPUS[gpu]
    timed = w  # unpacked rows are padded to the longest in each (length-grouped) batch, not to sequence_len
    if data is not None and not w.packing and data.examples:
        timed = replace(w, seq=min(w.seq, math.ceil(1.1 * data.tokens / data.examples)))
    step = step_seconds(shape, timed, g, constants)
    if cfg.train.num_gpus > 1:
        step = {**step, "total": step["total"] / DDP_EFFICIENCY}
    plan = Plan(gpu=g, workload=w, memory=memory_gib(shape, w, constants), step=step,
                data=data, num_gpus=cfg.train.num_gpus, accumulation=cfg.train.gradient_accumulation_steps,
                price_per_hour=g.price_per_hour if price_per_hour is None else price_per_hour)
    if from_table:
        plan.notes.append(f"the config.json of {cfg.model.base_model} could not be read here: its published shape "
                          "from qloraflow.plan.KNOWN_SHAPES was used (--model-config to give another)")
    if cfg.train.backend == "auto":
        plan.notes.append("train.backend auto: planned as unsloth (CUDA with Unsloth installed); hf is slower")
    if cfg.train.use_cpu:
        plan.notes.append(f"train.use_cpu: this config trains on the CPU; the numbers are what a {gpu} would take")
    if cfg.train.num_gpus > 1 and cfg.train.distributed != "ddp":
        plan.notes.append("train.distributed fsdp: weights are sharded, so memory is overestimated")
    if data is not None:
        rows = data.rows or (math.ceil(data.tokens / (w.seq * 0.97)) if w.packing else data.examples)
        per_step = w.micro_batch * plan.accumulation * cfg.train.num_gpus
        plan.steps_per_epoch = max(1, math.ceil(rows / per_step))
        plan.optimizer_steps = cfg.train.max_steps if cfg.train.max_steps > 0 else math.ceil(
            plan.steps_per_epoch * cfg.train.num_epochs)
    return plan


def suggestions(cfg: FinetuneConfig, gpu: str, shape: ModelShape, limit: int = 3) -> list[str]:
    """Single changes to ``cfg`` under which the plan fits ``gpu``, each with its predicted memory."""
    t, tried = cfg.train, []
    mb = t.micro_batch_size // 2
    while mb >= 1:  # the largest micro-batch that fits, the optimiser step's size kept
        changed = replace(cfg, train=replace(t, micro_batch_size=mb))
        if plan_config(changed, gpu, shape=shape).fits or mb == 1:
            tried.append((f"train.micro_batch_size: {mb} (and gradient_accumulation_steps: "
                          f"{t.gradient_accumulation_steps * t.micro_batch_size // mb})", "train.micro_batch_size", mb))
            break
        mb //= 2
    if not t.gradient_checkpointing:
        tried.append(("train.gradient_checkpointing: true", "train.gradient_checkpointing", True))
    if cfg.model.attn_implementation in ("sdpa", "eager") and t.backend == "hf":
        tried.append(("model.attn_implementation: varlen", "model.attn_implementation", "varlen"))
    if t.backend == "hf" and t.gradient_checkpointing and not t.activation_offloading:
        tried.append(("train.activation_offloading: true", "train.activation_offloading", True))
    tried.append((f"tokenize.sequence_len: {cfg.tokenize.sequence_len // 2}", "tokenize.sequence_len",
                  cfg.tokenize.sequence_len // 2))
    out = []
    for text, key, value in tried:
        section, name = key.split(".")
        changed = replace(cfg, **{section: replace(getattr(cfg, section), **{name: value})})
        p = plan_config(changed, gpu, shape=shape)
        if p.fits:
            out.append(f"{text} (predicted {p.device_gib:.1f} GiB)")
    return out[:limit]


def fit_check(cfg: FinetuneConfig, gpu: str, shape: Optional[ModelShape] = None) -> tuple[list[str], str]:
    """Whether ``cfg`` can train on the ``gpu`` the train task requests: (problems, a line saying what was
    checked). No problems when it fits, when it trains on the CPU (``train.use_cpu``), or when the base
    model's shape cannot be read (nothing to check)."""
    if cfg.train.use_cpu:
        return [], "fit not checked: train.use_cpu trains on the CPU"
    shape = shape or read_model_shape(cfg.model.base_model, cfg.model.revision)
    if shape is None:
        return [], f"fit not checked: no config.json for {cfg.model.base_model} here"
    if cfg.train.backend == "auto":  # auto trains with hf where Unsloth is not installed: the larger of the two
        cfg = replace(cfg, train=replace(cfg.train, backend="hf"))
    p = plan_config(cfg, gpu, shape=shape)
    line = f"predicted peak GPU memory {p.device_gib:.1f} GiB of the {gpu}'s {p.gpu.memory_gib:.1f} GiB"
    if p.fits:
        return [], line
    m = p.memory
    fixes = suggestions(cfg, gpu, shape) or ["a larger GPU (qloraflow plan CONFIG --gpu a100-40gb)"]
    return [f"'train': predicted peak GPU memory {p.device_gib:.1f} GiB (weights {m['weights']:.1f}, LoRA and "
            f"optimiser {m['lora_and_optimizer']:.1f}, activations {m['activations']:.1f}, attention mask "
            f"{m['attention_mask']:.1f}, overhead {m['overhead'] + m['logits']:.1f}, CUDA context "
            f"{CUDA_CONTEXT_GIB:.1f}) at {p.workload.seq} x {p.workload.micro_batch} tokens does not fit the "
            f"{gpu} the train task requests ({p.gpu.memory_gib:.1f} GiB); change one of: " + "; ".join(fixes)], line


def fit_problems(cfg: FinetuneConfig, gpu: str, shape: Optional[ModelShape] = None) -> list[str]:
    """The problems of :func:`fit_check`."""
    return fit_check(cfg, gpu, shape)[0]


def check_fit(cfg: FinetuneConfig, source: str, gpu: str) -> str:
    """:func:`fit_check`'s line, or a :class:`ConfigError` with its problems."""
    problems, line = fit_check(cfg, gpu)
    if problems:
        raise ConfigError(source, problems)
    return line


def format_plan(plan: Plan) -> str:
    """The text ``qloraflow plan`` prints."""
    w, m, s = plan.workload, plan.memory, plan.step
    verdict = "fits" if plan.fits else "DOES NOT FIT"
    lines = [f"GPU {plan.gpu.name} ({plan.gpu.memory_gib:.1f} GiB, {plan.gpu.bf16_tflops:.0f} bf16 TFLOP/s) x "
             f"{plan.num_gpus}; backend {w.backend}; {w.seq} x {w.micro_batch} tokens a micro-batch, "
             f"gradient checkpointing {'on' if w.checkpointing else 'off'}{', offloaded' if w.offload else ''}",
             f"peak GPU memory   {plan.device_gib:.1f} GiB ({verdict}): reserved {m['reserved']:.1f} = weights "
             f"{m['weights']:.2f} + LoRA/optimiser {m['lora_and_optimizer']:.2f} + activations "
             f"{m['activations']:.2f} + mask {m['attention_mask']:.2f} + logits {m['logits']:.2f} + overhead "
             f"{m['overhead']:.2f}; CUDA context {CUDA_CONTEXT_GIB:.1f}",
             f"throughput        {plan.tokens_per_s:,.0f} tokens/s a GPU ({s['total'] * 1000:.0f} ms a micro-batch: "
             f"matmul {s['matmul'] * 1000:.0f}, attention {s['attention'] * 1000:.0f}, dequantise "
             f"{s['dequantize'] * 1000:.0f}, fixed {s['fixed'] * 1000:.0f})"]
    if plan.data is not None:
        lines.append(f"data              {plan.data.tokens:,} train tokens in {plan.data.examples:,} examples "
                     f"({plan.data.source})")
        lines.append(f"time              {plan.epoch_hours:.2f} h an epoch ({plan.steps_per_epoch:,} optimiser steps); "
                     f"{plan.hours:.2f} h of training for {plan.optimizer_steps:,} steps")
        lines.append(f"cost              {plan.gpu_hours:.2f} GPU hours x ${plan.price_per_hour:.2f} = "
                     f"${plan.cost:,.2f}")
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)
