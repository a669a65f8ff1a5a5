"""The adapter's model card (``README.md``): what was trained, on what, how, and with which results.

PEFT's ``save_pretrained`` leaves an empty template. The train task replaces it with what is known
once training ends (base model, data, settings, the training curve's ends); the register task adds
the results (held-out loss and the gate metric of base, candidate and merged model, and the
registry's decision), and the completed card becomes the registered MLflow Model's card::

    card = adapter_card("tiny-sql", cfg, train_summary, lineage.read_description(tok_dir))
    write_adapter_card(out / "adapter", card)
    card = with_results(card, {"base": {...}, "candidate": {...}, "merged": {...}}, "exact_match", decision)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

from qloraflow import checkpoint as ckpt
from qloraflow.config import FinetuneConfig
from qloraflow.files import write_atomic

RESULTS_HEADING = "## Results"
PENDING = "Not evaluated yet: the register stage adds the held-out results of base, candidate and merged model."


def adapter_card(name: str, cfg: FinetuneConfig, summary: dict[str, Any], data: Optional[dict[str, Any]]) -> str:
    """The card as training leaves it (results pending).

    Args:
        name: the pipeline's name (``cfg.name`` of the whole config).
        cfg: the training config (model, lora, train and tokenize sections and the seed are read).
        summary: ``train_adapter``'s summary.
        data: the data splits' description (``qloraflow.lineage``), None when unknown.
    """
    m, lora, t, tok = cfg.model, cfg.lora, cfg.train, cfg.tokenize
    base = f"{m.base_model}" + (f" (revision {m.revision})" if m.revision else "")
    targets = lora.target_modules if isinstance(lora.target_modules, str) else ", ".join(lora.target_modules)
    steps = f"{t.max_steps} steps" if t.max_steps > 0 else f"{t.num_epochs:g} epoch(s)"
    lines = ["---", f"base_model: {m.base_model}", "library_name: peft", "pipeline_tag: text-generation",
             "tags: [lora, qlora, qloraflow]", "---", "",
             f"# {name}: LoRA adapter", "",
             f"A LoRA adapter for `{base}`, trained by qloraflow with the base model in "
             f"{_quantization(m.quantization)} and {m.compute_dtype} compute.", "", "## Data", ""]
    lines += _data_lines(data)
    lines += ["", "## Training", "", "| setting | value |", "|---|---|",
              f"| LoRA | r {lora.r}, alpha {lora.alpha}, dropout {lora.dropout}, on {targets}"
              f"{', rsLoRA' if lora.use_rslora else ''}{', DoRA' if lora.use_dora else ''} |",
              f"| schedule | {steps}, learning rate {t.learning_rate:g} ({t.lr_scheduler}, warmup {t.warmup_ratio:g}) |",
              f"| batch | {t.micro_batch_size} x {t.gradient_accumulation_steps} accumulation x "
              f"{summary.get('world_size', 1)} process(es) |",
              f"| sequences | {tok.sequence_len} tokens, packing {'on' if tok.packing else 'off'}, loss on {tok.train_on} |",
              f"| optimiser | {t.optimizer}, weight decay {t.weight_decay:g}, grad clip {t.max_grad_norm:g} |",
              f"| backend, seed | {summary.get('backend')}, {cfg.seed} |", "",
              f"{summary.get('global_step')} optimiser steps in {summary.get('train_seconds')} s"
              f"{_rate(summary.get('tokens_per_s'))}; train loss {_num(summary.get('train_loss_first'))} -> "
              f"{_num(summary.get('train_loss_last'))}; best validation loss {_num(summary.get('best_eval_loss'))}. "
              f"Trainable parameters: {summary.get('trainable_params')}.", "",
              RESULTS_HEADING, "", PENDING, ""]
    return "\n".join(lines)


def with_results(card: str, results: dict[str, dict[str, float]], gate_metric: str,
                 decision: Optional[dict[str, Any]] = None) -> str:
    """``card`` with its results section: held-out loss and the gate metric per model, and the decision.

    Args:
        card: a card from :func:`adapter_card`.
        results: metrics per model (``base``, ``candidate``, ``merged``, ``champion``), as evaluate and merge
            measured them on the test split.
        gate_metric: the metric the promotion gate compares.
        decision: the registry's decision (``promoted``, ``reason``), if taken.
    """
    keys = [k for k in ("heldout_loss", gate_metric) if any(k in m for m in results.values())]
    keys = list(dict.fromkeys(keys))
    lines = [RESULTS_HEADING, "", "On the held-out test split:", "", "| model | " + " | ".join(keys) + " |",
             "|---|" + "---|" * len(keys)]
    for model, metrics in results.items():
        if metrics:
            lines.append(f"| {model} | " + " | ".join(_num(metrics.get(k)) for k in keys) + " |")
    lines += ["", f"The promotion gate compares `{gate_metric}`."]
    if decision is not None:
        lines.append(f"Promoted to champion: {'yes' if decision.get('promoted') else 'no'} ({decision.get('reason')}).")
    head = card.split(RESULTS_HEADING)[0]
    return head + "\n".join(lines) + "\n"


def write_adapter_card(adapter_dir: str | os.PathLike, card: str) -> Path:
    """Write ``README.md`` into the adapter folder and refresh its manifest (the folder stays verifiable)."""
    path = write_atomic(Path(adapter_dir) / "README.md", card)
    if (Path(adapter_dir) / ckpt.MANIFEST).exists():
        meta = {k: v for k, v in ckpt.read_manifest(adapter_dir).items() if k not in ("files", "written_at")}
        ckpt.write_manifest(adapter_dir, meta)
    return path


def _data_lines(data: Optional[dict[str, Any]]) -> list[str]:
    if not data:
        return ["Unknown: the tokenized data carries no description of its splits."]
    lines = [f"Dataset hash (content of the input files): `{data['dataset_hash']}`.", ""]
    if data.get("sources"):
        lines += ["| input file | read | kept | rejected |", "|---|---|---|---|"]
        lines += [f"| {Path(src).name} | {c.get('read')} | {c.get('kept')} | {c.get('rejected')} |"
                  for src, c in data["sources"].items()]
        lines.append("")
    lines += ["| split | rows | digest |", "|---|---|---|"]
    lines += [f"| {split} | {d['rows']} | `{d['digest']}` |" for split, d in data["splits"].items()]
    return lines


def _quantization(q: str) -> str:
    return {"4bit": "4-bit NF4 (bitsandbytes, QLoRA)", "8bit": "8-bit (bitsandbytes)"}.get(q, "16 bits (plain LoRA)")


def _num(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, (int, float)) and not isinstance(v, bool) else "n/a"


def _rate(v: Any) -> str:
    return f", {v:,.0f} tokens/s" if isinstance(v, (int, float)) else ""
