"""The dtype a model's weights are loaded in: ``--dtype auto|float32|bfloat16|float16`` (CLI, server settings,
``load_model``).

``auto`` is float32 on CPU: on CPU cores fp32 matmuls run about 5x faster than bf16 ones, and fp16 has no fast
CPU kernels at all. Elsewhere (CUDA, MPS) ``auto`` is the checkpoint's own dtype: the dtype an embedded model was
released in (its GGUF is dequantized to fp32 for the conversion, so the files no longer say), else the one a
folder's config records, else float32 (transformers' default; the tiny random models are built in it). A bf16
checkpoint on a GPU without bf16 support gets float16. ``float16`` on CPU is refused: use float32 or bfloat16.
"""

from __future__ import annotations

import torch

from kvlab.errors import ParameterError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_CHOICES = ("auto", *DTYPES)
_NAMES = {value: name for name, value in DTYPES.items()}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """A loadable torch dtype, or None for auto; a ParameterError naming the choices otherwise."""
    if dtype is None or dtype == "auto":
        return None
    if isinstance(dtype, torch.dtype):
        if dtype not in _NAMES:
            raise ParameterError(f"dtype {dtype} cannot hold model weights; use one of {', '.join(DTYPE_CHOICES)}")
        return dtype
    if dtype not in DTYPES:
        raise ParameterError(f"unknown --dtype {dtype!r}; use one of {', '.join(DTYPE_CHOICES)}")
    return DTYPES[dtype]


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device,
                  checkpoint_dtype: str | torch.dtype | None) -> torch.dtype:
    """The dtype to load in on ``device``; ``checkpoint_dtype`` is the checkpoint's own (None: not recorded)."""
    chosen = parse_dtype(dtype)
    if chosen is None:
        if device.type == "cpu":
            return torch.float32
        recorded = DTYPES.get(checkpoint_dtype) if isinstance(checkpoint_dtype, str) else checkpoint_dtype
        chosen = recorded if recorded in _NAMES else torch.float32
        if chosen == torch.bfloat16 and device.type == "cuda" and not _cuda_bf16(device):
            chosen = torch.float16
        return chosen
    if chosen == torch.float16 and device.type == "cpu":
        raise ParameterError("--dtype float16 is not supported on CPU (no fast kernels); use --dtype float32 (the "
                             "CPU default) or bfloat16, or run on a GPU")
    if chosen == torch.bfloat16 and device.type == "cuda" and not _cuda_bf16(device):
        raise ParameterError(f"--dtype bfloat16: the GPU {device} has no bfloat16 support; use --dtype float16")
    return chosen


def dtype_name(dtype: torch.dtype) -> str:
    return _NAMES.get(dtype, str(dtype).removeprefix("torch."))


def _cuda_bf16(device: torch.device) -> bool:
    with torch.cuda.device(device):
        return bool(torch.cuda.is_bf16_supported())
