"""The kernels on one backend: staged cutouts in, typed per-object results out.

:class:`KernelInputs` holds the host arrays of one batch; :class:`KernelRunner` moves them
to the backend, runs every kernel and brings back one :class:`KernelResults` (each
kernel's own result type). The host computes what the kernels would otherwise read back
from the device (crop windows, the annulus pixels) from its own copies of the positions,
and every result comes back in one packed download. Inputs of several requests with the
same shapes concatenate, and results split again, so a service can batch concurrent
requests.
"""

from collections.abc import Callable
from dataclasses import dataclass, fields
from functools import cached_property
import math
from typing import Any, NamedTuple

import numpy as np

from forcedphot.kernels import (
    ApertureFluxes,
    LocalBackground,
    PixelFlags,
    PsfFluxResult,
    annulus_candidates,
    aperture_fluxes,
    centre_bounds,
    footprint_window,
    local_background,
    pixel_flags,
    psf_flux,
)
from forcedphot.photometry.backend import Backend
from forcedphot.photometry.config import MeasurementConfig
from forcedphot.photometry.cutouts import CutoutStack
from forcedphot.photometry.exposure import Exposure
from forcedphot.photometry.psf_models import PsfModel

# pixelFlags_<name> -> afw mask plane; the one list of pixel flags
PIXEL_FLAG_PLANES = {
    "edge": "EDGE",
    "nodata": "NO_DATA",
    "interpolated": "INTRP",
    "saturated": "SAT",
    "cr": "CR",
    "bad": "BAD",
    "suspect": "SUSPECT",
}
PIXEL_FLAG_NAMES = tuple(PIXEL_FLAG_PLANES)
BACKGROUND_REJECT_PLANES = ("BAD", "SAT", "NO_DATA")


class KernelResults(NamedTuple):
    """Every kernel's result for one set of objects (``None``: not measured).

    ``pixel_flags`` columns follow :data:`PIXEL_FLAG_NAMES`, all of them, whether the
    exposure defines the plane or not (an undefined plane is never set).
    """

    psf: PsfFluxResult
    apertures: ApertureFluxes | None = None
    background: LocalBackground | None = None
    pixel_flags: PixelFlags | None = None


def map_arrays(fn: Callable[..., Any], *results: Any) -> Any:
    """Apply ``fn`` to the corresponding arrays of ``results`` (nested named tuples of
    arrays, ``None`` kept), giving a result of the same type."""
    first = results[0]
    if first is None:
        return None
    if isinstance(first, tuple):
        return type(first)(*(map_arrays(fn, *parts) for parts in zip(*results)))
    return fn(*results)


def unmeasured(n: int, n_apertures: int, full: bool = True) -> KernelResults:
    """Results for ``n`` objects no kernel looked at: NaN, 0 and False, every array its own."""
    def f(*shape):
        return np.full((n, *shape), np.nan)

    def b(*shape):
        return np.zeros((n, *shape), bool)

    psf = PsfFluxResult(f(), f(), f(), f(), np.zeros(n, np.int64), b(), b(), b())
    if not full:
        return KernelResults(psf)
    planes = len(PIXEL_FLAG_NAMES)
    return KernelResults(
        psf,
        ApertureFluxes(f(n_apertures), f(n_apertures), b(n_apertures)),
        LocalBackground(f(), f(), np.zeros(n, np.int64), b()),
        PixelFlags(b(planes), b(planes), b(planes)),
    )


def scatter(into: KernelResults, batch: KernelResults, rows: np.ndarray) -> None:
    """Write one batch's results at ``rows`` of the full-length ``into``."""
    def put(target: np.ndarray, values: np.ndarray) -> None:
        target[rows] = values

    map_arrays(put, into, batch)


def split_results(results: KernelResults, sizes: list[int]) -> list[KernelResults]:
    """Undo :func:`concatenate_inputs` on a kernel result."""
    bounds = np.cumsum([0] + sizes)
    return [map_arrays(lambda a, lo=lo, hi=hi: a[lo:hi], results) for lo, hi in zip(bounds[:-1], bounds[1:])]


def mask_bits(planes: dict[str, int], names) -> int:
    """OR of the bits of the named mask planes that the exposure defines."""
    return sum(1 << planes[name] for name in set(names) if name in planes)


def cutout_half_size(psf: PsfModel, sigma: np.ndarray, config: MeasurementConfig) -> int:
    """Half-width h (px) of cutouts large enough for every measurement.

    Covers the background annulus (outer radius in PSF sigmas), the largest aperture
    plus one pixel (so truncation by the cutout cannot happen), and the PSF stamp.
    """
    sigma_max = float(np.max(sigma)) if sigma.size else 0.0
    return max(
        math.ceil(config.background_outer_sigma * sigma_max),
        math.ceil(max(config.apertures_px) + 1),
        psf.stamp_size // 2,
    )


@dataclass(frozen=True)
class KernelInputs:
    """Host arrays for one kernel call. Inputs of several requests with the same cutout
    and PSF stamp sizes concatenate (:func:`concatenate_inputs`), so a service can
    measure them in one batch."""

    image: np.ndarray  # (n, K, K) float32
    variance: np.ndarray  # (n, K, K) float32
    mask: np.ndarray  # (n, K, K) int32
    inside: np.ndarray  # (n, K, K) bool
    cx: np.ndarray  # (n,) cutout coordinates, px
    cy: np.ndarray
    sigma: np.ndarray  # (n,) PSF determinant radius, px
    psf: np.ndarray  # (n, Kp, Kp) PSF stamps, each summing to 1

    def __len__(self) -> int:
        return self.image.shape[0]

    @property
    def shape_key(self) -> tuple:
        """Inputs with equal keys can be concatenated."""
        return self.image.shape[1:] + self.psf.shape[1:]


def concatenate_inputs(parts: list[KernelInputs]) -> KernelInputs:
    """One batch from several (equal :attr:`KernelInputs.shape_key`)."""
    return KernelInputs(*(np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(KernelInputs)))


class KernelRunner:
    """Runs the kernels on staged cutouts, on one backend, for one exposure's mask planes."""

    def __init__(self, backend: Backend, exposure: Exposure, psf: PsfModel, config: MeasurementConfig):
        self.backend, self.psf, self.config = backend, psf, config
        planes = exposure.mask_planes
        self.bad_fit_bits = mask_bits(planes, config.bad_mask_planes)
        self.background_reject_bits = mask_bits(planes, BACKGROUND_REJECT_PLANES)
        # every flag gets a column; a plane the exposure lacks has no bit (never set)
        self.flag_bits = {name: planes.get(plane) for name, plane in PIXEL_FLAG_PLANES.items()}

    @cached_property
    def key(self) -> tuple:
        """Runners with equal keys compute identically: their inputs may share a batch."""
        return (self.backend.name, self.bad_fit_bits, self.background_reject_bits, tuple(sorted(self.flag_bits.items())), self.config.model_dump_json())

    def inputs(self, stack: CutoutStack, x: np.ndarray, y: np.ndarray, sigma: np.ndarray | None = None) -> KernelInputs:
        """Kernel inputs for a staged stack; x, y local positions, sigma PSF widths (px)."""
        sigma = np.full(len(x), np.nan) if sigma is None else sigma
        return KernelInputs(stack.image, stack.variance, stack.mask, stack.inside, stack.cx, stack.cy, sigma, self.psf.stamps(x, y, np))

    def _psf_fit(self, xp, image, variance, mask, inside, psf) -> PsfFluxResult:
        """PSF flux on the central PSF-stamp-sized part of the stack."""
        kp = psf.shape[1]
        start = image.shape[1] // 2 - kp // 2
        crop = (slice(None), slice(start, start + kp), slice(start, start + kp))
        image, variance, mask, inside = image[crop], variance[crop], mask[crop], inside[crop]
        # as LSST: a non-finite pixel on the image inside the fit region makes the flux NaN
        # and flagged (it is not dropped from the fit); padding beyond the edge is not fitted
        usable = inside
        if self.bad_fit_bits:
            usable = usable & ((mask & self.bad_fit_bits) == 0)
        return psf_flux(image, variance, psf, inside, usable)

    def run(self, inputs: KernelInputs, full: bool = True) -> KernelResults:
        """Every measurement (``full``) or the PSF flux alone; host arrays out.

        Moves the batch's arrays to the backend (cutout planes, PSF stamps, one packed
        array of positions and widths, and the annulus pixel indices), runs the kernels
        with the windows the host computed, and brings everything back in one download.
        """
        xp, to, config = self.backend.xp, self.backend.to_device, self.config
        image, variance, mask, inside = to(inputs.image), to(inputs.variance), to(inputs.mask), to(inputs.inside)
        fit = self._psf_fit(xp, image, variance, mask, inside, to(inputs.psf))
        if not full:
            return self._download(KernelResults(fit))
        positions = to(np.stack([inputs.cx, inputs.cy, inputs.sigma]).astype(np.float64))
        cx, cy, sigma = positions[0, ...], positions[1, ...], positions[2, ...]
        k = inputs.image.shape[1]
        valid = inside & xp.isfinite(image) & xp.isfinite(variance)
        apertures = aperture_fluxes(image, variance, valid, cx, cy, config.apertures_px, bounds=centre_bounds(inputs.cx, inputs.cy))
        clean = valid & ((mask & self.background_reject_bits) == 0)
        inner, outer = config.background_inner_sigma, config.background_outer_sigma
        background = local_background(
            image, clean, cx, cy, sigma, inner=inner, outer=outer,
            n_iter=config.background_iterations, n_sigma=config.background_clip_sigma,
            candidates=to(annulus_candidates(k, inputs.cx, inputs.cy, inputs.sigma, inner, outer)),
        )
        radius = config.psf_footprint_scaling * inputs.sigma
        flags = pixel_flags(mask, inside, cx, cy, config.psf_footprint_scaling * sigma, self.flag_bits,
                            window=footprint_window(inputs.cx, inputs.cy, radius, k))
        return self._download(KernelResults(fit, apertures, background, flags))

    def _download(self, results: KernelResults) -> KernelResults:
        """``results`` on the host, copied in one transfer: every array packed as float64
        columns of one ``(N, C)`` array (exact for flags and counts below 2^53)."""
        xp = self.backend.xp
        leaves: list = []
        map_arrays(leaves.append, results)
        n = leaves[0].shape[0]
        widths = [leaf.shape[1] if leaf.ndim == 2 else 1 for leaf in leaves]
        packed = xp.concat([xp.reshape(xp.astype(leaf, xp.float64), (n, width)) for leaf, width in zip(leaves, widths)], axis=1)
        host = self.backend.to_host(packed)
        bounds = np.cumsum([0, *widths])
        columns = iter(
            host[:, lo:hi].reshape((n, hi - lo) if leaf.ndim == 2 else (n,)).astype(_HOST_DTYPES[_kind(xp, leaf.dtype)])
            for leaf, lo, hi in zip(leaves, bounds[:-1], bounds[1:])
        )
        return map_arrays(lambda leaf: next(columns), results)


_HOST_DTYPES = {"bool": bool, "integral": np.int64, "real floating": np.float64}


def _kind(xp: Any, dtype: Any) -> str:
    return next(kind for kind in _HOST_DTYPES if xp.isdtype(dtype, kind))


Execute = Callable[[KernelRunner, KernelInputs, bool], KernelResults]


def run_directly(runner: KernelRunner, inputs: KernelInputs, full: bool) -> KernelResults:
    """The default executor: run the kernels now, in this thread."""
    return runner.run(inputs, full)
