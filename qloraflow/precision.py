"""Number formats the stages share: dtypes, 4-/8-bit quantisation, the accelerator, units in the last place.

A low module (it imports nothing of the package), so that both training backends, evaluation and
merging agree on what ``model.compute_dtype: bfloat16`` and ``model.quantization: 4bit`` mean
without importing each other::

    from qloraflow.precision import DTYPES, ulp
    ulp(torch.tensor([1.0, 3.0], dtype=torch.bfloat16))   # tensor([0.0078, 0.0156]): 2**-7 and 2**-6
"""

from __future__ import annotations

import gc
from typing import TYPE_CHECKING, Any, Optional

import torch

if TYPE_CHECKING:
    from qloraflow.config import ModelConfig

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

# The integer type of the same width: the bits of a float, read as a sign-magnitude integer.
_BITS = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}
_MAGNITUDE = {torch.int16: 0x7FFF, torch.int32: 0x7FFFFFFF}


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX); elsewhere torch emulates it."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # an older torch: assume the hardware is there, as the config asks
        return True


def compute_dtype(model: "ModelConfig", use_cpu: bool = False) -> torch.dtype:
    """The dtype training computes in: the configured one, with two fallbacks.

    fp16 on GPUs without bf16; float32 when training on a CPU without native bf16 (AVX2 machines),
    where emulated bf16 matrix products run about 10x slower than float32 ones (measured on a 2-core
    AMD EPYC: a 4-layer demo step 6.2 s in bf16, 1.2 s in float32). Evaluation and the merge keep the
    configured dtype: it is what the merged model is saved and served in.
    """
    dtype = DTYPES[model.compute_dtype]
    on_cpu = use_cpu or not torch.cuda.is_available()
    if dtype == torch.bfloat16 and not on_cpu and not torch.cuda.is_bf16_supported():
        return torch.float16
    if dtype != torch.float32 and on_cpu and not cpu_has_native_bf16():
        return torch.float32
    return dtype


def quantization_config(model: "ModelConfig", use_cpu: bool = False) -> Any:
    """bitsandbytes settings for ``model.quantization`` (NF4 with double quantisation for QLoRA), or None."""
    from transformers import BitsAndBytesConfig

    if model.quantization == "4bit":
        dtype = compute_dtype(model, use_cpu)
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=model.bnb_4bit_quant_type,
                                  bnb_4bit_use_double_quant=model.double_quant,
                                  bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=dtype)
    if model.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def accelerator() -> str:
    """Where evaluation and merge verification run: the task's GPU when there is one, else the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def release_memory() -> None:
    """Give a finished stage's tensors back: models hold reference cycles (PEFT, the Trainer), and the
    CUDA caching allocator keeps freed blocks, so the next stage in the same process (a local Flyte
    run) would otherwise start with the last one's memory still held."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def ulp(values: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The unit in the last place of each value in ``dtype`` (default: its own), as float32.

    The gap between ``|x|`` rounded to ``dtype`` and the next representable number above it: for
    bfloat16 (8 significant bits) that is between 2**-8 and 2**-7 of ``|x|``; zeros and subnormals
    get the smallest subnormal step. Round-to-nearest moves a value by at most half of it.
    """
    dtype = dtype or values.dtype
    magnitude = values.detach().abs().to(dtype)
    bits = magnitude.view(_BITS[dtype])
    return ((bits + 1).view(dtype).float() - magnitude.float())


def nudge_by_ulp(weight: torch.Tensor, generator: torch.Generator) -> None:
    """Move every non-zero element of a float tensor to its next representable neighbour, up or down at random.

    What one more rounding in that format does to each weight, at most: the merge check measures the
    effect of exactly this on a model's outputs to learn what rounding noise looks like at its depth.
    """
    kind = _BITS[weight.dtype]
    bits = weight.data.view(kind)
    step = torch.randint(0, 2, bits.shape, generator=generator, device=bits.device, dtype=kind) * 2 - 1
    step *= (bits & _MAGNITUDE[kind]) != 0  # +-0 would turn into NaN bit patterns
    bits += step
