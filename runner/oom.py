"""Out-of-memory: recognise it on every backend, and free what can be freed.

Recognised as OOM (the ladder walks: halve the batch, then the next model):
  * ``torch.OutOfMemoryError`` (CUDA and XPU; ``torch.cuda.OutOfMemoryError`` is the same)
  * CTranslate2's ``RuntimeError: CUDA failed with error out of memory``
  * MPS's ``RuntimeError: MPS backend out of memory``
  * messages from allocators such as "CUDA out of memory", "XPU out of memory",
    "UR_RESULT_ERROR_OUT_OF_DEVICE_MEMORY", "out of memory" with "CUBLAS_STATUS_ALLOC_FAILED"
  * ``MemoryError`` and torch's CPU allocator ("DefaultCPUAllocator: can't allocate memory",
    a plain RuntimeError) -- host memory, for CPU workers
Every other exception, RuntimeError included, is an item error.
"""
from __future__ import annotations

import gc
import re
import sys

_OOM_MESSAGES = re.compile(
    r"(CUDA failed with error out of memory"
    r"|MPS backend out of memory"
    r"|(CUDA|XPU|HIP) out of memory"
    r"|OUT_OF_DEVICE_MEMORY|OUT_OF_HOST_MEMORY"
    r"|CUBLAS_STATUS_ALLOC_FAILED"
    r"|DefaultCPUAllocator: can't allocate memory"
    r"|out of memory\. Tried to allocate)",
    re.IGNORECASE,
)


def is_oom(exc: BaseException) -> bool:
    """True when ``exc`` (or an exception it was raised from) means out of memory."""
    seen = 0
    while exc is not None and seen < 5:
        if isinstance(exc, MemoryError):
            return True
        torch = sys.modules.get("torch")
        oom_type = getattr(torch, "OutOfMemoryError", None) if torch else None
        if oom_type is not None and isinstance(exc, oom_type):
            return True
        if isinstance(exc, RuntimeError) and _OOM_MESSAGES.search(str(exc)):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def free_memory(device: str) -> None:
    """Drop garbage and the allocator's cached blocks on ``device`` (cuda, xpu, mps)."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is None:
        return
    backend = getattr(torch, device, None)
    if backend is not None and hasattr(backend, "empty_cache"):
        try:
            if getattr(backend, "is_available", lambda: False)():
                backend.empty_cache()
        except RuntimeError:
            pass
