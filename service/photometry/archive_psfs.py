"""PSF models read from an exposure's afw archive, evaluated at each position as afw's
``Psf.computeImage(position)`` does (parent pixel coordinates, sub-pixel shift, sum 1).

- ``GaussianPsf`` (afw): :class:`~forcedphot.photometry.psf_models.SampledGaussianPsf`.
- ``PcaPsf`` (meas_algorithms): a ``KernelPsf`` whose kernel is a ``LinearCombinationKernel``
  of ``FixedKernel`` images weighted by ``Chebyshev1Function2D`` spatial functions; the
  kernel image is normalised to sum 1 and shifted with Lanczos-5 (afw's ``recenterKernelImage``).
- ``PsfexPsf`` (meas_extensions_psfex): the PSFEx model of our ``.psf`` reader, with the
  context offset/scale of the archive applied to parent coordinates and the pixel data read
  as meas_extensions_psfex does (``_comp[k][y * w + x]`` is the model at column y, row x).
- ``PiffPsf`` (meas_extensions_piff): a pickled ``(width, height, piff.PSF)``. Unpickling runs
  code, so it is read only when the caller allows it (local files and repository files,
  never uploads) and only with the optional ``piff`` package (``pip install
  'forcedphot[piff]'``); stamps are Piff's own ``draw`` at each position, normalised to sum 1.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from forcedphot.photometry.afw_archive import Archive, ArchiveError
from forcedphot.photometry.psf_models import (MAX_PSF_MODEL_PX, MAX_PSF_STAMP_PX, Array, PsfError, PsfexPsf, PsfModel, Put, ResampledPsf,
                                              SampledGaussianPsf, _normalised, _positions, check_degree, check_psf_size)

__all__ = ["Chebyshev1Function2D", "KernelPsf", "PiffPsf", "archive_psf", "archive_psf_class"]

class Chebyshev1Function2D:
    """afw ``Chebyshev1Function2D``: ``sum c_k T_a(x') T_b(y')`` with the terms ordered by
    total order n, then a = n, n-1, ..., 0 (b = n - a); x', y' map [min, max] to [-1, 1]."""

    def __init__(self, coefficients: np.ndarray, lower: np.ndarray, upper: np.ndarray):
        coefficients = np.atleast_1d(np.asarray(coefficients, np.float64))
        order = (math.isqrt(1 + 8 * coefficients.size) - 3) // 2
        if (order + 1) * (order + 2) // 2 != coefficients.size:
            raise PsfError(f"Chebyshev1Function2D: {coefficients.size} coefficients is not a triangular number")
        lower, upper = np.asarray(lower, np.float64), np.asarray(upper, np.float64)
        if lower.shape != (2,) or upper.shape != (2,) or not np.all(upper > lower):
            raise PsfError(f"Chebyshev1Function2D: range {lower.tolist()} - {upper.tolist()} is empty")
        self.coefficients, self.order = coefficients, order
        self.centre, self.half_width = (lower + upper) / 2.0, (upper - lower) / 2.0
        self.terms = [(n - b, b) for n in range(order + 1) for b in range(n + 1)]

    def __call__(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """The function at (x, y) (float64 arrays of one shape)."""
        tx = _chebyshev_table((np.asarray(x, np.float64) - self.centre[0]) / self.half_width[0], self.order)
        ty = _chebyshev_table((np.asarray(y, np.float64) - self.centre[1]) / self.half_width[1], self.order)
        return sum(c * tx[a] * ty[b] for c, (a, b) in zip(self.coefficients, self.terms))


def _chebyshev_table(u: np.ndarray, order: int) -> list[np.ndarray]:
    """[T_0(u), ..., T_order(u)] by the recurrence."""
    table = [np.ones_like(u), u]
    for _ in range(2, order + 1):
        table.append(2.0 * u * table[-1] - table[-2])
    return table[:order + 1]


class KernelPsf(ResampledPsf):
    """LSST's ``KernelPsf`` of a spatially varying ``LinearCombinationKernel`` (``PcaPsf``).

    At parent position (X, Y) = local + ``xy0`` the kernel image is
    ``sum_i f_i(X, Y) K_i / sum_i f_i(X, Y) sum(K_i)`` (afw ``computeImage(doNormalize=true)``),
    shifted to the sub-pixel position with Lanczos-5.
    """

    def __init__(self, kernels: np.ndarray, functions: list[Chebyshev1Function2D], xy0: tuple[int, int], kind: str):
        self.kernels = np.asarray(kernels, np.float64)
        if len(functions) != len(self.kernels):
            raise PsfError(f"{kind}: {len(self.kernels)} kernel images but {len(functions)} spatial functions")
        self.functions, self.xy0, self.kind = functions, xy0, kind
        self.stamp_size = self.kernels.shape[1]
        self._sums = self.kernels.reshape(len(self.kernels), -1).sum(axis=1)

    def weights(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """(N, n_kernels) normalised weights of the kernel images at 0-based local (x, y)."""
        x, y = _positions(x, y)
        values = np.stack([f(x + self.xy0[0], y + self.xy0[1]) for f in self.functions], axis=1)
        return values / (values @ self._sums)[:, None]

    def models(self, x: np.ndarray, y: np.ndarray, xp: Any, put: Put) -> Array:
        n, side = len(self.kernels), self.stamp_size
        weights = put(self.weights(x, y))
        return xp.reshape(xp.matmul(weights, put(self.kernels.reshape(n, side * side))), (weights.shape[0], side, side))

    def describe(self) -> str:
        return (f"LSST {self.kind}: {len(self.kernels)} kernel images of {self.stamp_size} x {self.stamp_size} px weighted by "
                f"Chebyshev polynomials of order {max(f.order for f in self.functions)}, shifted with Lanczos-5")


class PiffPsf(ResampledPsf):
    """LSST's ``PiffPsf``: stamps drawn by Piff at each parent position (Piff's GalSim
    rendering, sub-pixel position included), normalised to sum 1."""

    def __init__(self, piff_psf: Any, width: int, xy0: tuple[int, int]):
        self.piff_psf, self.xy0 = piff_psf, xy0
        self.stamp_size = int(width) | 1

    def _resampled(self, x: np.ndarray, y: np.ndarray, cx: np.ndarray, cy: np.ndarray, xp: Any, put: Put) -> Array:
        """(N, K, K) Piff drawings of the PSF at local (x, y), its centre at stamp coords (cx, cy)."""
        import galsim

        side = self.stamp_size
        out = np.empty((len(x), side, side))
        for n in range(len(x)):
            px, py = x[n] + self.xy0[0], y[n] + self.xy0[1]
            corner_x, corner_y = int(round(px - cx[n])), int(round(py - cy[n]))  # parent pixel of stamp pixel (0, 0)
            image = galsim.ImageD(galsim.BoundsI(corner_x, corner_x + side - 1, corner_y, corner_y + side - 1))
            out[n] = self.piff_psf.draw(px, py, image=image, center=(cx[n] + corner_x, cy[n] + corner_y)).array
        return _normalised(put(out), xp)  # drawn on the host: the stamps themselves travel

    def describe(self) -> str:
        return f"LSST PiffPsf ({type(self.piff_psf).__name__}), drawn by Piff on {self.stamp_size} x {self.stamp_size} px"


def archive_psf(archive: Archive | None, xy0: tuple[int, int], *, allow_pickled: bool) -> PsfModel | None:
    """The PSF model in ``archive`` for an exposure whose parent origin is ``xy0``, or None
    when the archive holds no PSF or one of a class not read (see :func:`archive_psf_class`).

    Raises :class:`PsfError` for a damaged record, and for a pickled PSF (``PiffPsf``) when
    ``allow_pickled`` is False or Piff is not installed.
    """
    if archive is None:
        return None
    archive_id = archive.component("Psf")
    if archive_id is None:
        return None
    kind = archive.class_name(archive_id)
    reader = _READERS.get(kind)
    if reader is None:
        return None
    try:
        return reader(archive, archive_id, xy0, allow_pickled)
    except PsfError:
        raise
    except (ArchiveError, KeyError, TypeError, ValueError, OverflowError, IndexError) as exc:
        raise PsfError(f"the archive's {kind} cannot be read: {exc}") from None


def archive_psf_class(archive: Archive | None) -> str | None:
    """The class of the PSF in ``archive`` ("PcaPsf", ...), or None when it has none."""
    archive_id = archive.component("Psf") if archive is not None else None
    return archive.class_name(archive_id) if archive_id is not None else None


def _gaussian(archive: Archive, archive_id: int, xy0: tuple[int, int], allow_pickled: bool) -> PsfModel:
    record = archive.record(archive_id)
    dims = record.get("dimensions")
    width, height = (dims[0], dims[1]) if dims is not None else (record["dimensions_x"], record["dimensions_y"])
    return SampledGaussianPsf(float(record["sigma"]), _size("GaussianPsf dimensions", width, MAX_PSF_STAMP_PX),
                              _size("GaussianPsf dimensions", height, MAX_PSF_STAMP_PX))


def _pca(archive: Archive, archive_id: int, xy0: tuple[int, int], allow_pickled: bool) -> PsfModel:
    kind = archive.class_name(archive_id)
    kernel_id = int(archive.record(archive_id)["kernel"])
    if archive.class_name(kernel_id) != "LinearCombinationKernel":
        raise PsfError(f"{kind}: its kernel is a {archive.class_name(kernel_id)}; only LinearCombinationKernel is read")
    kernel = archive.record(kernel_id)
    width, height = (_size(f"{kind} kernel dimensions", v, MAX_PSF_STAMP_PX) for v in kernel["dimensions"])
    if width != height or width % 2 == 0 or tuple(int(v) for v in kernel["center"]) != (width // 2, height // 2):
        raise PsfError(f"{kind}: kernel of {width} x {height} px centred at {list(kernel['center'])}; "
                       "only odd square kernels centred on their middle pixel are read")
    images = []
    for component in np.atleast_1d(kernel["components"]):
        fixed = archive.record(int(component))
        if archive.class_name(int(component)) != "FixedKernel" or tuple(int(v) for v in fixed["dimensions"]) != (width, height):
            raise PsfError(f"{kind}: component {int(component)} is not a {width} x {height} FixedKernel")
        images.append(np.asarray(fixed["image"], np.float64).reshape(height, width))
    functions = []
    for function_id in np.atleast_1d(kernel["spatialfunctions"]):
        if archive.class_name(int(function_id)) != "Chebyshev1Function2D":
            raise PsfError(f"{kind}: spatial function {int(function_id)} is a {archive.class_name(int(function_id))}; "
                           "only Chebyshev1Function2D is read")
        record = archive.record(int(function_id))
        functions.append(Chebyshev1Function2D(record["coefficients"], record["min"], record["max"]))
    if not np.all(np.isfinite(images)):
        raise PsfError(f"{kind}: kernel images have non-finite pixels")
    return KernelPsf(np.stack(images), functions, xy0, kind)


def _psfex(archive: Archive, archive_id: int, xy0: tuple[int, int], allow_pickled: bool) -> PsfModel:
    catalogs = archive.catalogs(archive_id)
    if len(catalogs) != 2 or len(catalogs[0]) != 1 or len(catalogs[1]) != 1:
        raise PsfError("PsfexPsf: expected two catalogs of one row (sizes, then arrays)")
    sizes, arrays = catalogs[0][0], catalogs[1][0]
    if int(sizes["ndim"]) != 2 or int(sizes["ngroup"]) != 1:
        raise PsfError(f"PsfexPsf: {sizes['ndim']} context dimensions in {sizes['ngroup']} groups; only one group in x, y is read")
    width, height, *rest = (_size("PsfexPsf _size", v, MAX_PSF_MODEL_PX) for v in np.atleast_1d(arrays["_size"]))
    nbasis = rest[0] if rest else 1
    comp = np.asarray(arrays["_comp"], np.float64).reshape(nbasis, width * height)
    # meas_extensions_psfex copies _comp[k][a * w + b] to image column a, row b: the transpose
    basis = comp.reshape(nbasis, height, width).transpose(0, 2, 1)
    degree = check_degree("the archive's PsfexPsf", np.atleast_1d(arrays["degree"])[0])
    first, second = np.atleast_1d(arrays["_context_first"]), np.atleast_1d(arrays["_context_second"])
    return PsfexPsf(basis, degree, (first[0], first[1]), (second[0], second[1]), float(sizes["_pixstep"]), xy0,
                    "the archive's PsfexPsf")


def _piff(archive: Archive, archive_id: int, xy0: tuple[int, int], allow_pickled: bool) -> PsfModel:
    if not allow_pickled:
        raise PsfError("its archive holds a PiffPsf, a pickled Python object, and pickles from uploads are never loaded "
                       "(loading one runs code from the file)")
    try:
        import piff
    except ImportError:
        raise PsfError("its archive holds a PiffPsf, which needs the optional Piff package: pip install 'forcedphot[piff]'") from None
    import pickle

    width, height, piff_psf = pickle.loads(archive.record(archive_id)["bytes"])  # noqa: S301 (local or repository files only)
    _upgrade_old_piff(piff_psf, piff.version)
    return PiffPsf(piff_psf, _size("PiffPsf width", width, MAX_PSF_STAMP_PX), xy0)


def _size(what: str, value: Any, limit: int) -> int:
    """A declared side as an int, or PsfError unless it is a whole number in [1, ``limit``]."""
    check_psf_size("the archive's PSF", what, value, limit)
    if value != int(value):
        raise PsfError(f"the archive's PSF: {what} = {value!r} is not a whole number")
    return int(value)


def _upgrade_old_piff(piff_psf: Any, version: str) -> None:
    """Attributes that Piff >= 1.4 expects and pickles from older Piff lack (the fix-up
    meas_extensions_piff applies, plus PixelGrid's cached maxk/stepk, reset as Piff does)."""
    major_minor = tuple(int(part) for part in version.split(".")[:2])
    if major_minor < (1, 4) or hasattr(piff_psf, "_num"):
        return
    piff_psf._num = None
    piff_psf.model._num = None
    piff_psf.model._fit_flux = None
    piff_psf.interp._num = None
    for cached in ("_maxk", "_stepk"):
        if not hasattr(piff_psf.model, cached):
            setattr(piff_psf.model, cached, 0.0)


_READERS = {"GaussianPsf": _gaussian, "PcaPsf": _pca, "PsfexPsf": _psfex, "PiffPsf": _piff}
