"""Pick the array backend the kernels run on: NumPy on the CPU, CuPy on a CUDA GPU, or the
stand-in device that CI uses in place of a GPU.

``auto`` takes CuPy when it imports and a CUDA device answers, else NumPy. ``stand-in``
runs on ``array_api_strict.Device("device1")``: its arrays refuse ``np.asarray`` and
cannot be mixed with host arrays, exactly the mistakes that break on CuPy, so the engine's
host/device boundary is tested without a GPU. Every backend counts what crosses that
boundary (:class:`TransferCounts`); the stand-in also counts scalar reads of device arrays
(``float(x)``, ``int(x)``, ``bool(x)``: each one a synchronisation on a GPU).
"""

from dataclasses import dataclass, field
from functools import cache
from types import ModuleType
from typing import Any

from array_api_compat import array_namespace
import numpy as np

from forcedphot.defaults import BackendName  # the names a backend may have (light, for the command line)


class BackendError(RuntimeError):
    """The requested backend cannot run on this machine."""


@dataclass
class TransferCounts:
    """What crossed the host/device boundary (a NumPy backend copies nothing but counts the
    same calls, so the bounds are checked on every backend)."""

    uploads: int = 0
    upload_bytes: int = 0
    downloads: int = 0
    download_bytes: int = 0
    scalar_reads: int = 0  # counted on the stand-in device only

    def snapshot(self) -> "TransferCounts":
        return TransferCounts(self.uploads, self.upload_bytes, self.downloads, self.download_bytes, self.scalar_reads)

    def since(self, earlier: "TransferCounts") -> "TransferCounts":
        """Counts accumulated after ``earlier`` (a :meth:`snapshot`)."""
        return TransferCounts(self.uploads - earlier.uploads, self.upload_bytes - earlier.upload_bytes, self.downloads - earlier.downloads,
                              self.download_bytes - earlier.download_bytes, self.scalar_reads - earlier.scalar_reads)


@dataclass(frozen=True)
class Backend:
    """An array namespace, where it computes, and the transfers to and from it."""

    name: str  # "numpy", "cupy" or "stand-in"
    device: str  # e.g. "cpu" or the GPU's name
    xp: ModuleType
    target: Any = None  # the namespace's device object, when arrays must be placed on one
    counts: TransferCounts = field(default_factory=TransferCounts, compare=False)

    def to_device(self, array: np.ndarray) -> Any:
        """Copy a host array to the backend (no copy for NumPy)."""
        array = np.asarray(array)
        self.counts.uploads += 1
        self.counts.upload_bytes += array.nbytes
        return self.xp.asarray(array) if self.target is None else self.xp.asarray(array, device=self.target)

    def to_host(self, array: Any) -> np.ndarray:
        """Copy a backend array to a host NumPy array."""
        if self.name == "cupy":
            host = array.get()
        elif self.name == "stand-in":
            host = np.asarray(array.to_device(self.xp.Device("CPU_DEVICE")))
        else:
            host = np.asarray(array)
        self.counts.downloads += 1
        self.counts.download_bytes += host.nbytes
        return host


@cache
def _cupy_backend() -> Backend | None:
    """CuPy on its current device when a CUDA device answers, else None: probed once a
    process (a failed ``import cupy`` searches the whole path again each time it is
    tried: ~0.05 ms of every ``measure`` call that chose ``auto``)."""
    try:
        import cupy
    except ImportError:
        return None
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return None
        props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    except Exception:  # no driver, no device: CuPy raises its own CUDA errors
        return None
    name = props["name"]
    return Backend("cupy", name.decode() if isinstance(name, bytes) else str(name), array_namespace(cupy.empty(0)))


@cache
def _stand_in_backend() -> Backend:
    """``array_api_strict`` on ``Device("device1")``, one per process (it is one device), with
    scalar reads of its arrays counted."""
    try:
        import array_api_strict
    except ImportError:
        raise BackendError("backend 'stand-in' needs array-api-strict (pip install -e '.[test]')") from None
    backend = Backend("stand-in", "array_api_strict device1 (a stand-in for a GPU)", array_api_strict, array_api_strict.Device("device1"))
    array_class = type(array_api_strict.asarray(0.0))
    for method in ("__float__", "__int__", "__bool__", "__index__", "__complex__"):
        _count_reads(array_class, method, backend)
    return backend


def _count_reads(array_class: type, method: str, backend: Backend) -> None:
    original = getattr(array_class, method)

    def counted(self, *args, **kwargs):
        if self.device == backend.target:
            backend.counts.scalar_reads += 1
        return original(self, *args, **kwargs)

    setattr(array_class, method, counted)


def select_backend(name: BackendName = "auto") -> Backend:
    """Return the backend for ``name``; ``cupy`` without a usable GPU raises BackendError."""
    if name not in ("auto", "numpy", "cupy", "stand-in"):
        raise BackendError(f"unknown backend {name!r}; choose auto, numpy, cupy or stand-in")
    if name == "stand-in":
        return _stand_in_backend()
    if name != "numpy":
        gpu = _cupy_backend()
        if gpu is not None:
            return gpu
        if name == "cupy":
            raise BackendError("backend 'cupy' requested but CuPy is not installed or no CUDA device answers")
    return Backend("numpy", "cpu", array_namespace(np.empty(0)))
