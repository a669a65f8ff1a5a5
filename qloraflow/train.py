"""QLoRA training: load -> build -> run -> save, in that order.

One function, ``train_adapter``, runs the whole recipe: the base model in 4-bit NF4 with double
quantisation and bf16 compute (bitsandbytes), ``prepare_model_for_kbit_training``, a LoRA adapter
(peft), and TRL's ``SFTTrainer`` with paged 8-bit AdamW, gradient checkpointing, periodic evaluation
and checkpoints that are only trusted once their manifest says they are complete. It imports neither
flytekit nor mlflow, so it runs unchanged on a bare GPU machine::

    python -m qloraflow.train --config configs/tiny.yaml --data outputs/tok --out outputs/train

A killed run is resumed by calling it again with the same ``output_dir``: it continues from the
newest complete checkpoint (and the caller can continue the same MLflow run, see ``run_id_file``).

On several GPUs every process runs the same function (DDP, or FSDP with ``train.distributed``); rank 0
alone logs, publishes checkpoints and writes the adapter::

    torchrun --nproc-per-node 2 -m qloraflow.train --config configs/tiny.yaml --data outputs/tok --out outputs/train
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from qloraflow import checkpoint as ckpt
from qloraflow.attention import attention_implementation, boundaries
from qloraflow.config import FinetuneConfig
from qloraflow.errors import ConfigError, PreemptedError
from qloraflow.files import raise_if_out_of_space
from qloraflow.preemption import PreemptionGuard
from qloraflow.precision import compute_dtype, quantization_config, release_memory
from qloraflow.tokenize import IGNORE_INDEX
from qloraflow.tracking import NullTracker, Tracker


# ---------------------------------------------------------------------------------------------- load

def resolve_backend(requested: str) -> str:
    """``auto`` means Unsloth on CUDA when it is installed and one process trains, else the plain HF stack."""
    if requested != "auto":
        return requested
    if torch.cuda.is_available() and world_size() == 1:
        import importlib.util

        if importlib.util.find_spec("unsloth") is not None:
            return "unsloth"
    return "hf"


def world_size() -> int:
    """Processes training together: torchrun's ``WORLD_SIZE``, 1 when launched alone."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def join_processes(cfg: FinetuneConfig) -> Any:
    """accelerate's process state; under torchrun it joins the processes into one group (NCCL, or gloo on the CPU).

    Joined before anything is read, so that rank 0 can set broken checkpoints aside before the others
    look (``main_process_first``) and so that every rank knows which GPU is its own (``LOCAL_RANK``).
    The Trainer reuses this state.
    """
    from datetime import timedelta

    from accelerate import PartialState

    return PartialState(cpu=not _on_gpu(cfg), timeout=timedelta(seconds=1800))  # the Trainer's ddp_timeout


def _on_gpu(cfg: FinetuneConfig) -> bool:
    return torch.cuda.is_available() and not cfg.train.use_cpu


def load_base_model(cfg: FinetuneConfig) -> Any:
    """The base causal LM, quantised as configured and ready for k-bit training.

    With ``model.upcast_unquantized_fp32`` (the default) peft's ``prepare_model_for_kbit_training``
    runs: base frozen, the weights that stay unquantised (embeddings, norms, lm_head) upcast to fp32,
    gradient checkpointing non-reentrant. Without it they stay in the compute dtype, as in TRL's own
    QLoRA recipe: at Llama-3-8B, 8192 x 2 tokens the fp32 residual stream costs 4.3 GB more of
    checkpointed activations and fp32 intermediates plus 2 GB more weights, more than an A10G has.
    """
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    # Each process holds the whole (4-bit) model on its own GPU: DDP replicates it, FSDP shards it
    # once the Trainer wraps it (its 4-bit weights are stored in the compute dtype, so FSDP can).
    model = AutoModelForCausalLM.from_pretrained(
        cfg.model.base_model, revision=cfg.model.revision, quantization_config=quantization_config(cfg.model, cfg.train.use_cpu),
        dtype=compute_dtype(cfg.model, cfg.train.use_cpu), attn_implementation=attention_implementation(cfg.model.attn_implementation),
        device_map={"": int(os.environ.get("LOCAL_RANK", "0"))} if _on_gpu(cfg) else {"": "cpu"})
    model.config.use_cache = False
    if cfg.model.quantization != "none" and cfg.model.upcast_unquantized_fp32:
        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.train.gradient_checkpointing,
                                               gradient_checkpointing_kwargs={"use_reentrant": False})
    for p in model.parameters():
        p.requires_grad_(False)
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return model


def lora_config(cfg: FinetuneConfig) -> Any:
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=cfg.lora.target_modules, bias=cfg.lora.bias, use_rslora=cfg.lora.use_rslora,
                      use_dora=cfg.lora.use_dora, task_type="CAUSAL_LM")


def load_datasets(dataset_dir: str | os.PathLike) -> tuple[Any, Optional[Any]]:
    """The tokenized train split and the validation split (None when empty)."""
    import datasets

    train = datasets.load_from_disk(str(Path(dataset_dir) / "train"))
    val_path = Path(dataset_dir) / "validation"
    val = datasets.load_from_disk(str(val_path)) if val_path.exists() else None
    return train, (val if val is not None and len(val) > 0 else None)


# --------------------------------------------------------------------------------------------- build

@dataclass
class Collator:
    """Batches tokenized rows for the model.

    ``padding_free``: the micro-batch's rows are concatenated into one ``(1, N)`` row whose
    ``position_ids`` restart at every example and no attention mask is passed; transformers turns
    that into a block-diagonal causal mask (SDPA/eager) or FlashAttention's varlen path. No pad
    token is computed. Otherwise rows are right-padded with an attention mask.

    ``boundaries``: where the examples of a padding-free batch start, computed here on the host so
    that the attention kernel need not read them off the ``position_ids`` on the GPU (a sync each
    time): ``"flash"`` adds ``cu_seq_lens_q/k`` and ``max_length_q/k`` (transformers' names, read by
    ``model.attn_implementation: varlen``), ``"unsloth"`` adds ``packed_seq_lengths`` (Unsloth's).
    """

    pad_token_id: int
    padding_free: bool
    boundaries: Optional[str] = None

    def __call__(self, rows: list[dict]) -> dict[str, Any]:
        if self.padding_free:
            cat = lambda key: torch.tensor([[t for r in rows for t in r[key]]], dtype=torch.long)  # noqa: E731
            batch: dict[str, Any] = {"input_ids": cat("input_ids"), "labels": cat("labels"),
                                     "position_ids": cat("position_ids")}
            if self.boundaries:
                batch.update(self.example_boundaries(batch["position_ids"][0]))
            return batch
        width = max(len(r["input_ids"]) for r in rows)
        width = (width + 7) // 8 * 8
        padded: dict[str, list] = {"input_ids": [], "labels": [], "attention_mask": []}
        for r in rows:
            pad = width - len(r["input_ids"])
            padded["input_ids"].append(list(r["input_ids"]) + [self.pad_token_id] * pad)
            padded["labels"].append(list(r["labels"]) + [IGNORE_INDEX] * pad)
            padded["attention_mask"].append([1] * len(r["input_ids"]) + [0] * pad)
        return {k: torch.tensor(v, dtype=torch.long) for k, v in padded.items()}

    def example_boundaries(self, positions: torch.Tensor) -> dict[str, Any]:
        cu, longest = boundaries(positions)
        if self.boundaries == "unsloth":
            return {"packed_seq_lengths": cu[1:] - cu[:-1]}
        return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


def training_arguments(cfg: FinetuneConfig, output_dir: Path, has_eval: bool) -> Any:
    from trl import SFTConfig

    t = cfg.train
    dtype = compute_dtype(cfg.model, cfg.train.use_cpu)
    evaluating = has_eval and t.eval_steps > 0
    return SFTConfig(
        output_dir=str(output_dir / "checkpoints"),
        per_device_train_batch_size=t.micro_batch_size, per_device_eval_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        num_train_epochs=t.num_epochs, max_steps=t.max_steps,
        learning_rate=t.learning_rate, lr_scheduler_type=t.lr_scheduler, warmup_steps=t.warmup_ratio,
        weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm, optim=t.optimizer,
        gradient_checkpointing=False,  # already set up on the model, non-reentrant (see load_base_model)
        bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16, use_cpu=t.use_cpu or not torch.cuda.is_available(),
        logging_steps=t.logging_steps, logging_first_step=True,
        eval_strategy="steps" if evaluating else "no", eval_steps=t.eval_steps if evaluating else None,
        save_strategy="steps", save_steps=t.save_steps, save_total_limit=t.save_total_limit,
        load_best_model_at_end=evaluating and t.early_stopping_patience is not None,
        metric_for_best_model="eval_loss" if evaluating else None, greater_is_better=False,
        seed=cfg.seed, data_seed=cfg.seed,
        **_length_grouping(SFTConfig, not cfg.tokenize.packing),
        remove_unused_columns=False, dataset_kwargs={"skip_prepare_dataset": True}, packing=False,
        report_to="none", dataloader_num_workers=0, include_num_input_tokens_seen="non_padding",
        use_liger_kernel=cfg.train.liger_kernel, activation_offloading=cfg.train.activation_offloading,
        **_distributed_arguments(cfg),
    )


def _distributed_arguments(cfg: FinetuneConfig) -> dict[str, Any]:
    """How torchrun's processes share the work (nothing when one process trains).

    DDP: every LoRA weight takes part in every step, so DDP need not search for unused parameters.
    FSDP (FSDP1, the version QLoRA is known to work with): each decoder layer is one shard unit and
    the Trainer wraps the LoRA layers apart (peft's wrap policy) in the 4-bit storage dtype; the
    state dict is gathered whole to rank 0 for checkpoints and the adapter, as the Trainer expects.
    """
    if world_size() == 1:
        return {}
    if cfg.train.distributed == "ddp":
        return {"ddp_find_unused_parameters": False}
    return {"fsdp": "full_shard auto_wrap",
            "fsdp_config": {"version": 1, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP", "use_orig_params": False,
                            "sync_module_states": True, "cpu_ram_efficient_loading": False,
                            "state_dict_type": "FULL_STATE_DICT"}}


def _length_grouping(args_cls: type, on: bool) -> dict[str, Any]:
    """Length-grouped batches for unpacked data; the argument was renamed in transformers 5.2x."""
    fields = getattr(args_cls, "__dataclass_fields__", {})
    if "train_sampling_strategy" in fields:
        return {"train_sampling_strategy": "group_by_length" if on else "random"}
    return {"group_by_length": on}


def build_model(cfg: FinetuneConfig, backend: str) -> Any:
    """The base model with a freshly initialised LoRA adapter, by the chosen backend.

    ``hf``: transformers + bitsandbytes + peft. ``unsloth``: Unsloth's FastLanguageModel with the same
    quantisation, LoRA shape and seed (its kernels, compiled blocks and offloaded checkpointing).
    Both save a standard PEFT adapter folder.
    """
    if backend == "unsloth":
        from qloraflow.unsloth_backend import load_unsloth_model

        model = load_unsloth_model(cfg)
    else:
        from peft import get_peft_model

        model = get_peft_model(load_base_model(cfg), lora_config(cfg))
    if cfg.lora.init_adapter:
        load_adapter_weights(model, cfg.lora.init_adapter)
    return model


def load_adapter_weights(model: Any, folder: str | os.PathLike) -> None:
    """Start from a saved adapter's weights (same LoRA shape), in place of the fresh initialisation."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from qloraflow.errors import ConfigError

    path = Path(folder) / "adapter_model.safetensors"
    if not path.is_file():
        raise ConfigError("lora.init_adapter", [f"'lora.init_adapter': no adapter_model.safetensors in {folder}; "
                                                "point it at a folder written by save_pretrained"])
    fix = "use the same r, target_modules and base model"
    try:
        result = set_peft_model_state_dict(model, load_file(path))
    except RuntimeError as e:  # shapes differ
        detail = str(e).split("\n\t")[1] if "\n\t" in str(e) else str(e)
        raise ConfigError("lora.init_adapter", [
            f"'lora.init_adapter': {folder} does not match the configured LoRA ({detail}); {fix}"]) from None
    missing = [k for k in result.missing_keys if "lora_" in k]
    if result.unexpected_keys or missing:
        raise ConfigError("lora.init_adapter", [
            f"'lora.init_adapter': {folder} does not match the configured LoRA (missing {missing[:3]}, "
            f"unexpected {list(result.unexpected_keys)[:3]}); {fix}"])


def with_atomic_checkpoints(trainer_cls: type) -> type:
    """``trainer_cls`` whose checkpoints appear only complete: staged, hashed, then renamed into place.

    The Trainer writes ``checkpoint-N`` under ``<output_dir>/.staging/``; the manifest (sha256 of every
    file) is written last, then one rename moves the folder next to the others. A process killed while
    saving leaves only the staging folder, which ``train_adapter`` discards when it resumes.
    """

    class AtomicCheckpointTrainer(trainer_cls):
        checkpoint_meta: dict[str, Any] = {}
        _staging: Optional[str] = None

        def _get_output_dir(self, trial: Any) -> str:
            return self._staging or super()._get_output_dir(trial)

        def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
            # peft reloads the adapter in fp32 while TRL trains QLoRA adapters in bf16: restore the dtypes
            # here, before DDP wraps the model (its gradient buckets are laid out by dtype at wrap time).
            dtypes = {n: p.dtype for n, p in self.model.named_parameters() if p.requires_grad}
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            for n, p in self.model.named_parameters():
                if n in dtypes and p.dtype != dtypes[n]:
                    p.data = p.data.to(dtypes[n])

        def _save_checkpoint(self, model: Any, trial: Any) -> None:
            from transformers.trainer_utils import rotate_checkpoints

            root = Path(super()._get_output_dir(trial))
            staging = root / ckpt.STAGING
            name = f"checkpoint-{self.state.global_step}"
            if self.args.should_save:
                shutil.rmtree(staging, ignore_errors=True)
            self.accelerator.wait_for_everyone()  # no rank writes into the staging folder before it is clean
            self._staging = str(staging)
            try:
                super()._save_checkpoint(model, trial)
                self.accelerator.wait_for_everyone()  # FSDP: every rank has written its shards
                if self.args.should_save:
                    ckpt.write_manifest(staging / name, {"global_step": self.state.global_step,
                                                         **self.checkpoint_meta})
            except Exception as e:  # noqa: BLE001 - a full disk gets its own error, anything else is raised
                written = sum(p.stat().st_size for p in (staging / name).rglob("*") if p.is_file())
                shutil.rmtree(staging, ignore_errors=True)  # give the room back; the last checkpoint stays
                raise_if_out_of_space(e, root / name, ckpt.newest_size(root), written)
                raise
            finally:
                self._staging = None
            if not self.args.should_save:
                return
            ckpt.publish(staging / name, root / name)
            best = self.state.best_model_checkpoint
            if best and Path(best).parent == staging:
                self.state.best_model_checkpoint = str(root / Path(best).name)
            rotate_checkpoints(str(root), self.args.save_total_limit, self.state.best_model_checkpoint)

    return AtomicCheckpointTrainer


def with_host_token_count(trainer_cls: type) -> type:
    """``trainer_cls`` that counts a padding-free batch's tokens from its shape.

    The Trainer counts the tokens it has seen (``include_num_input_tokens_seen``, behind the tokens/s
    metric) with a GPU sum and ``.item()`` every micro-step: a full synchronisation before each forward,
    which leaves the GPU idle while the next step is launched. Every token of a padding-free batch is
    a real one, so one process counts ``numel`` instead; padded batches and several processes keep
    the Trainer's count (it needs the mask's sum, and a gather across processes).
    """

    class HostTokenCountTrainer(trainer_cls):
        def _track_num_input_tokens(self, inputs: dict[str, Any]) -> None:
            if ("attention_mask" in inputs or "position_ids" not in inputs or self.args.world_size > 1
                    or self.args.include_num_input_tokens_seen == "no"):
                return super()._track_num_input_tokens(inputs)
            self.state.num_input_tokens_seen += inputs["input_ids"].numel()

    return HostTokenCountTrainer


def boundaries_for(cfg: FinetuneConfig) -> Optional[str]:
    """Which example boundaries the collator adds to padding-free batches (see ``Collator``)."""
    if not cfg.tokenize.packing:
        return None
    if resolve_backend(cfg.train.backend) == "unsloth":
        return "unsloth"
    return "flash" if cfg.model.attn_implementation == "varlen" else None


def build_trainer(cfg: FinetuneConfig, model: Any, tokenizer: Any, train_ds: Any, val_ds: Optional[Any],
                  output_dir: Path, callbacks: list[Any]) -> Any:
    from transformers import EarlyStoppingCallback
    from trl import SFTTrainer  # after Unsloth's import, which patches it

    args = training_arguments(cfg, output_dir, val_ds is not None)
    if args.load_best_model_at_end:
        callbacks = callbacks + [EarlyStoppingCallback(cfg.train.early_stopping_patience)]
    collator = Collator(tokenizer.pad_token_id, padding_free=cfg.tokenize.packing, boundaries=boundaries_for(cfg))
    return with_host_token_count(with_atomic_checkpoints(SFTTrainer))(
        model=model, args=args, train_dataset=train_ds, eval_dataset=val_ds, processing_class=tokenizer,
        callbacks=callbacks, data_collator=collator)


# ----------------------------------------------------------------------------------------------- run

# The run's summary in MLflow: one value each, under names no per-step series uses (``train_adapter``'s
# summary key -> MLflow metric). The per-step series keep the Trainer's names: loss, eval_loss,
# learning_rate, grad_norm, epoch, num_input_tokens_seen, plus tokens_per_s and the memory peaks.
SUMMARY_METRICS = {"train_loss_first": "train_loss_first", "train_loss_last": "train_loss_final",
                   "best_eval_loss": "eval_loss_best", "train_seconds": "train_seconds",
                   "tokens_per_s": "train_tokens_per_s", "global_step": "train_steps"}
# Per-step keys the Trainer adds beside the loss that would make a second throughput series.
SECOND_THROUGHPUT = ("train_runtime", "train_tokens_per_second")


def _progress_callback(tracker: Tracker, output_dir: Path, on_checkpoint: Optional[Callable[[Path], None]]) -> Any:
    """Per-step series to the tracker (loss, lr, grad norm, tokens/s, memory); ``on_checkpoint`` after each save."""
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        def __init__(self) -> None:
            self.t0, self.tokens0 = time.time(), 0

        def on_log(self, args, state, control, logs=None, **kw):  # noqa: ANN001
            logs = dict(logs or {})
            if "train_loss" in logs:  # the Trainer's closing summary: train_adapter logs SUMMARY_METRICS instead
                return
            for k in SECOND_THROUGHPUT:  # the time since training started: tokens_per_s is the rate per step
                logs.pop(k, None)
            now, seen = time.time(), state.num_input_tokens_seen
            if seen and now > self.t0 and seen > self.tokens0:
                logs["tokens_per_s"] = (seen - self.tokens0) / (now - self.t0)
            self.t0, self.tokens0 = now, seen
            if "loss" in logs:  # a training step's log (evaluation logs carry eval_* only)
                logs.update(memory_metrics())
            tracker.log_metrics({k: v for k, v in logs.items() if isinstance(v, (int, float))}, step=state.global_step)

        def on_save(self, args, state, control, **kw):  # noqa: ANN001
            # The checkpoint is complete and in place (see with_atomic_checkpoints).
            if on_checkpoint is not None and state.is_world_process_zero:
                on_checkpoint(Path(args.output_dir))

    return Progress()


def adapter_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 over an adapter's tensors as saved (names, dtypes, shapes, bytes): equal digests, equal adapters."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _adapter_digests(trainer: Any, fsdp_state: Optional[dict[str, torch.Tensor]]) -> list[Optional[str]]:
    """The adapter's digest on every rank (rank order). DDP keeps full replicas, which must be identical."""
    import warnings

    from peft import get_peft_model_state_dict

    model = trainer.accelerator.unwrap_model(trainer.model)
    if fsdp_state is not None:  # sharded: only rank 0 holds the gathered adapter
        mine = adapter_digest(get_peft_model_state_dict(model, state_dict=fsdp_state)) if fsdp_state else None
        return [mine] + [None] * (trainer.accelerator.num_processes - 1)
    mine = adapter_digest(get_peft_model_state_dict(model))
    if trainer.accelerator.num_processes == 1:
        return [mine]
    digests = [None] * trainer.accelerator.num_processes
    torch.distributed.all_gather_object(digests, mine)
    if len(set(digests)) > 1:
        warnings.warn(f"the DDP replicas ended with different adapters: {digests}", stacklevel=2)
    return digests


def finished_state(checkpoint: Optional[Path]) -> Any:
    """The checkpoint's TrainerState when it was saved at the run's last step, else None."""
    from transformers import TrainerState

    state_file = checkpoint / "trainer_state.json" if checkpoint else None
    if state_file is None or not state_file.is_file():
        return None
    state = TrainerState.load_from_json(str(state_file))
    return state if state.max_steps and state.global_step >= state.max_steps else None


def memory_metrics() -> dict[str, float]:
    if torch.cuda.is_available():
        return {"gpu_peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
                "gpu_peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30}
    import resource

    return {"cpu_max_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def train_adapter(cfg: FinetuneConfig, dataset_dir: str | os.PathLike, output_dir: str | os.PathLike,
                  tracker: Optional[Tracker] = None,
                  on_checkpoint: Optional[Callable[[Path], None]] = None) -> dict[str, Any]:
    """Train a LoRA adapter on a tokenized dataset; resume if ``output_dir`` holds checkpoints.

    Args:
        cfg: the pipeline config (model, lora, train and tokenize sections are used).
        dataset_dir: output of ``tokenize_dataset`` (``train/``, ``validation/``, ``tokenizer/``).
        output_dir: receives ``checkpoints/``, the final ``adapter/`` and ``train_result.json``.
        tracker: where metrics go; ``NullTracker`` by default.
        on_checkpoint: called with the checkpoints folder after each complete checkpoint (the Flyte
            task uses it to copy checkpoints to the task's checkpoint store).

    Returns:
        Summary: steps, first and last train loss, best eval loss, trainable parameters, tokens/s.

    Raises:
        PreemptedError: SIGTERM came while training; the step in progress was finished and saved as a
            complete checkpoint first (see ``qloraflow.preemption``), which a rerun resumes from.
    """
    backend = resolve_backend(cfg.train.backend)
    if backend == "unsloth":
        # Unsloth patches transformers/peft/trl as it is imported: it has to come before them.
        from qloraflow.unsloth_backend import import_unsloth

        import_unsloth()
    from transformers import AutoTokenizer, set_seed

    procs = join_processes(cfg)  # torchrun: every process runs this function; rank 0 alone logs and saves
    tracker = tracker if tracker is not None and procs.is_main_process else NullTracker()
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    set_seed(cfg.seed)  # before the adapter exists: LoRA initialisation is part of the result

    # load
    tokenizer = AutoTokenizer.from_pretrained(str(Path(dataset_dir) / "tokenizer"))
    train_ds, val_ds = load_datasets(dataset_dir)

    # build
    model = build_model(cfg, backend)
    with procs.main_process_first():  # rank 0 sets unfinished checkpoints aside before the others look
        ckpt.discard_staging(output_dir / "checkpoints")
        resume_from = ckpt.latest_complete(output_dir / "checkpoints")
    guard = PreemptionGuard(cfg.train.preemption_grace_s)  # SIGTERM: save at the next step end, then stop
    trainer = build_trainer(cfg, model, tokenizer, train_ds, val_ds, output_dir,
                            [_progress_callback(tracker, output_dir, on_checkpoint), guard.callback()])
    trainer.checkpoint_meta = {"mlflow_run_id": tracker.run_id}
    trainable, total = trainer.model.get_nb_trainable_parameters()
    tracker.log_params({"backend": backend, "trainable_params": trainable, "total_params": total})
    # Tags, not params: a resumed attempt continues the same run and params cannot change.
    tracker.set_tags({"resumed_from": resume_from.name if resume_from else "none", "world_size": procs.num_processes})

    # run
    finished = finished_state(resume_from)
    checkpointing = budget_checkpointing(cfg, trainer, tokenizer) if finished is None else None
    t0 = time.time()
    if finished is not None:
        # Killed after its last checkpoint, before the adapter was written: the Trainer would train
        # one step past max_steps when resumed there, so take the weights and state as they are.
        trainer._load_from_checkpoint(str(resume_from))
        trainer.state = finished
    else:
        with guard:
            trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        guard.raise_if_preempted(output_dir / "checkpoints")  # before the adapter: training is not finished
    seconds = time.time() - t0
    if checkpointing is None and backend == "unsloth":
        from qloraflow.memory_budget import unsloth_plan

        checkpointing = unsloth_plan(trainer.model, cfg.train.gpu_memory_gb)
    if checkpointing is not None:
        tracker.set_tags({"checkpointed_layers": f"{checkpointing.checkpointed}/{checkpointing.layers}"})

    # save (under FSDP every rank takes part in gathering the adapter; rank 0 writes it)
    adapter_dir = output_dir / "adapter"
    state = trainer.accelerator.get_state_dict(trainer.model) if trainer.is_fsdp_enabled else None
    digests = _adapter_digests(trainer, state)
    if procs.is_main_process:
        ckpt.save_atomic(adapter_dir, lambda tmp: (trainer.model.save_pretrained(tmp, state_dict=state),
                                                   tokenizer.save_pretrained(tmp)))
    history = list(trainer.state.log_history)  # per logging step: loss, learning rate, eval loss
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    evals = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
    summary = {
        "backend": backend, "global_step": trainer.state.global_step, "train_loss_first": losses[0] if losses else None,
        "train_loss_last": losses[-1] if losses else None, "best_eval_loss": min(evals) if evals else None,
        "best_checkpoint": trainer.state.best_model_checkpoint, "trainable_params": trainable,
        "resumed_from": str(resume_from) if resume_from else None, "train_seconds": round(seconds, 2),
        "tokens_seen": trainer.state.num_input_tokens_seen,
        "compute_dtype": str(compute_dtype(cfg.model, cfg.train.use_cpu)).removeprefix("torch."),
        "world_size": procs.num_processes, "adapter_sha256": digests[0], "adapter_sha256_by_rank": digests,
        **memory_metrics(), "checkpointing": checkpointing.as_dict() if checkpointing is not None else None,
    }
    summary["tokens_per_s"] = summary["tokens_seen"] / seconds if seconds and summary["tokens_seen"] else None
    del trainer, model
    release_memory()  # a local Flyte run evaluates next in this process, on this GPU
    if not procs.is_main_process:
        return summary
    (output_dir / "train_result.json").write_text(json.dumps(summary, indent=1))
    (output_dir / "log_history.json").write_text(json.dumps(history, indent=1, default=str))
    tracker.log_metrics({name: summary[key] for key, name in SUMMARY_METRICS.items()
                         if isinstance(summary[key], (int, float)) and not math.isnan(summary[key])})
    return summary


def budget_checkpointing(cfg: FinetuneConfig, trainer: Any, tokenizer: Any) -> Optional[Any]:
    """On one CUDA GPU, checkpoint only the layers ``train.gpu_memory_gb`` requires (qloraflow.memory_budget).

    Returns the plan (also kept at every step by a callback), or None where every set-up layer stays
    checkpointed: no CUDA, CPU training, several processes, checkpointing off, or a budget of 0.
    """
    from qloraflow import memory_budget as mb

    t = cfg.train
    if (not t.gradient_checkpointing or t.use_cpu or not torch.cuda.is_available() or world_size() > 1
            or t.gpu_memory_gb == 0 or resolve_backend(t.backend) == "unsloth"):  # Unsloth plans itself
        return None
    layers = mb.checkpointed_layers(trainer.model)
    budget = t.gpu_memory_gb if t.gpu_memory_gb is not None else mb.card_memory_gib()
    vocab = min(len(tokenizer), trainer.model.get_input_embeddings().num_embeddings)
    batch = mb.probe_batch(trainer.data_collator, cfg.tokenize.sequence_len, t.micro_batch_size, vocab)
    plan = mb.plan_checkpointing(trainer.model, layers, batch, budget, compute_dtype(cfg.model, t.use_cpu))
    trainer.add_callback(mb.keep_plan_callback(layers, plan.checkpointed))
    print(f"checkpointing: {plan.reason}", flush=True)
    return plan


def main(argv: Optional[list[str]] = None) -> None:
    import argparse

    from qloraflow.config import load_config, parse_overrides

    ap = argparse.ArgumentParser(description="Train a QLoRA adapter on a tokenized dataset.")
    ap.add_argument("--config", required=True)
    ap.add_argument("--data", required=True, help="tokenized dataset folder")
    ap.add_argument("--out", required=True)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. train.max_steps=5")
    a = ap.parse_args(argv)
    try:
        cfg = load_config(a.config, parse_overrides(a.set))
        print(json.dumps(train_adapter(cfg, a.data, a.out), indent=1))
    except PreemptedError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(128 + signal.SIGTERM) from None  # the exit status of a process ended by SIGTERM
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
