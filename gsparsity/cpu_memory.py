"""Keep freed CPU memory in the process, so that large tensors do not page-fault every time.

glibc's malloc serves a block above its mmap threshold (at most 32 MiB) with a fresh
``mmap`` and gives it back with ``munmap`` when it is freed. A ResNet's activations at
224x224 are that large from batch 11 on (layer1's at batch 32: 32 x 256 x 56 x 56 floats,
103 MB), so every step maps them anew and the kernel zeroes every page again on first
touch. Measured on the team's CPU (docs/benchmarks-history.md, "Freed memory"), keeping that memory
about doubles the CPU training img/s at batch 32, 224x224, and the eager inference speed
of ResNet-50, and lifts the compressed model's inference speedup over the full one.

``keep_freed_memory()`` makes malloc serve the main thread's blocks from its heap,
whatever their size, and never trim that heap, so the next step reuses pages that are
already there. (Other threads' arenas still map blocks above 64 MiB.) The cost: freed
blocks that do not fit the next request stay beside it (a 3-epoch training run at batch
32, 224x224 peaked at 6.0 GB instead of 3.7 GB, flat from its second epoch on), the
process keeps the most memory it ever held until it exits, one-off peaks included, and
so does each forked DataLoader worker, whose peak is a few decoded images.

The training scripts call it when they run on the CPU (``distributed.claim_device``).
It only changes glibc's malloc (Linux), and leaves malloc alone where the user has set it
up through the environment (``MALLOC_*_`` variables or a ``glibc.malloc`` tunable): that
is also the way to opt out, e.g. ``MALLOC_MMAP_MAX_=65536`` (glibc's default). Any other
process, one serving an exported model say, gets the same effect from
``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647`` in its environment.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

# mallopt parameters, from glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_NEVER_TRIM = 2**31 - 1  # mallopt takes an int; bytes of free memory at the top before trimming


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse. False, and nothing changed, where
    malloc is not glibc's or the environment already sets malloc up."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc" or malloc_set_by_environment():
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    served_without_mmap = libc.mallopt(_M_MMAP_MAX, 0) == 1
    never_trimmed = libc.mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM) == 1
    return served_without_mmap and never_trimmed


def malloc_set_by_environment() -> bool:
    """Whether the user configured glibc's malloc through the environment (then it is theirs)."""
    legacy = any(name.startswith("MALLOC_") and name.endswith("_") for name in os.environ)
    return legacy or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", "")
