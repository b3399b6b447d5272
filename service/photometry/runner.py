"""The kernels on one backend: batches of objects in, typed per-object results out.

:class:`KernelInputs` describes one batch (windows, positions, PSF, and where its pixels
are); :class:`KernelRunner` uploads the windows and positions as one packed array, gathers
the cutouts from device-resident planes (or uploads host-staged ones), makes the PSF
stamps on the backend, runs every kernel and brings back one :class:`KernelResults` per
batch (each kernel's own result type) from one packed download. The host computes what
the kernels would otherwise read back from the device (crop windows, the annulus pixels)
from its own copies of the positions. Several batches of equal shapes run as one call, so
a service can batch concurrent requests.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import IntEnum
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
from forcedphot.kernels.cutouts import Cutouts
from forcedphot.photometry.backend import Backend
from forcedphot.photometry.config import MeasurementConfig
from forcedphot.photometry.cutouts import Band, ResidentPlanes, Windows
from forcedphot.photometry.exposure import Exposure
from forcedphot.photometry.psf_models import PsfModel, gaussian_recipe

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


class Scope(IntEnum):
    """What a kernel call measures of each object (the fused CPU kernel takes the value)."""

    PSF = 0  # the PSF flux alone (a direct image, for scienceFlux)
    BACKGROUND = 1  # the PSF flux and the local background (a direct image whose background is subtracted)
    ALL = 2  # every measurement: PSF flux, apertures, local background, pixel flags


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


def unmeasured(n: int, n_apertures: int, scope: Scope = Scope.ALL) -> KernelResults:
    """Results for ``n`` objects no kernel looked at: NaN, 0 and False, every array its own;
    those a call of ``scope`` gives (``None`` for the others)."""
    def f(*shape):
        return np.full((n, *shape), np.nan)

    def b(*shape):
        return np.zeros((n, *shape), bool)

    psf = PsfFluxResult(f(), f(), f(), f(), np.zeros(n, np.int64), b(), b(), b(), f())
    if scope is Scope.PSF:
        return KernelResults(psf)
    background = LocalBackground(f(), f(), np.zeros(n, np.int64), b())
    if scope is Scope.BACKGROUND:
        return KernelResults(psf, background=background)
    planes = len(PIXEL_FLAG_NAMES)
    return KernelResults(psf, ApertureFluxes(f(n_apertures), f(n_apertures), b(n_apertures), f(n_apertures)), background,
                         PixelFlags(b(planes), b(planes), b(planes)))


def scatter(into: KernelResults, batch: KernelResults, rows: np.ndarray) -> None:
    """Write one batch's results at ``rows`` of the full-length ``into`` (a plain loop over
    the two levels of named tuples: it runs once per batch, and small batches are many)."""
    for into_group, batch_group in zip(into, batch):
        if batch_group is not None:
            for target, values in zip(into_group, batch_group, strict=True):
                target[rows] = values


def split_results(results: KernelResults, sizes: list[int]) -> list[KernelResults]:
    """Results of consecutive batches of ``sizes`` objects, from the results of all of them."""
    if len(sizes) == 1:
        return [results]
    bounds = np.cumsum([0] + sizes)
    return [map_arrays(lambda a, lo=lo, hi=hi: a[lo:hi], results) for lo, hi in zip(bounds[:-1], bounds[1:])]


def mask_bits(planes: dict[str, int], names) -> int:
    """OR of the bits of the named mask planes that the exposure defines."""
    return sum(1 << planes[name] for name in set(names) if name in planes)


def runs_fused(backend: Backend, config: MeasurementConfig) -> bool:
    """Whether kernels on ``backend`` with ``config`` run as the fused CPU pass
    (:mod:`forcedphot.kernels.fused_cpu`) rather than the array-API kernels."""
    return backend.name == "numpy" and config.cpu_kernels == "fused"


def cutout_half_size(psf: PsfModel, sigma: np.ndarray, config: MeasurementConfig, scope: Scope = Scope.ALL) -> int:
    """Half-width h (px) of cutouts large enough for the measurements of ``scope``
    (default: every measurement).

    Covers the PSF stamp; from :attr:`Scope.BACKGROUND` on, the background annulus (outer
    radius in PSF sigmas ``sigma``); with :attr:`Scope.ALL`, the largest aperture plus one
    pixel (so truncation by the cutout cannot happen).
    """
    half = psf.stamp_size // 2
    if scope >= Scope.BACKGROUND and sigma.size:
        half = max(half, math.ceil(config.background_outer_sigma * float(np.max(sigma))))
    if scope is Scope.ALL:
        half = max(half, math.ceil(max(config.apertures_px) + 1))
    return half


def psf_scope(subtract: bool) -> Scope:
    """The PSF flux alone, or with the local background when that is ``subtract``-ed from it."""
    return Scope.BACKGROUND if subtract else Scope.PSF


def measured_scope(config: MeasurementConfig, subtract: bool) -> Scope:
    """What the kernels measure on the image a catalog reports (the difference image in
    difference mode): everything, or (``measurements='psf'``) :func:`psf_scope`."""
    return Scope.ALL if config.measurements == "all" else psf_scope(subtract)


@dataclass(frozen=True)
class KernelInputs:
    """One batch of objects for a kernel call: their windows, where their pixels are (host
    cutouts already staged, or an exposure's planes resident on the backend's device),
    their local positions and PSF. Batches of several requests with equal
    :attr:`shape_key` run as one call (:meth:`KernelRunner.run`): only their windows and
    positions are concatenated, each part's pixels being gathered where they lie."""

    windows: Windows
    pixels: Cutouts | ResidentPlanes | Band  # (n, K, K) host stacks, device-resident planes, or a host band of rows
    x: np.ndarray  # (n,) local positions, px (for the PSF model)
    y: np.ndarray
    sigma: np.ndarray  # (n,) PSF determinant radius, px
    psf: PsfModel

    def __len__(self) -> int:
        return len(self.windows)

    @property
    def shape_key(self) -> tuple:
        """Inputs with equal keys can share a kernel call."""
        return (self.windows.size, self.psf.stamp_size)


class KernelRunner:
    """Runs the kernels on batches of objects, on one backend, for one exposure's mask planes."""

    def __init__(self, backend: Backend, exposure: Exposure, psf: PsfModel, config: MeasurementConfig):
        self.backend, self.psf, self.config = backend, psf, config
        planes = exposure.mask_planes
        self.bad_fit_bits = mask_bits(planes, config.bad_mask_planes)
        self.background_reject_bits = mask_bits(planes, BACKGROUND_REJECT_PLANES)
        # every flag gets a column; a plane the exposure lacks has no bit (never set)
        self.flag_bits = {name: planes.get(plane) for name, plane in PIXEL_FLAG_PLANES.items()}

    @property
    def fused(self) -> bool:
        """Whether the kernels run as the fused CPU pass (:mod:`forcedphot.kernels.fused_cpu`)."""
        return runs_fused(self.backend, self.config)

    @cached_property
    def key(self) -> tuple:
        """Runners with equal keys compute identically: their inputs may share a batch."""
        return (self.backend.name, self.bad_fit_bits, self.background_reject_bits, tuple(sorted(self.flag_bits.items())), self.config.model_dump_json())

    def inputs(self, windows: Windows, pixels: Cutouts | ResidentPlanes | Band, x: np.ndarray, y: np.ndarray,
               sigma: np.ndarray | None = None) -> KernelInputs:
        """Kernel inputs for one batch of windows; x, y local positions, sigma PSF widths (px)."""
        sigma = np.full(len(x), np.nan) if sigma is None else sigma
        return KernelInputs(windows, pixels, x, y, sigma, self.psf)

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

    def _on_device(self, parts: Sequence[KernelInputs], ix, iy) -> tuple:
        """The parts' cutout stacks and PSF stamps on the backend, concatenated: resident
        planes are gathered there, host stacks uploaded."""
        xp, to = self.backend.xp, self.backend.to_device
        stacks, stamps, lo = [], [], 0
        for part in parts:
            hi = lo + len(part)
            if isinstance(part.pixels, ResidentPlanes):
                stacks.append(part.pixels.gather(ix[lo:hi], iy[lo:hi], part.windows.size))
            elif isinstance(part.pixels, Band):
                stacks.append(Cutouts(*(to(plane) for plane in part.pixels.cutouts(part.windows))))
            else:
                stacks.append(Cutouts(*(to(plane) for plane in part.pixels)))
            stamps.append(part.psf.stamps(part.x, part.y, xp, to))
            lo = hi
        if len(parts) == 1:
            return (*stacks[0], stamps[0])
        return (*(xp.concat(planes, axis=0) for planes in zip(*stacks)), xp.concat(stamps, axis=0))

    def run(self, parts: Sequence[KernelInputs], scope: Scope = Scope.ALL) -> list[KernelResults]:
        """The measurements of ``scope``, for one or more batches of equal
        :attr:`KernelInputs.shape_key` in one call; host results, one per batch.

        Uploads one packed array of windows, positions and widths; gathers (or uploads)
        the cutouts and makes the PSF stamps on the backend; runs the kernels with the
        windows the host computed; and brings everything back in one download.
        """
        xp, to, config = self.backend.xp, self.backend.to_device, self.config
        if self.fused:
            return [self._fused(part, scope) for part in parts]
        host = {name: np.concatenate([getattr(p.windows, name) for p in parts]) for name in ("ix", "iy", "cx", "cy")}
        host["sigma"] = np.concatenate([p.sigma for p in parts])
        packed = to(np.stack([host["ix"], host["iy"], host["cx"], host["cy"], host["sigma"]]).astype(np.float64))
        ix, iy = (xp.astype(packed[i, ...], xp.int64) for i in (0, 1))
        cx, cy, sigma = packed[2, ...], packed[3, ...], packed[4, ...]
        image, variance, mask, inside, psf = self._on_device(parts, ix, iy)
        sizes = [len(p) for p in parts]
        fit = self._psf_fit(xp, image, variance, mask, inside, psf)
        if scope is Scope.PSF:
            return split_results(self._download(KernelResults(fit)), sizes)
        k = image.shape[1]
        valid = inside & xp.isfinite(image) & xp.isfinite(variance)
        clean = valid & ((mask & self.background_reject_bits) == 0)
        inner, outer = config.background_inner_sigma, config.background_outer_sigma
        background = local_background(
            image, clean, cx, cy, sigma, inner=inner, outer=outer,
            n_iter=config.background_iterations, n_sigma=config.background_clip_sigma,
            candidates=to(annulus_candidates(k, host["cx"], host["cy"], host["sigma"], inner, outer)),
        )
        if scope is Scope.BACKGROUND:
            return split_results(self._download(KernelResults(fit, background=background)), sizes)
        apertures = aperture_fluxes(image, variance, valid, cx, cy, config.apertures_px, bounds=centre_bounds(host["cx"], host["cy"]))
        radius = config.psf_footprint_scaling * host["sigma"]
        flags = pixel_flags(mask, inside, cx, cy, config.psf_footprint_scaling * sigma, self.flag_bits,
                            window=footprint_window(host["cx"], host["cy"], radius, k))
        return split_results(self._download(KernelResults(fit, apertures, background, flags)), sizes)

    def _fused(self, part: KernelInputs, scope: Scope) -> KernelResults:
        """The measurements of ``scope`` of one batch on the host in
        one compiled pass per object (:mod:`forcedphot.kernels.fused_cpu`), the same numbers
        as the array-API kernels.
        From a band, every window is read in place (a file's big-endian rows too: the
        kernel swaps each window's bytes as it copies it, and pads those crossing the
        image's edge); nothing is staged. A Gaussian PSF's stamps are made by the kernel,
        one object at a time."""
        from forcedphot.kernels.fused_cpu import NO_PLANE, FusedParameters, measure_windows

        c, w = self.config, part.windows
        flag_bits = np.array([NO_PLANE if self.flag_bits[name] is None else self.flag_bits[name] for name in PIXEL_FLAG_NAMES], np.int64)
        parameters = FusedParameters(np.asarray(c.apertures_px, np.float64), self.bad_fit_bits, self.background_reject_bits, flag_bits,
                                     c.psf_footprint_scaling, c.background_inner_sigma, c.background_outer_sigma,
                                     c.background_iterations, c.background_clip_sigma, int(scope))
        gaussian = gaussian_recipe(part.psf, part.x, part.y)  # (the kernel then makes each stamp itself)
        k = part.psf.stamp_size
        stamps = part.psf.stamps(part.x, part.y, np) if gaussian is None else np.zeros((0, k, k))
        pixels = part.pixels
        if isinstance(pixels, Band):
            band, h, none = pixels, w.size // 2, np.zeros((0, w.size, w.size), np.float32)
            out = measure_windows(band.image, band.variance, band.mask, w.iy - h - band.row0, w.ix - h, none, none,
                                  np.zeros(none.shape, np.int32), np.zeros(none.shape, bool), np.full(len(w), -1, np.int64),
                                  stamps, w.cx, w.cy, part.sigma, parameters, no_data=1 << band.no_data_bit, gaussian=gaussian)
        else:
            nothing = np.zeros((0, 0), np.float32)
            out = measure_windows(nothing, nothing, np.zeros((0, 0), np.int32), np.zeros(len(w), np.int64), np.zeros(len(w), np.int64),
                                  *pixels, np.arange(len(w)), stamps, w.cx, w.cy, part.sigma, parameters, gaussian=gaussian)
        fit = PsfFluxResult(*out[:8], out[18])
        if scope is Scope.PSF:
            return KernelResults(fit)
        background = LocalBackground(*out[11:15])
        if scope is Scope.BACKGROUND:
            return KernelResults(fit, background=background)
        return KernelResults(fit, ApertureFluxes(*out[8:11], out[19]), background, PixelFlags(*out[15:18]))

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


Execute = Callable[[KernelRunner, KernelInputs, Scope], KernelResults]


def run_directly(runner: KernelRunner, inputs: KernelInputs, scope: Scope) -> KernelResults:
    """The default executor: run the kernels now, in this thread."""
    return runner.run([inputs], scope)[0]
