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

Batch sizes per slot (``batch_size``, ``batch_probe``): :func:`slot_batch` gives the batch a
worker starts at and, for ``batch_size=auto`` on an accelerator slot, the bounds it probes
within; :func:`call_size` gives how many items the controller puts in one call. The probe
itself runs in the worker (runner/worker.py, ``_Ladder``).
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


def probes(backend: str) -> bool:
    """``batch_size=auto`` probes on an accelerator slot (cuda, xpu); a CPU slot takes the
    task's default batch size: its batch is limited by speed, not by a card's memory."""
    return backend != "cpu"


def slot_batch(batch_size: int | str | None, floor: int, top: int, default: int,
               backend: str) -> tuple[int, tuple[int, int] | None]:
    """(the batch size a worker of ``backend`` starts at, its probe bounds or None).

    ``batch_size``: the top-level setting (an int, "auto" or None = the task's ``default``);
    ``floor``, ``top``: ``batch_probe.floor`` and ``batch_probe.max``.
    """
    if batch_size != "auto":
        return int(batch_size or default), None
    if not probes(backend):
        return default, None
    return floor, (floor, top)


def call_size(batch_size: int | str | None, floor: int, top: int, default: int,
              backends: "set[str] | frozenset[str] | list[str]") -> int:
    """Items per dispatched call: the scheduler's batch size, one for every slot.

    A worker's ladder cuts each call into chunks of its own batch size, so with
    ``batch_size=auto`` a call holds ``batch_probe.max`` items wherever a slot probes: its
    worker can grow to any size the probe allows within one call (and a CPU slot beside it
    runs the same call in chunks of the task's default). Without a probing slot a call is
    the task's default, as with ``batch_size=null``.
    """
    sizes = [probe[1] if probe else start
             for start, probe in (slot_batch(batch_size, floor, top, default, b) for b in backends)]
    return max(sizes, default=int(batch_size if isinstance(batch_size, int) else default))
