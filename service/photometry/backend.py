"""Pick the array backend the kernels run on: NumPy on the CPU or CuPy on a CUDA GPU.

``auto`` takes CuPy when it imports and a CUDA device answers, else NumPy. The chosen
backend is reported (name and device) so callers and ``/v1/info`` can say what ran.
"""

from dataclasses import dataclass
from types import ModuleType
from typing import Any, Literal

from array_api_compat import array_namespace
import numpy as np

BackendName = Literal["auto", "numpy", "cupy"]


class BackendError(RuntimeError):
    """The requested backend cannot run on this machine."""


@dataclass(frozen=True)
class Backend:
    """An array namespace and a description of where it computes."""

    name: str  # "numpy" or "cupy"
    device: str  # e.g. "cpu" or the GPU's name
    xp: ModuleType

    def to_device(self, array: np.ndarray) -> Any:
        """Copy a host array to the backend (no copy for NumPy)."""
        return self.xp.asarray(array)


def to_numpy(array: Any) -> np.ndarray:
    """Copy any backend's array to a host NumPy array."""
    if hasattr(array, "get"):  # CuPy
        return array.get()
    return np.asarray(array)


def _cupy_backend() -> Backend | None:
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


def select_backend(name: BackendName = "auto") -> Backend:
    """Return the backend for ``name``; ``cupy`` without a usable GPU raises BackendError."""
    if name not in ("auto", "numpy", "cupy"):
        raise BackendError(f"unknown backend {name!r}; choose auto, numpy or cupy")
    if name != "numpy":
        gpu = _cupy_backend()
        if gpu is not None:
            return gpu
        if name == "cupy":
            raise BackendError("backend 'cupy' requested but CuPy is not installed or no CUDA device answers")
    return Backend("numpy", "cpu", array_namespace(np.empty(0)))
