"""Spend the card's spare memory on speed: checkpoint only as many decoder layers as the budget needs.

Gradient checkpointing trades memory for time: a checkpointed layer keeps only its input and runs its
forward a second time in the backward pass (about a third more compute for that layer). Unsloth and
the ``hf`` backend checkpoint every layer, whatever memory is free; on a 24 GB card an 8B QLoRA job
at 2048 x 2 needs about 7 GiB that way and about 21 GiB with no checkpointing at all, so the
recomputation buys nothing there.

``plan_checkpointing`` measures instead of guessing. Before training it runs two probe steps
(forward and backward, no optimiser step) on a full-size batch made by the trainer's own collator:

1. every layer checkpointed: peak ``p_all``;
2. the first layer not checkpointed: peak ``p_one``; ``per_layer = p_one - p_all``.

Then ``keep = 1 + (budget - headroom - p_one) // per_layer`` layers run without checkpointing (at
most all of them, at least none), the others stay checkpointed. Peaks are the allocator's allocated
bytes; ``headroom`` (:data:`HEADROOM_SHARE` of the budget, at least :data:`HEADROOM_MIN_GIB`) covers
what the probe does not see: the allocator's fragmentation (reserved above allocated), the
optimiser's states created at the first step, evaluation batches.

Each decoder layer of transformers 5 is a ``GradientCheckpointingLayer`` whose ``gradient_checkpointing``
flag decides per layer. That is the ``hf`` backend's planner. The ``unsloth`` backend hands the same
decision to Unsloth's own planner (``get_peft_model(checkpoint_skip_layers="auto")``, which measures
the first step and keeps its offloaded checkpointing consistent), held to the budget by the process's
CUDA memory fraction (:func:`cap_process_memory`); :func:`unsloth_plan` reads back what it chose.
The result does not depend on the choice except through dropout: a recomputed forward draws new
dropout masks where the checkpoint function does not restore the RNG state (Unsloth's), so with LoRA
dropout above 0 the two schedules give slightly different, equally valid, gradients.
"""

from __future__ import annotations

import gc
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional

GIB = 2**30
HEADROOM_SHARE = 0.08  # of the budget: fragmentation, optimiser states, evaluation
HEADROOM_MIN_GIB = 1.5


@dataclass(frozen=True)
class CheckpointPlan:
    """Which layers recompute, and the numbers that decided it (all sizes in GiB)."""

    layers: int
    checkpointed: int
    budget_gib: float
    peak_all_checkpointed_gib: Optional[float] = None
    per_layer_gib: Optional[float] = None
    predicted_peak_gib: Optional[float] = None
    reason: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def decoder_layers(model: Any) -> list[Any]:
    """The modules with a per-layer ``gradient_checkpointing`` flag, in model order."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def checkpointed_layers(model: Any) -> list[Any]:
    """The decoder layers set up for checkpointing (their checkpoint function attached), in model order."""
    return [m for m in decoder_layers(model) if getattr(m, "gradient_checkpointing", False)]


def apply_plan(layers: list[Any], checkpointed: int) -> None:
    """The last ``checkpointed`` layers recompute; the first ``len(layers) - checkpointed`` do not.

    ``layers`` are those set up for checkpointing (:func:`checkpointed_layers`, before any plan).
    """
    keep = len(layers) - checkpointed
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = i >= keep


def card_memory_gib(device: int = 0) -> float:
    """The memory this process may use on ``device``: the card's, times the per-process fraction if set."""
    import torch

    total = torch.cuda.get_device_properties(device).total_memory
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    share = fraction(device) if fraction is not None else 1.0
    return total * share / GIB


def cap_process_memory(budget_gib: Optional[float], device: int = 0) -> None:
    """Hold this process to ``budget_gib`` on ``device`` (torch's per-process memory fraction), if below the card.

    An allocation past it raises ``OutOfMemoryError`` as on a card of that size, and planners that read
    the fraction (Unsloth's ``checkpoint_skip_layers="auto"``) size themselves to it.
    """
    import torch

    if not budget_gib:
        return
    total = torch.cuda.get_device_properties(device).total_memory
    if budget_gib * GIB < total:
        torch.cuda.set_per_process_memory_fraction(budget_gib * GIB / total, device)


def unsloth_plan(model: Any, budget_gib: Optional[float]) -> Optional[CheckpointPlan]:
    """What Unsloth's own planner (``checkpoint_skip_layers="auto"``) chose after its first step, if it ran."""
    planner = getattr(model, "_unsloth_auto_skip", None)
    if planner is None:
        for m in getattr(model, "modules", lambda: [])():
            planner = getattr(m, "_unsloth_auto_skip", None)
            if planner is not None:
                break
    if planner is None or planner.kept is None:
        return None
    layers = len(planner.layers)
    budget = budget_gib if budget_gib is not None else card_memory_gib()
    per_layer = planner.layer_bytes / GIB if planner.layer_bytes else None
    return CheckpointPlan(layers, layers - len(planner.kept), round(budget, 2),
                          per_layer_gib=round(per_layer, 3) if per_layer else None,
                          reason=f"Unsloth's planner kept {len(planner.kept)} of {layers} layers un-checkpointed "
                                 f"within {budget:.1f} GiB")


def probe_peak(model: Any, batch: dict[str, Any], dtype: Any = None) -> int:
    """Peak allocated bytes of one forward and backward on ``batch`` (the gradients are dropped after).

    ``dtype``: the mixed-precision compute dtype the Trainer autocasts to (None: no autocast).
    """
    import contextlib

    import torch

    device = next(p.device for p in model.parameters())
    batch = {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    with torch.autocast("cuda", dtype=dtype) if dtype is not None else contextlib.nullcontext():
        loss = model(**batch).loss
    loss.backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    model.zero_grad(set_to_none=True)
    del loss
    return peak


def probe_batch(collator: Callable[[list[dict]], dict[str, Any]], sequence_len: int, micro_batch: int,
                vocab_size: int) -> dict[str, Any]:
    """The largest micro-batch training can see: ``micro_batch`` rows of ``sequence_len`` tokens, all labelled."""
    import torch

    gen = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(micro_batch):
        ids = torch.randint(0, vocab_size, (sequence_len,), generator=gen).tolist()
        rows.append({"input_ids": ids, "labels": ids, "position_ids": list(range(sequence_len))})
    return collator(rows)


def plan_checkpointing(model: Any, layers: list[Any], batch: dict[str, Any], budget_gib: float,
                       dtype: Any = None) -> CheckpointPlan:
    """Measure, decide and apply how many of ``layers`` recompute under ``budget_gib`` (module docstring).

    Args:
        model: the model being trained (in training mode afterwards if it was before).
        layers: :func:`checkpointed_layers` of the model, taken before any plan changed them.
        batch: a full-size micro-batch from the training collator (:func:`probe_batch`).
        budget_gib: the memory the job may use on the GPU.
        dtype: the Trainer's autocast dtype (None: none).
    """
    if not layers:
        return CheckpointPlan(0, 0, budget_gib, reason="no layer is set up for checkpointing")
    was_training = model.training
    model.train()
    try:
        apply_plan(layers, len(layers))
        p_all = probe_peak(model, batch, dtype)
        apply_plan(layers, len(layers) - 1)
        p_one = probe_peak(model, batch, dtype)
    finally:
        model.train(was_training)
    per_layer = max(p_one - p_all, 1)
    headroom = max(HEADROOM_SHARE * budget_gib, HEADROOM_MIN_GIB) * GIB
    room = budget_gib * GIB - headroom - p_one
    keep = 0 if room < 0 else min(len(layers), 1 + int(room // per_layer))
    if p_one > budget_gib * GIB - headroom:
        keep = 0
    apply_plan(layers, len(layers) - keep)
    predicted = p_all + keep * per_layer
    reason = (f"{keep} of {len(layers)} layers without recomputation: each costs {per_layer / GIB:.2f} GiB "
              f"on top of {p_all / GIB:.2f} GiB with every layer checkpointed, within {budget_gib:.1f} GiB "
              f"less {headroom / GIB:.1f} GiB headroom")
    return CheckpointPlan(len(layers), len(layers) - keep, round(budget_gib, 2), round(p_all / GIB, 3),
                          round(per_layer / GIB, 3), round(predicted / GIB, 3), reason)


def keep_plan_callback(layers: list[Any], checkpointed: int) -> Any:
    """A TrainerCallback that re-applies the plan at every step (a switch of train/eval mode may reset it)."""
    from transformers import TrainerCallback

    class KeepPlan(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):  # noqa: ANN001
            apply_plan(layers, checkpointed)

    return KeepPlan()
