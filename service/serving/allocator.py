"""Keep the kernels' large temporaries on the malloc heap (glibc ``mallopt``).

The kernels create many short-lived work arrays of 1-16 MB. glibc serves each
allocation above its mmap threshold (128 kB, raised dynamically only after such blocks
are freed) with a fresh ``mmap``, so every temporary costs a page fault per 4 kB page
on first touch and an ``munmap`` when freed: a third of a small request's time (see
``bench/RESULTS.md``). Raising the
mmap threshold and the trim threshold lets freed blocks be reused, at the price of
keeping up to ``trim_threshold_bytes`` of freed memory per malloc arena.

The tuning is process-wide, so it is applied at process entry (the command line and
each service worker), never by the engine itself. On other C libraries it does nothing.
"""

import ctypes
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 * 2**20
TRIM_THRESHOLD_BYTES = 128 * 2**20


def keep_temporaries_on_heap(mmap_threshold_bytes: int = MMAP_THRESHOLD_BYTES,
                             trim_threshold_bytes: int = TRIM_THRESHOLD_BYTES) -> bool:
    """Raise glibc's mmap and trim thresholds; True if the C library accepted both.

    Allocations up to ``mmap_threshold_bytes`` then come from the heap, and up to
    ``trim_threshold_bytes`` of free heap is kept for reuse instead of being returned
    to the system.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # musl and other libcs answer 0 (not supported); glibc answers 1.
    return mallopt(M_MMAP_THRESHOLD, mmap_threshold_bytes) == 1 and mallopt(M_TRIM_THRESHOLD, trim_threshold_bytes) == 1
