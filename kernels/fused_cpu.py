"""Every measurement of a stack in one compiled pass per object: the CPU fast path.

The array-API kernels (:mod:`~forcedphot.kernels.psf_flux`, :mod:`~.aperture`,
:mod:`~.local_background`, :mod:`~.pixel_flags`) run the same formulas as whole-array
operations over ``(N, K, K)`` stacks, which streams every object's pixels through memory
tens of times and sorts each background annulus. Here each object is measured once, in a
loop compiled with numba (runs of objects spread over threads), touching only its own
pixels: the PSF-stamp box, the pixels some aperture reaches (exact overlap computed only
for pixels on a circle's rim), the annulus (its quartiles found by counting into buckets
and selecting within one, not a sort; the clipping passes as sums over the kept values)
and the footprint; a circular Gaussian PSF's stamp is made in the same pass.

Same inputs, same semantics, same pixel conventions as the array-API kernels (see their
module docstrings, which this follows line by line). Results agree with them to the last
bits of the sums (different summation order; ``tests/kernels/test_fused_cpu.py`` holds the
two to 1e-10 relative and every flag identical). A background pixel exactly at a clipping
boundary could fall the other way for a difference in the last bit of the clip centre.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
import math
import os
import threading
from typing import NamedTuple, TypeVar

import numba
from numba import njit
import numpy as np

from forcedphot.kernels.aperture import check_radius
from forcedphot.kernels.local_background import IQ_TO_STDEV
from forcedphot.kernels.psf_stamps_cpu import COEFFS, gaussian_stamp

NO_PLANE = -1  # a flag plane the mask does not define: never set
# a call with fewer objects runs on the calling thread alone, where handing work to another
# costs more than it gives
PARALLEL_MIN_OBJECTS = 96
_threads: int | None = None  # set_threads' count; None: numba's NUMBA_NUM_THREADS
_pool: tuple[int, ThreadPoolExecutor] | None = None  # (workers, pool) of the threads beside the caller's
_pool_lock = threading.Lock()
T = TypeVar("T")


def set_threads(count: int | None) -> None:
    """Spread each call over at most ``count`` threads (``None``: numba's
    ``NUMBA_NUM_THREADS``, by default the machine's cores). A service's measurement process,
    one per core, sets 1."""
    global _threads
    if count is not None and count < 1:
        raise ValueError(f"threads must be at least 1, got {count}")
    _threads = count


def threads() -> int:
    """The threads a call of many objects is spread over (see :func:`set_threads`)."""
    return _threads or numba.config.NUMBA_NUM_THREADS


def _helpers(workers: int) -> ThreadPoolExecutor:
    """A pool of at least ``workers`` threads that run parts of calls beside the caller's."""
    global _pool
    with _pool_lock:
        if _pool is None or _pool[0] < workers:  # (a smaller one is left to idle: a call may still be handing it work)
            _pool = (workers, ThreadPoolExecutor(workers, thread_name_prefix="fused-kernel"))
        return _pool[1]


def _forget_pool() -> None:
    """In a forked child: the parent's threads are not there (a new pool starts on demand)."""
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_pool)


class FusedParameters(NamedTuple):
    """Everything but the pixels and positions, as the array-API kernels take it."""

    radii: np.ndarray  # (R,) aperture radii, px
    bad_fit_bits: int  # mask bits the PSF fit leaves out (0: none)
    background_reject_bits: int  # mask bits left out of the background annulus
    flag_bits: np.ndarray  # (P,) int64 bit numbers of the flag planes, NO_PLANE where undefined
    footprint_scaling: float  # footprint radius in PSF sigmas
    inner: float  # annulus radii in PSF sigmas
    outer: float
    n_iter: int  # clipping passes
    n_sigma: float  # clipping half-width
    scope: int = 2  # 2: every measurement; 1: the PSF fit and the local background; 0: the PSF fit alone
    #                 (what is not measured stays 0 / NaN / False)


def measure_stack(image: np.ndarray, variance: np.ndarray, mask: np.ndarray, inside: np.ndarray, psf: np.ndarray,
                  cx: np.ndarray, cy: np.ndarray, sigma: np.ndarray, parameters: FusedParameters) -> tuple[np.ndarray, ...]:
    """Measure every object of a stack of cutouts.

    Parameters
    ----------
    image, variance : (N, K, K) float arrays
        Cutouts of the image and its variance.
    mask : (N, K, K) integer array
        Mask bits.
    inside : (N, K, K) bool array
        The pixel lies on the image.
    psf : (N, Kp, Kp) float array
        PSF stamps (sum 1), centred as the cutouts' central ``Kp x Kp`` box.
    cx, cy : (N,) float arrays
        Positions in stamp coordinates, px (pixel ``[j, i]`` centred at ``(i, j)``).
    sigma : (N,) float array
        PSF determinant radius, px.
    parameters : FusedParameters

    Returns
    -------
    tuple of arrays
        PSF fit: flux, flux_err, area, chi2 (float64), npixels (int64), flag, flag_edge,
        flag_no_good_pixels (bool); apertures: flux, flux_err (float64), truncated (bool),
        each ``(N, R)``; background: mean, std (float64), n_pixels (int64), no-good flag;
        pixel flags: any, center, center_all, each ``(N, P)`` bool; then the PSF fit's
        background response ``(N,)`` and the apertures' areas ``(N, R)`` (float64).
    """
    n = image.shape[0]
    nothing = np.zeros((0, 0), np.float32)
    return measure_windows(nothing, nothing, np.zeros((0, 0), np.int32), np.zeros(n, np.int64), np.zeros(n, np.int64),
                           image, variance, mask, inside, np.arange(n), psf, cx, cy, sigma, parameters)


def measure_windows(band_image: np.ndarray, band_variance: np.ndarray, band_mask: np.ndarray, row0: np.ndarray, col0: np.ndarray,
                    image: np.ndarray, variance: np.ndarray, mask: np.ndarray, inside: np.ndarray, stack_of: np.ndarray,
                    psf: np.ndarray, cx: np.ndarray, cy: np.ndarray, sigma: np.ndarray, parameters: FusedParameters,
                    no_data: int = 0, gaussian: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, ...]:
    """Measure objects whose ``K x K`` windows are read from a band of rows of the image
    planes (``stack_of[i] < 0``: window ``band[row0[i]:row0[i] + K, col0[i]:col0[i] + K]``,
    read in place, nothing staged) or are staged cutouts (``stack_of[i]``: the cutout's
    index in the ``(M, K, K)`` stacks, with their ``inside``). ``K`` is the stacks' side;
    the rest as :func:`measure_stack`.

    A band holds every row of the image that its windows touch, the image's whole width:
    the part of a window beyond the band lies beyond the image, and is padding (image and
    variance NaN, mask ``no_data``, not inside), as
    :func:`~forcedphot.kernels.cutouts.gather_cutouts` pads.

    The band's float32 image and variance and int32 mask are read in either byte order
    (a FITS file's big-endian rows, memory-mapped, are swapped as each window is copied:
    the band itself is never converted); other types are converted first.

    ``gaussian`` = (centres x, y in stamp coordinates, widths), each ``(N,)``, px: the PSF
    stamps are circular pixel-integrated Gaussians, made here one object at a time as
    :func:`~forcedphot.kernels.psf_stamps_cpu.normalised_gaussian_stamps` makes them (the
    same numbers), so no ``(N, Kp, Kp)`` stack is held; ``psf`` then has no stamps, only
    their side (shape ``(0, Kp, Kp)``)."""
    p = parameters._replace(radii=np.array([check_radius(r) for r in parameters.radii], np.float64))
    n = len(cx)
    if gaussian is None:
        made = (np.zeros(0),) * 3
    else:
        made = tuple(np.ascontiguousarray(np.broadcast_to(np.asarray(a, np.float64), (n,))) for a in gaussian)
    words, swap = _band_words(band_image, band_variance, band_mask)
    stacks = [np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("=")) for a in (image, variance, mask)]
    planes = (*words, *stacks, np.ascontiguousarray(inside))
    geometry = (np.asarray(row0, np.int64), np.asarray(col0, np.int64), np.asarray(stack_of, np.int64),
                np.ascontiguousarray(psf, dtype=np.float64), np.ascontiguousarray(cx, dtype=np.float64),
                np.ascontiguousarray(cy, dtype=np.float64), np.ascontiguousarray(sigma, dtype=np.float64), *made)
    if n and (len(geometry[3]) == n) == (gaussian is not None):
        raise ValueError("give either a PSF stamp for each object or the Gaussian stamps' centres and widths")
    settings = (np.asarray(p.radii, dtype=np.float64), np.int64(p.bad_fit_bits), np.int64(p.background_reject_bits),
                np.asarray(p.flag_bits, dtype=np.int64), float(p.footprint_scaling), float(p.inner), float(p.outer), int(p.n_iter),
                float(p.n_sigma), int(p.scope), swap, np.int32(no_data), COEFFS)
    results = spread(lambda lo, hi: _measure(planes, tuple(g[lo:hi] for g in geometry), settings), n, PARALLEL_MIN_OBJECTS)
    return results[0] if len(results) == 1 else tuple(np.concatenate(columns) for columns in zip(*results))


def spread(call: Callable[[int, int], T], n: int, minimum: int) -> list[T]:
    """``call(lo, hi)`` for consecutive runs of ``range(n)``, one a thread (see
    :func:`threads`), their results in order; one run where ``n < minimum``. The runs are
    done as :func:`alongside` does its calls.

    For compiled loops that release the interpreter (numba's own ``prange`` threads,
    which poll for work, gained little on calls of a few hundred objects: 1 MiB batches
    took 1.5x the time of 128 MiB ones)."""
    parts = threads() if n >= minimum else 1
    bounds = [n * part // parts for part in range(parts + 1)]
    return alongside([lambda lo=lo, hi=hi: call(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:])])


def alongside(calls: Sequence[Callable[[], T]]) -> list[T]:
    """Every one of ``calls``, their results in order: the first on the calling thread, the
    others handed to helper threads; any call no helper has started by the time the caller
    is free (all busy with other callers' work) is done on the calling thread, so callers
    never queue behind one another. Exceptions propagate, once every call has ended."""
    helpers = _helpers(len(calls) - 1) if len(calls) > 1 else None
    others = [helpers.submit(call) for call in calls[1:]]
    results, error = [], None
    for call, other in zip(calls, [None, *others]):
        try:
            results.append(call() if other is None or other.cancel() else other.result())
        except BaseException as e:  # the other calls still end before this one's error is raised
            error = error or e
    if error is not None:
        raise error
    return results


_BAND_TYPES = (np.float32, np.float32, np.int32)  # a band's image, variance and mask


def _as_is(plane: np.ndarray, dtype: type) -> bool:
    return plane.dtype.newbyteorder("=") == np.dtype(dtype) and plane.flags.c_contiguous


def copies_in_place(image: np.ndarray, variance: np.ndarray, mask: np.ndarray) -> bool:
    """Whether a band's planes are read as they are (else converted first): C-contiguous
    float32 image and variance and int32 mask, in either byte order."""
    return all(_as_is(plane, dtype) for plane, dtype in zip((image, variance, mask), _BAND_TYPES))


def _band_words(image: np.ndarray, variance: np.ndarray, mask: np.ndarray) -> tuple[tuple[np.ndarray, ...], np.ndarray]:
    """A band's three planes as C-contiguous uint32 words, and for each whether its bytes
    are the other way round (stored big-endian on a little-endian machine): read in place
    where a plane is its type already in either byte order, else converted."""
    words, swap = [], []
    for plane, dtype in zip((image, variance, mask), _BAND_TYPES):
        if not _as_is(plane, dtype):
            plane = np.ascontiguousarray(plane, dtype=dtype)
        words.append(plane.view(np.uint32))
        swap.append(not plane.dtype.isnative)
    return tuple(words), np.array(swap, np.bool_)


def stage_windows(band_image: np.ndarray, band_variance: np.ndarray, band_mask: np.ndarray, row0: np.ndarray, col0: np.ndarray,
                  which: np.ndarray, image: np.ndarray, variance: np.ndarray, mask: np.ndarray) -> None:
    """Copy the ``K x K`` windows ``band[row0[i]:row0[i] + K, col0[i]:col0[i] + K]`` of a band's
    planes (as :func:`copies_in_place` says they are read; a FITS file's big-endian rows
    swapped as they are copied) into cutout ``which[i]`` of the native ``(N, K, K)`` float32 image
    and variance and int32 mask stacks. Row by row, as the kernel reads windows in place:
    NumPy's gather through a sliding-window view with the byte swap took several times
    as long."""
    words, swap = _band_words(band_image, band_variance, band_mask)
    _stage(words, swap, np.asarray(row0, np.int64), np.asarray(col0, np.int64), np.asarray(which, np.int64), (image, variance, mask))


def warm_up() -> None:
    """Load (or, the first time on a machine, compile: ~30 s) every compiled variant of the
    kernel, so that no measurement waits for one (a load holds the interpreter: a job's
    heartbeat in the same process would wait behind it): for staged stacks and for windows
    read in place from a read-only band (a memory-mapped file's rows, or an exposure's
    planes in memory), and the staging of windows from either kind of band. numba caches
    them beside this module."""
    k, n = 5, 1
    parameters = FusedParameters(np.array([1.0]), 0, 0, np.array([NO_PLANE, 0], np.int64), 3.0, 1.0, 2.0, 3, 3.0)
    stack = np.zeros((n, k, k), np.float32)
    psf, cx, cy, sigma = np.full((n, 3, 3), 1 / 9), np.full(n, 2.0), np.full(n, 2.0), np.full(n, 0.5)
    measure_stack(stack, stack + 1, np.zeros((n, k, k), np.int32), np.ones((n, k, k), bool), psf, cx, cy, sigma, parameters)
    band = [np.zeros((k, k), dtype) for dtype in (np.float32, np.float32, np.int32)]
    for plane in band:
        plane.flags.writeable = False
    no_stack = np.zeros((0, k, k), np.float32)
    measure_windows(*band, np.zeros(n, np.int64), np.zeros(n, np.int64), no_stack, no_stack, np.zeros((0, k, k), np.int32),
                    np.zeros((0, k, k), bool), np.full(n, -1, np.int64), psf, cx, cy, sigma, parameters)
    for planes in (band, [plane.copy() for plane in band]):  # staging from a read-only band, and from a writeable one
        stage_windows(*planes, np.zeros(n, np.int64), np.zeros(n, np.int64), np.arange(n), stack, stack.copy(), np.zeros((n, k, k), np.int32))


@njit(cache=True, error_model="numpy")
def _outputs(n, n_radii, n_planes):
    """The result arrays of ``n`` objects (see :func:`measure_stack`), as one tuple."""
    return (np.empty((n, 5)), np.zeros(n, np.int64), np.zeros((n, 3), np.bool_), np.zeros((n, n_radii)), np.zeros((n, n_radii)),
            np.zeros((n, n_radii), np.bool_), np.full((n, 2), np.nan), np.zeros(n, np.int64), np.zeros((n, n_planes), np.bool_),
            np.zeros((n, n_planes), np.bool_), np.zeros((n, n_planes), np.bool_), np.zeros((n, n_radii)))


@njit(cache=True, error_model="numpy")
def _results(out):
    fit, npixels, fit_flags, ap_flux, ap_err, ap_truncated, background, n_background, flags_any, flags_center, flags_all, ap_area = out
    return (fit[:, 0].copy(), fit[:, 1].copy(), fit[:, 2].copy(), fit[:, 3].copy(), npixels,
            fit_flags[:, 0].copy(), fit_flags[:, 1].copy(), fit_flags[:, 2].copy(),
            ap_flux, ap_err, ap_truncated,
            background[:, 0].copy(), background[:, 1].copy(), n_background, n_background == 0,
            flags_any, flags_center, flags_all, fit[:, 4].copy(), ap_area)


@njit(cache=True, error_model="numpy")
def _window_scratch(planes):
    """Per-thread copies of one window of each band plane, and which of its pixels lie on
    the band (see :func:`_window`)."""
    k = planes[3].shape[1]
    return np.empty((k, k), np.float32), np.empty((k, k), np.float32), np.empty((k, k), np.int32), np.empty((k, k), np.bool_)


@njit(cache=True, error_model="numpy", inline="always")
def _copy_words(band, y, x, k, swap, out):
    """``band[y:y + k, x:x + k]`` (uint32 words) into ``out`` (k x k, 4-byte values), each
    word's bytes reversed when ``swap``. Row by row through 1-d views indexed from 0, which
    the compiler vectorises (2-d indexing from an offset checks each index for wrapping
    round: 3x slower)."""
    words = out.view(np.uint32)
    for j in range(k):
        source, target = band[y + j, x:x + k], words[j]
        if swap:
            for i in range(k):
                target[i] = _swapped(source[i])
        else:
            for i in range(k):
                target[i] = source[i]


@njit(cache=True, error_model="numpy", inline="always")
def _swapped(v):
    """The 32-bit word ``v`` with its bytes reversed."""
    return (((v & np.uint32(0xFF)) << np.uint32(24)) | ((v & np.uint32(0xFF00)) << np.uint32(8))
            | ((v >> np.uint32(8)) & np.uint32(0xFF00)) | (v >> np.uint32(24)))


@njit(cache=True, error_model="numpy")
def _copy_part(band, y, x, y0, y1, x0, x1, swap, out):
    """Rows ``[y0, y1)`` and columns ``[x0, x1)`` of a band's word plane into the window
    ``out`` whose first pixel is the band's ``(y, x)`` (see :func:`_copy_words`)."""
    words = out.view(np.uint32)
    for row in range(y0, y1):
        for column in range(x0, x1):
            v = band[row, column]
            words[row - y, column - x] = _swapped(v) if swap else v


@njit(cache=True, error_model="numpy", inline="always")
def _copy_window(band, swap, y, x, k, image, variance, mask):
    """The ``k x k`` window at row ``y``, column ``x`` of a band's three word planes into
    ``image``, ``variance`` and ``mask`` (see :func:`_copy_words`)."""
    _copy_words(band[0], y, x, k, swap[0], image)
    _copy_words(band[1], y, x, k, swap[1], variance)
    _copy_words(band[2], y, x, k, swap[2], mask)


@njit(cache=True, error_model="numpy")
def _copy_clipped(band, swap, y, x, k, no_data, image, variance, mask, inside):
    """The ``k x k`` window at row ``y``, column ``x`` of a band's word planes, which
    crosses the band's edge: its part on the band copied (see :func:`_copy_words`), the
    rest padding (image and variance NaN, mask ``no_data``, ``inside`` False), as
    :func:`~forcedphot.kernels.cutouts.gather_cutouts` pads."""
    rows, columns = band[0].shape
    y0, y1, x0, x1 = max(y, 0), min(y + k, rows), max(x, 0), min(x + k, columns)
    image[:] = np.nan
    variance[:] = np.nan
    mask[:] = no_data
    inside[:] = False
    inside[max(y0 - y, 0):max(y1 - y, 0), max(x0 - x, 0):max(x1 - x, 0)] = True
    _copy_part(band[0], y, x, y0, y1, x0, x1, swap[0], image)
    _copy_part(band[1], y, x, y0, y1, x0, x1, swap[1], variance)
    _copy_part(band[2], y, x, y0, y1, x0, x1, swap[2], mask)


@njit(nogil=True, cache=True, error_model="numpy")
def _stage(band, swap, row0, col0, which, stacks):
    """See :func:`stage_windows`."""
    k = stacks[0].shape[1]
    for i in range(row0.shape[0]):
        j = which[i]
        _copy_window(band, swap, row0[i], col0[i], k, stacks[0][j], stacks[1][j], stacks[2][j])


@njit(cache=True, error_model="numpy")
def _window(i, planes, geometry, settings, out, on_image, scratch, window, stamp):
    """Object ``i``: its window of the band, copied once into ``window`` (contiguous: the
    measurements pass over it several times, where the band's rows lie a page or more
    apart; padded where it crosses the band's edge), or its staged cutout."""
    image, variance, mask, inside = planes[3:]
    row0, col0, stack_of, _, cx, cy, sigma = geometry[:7]
    psf = _stamp(i, geometry, settings[12], stamp)
    k = image.shape[1]
    j = stack_of[i]
    if j < 0:
        window_image, window_variance, window_mask, window_inside = window
        y, x = row0[i], col0[i]
        rows, columns = planes[0].shape
        if y >= 0 and x >= 0 and y + k <= rows and x + k <= columns:
            _copy_window(planes[:3], settings[10], y, x, k, window_image, window_variance, window_mask)
            _object(window_image, window_variance, window_mask, on_image, psf, cx[i], cy[i], sigma[i], settings, i, scratch, out)
        else:
            _copy_clipped(planes[:3], settings[10], y, x, k, settings[11], window_image, window_variance, window_mask, window_inside)
            _object(window_image, window_variance, window_mask, window_inside, psf, cx[i], cy[i], sigma[i], settings, i, scratch, out)
    else:
        _object(image[j], variance[j], mask[j], inside[j], psf, cx[i], cy[i], sigma[i], settings, i, scratch, out)


@njit(cache=True, error_model="numpy", inline="always")
def _stamp(i, geometry, coeffs, stamp):
    """Object ``i``'s PSF stamp: given, or (Gaussian stamps) made into ``stamp`` = (the
    stamp, its two profiles' scratch)."""
    psf, made_x, made_y, made_sigma = geometry[3], geometry[7], geometry[8], geometry[9]
    if psf.shape[0] > 0:
        return psf[i]
    gaussian_stamp(made_x[i], made_y[i], made_sigma[i], coeffs, stamp[1], stamp[2], stamp[0])
    return stamp[0]


@njit(nogil=True, cache=True, error_model="numpy")
def _measure(planes, geometry, settings):
    """Every object of ``geometry``, in turn (the interpreter released)."""
    n, k, kp = geometry[4].shape[0], planes[3].shape[1], geometry[3].shape[1]
    out = _outputs(n, settings[0].shape[0], settings[3].shape[0])
    on_image = np.ones((k, k), np.bool_)
    scratch, window, stamp = np.empty((10, k + 2)), _window_scratch(planes), (np.empty((kp, kp)), np.empty(kp), np.empty(kp))
    for i in range(n):
        _window(i, planes, geometry, settings, out, on_image, scratch, window, stamp)
    return _results(out)


@njit(cache=True, error_model="numpy")
def _object(image, variance, mask, inside, psf, cx, cy, sigma, settings, i, scratch, out):
    """The measurements of ``scope`` (see :class:`FusedParameters`) of object ``i`` from its
    ``K x K`` window, into row ``i`` of the outputs."""
    radii, bad_fit_bits, reject_bits, flag_bits, footprint_scaling, inner, outer, n_iter, n_sigma, scope = settings[:10]
    fit, npixels, fit_flags, ap_flux, ap_err, ap_truncated, background, n_background, flags_any, flags_center, flags_all, ap_area = out
    _psf_fit(image, variance, mask, inside, psf, bad_fit_bits, fit[i], fit_flags[i], npixels, i)
    if scope == 0:
        return
    _background(image, variance, mask, inside, cx, cy, inner * sigma, outer * sigma, reject_bits, n_iter, n_sigma,
                background[i], n_background, i)
    if scope == 1:
        return
    for a in range(radii.shape[0]):
        _aperture(image, variance, inside, cx, cy, radii[a], ap_flux, ap_err, ap_truncated, ap_area, i, a, scratch)
    _flags(mask, inside, cx, cy, footprint_scaling * sigma, flag_bits, flags_any[i], flags_center[i], flags_all[i])


@njit(cache=True, error_model="numpy")
def _psf_fit(image, variance, mask, inside, psf, bad_fit_bits, out, out_flags, npixels, i):
    """As :func:`~forcedphot.kernels.psf_flux.psf_flux` on the central ``Kp x Kp`` box."""
    k, kp = image.shape[0], psf.shape[0]
    start = k // 2 - kp // 2
    count = 0
    sum_p = sum_pp = sum_pd = sum_ppv = 0.0
    all_inside = True
    for y in range(kp):
        for x in range(kp):
            on = inside[start + y, start + x]
            if not on:
                all_inside = False
                continue
            if bad_fit_bits != 0 and (mask[start + y, start + x] & bad_fit_bits) != 0:
                continue
            pv = psf[y, x]
            count += 1
            sum_p += pv
            sum_pp += pv * pv
            sum_pd += pv * float(image[start + y, start + x])
            sum_ppv += pv * pv * float(variance[start + y, start + x])
    npixels[i] = count
    good = count > 0
    nan = math.nan
    if good:
        flux = sum_pd / sum_pp
        flux_err = math.sqrt(sum_ppv) / sum_pp
        area = sum_p * sum_p / sum_pp
        response = sum_p / sum_pp
        chi2 = 0.0
        for y in range(kp):
            for x in range(kp):
                if not inside[start + y, start + x]:
                    continue
                if bad_fit_bits != 0 and (mask[start + y, start + x] & bad_fit_bits) != 0:
                    continue
                residual = float(image[start + y, start + x]) - flux * psf[y, x]
                chi2 += residual * residual / float(variance[start + y, start + x])
    else:
        flux = flux_err = area = chi2 = response = nan
    finite = math.isfinite(flux) and math.isfinite(flux_err)
    out[0] = flux if finite else nan
    out[1] = flux_err
    out[2] = area
    out[3] = chi2
    out[4] = response
    out_flags[1] = not all_inside
    out_flags[2] = not good
    out_flags[0] = (not all_inside) or (not good) or (not finite)


@njit(cache=True, error_model="numpy")
def _edge_terms(offsets, r, sign, clipped, root, term, row):
    """The per-edge parts of :func:`~forcedphot.kernels.aperture._corner_area` for corner
    offsets ``offsets`` (px from the centre) along one axis: the sign, ``min(|o|, r)``, its
    chord half-length, and the row part ``a c + r^2 atan2(c, a)`` (``row``) or the column
    part ``c s - r^2 atan2(s, c)``; one atan2 per edge, as the array-API kernel."""
    for j in range(offsets.shape[0]):
        o = offsets[j]
        sign[j] = 1.0 - 2.0 * (1.0 if o < 0 else 0.0)
        c = min(abs(o), r)
        h = math.sqrt((r - c) * (r + c))
        clipped[j] = c
        root[j] = h
        term[j] = h * c + r * r * math.atan2(c, h) if row else c * h - r * r * math.atan2(h, c)


@njit(cache=True, error_model="numpy", inline="always")
def _corner(j, i, r, sign_v, yc, rows, sign_u, xc, cols):
    """Signed circle area inside the rectangle from the centre to corner (row j, column i)."""
    if xc[i] * xc[i] + yc[j] * yc[j] <= r * r:
        area = xc[i] * yc[j]
    else:
        area = 0.5 * (rows[j] + cols[i])
    return (sign_v[j] * sign_u[i]) * area


@njit(cache=True, error_model="numpy", inline="always")
def _gaps(lo, hi):
    """Nearest and farthest distance from the centre, along one axis, of a pixel's span."""
    near = max(max(lo, -hi), 0.0)
    far = max(abs(lo), abs(hi))
    return near, far


@njit(cache=True, error_model="numpy")
def _aperture(image, variance, inside, cx, cy, r, flux_out, err_out, truncated_out, area_out, i, a, scratch):
    """As :func:`~forcedphot.kernels.aperture.aperture_fluxes` for one object and radius:
    exact overlap weights, from corners only for pixels on the circle's rim."""
    k = image.shape[0]
    flux = 0.0
    var = 0.0
    area = 0.0
    truncated = (cx - r < -0.5) or (cx + r > k - 0.5) or (cy - r < -0.5) or (cy + r > k - 0.5)
    if math.isfinite(cx) and math.isfinite(cy):
        x0 = max(0, int(math.floor(cx - r - 0.5)))
        x1 = min(k, int(math.ceil(cx + r + 0.5)) + 1)
        y0 = max(0, int(math.floor(cy - r - 0.5)))
        y1 = min(k, int(math.ceil(cy + r + 0.5)) + 1)
        nx, ny = x1 - x0 + 1, y1 - y0 + 1  # corner columns and rows
        u, v = scratch[0, :nx], scratch[1, :ny]
        for c in range(nx):
            u[c] = (x0 + c - 0.5) - cx
        for c in range(ny):
            v[c] = (y0 + c - 0.5) - cy
        sign_u, xc, s, cols = scratch[2, :nx], scratch[3, :nx], scratch[4, :nx], scratch[5, :nx]
        sign_v, yc, h, rows = scratch[6, :ny], scratch[7, :ny], scratch[8, :ny], scratch[9, :ny]
        _edge_terms(u, r, sign_u, xc, s, cols, False)
        _edge_terms(v, r, sign_v, yc, h, rows, True)
        r2 = r * r
        for y in range(y0, y1):
            j = y - y0
            near_y, far_y = _gaps(v[j], v[j + 1])
            for x in range(x0, x1):
                c = x - x0
                near_x, far_x = _gaps(u[c], u[c + 1])
                if near_y * near_y + near_x * near_x >= r2:
                    continue
                if far_y * far_y + far_x * far_x <= r2:
                    w = 1.0
                else:
                    across_hi = _corner(j + 1, c + 1, r, sign_v, yc, rows, sign_u, xc, cols) - \
                        _corner(j + 1, c, r, sign_v, yc, rows, sign_u, xc, cols)
                    across_lo = _corner(j, c + 1, r, sign_v, yc, rows, sign_u, xc, cols) - \
                        _corner(j, c, r, sign_v, yc, rows, sign_u, xc, cols)
                    w = min(max(across_hi - across_lo, 0.0), 1.0)
                    if w <= 0.0:
                        continue
                d = float(image[y, x])
                vv = float(variance[y, x])
                if inside[y, x] and math.isfinite(d) and math.isfinite(vv):
                    flux += w * d
                    var += w * w * vv
                    area += w
                else:
                    truncated = True
    flux_out[i, a] = flux
    err_out[i, a] = math.sqrt(var)
    truncated_out[i, a] = truncated
    area_out[i, a] = area


@njit(cache=True, inline="always")
def _median3(a, b, c):
    return max(min(a, b), min(max(a, b), c))


@njit(cache=True, inline="always")
def _sort_small(values, lo, hi):
    """Sort ``values[lo:hi]`` in place by insertion (for short ranges)."""
    for j in range(lo + 1, hi):
        value = values[j]
        m = j - 1
        while m >= lo and values[m] > value:
            values[m + 1] = values[m]
            m -= 1
        values[m + 1] = value


@njit(cache=True)
def _select(values, lo, hi, kth, less, more):
    """Put the ``kth`` smallest of ``values[lo:hi]`` at ``values[kth]``, smaller (or equal)
    ones before it and larger (or equal) after. Each round splits the range about a pivot
    (the median of three medians of three) into the values below, equal to and above it,
    written without branches through the buffers ``less`` and ``more`` (each at least
    ``hi - lo`` long): a random-data partition's branches mispredict half the time. The
    range holding ``kth`` is kept; a short one is sorted by insertion."""
    while hi - lo > _SELECT_SORT:
        step = (hi - lo) // 8
        pivot = _median3(_median3(values[lo], values[lo + step], values[lo + 2 * step]),
                         _median3(values[lo + 3 * step], values[lo + 4 * step], values[lo + 5 * step]),
                         _median3(values[lo + 6 * step], values[lo + 7 * step], values[hi - 1]))
        below = above = 0
        for j in range(lo, hi):
            value = values[j]
            less[below] = value
            more[above] = value
            below += value < pivot
            above += value > pivot
        equal = hi - lo - below - above
        for j in range(below):
            values[lo + j] = less[j]
        for j in range(equal):
            values[lo + below + j] = pivot
        for j in range(above):
            values[lo + below + equal + j] = more[j]
        if kth < lo + below:
            hi = lo + below
        elif kth >= lo + below + equal:
            lo = lo + below + equal
        else:
            return
    _sort_small(values, lo, hi)


_SELECT_SORT = 24  # ranges this short are sorted


_SAMPLE = 32  # values sampled to place the buckets' range (samples of fewer values: one bucket)


@njit(cache=True, error_model="numpy")
def _quartiles(values, n, out, work):
    """The order statistics around ``f (n - 1)`` for f = 1/4, 1/2, 3/4 (each one's floor and
    ceiling position, ``out[2 q]`` and ``out[2 q + 1]``) of ``values[:n]``, left as they are.

    The values are counted into ~n/4 buckets of equal width between two order statistics
    of a sample of 32 (near the 3rd and 97th percentiles; bucket 0 below, the last one
    above); the values of the buckets that hold the wanted positions are copied into their
    place in ``work[0]`` (as if every bucket were), and each wanted position is selected
    within its own bucket (a handful of values; more where an unlucky sample leaves it
    outside the range): three passes over the values, where selecting over them all takes
    several and a sort log2(n). Exact whatever the sample: a value's bucket never
    decreases as the value grows (each step rounds monotonically), so the buckets are in
    order. ``work``: (3, >= n) buffers of the values' type (``work[1:]`` for :func:`_select`)."""
    bucketed, less, more = work[0], work[1], work[2]
    n_buckets = 1
    low, scale = 0.0, 0.0
    if n >= 4 * _SAMPLE:
        step = n // _SAMPLE
        for j in range(_SAMPLE):
            less[j] = values[j * step]
        _sort_small(less, 0, _SAMPLE)
        low, high = float(less[1]), float(less[_SAMPLE - 2])
        if high > low:
            n_buckets = n // 4
            scale = n_buckets / (high - low)
    bucket = np.empty(n, np.int32)
    top = n_buckets + 1.0
    for j in range(n):  # no branches: vectorised
        bucket[j] = int(min(max((float(values[j]) - low) * scale + 1.0, 0.0), top))
    starts = np.zeros(n_buckets + 3, np.int64)  # bucket b: bucketed[starts[b]:starts[b + 1]]
    for j in range(n):
        starts[bucket[j] + 1] += 1
    for b in range(1, n_buckets + 3):
        starts[b] += starts[b - 1]
    wanted = np.zeros(n_buckets + 2, np.bool_)  # the buckets holding the positions sought
    b = 0
    for q in range(6):
        lo, hi, _ = _quantile_positions(n, 0.25 * (q // 2 + 1))
        while starts[b + 1] <= (hi if q % 2 else lo):
            b += 1
        wanted[b] = True
    ends = starts[1:].copy()
    for j in range(n):  # only the wanted buckets' values are copied: the others are never read
        b = bucket[j]
        if wanted[b]:
            ends[b] -= 1
            bucketed[ends[b]] = values[j]
    previous, b = -1, 0
    for q in range(6):
        lo, hi, _ = _quantile_positions(n, 0.25 * (q // 2 + 1))
        rank = hi if q % 2 else lo
        if rank != previous:
            while starts[b + 1] <= rank:
                b += 1
            first = max(starts[b], previous + 1)  # after a selection in this bucket, the rest lies above it
            _select(bucketed, first, starts[b + 1], rank, less, more)
            previous = rank
        out[q] = bucketed[rank]


@njit(cache=True, error_model="numpy", inline="always")
def _quantile_positions(n, f):
    last = max(n - 1, 0)
    pos = f * float(last)
    lo = int(math.floor(pos))
    hi = min(lo + 1, last)
    return lo, hi, pos - float(lo)


@njit(cache=True, error_model="numpy", inline="always")
def _in_disc(x, cx, dy2, r2):
    return (float(x) - cx) ** 2 + dy2 <= r2


@njit(cache=True, error_model="numpy", inline="always")
def _disc_span(cx, dy2, r2, lo, hi):
    """``[a, b)``: the columns ``x`` in ``[lo, hi)`` of a row ``dy2 = (y - cy)^2`` from the
    centre inside the disc ``(x - cx)^2 + dy2 <= r2`` (afw's rim rule: none where ``dy2 >= r2``).
    They are one run (the rounded sum never decreases as ``|x - cx|`` grows): guessed from a
    square root, then each end moved while the test itself says so, so that exactly the
    columns the test admits are in."""
    if not dy2 < r2:
        return lo, lo
    half = math.sqrt(r2 - dy2)
    a = min(max(int(math.ceil(cx - half)), lo), hi)
    b = min(max(int(math.floor(cx + half)) + 1, a), hi)
    while a > lo and _in_disc(a - 1, cx, dy2, r2):
        a -= 1
    while a < b and not _in_disc(a, cx, dy2, r2):
        a += 1
    while b < hi and _in_disc(b, cx, dy2, r2):
        b += 1
    while b > a and not _in_disc(b - 1, cx, dy2, r2):
        b -= 1
    return a, b


@njit(cache=True, error_model="numpy", fastmath={"reassoc"})
def _clipped_sums(values, n, low, high, centre):
    """Count, sum and sum of squares of ``value - centre`` over the ``values[:n]`` with
    ``low <= value <= high`` (none for a NaN bound). The sums may be reassociated, which
    lets them run on vector registers instead of waiting on one addition after another:
    ~0.35 us a pass over 1,200 values instead of ~1.4 (the array-API kernel's sums add in
    an order of their own too; the tests hold the two to 1e-10)."""
    count = 0
    s1 = s2 = 0.0
    for j in range(n):
        value = float(values[j])
        keep = low <= value <= high
        shifted = value - centre if keep else 0.0
        count += keep
        s1 += shifted
        s2 += shifted * shifted
    return count, s1, s2


@njit(cache=True, error_model="numpy")
def _background(image, variance, mask, inside, cx, cy, r_in, r_out, reject_bits, n_iter, n_sigma, out, n_out, i):
    """As :func:`~forcedphot.kernels.local_background.local_background` for one object:
    the annulus ``r_in < d <= r_out`` (afw's rim rule), clipped mean and std."""
    k = image.shape[0]
    nan = math.nan
    n = 0
    work = np.empty((4, 0), image.dtype)
    values = work[0]
    if math.isfinite(cx) and math.isfinite(cy) and math.isfinite(r_out) and math.isfinite(r_in):
        x0 = max(0, int(math.floor(cx - r_out)))
        x1 = min(k, int(math.ceil(cx + r_out)) + 1)
        y0 = max(0, int(math.floor(cy - r_out)))
        y1 = min(k, int(math.ceil(cy + r_out)) + 1)
        work = np.empty((4, max(0, (x1 - x0) * (y1 - y0))), image.dtype)  # the values, and buffers for their quartiles
        values = work[0]
        ro2, ri2 = r_out * r_out, r_in * r_in
        for y in range(y0, y1):  # each row's annulus: its outer disc's span less its inner disc's
            dy2 = (float(y) - cy) ** 2
            a, b = _disc_span(cx, dy2, ro2, x0, x1)
            c, d = _disc_span(cx, dy2, ri2, a, b)
            if c == d:
                c = d = b
            for part in range(2):  # left of the inner disc, right of it
                lo, hi = (a, c) if part == 0 else (d, b)
                for x in range(lo, hi):
                    if not inside[y, x] or (mask[y, x] & reject_bits) != 0:
                        continue
                    value = image[y, x]
                    if not (math.isfinite(value) and math.isfinite(variance[y, x])):
                        continue
                    values[n] = value
                    n += 1
    n_out[i] = n
    if n == 0:
        out[0] = nan
        out[1] = nan
        return
    # quartiles and median: linear interpolation between the order statistics around f (n - 1)
    stats = np.empty(6)
    _quartiles(values, n, stats, work[1:])
    fractions = (0.25, 0.5, 0.75)
    quartiles = np.empty(3)
    for q in range(3):
        _, _, w = _quantile_positions(n, fractions[q])
        quartiles[q] = (1.0 - w) * stats[2 * q] + w * stats[2 * q + 1]
    median = quartiles[1]
    iqr_width = n_sigma * IQ_TO_STDEV * (quartiles[2] - quartiles[0])
    centre, half_width, std = median, iqr_width, nan
    for _ in range(n_iter):
        count, s1, s2 = _clipped_sums(values, n, centre - half_width, centre + half_width, median)
        mean_shift = s1 / (count if count > 0 else 1.0)
        var = max(s2 - s1 * mean_shift, 0.0) / (count - 1.0 if count > 1 else 1.0)
        centre = median + mean_shift if count > 0 else nan
        std = math.sqrt(var) if count > 1 else nan
        half_width = n_sigma * std if n > 1 else iqr_width
    out[0] = centre
    out[1] = std


@njit(cache=True, error_model="numpy")
def _flags(mask, inside, cx, cy, radius, flag_bits, any_out, center_out, all_out):
    """As :func:`~forcedphot.kernels.pixel_flags.pixel_flags` for one object: the bits of the
    footprint (disc of ``radius`` plus the peak pixel) and of the central 3x3 box."""
    k = mask.shape[0]
    footprint_bits = 0
    box_any = 0
    box_all = -1  # all bits: afw starts _allBits at all-ones (an empty box sets every CenterAll)
    if math.isfinite(cx) and math.isfinite(cy):
        near_x, near_y = math.floor(cx + 0.5), math.floor(cy + 0.5)
        r = radius if math.isfinite(radius) else 0.0
        x0 = max(0, int(min(near_x - 1.0, math.floor(cx - r))))
        x1 = min(k, int(max(near_x + 1.0, math.ceil(cx + r))) + 1)
        y0 = max(0, int(min(near_y - 1.0, math.floor(cy - r))))
        y1 = min(k, int(max(near_y + 1.0, math.ceil(cy + r))) + 1)
        r2 = radius * radius
        for y in range(y0, y1):
            dy2 = (float(y) - cy) ** 2
            for x in range(x0, x1):
                if not inside[y, x]:
                    continue
                bits = int(mask[y, x])
                d2 = (float(x) - cx) ** 2 + dy2
                if (dy2 < r2 and d2 <= r2) or (x == near_x and y == near_y):
                    footprint_bits |= bits
                if abs(x - near_x) <= 1.0 and abs(y - near_y) <= 1.0:
                    box_any |= bits
                    box_all &= bits
    for p in range(flag_bits.shape[0]):
        bit = flag_bits[p]
        if bit < 0:
            continue
        b = 1 << bit
        any_out[p] = (footprint_bits & b) != 0
        center_out[p] = (box_any & b) != 0
        all_out[p] = (box_all & b) != 0
