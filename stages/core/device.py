"""Where networks run and in which precision: the one choice every stage that runs a network makes the same way.

CUDA when available, else the CPU. On CUDA the forward pass runs under
autocast in bfloat16 where the GPU supports it, else in float16 (training then
needs a gradient scaler: float16 gradients underflow); on the CPU in float32,
which is also what makes CPU runs reproducible to the byte.
"""
from __future__ import annotations

import contextlib
import os

import torch


def pick_device() -> torch.device:
    """CUDA when available (made deterministic among GPU runs, see :func:`deterministic_cuda`), else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    deterministic_cuda()
    return torch.device("cuda")


def deterministic_cuda() -> None:
    """GPU runs repeat to the byte where torch allows: deterministic algorithms (a warning names any op
    without one), cuBLAS with a fixed workspace, no cuDNN autotuning. A GPU run never equals a CPU run."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True, warn_only=True)


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype on ``device``; None: plain float32."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def needs_grad_scaler(device: torch.device) -> bool:
    """Whether training on ``device`` must scale its loss (float16 autocast)."""
    return autocast_dtype(device) is torch.float16


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """The autocast context of :func:`autocast_dtype` (a no-op on the CPU)."""
    dtype = autocast_dtype(device)
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)
