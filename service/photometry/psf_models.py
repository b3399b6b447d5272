"""PSF models that produce normalised PSF stamps at object positions, in any array namespace.

Models sharing the :class:`PsfModel` protocol:

- :class:`GaussianPsf`: a circular Gaussian of given FWHM, integrated over pixels.
- :class:`SampledGaussianPsf`: LSST's ``GaussianPsf``, sampled at pixel centres.
- :class:`ResampledPsf` models, pixelized images shifted to the sub-pixel position with
  Lanczos, as LSST's ``ImagePsf.computeImage`` does: :class:`ImagePsf`, one image for the
  whole exposure (Lanczos-5), and :class:`PsfexPsf`, a PSFEx model (polynomial in the position
  of basis images sampled every ``PSF_SAMP`` pixels, Lanczos-3 as GalSim's ``des.DES_PSFEx``
  does). :mod:`forcedphot.photometry.archive_psfs` adds the models of an exposure's archive.

Pixel convention (LSST, astropy ``origin=0``): positions ``x``, ``y`` are 0-based local image
coordinates, the centre of pixel ``(i, j)`` at ``(i, j)``. A stamp of odd side
``K = 2h + 1`` for an object at ``(x, y)`` is centred on the nearest pixel: stamp pixel
``[j, i]`` is image pixel ``(floor(x+0.5) - h + i, floor(y+0.5) - h + j)``, the PSF centre
at stamp coordinates ``(h + x - floor(x+0.5), h + y - floor(y+0.5))``. Stamps are
``(N, K, K)`` (object, y, x), float64, each summing to 1.

PSF sizes (``sigma``, ``shape``) are second moments in pixels. Pixelized models use adaptive
(elliptical-Gaussian-weighted, iterated) moments of the PSF image centred on its middle
pixel, as LSST's ``ImagePsf.computeShape`` does (SdssShape adaptive moments of the kernel
image); unweighted moments would be dominated by the noisy, partly negative wings of
empirical models. The Gaussian reports its exact profile moments (see :class:`GaussianPsf`).
"""

from collections.abc import Callable
import io
import math
from typing import Any, Protocol, runtime_checkable
import warnings

from array_api_compat import device, is_numpy_namespace
from astropy.io import fits
import numpy as np

from forcedphot.kernels.psf_stamps import gaussian_stamps, lanczos_resample
from forcedphot.kernels.psf_stamps_cpu import normalised_gaussian_stamps
from forcedphot.photometry.fits_preflight import not_fits_reason

Array = Any
Put = Callable[[np.ndarray], Array]
"""Moves a host array to where stamps are computed (``xp.asarray``, or a backend's upload)."""

FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))


class PsfError(ValueError):
    """A PSF cannot be built: the message names the file (or parameter) and the problem."""


#: What a PSF may declare, checked from its header or record before anything is allocated
#: (a few kilobytes can otherwise ask for gigabytes: a sampling of 300, a polynomial of
#: degree 3000, a 16383^2 compressed image). Real models are far inside: LSST's PSF
#: kernels are 21-41 px, DES PSFEx models 25-35 px of degree 2-3 sampled every 0.5-1 px.
MAX_PSF_STAMP_PX = 127  # side of a PSF stamp, image pixels
MAX_PSF_MODEL_PX = 255  # side of a model, kernel or basis image as stored
MAX_PSF_DEGREE = 8  # PSFEx polynomial degree (45 basis images)
PSF_SAMPLING_RANGE = (0.1, 10.0)  # PSFEx PSF_SAMP, image pixels per model pixel
MAX_PSF_FILE_BYTES = 64 * 2**20  # what one HDU of a PSF file may declare


def _finite_number(value: Any) -> bool:
    """A finite int or float (NumPy's too), not a bool: what a declared size may be."""
    return not isinstance(value, (bool, np.bool_)) and isinstance(value, (int, float, np.integer, np.floating)) and math.isfinite(value)


def check_psf_size(source: str, what: str, value: float, limit: float) -> None:
    """PsfError naming ``what`` when ``value`` is not a finite number within [1, ``limit``]."""
    if not _finite_number(value) or not 1 <= value <= limit:
        raise PsfError(f"{source}: {what} = {_plain(value)!r}, outside the 1 to {limit:g} allowed")


def check_sampling(source: str, sampling: float) -> None:
    """PsfError unless the model's sampling (image pixels per model pixel) is finite and
    within :data:`PSF_SAMPLING_RANGE`."""
    low, high = PSF_SAMPLING_RANGE
    if not _finite_number(sampling) or not low <= sampling <= high:
        raise PsfError(f"{source}: sample spacing {_plain(sampling)!r} px is outside the {low:g} to {high:g} allowed")


def check_degree(source: str, degree: float) -> int:
    """The polynomial degree as an int, or PsfError unless it is a whole number in [0, :data:`MAX_PSF_DEGREE`]."""
    if not _finite_number(degree) or degree != int(degree) or not 0 <= degree <= MAX_PSF_DEGREE:
        raise PsfError(f"{source}: polynomial degree {_plain(degree)!r} is outside the 0 to {MAX_PSF_DEGREE} allowed")
    return int(degree)


def _plain(value: Any) -> Any:
    """A NumPy scalar as the Python number it holds (for messages)."""
    return value.item() if isinstance(value, np.generic) else value


@runtime_checkable
class PsfModel(Protocol):
    """What photometry needs from a PSF model."""

    stamp_size: int  # odd side K of the stamps, pixels

    def stamps(self, x: np.ndarray, y: np.ndarray, xp: Any, put: Put | None = None) -> Array:
        """(N, K, K) stamps in namespace ``xp``, each summing to 1, centred on the nearest pixel;
        host arrays reach ``xp`` through ``put`` (default ``xp.asarray``; an engine passes
        its backend's counted upload to its device)."""
        ...

    def sigma(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """(N,) PSF determinant radius (Ixx Iyy - Ixy^2)^(1/4) in pixels."""
        ...

    def describe(self) -> str:
        """The model in words (for provenance; no file paths)."""
        ...


def _positions(x: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
    """Positions as two equal-length 1-D float64 host arrays."""
    x = np.atleast_1d(np.asarray(x, dtype=np.float64))
    y = np.atleast_1d(np.asarray(y, dtype=np.float64))
    if x.ndim != 1 or x.shape != y.shape:
        raise PsfError(f"positions x {x.shape} and y {y.shape} must be 1-D of equal length")
    return x, y


def _stamp_centres(x: np.ndarray, y: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """PSF centre in stamp coordinates for stamps centred on the pixel nearest (x, y)."""
    half = size // 2
    return half + x - np.floor(x + 0.5), half + y - np.floor(y + 0.5)


def _normalised(stamps: Array, xp: Any) -> Array:
    """Divide each stamp of an (N, K, K) stack by its sum; a stamp whose sum is not positive
    (a model that cannot be evaluated there) becomes NaN, and so does all that uses it."""
    total = xp.sum(stamps, axis=(1, 2))
    return stamps / xp.where(total > 0, total, xp.nan)[:, None, None]


def _gaussian_stamps(x: np.ndarray, y: np.ndarray, sigma: float | np.ndarray, size: int, xp: Any, put: Put | None) -> Array:
    """(N, K, K) normalised pixel-integrated Gaussian stamps of width ``sigma`` (px; one, or
    one per object), from one upload of the centres (and the widths); on the host (NumPy,
    nothing to upload) by the compiled fast path, the same stamps to 1e-13."""
    rows = [*_stamp_centres(*_positions(x, y), size)]
    if put is None and is_numpy_namespace(xp):
        return normalised_gaussian_stamps(*rows, sigma, size)
    if np.ndim(sigma):
        rows.append(np.asarray(sigma, np.float64))
    packed = (put or xp.asarray)(np.stack(rows))
    return _normalised(gaussian_stamps(packed[0, ...], packed[1, ...], packed[2, ...] if np.ndim(sigma) else sigma, size), xp)


def adaptive_moments(images: np.ndarray, max_iter: int = 200, tol: float = 1e-9) -> np.ndarray:
    """Adaptive second moments of a stack of (N, K, K) images, vectorised over images.

    Iterates the elliptical Gaussian weight ``w = exp(-d^T M^-1 d / 2)``, ``d`` the pixel
    position minus the centroid, to the fixed point ``M = 2 sum(w I d d^T) / sum(w I)``, the
    centroid moving to the weighted mean (the HSM / SdssShape definition: for a Gaussian
    image M is its covariance). Starts at the middle pixel with M = 1.5^2 identity; stops
    when M changes by less than ``tol`` times its trace and the centroid by less than ``tol``.

    Returns
    -------
    (N, 3) float64 array
        ``Ixx, Iyy, Ixy`` in pixels^2 (x = column axis); NaN for an image that does not
        converge or whose weighted flux is not positive.
    """
    images = np.asarray(images, dtype=np.float64)
    n, rows, cols = images.shape
    yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float64)
    centre = np.tile([cols // 2, rows // 2], (n, 1)).astype(np.float64)
    moments = np.tile([2.25, 2.25, 0.0], (n, 1))
    converged = np.zeros(n, dtype=bool)
    failed = np.zeros(n, dtype=bool)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        for _ in range(max_iter):
            active = ~(converged | failed)
            if not active.any():
                break
            new, shift = _weighted_moments(images, xx - centre[:, 0, None, None],
                                           yy - centre[:, 1, None, None], moments)
            failed |= active & ~np.all(np.isfinite(new), axis=1)
            active &= ~failed
            change = np.abs(new - moments).max(axis=1) / (new[:, 0] + new[:, 1])
            moments = np.where(active[:, None], new, moments)
            centre = np.where(active[:, None], centre + shift, centre)
            converged |= active & (change < tol) & (np.abs(shift).max(axis=1) < tol)
    return np.where(converged[:, None], moments, np.nan)


def _weighted_moments(images: np.ndarray, dx: np.ndarray, dy: np.ndarray,
                      moments: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Twice the Gaussian-weighted second moments (N, 3) about the weighted centroid, and
    that centroid's offset (N, 2) from the current centre; NaN where undefined."""
    ixx, iyy, ixy = (moments[:, k, None, None] for k in range(3))
    det = ixx * iyy - ixy * ixy
    r2 = (iyy * dx * dx - 2.0 * ixy * dx * dy + ixx * dy * dy) / np.where(det > 0, det, np.nan)
    weighted = images * np.exp(-0.5 * r2)
    total = weighted.sum(axis=(1, 2))
    total = np.where(total > 0, total, np.nan)
    sx = (weighted * dx).sum(axis=(1, 2)) / total
    sy = (weighted * dy).sum(axis=(1, 2)) / total
    ex, ey = dx - sx[:, None, None], dy - sy[:, None, None]
    new = 2.0 * np.stack([(weighted * ex * ex).sum(axis=(1, 2)), (weighted * ey * ey).sum(axis=(1, 2)),
                          (weighted * ex * ey).sum(axis=(1, 2))], axis=1) / total[:, None]
    return new, np.stack([sx, sy], axis=1)


def determinant_radius(shape: np.ndarray) -> np.ndarray:
    """(Ixx Iyy - Ixy^2)^(1/4) of (N, 3) moments ``Ixx, Iyy, Ixy``, pixels."""
    return (shape[:, 0] * shape[:, 1] - shape[:, 2] ** 2) ** 0.25


class GaussianPsf:
    """Circular Gaussian PSF of given FWHM (pixels), integrated over pixels.

    ``sigma`` = FWHM / 2.3548 describes the profile before pixel integration; the stamps hold
    its flux in each pixel, so their variance is sigma^2 + 1/12. :meth:`sigma` and
    :meth:`shape` report the profile's exact moments (sigma, pixel excluded) because that is
    what LSST's ``GaussianPsf.computeShape`` returns (sigma^2) and what a user's FWHM means;
    including the pixel would widen LocalBackground's 7-15 sigma annulus by 1.4% at sigma =
    1.7 px. (LSST's GaussianPsf samples its stamps at pixel centres; ours integrate.)
    Default stamp side: 2 ceil(5 sigma) + 1.
    """

    def __init__(self, fwhm_pixels: float, stamp_size: int | None = None):
        try:
            fwhm = float(fwhm_pixels)
        except (TypeError, ValueError):
            fwhm = math.nan
        if not (math.isfinite(fwhm) and fwhm > 0):
            raise PsfError(f"PSF FWHM must be a positive number of pixels, got {fwhm_pixels!r}")
        self.sigma_pixels = fwhm / FWHM_PER_SIGMA
        if stamp_size is None:
            stamp_size = 2 * math.ceil(5.0 * self.sigma_pixels) + 1
        if not isinstance(stamp_size, (int, np.integer)) or stamp_size < 1 or stamp_size % 2 == 0:
            raise PsfError(f"PSF stamp size must be a positive odd integer, got {stamp_size!r}")
        self.stamp_size = int(stamp_size)

    def describe(self) -> str:
        return f"circular Gaussian of FWHM {self.sigma_pixels * FWHM_PER_SIGMA:.4g} px, integrated over pixels"

    def stamps(self, x: np.ndarray, y: np.ndarray, xp: Any, put: Put | None = None) -> Array:
        """(N, K, K) pixel-integrated Gaussian stamps in namespace ``xp``, each summing to 1."""
        return _gaussian_stamps(x, y, self.sigma_pixels, self.stamp_size, xp, put)

    def shape(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """(N, 3) moments ``Ixx, Iyy, Ixy`` = (sigma^2, sigma^2, 0), pixels^2."""
        x, _ = _positions(x, y)
        return np.tile([self.sigma_pixels**2, self.sigma_pixels**2, 0.0], (x.size, 1))

    def sigma(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """(N,) sigma of the Gaussian profile, pixels (pixel integration excluded)."""
        return determinant_radius(self.shape(x, y))


class SampledGaussianPsf:
    """LSST's ``GaussianPsf``: a circular Gaussian sampled at pixel centres (not integrated),
    on a ``width`` x ``height`` realization, normalised to sum 1 (afw ``computeImage``).
    Positions keep their sub-pixel offsets, as ``computeImage(position)`` does."""

    def __init__(self, sigma_pixels: float, width: int, height: int):
        if not (math.isfinite(sigma_pixels) and sigma_pixels > 0):
            raise PsfError(f"GaussianPsf record: sigma {sigma_pixels!r} px is not usable")
        for what, value in (("width", width), ("height", height)):
            check_psf_size("GaussianPsf record", what, value, MAX_PSF_STAMP_PX)
        self.sigma_pixels = float(sigma_pixels)
        self.stamp_size = max(int(width), int(height)) | 1  # odd, as the stamps are centred

    def describe(self) -> str:
        return f"LSST GaussianPsf of sigma {self.sigma_pixels:.4g} px on {self.stamp_size} x {self.stamp_size} px, sampled at pixel centres"

    def stamps(self, x: np.ndarray, y: np.ndarray, xp: Any, put: Put | None = None) -> Array:
        """(N, K, K) sampled Gaussian stamps in namespace ``xp``, each summing to 1."""
        centres = (put or xp.asarray)(np.stack(_stamp_centres(*_positions(x, y), self.stamp_size)))
        grid = xp.arange(self.stamp_size, dtype=xp.float64, device=device(centres))
        dx = grid[None, None, :] - centres[0, ...][:, None, None]
        dy = grid[None, :, None] - centres[1, ...][:, None, None]
        return _normalised(xp.exp(-(dx * dx + dy * dy) / (2.0 * self.sigma_pixels**2)), xp)

    def sigma(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """(N,) sigma of the Gaussian, pixels."""
        x, _ = _positions(x, y)
        return np.full(x.size, self.sigma_pixels)


def _declared_bytes(header: fits.Header) -> int:
    """Bytes of data an HDU's header declares (decompressed, for a tile-compressed image)."""
    prefix = "Z" if header.get("ZIMAGE") is True else ""
    axes = [header.get(f"{prefix}NAXIS{i}", 0) for i in range(1, int(header.get(f"{prefix}NAXIS", 0) or 0) + 1)]
    bits = header.get(f"{prefix}BITPIX", 8)
    values = [*axes, bits, header.get("PCOUNT", 0) or 0]
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) for v in values):
        raise ValueError("a header declares its data size with a value that is not a number")
    return int(math.prod(abs(int(a)) for a in axes) * abs(int(bits)) // 8 + abs(int(values[-1]))) if axes else 0


def _read_fits(path: str) -> fits.HDUList:
    """All HDUs of a FITS file, data loaded; PsfError if unreadable or truncated, or if a
    header declares more than :data:`MAX_PSF_FILE_BYTES` (checked before any data is decoded)."""
    try:
        with open(path, "rb") as stream:
            content = stream.read()
    except FileNotFoundError as err:
        raise PsfError(f"PSF file {path}: not found") from err
    except OSError as err:
        raise PsfError(f"PSF file {path}: cannot be read ({err})") from err
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message="(?s).*(truncated|corrupted)")
            hdus = fits.open(io.BytesIO(content), lazy_load_hdus=False, disable_image_compression=True)
            for index, hdu in enumerate(hdus):
                declared = _declared_bytes(hdu.header)
                if declared > MAX_PSF_FILE_BYTES:
                    raise PsfError(f"PSF file {path}: HDU {index} declares {declared} bytes of data, more than the "
                                   f"{MAX_PSF_FILE_BYTES} a PSF may have")
            hdus = fits.open(io.BytesIO(content), lazy_load_hdus=False)
            for hdu in hdus:
                hdu.data  # noqa: B018 (decode every HDU now, so damage shows here)
            return hdus
    except PsfError:
        raise
    except Exception as err:  # astropy raises OSError, ValueError, TypeError, warnings...
        if not_fits_reason(err):
            raise PsfError(f"PSF file {path}: {not_fits_reason(err)}") from None
        raise PsfError(f"PSF file {path}: not a readable FITS file ({err})") from err


class ResampledPsf:
    """A pixelized model shifted to each object's sub-pixel position, as LSST's ``ImagePsf``.

    Subclasses give :meth:`models`: the model at each position, an odd square array sampled
    every ``sample_scale`` image pixels with the PSF centre at its middle pixel. Stamps (side
    ``stamp_size``) hold it interpolated with Lanczos of ``lanczos_order`` (DC-conserving)
    at the object's offset from the nearest pixel, normalised to sum 1.
    """

    lanczos_order = 5
    sample_scale = 1.0
    stamp_size: int

    def models(self, x: np.ndarray, y: np.ndarray, xp: Any, put: Put) -> Array:
        """(N, B, B) (or one (B, B)) model images at 0-based local (x, y), in namespace ``xp``
        (host arrays moved there by ``put``)."""
        raise NotImplementedError

    def _resampled(self, x: np.ndarray, y: np.ndarray, cx: np.ndarray, cy: np.ndarray, xp: Any, put: Put) -> Array:
        """(N, K, K) model at (x, y) resampled with its centre at stamp coords (cx, cy), sum 1."""
        centres = put(np.stack([cx, cy]))
        raw = lanczos_resample(self.models(x, y, xp, put), centres[0, ...], centres[1, ...], self.stamp_size,
                               self.sample_scale, self.lanczos_order)
        return _normalised(raw, xp)

    def stamps(self, x: np.ndarray, y: np.ndarray, xp: Any, put: Put | None = None) -> Array:
        """(N, K, K) model stamps at 0-based local (x, y) in namespace ``xp``, each summing to 1."""
        x, y = _positions(x, y)
        cx, cy = _stamp_centres(x, y, self.stamp_size)
        return self._resampled(x, y, cx, cy, xp, put or xp.asarray)

    def shape(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """(N, 3) adaptive moments ``Ixx, Iyy, Ixy`` of the centred model at (x, y), pixels^2."""
        x, y = _positions(x, y)
        middle = np.full(x.shape, float(self.stamp_size // 2))
        return adaptive_moments(self._resampled(x, y, middle, middle, np, np.asarray))

    def sigma(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """(N,) adaptive-moment determinant radius of the model near (x, y), pixels.

        Evaluated once per cell of :data:`SIGMA_CELL_PX` pixels, at the cell centre: models
        vary smoothly over a detector, so the width changes negligibly within a cell, and
        the cost scales with the cells, not the objects.
        """
        x, y = _positions(x, y)
        cells = np.floor(np.stack([x, y], axis=1) / SIGMA_CELL_PX)
        unique, inverse = np.unique(cells, axis=0, return_inverse=True)
        centres = (unique + 0.5) * SIGMA_CELL_PX
        return determinant_radius(self.shape(centres[:, 0], centres[:, 1]))[inverse.ravel()]


def _odd_square(image: np.ndarray, source: str) -> np.ndarray:
    """``image`` if it is a finite odd square array (the PSF centre at its middle pixel)."""
    if image.ndim != 2 or image.shape[0] != image.shape[1] or image.shape[0] % 2 == 0:
        raise PsfError(f"{source}: PSF image must be a square array of odd side, got shape {image.shape}")
    if not np.all(np.isfinite(image)):
        raise PsfError(f"{source}: PSF image has non-finite pixels")
    return image


class ImagePsf(ResampledPsf):
    """A pixelized PSF image, constant over the image, shifted with Lanczos-5.

    The image is an odd square array whose middle pixel ``(B//2, B//2)`` is the PSF centre,
    sampled at the image's pixel scale. Stamps (side B) hold the image interpolated at the
    object's fractional offset (Lanczos-5, DC-conserving), normalised to sum 1.
    """

    def __init__(self, image: Any, source: str = "PSF image"):
        image = np.asarray(image)
        if image.ndim == 2:
            check_psf_size(source, "image side", max(image.shape), MAX_PSF_STAMP_PX)
        image = _odd_square(np.asarray(image, dtype=np.float64), source)
        if not image.sum() > 0:
            raise PsfError(f"{source}: PSF image must have a positive sum, got {image.sum()}")
        self.image = image
        self.stamp_size = image.shape[0]
        self._shape = adaptive_moments(image[None])[0]
        if not np.all(np.isfinite(self._shape)):
            raise PsfError(f"{source}: adaptive second moments of the PSF image do not converge")

    @classmethod
    def from_fits(cls, path: str, hdu: int | str | None = None) -> "ImagePsf":
        """Read the PSF image from HDU ``hdu`` (index or EXTNAME) or the first 2-D image HDU."""
        hdus = _read_fits(path)
        if hdu is None:
            images = [h for h in hdus if h.is_image and h.data is not None and h.data.ndim == 2]
            if not images:
                raise PsfError(f"PSF file {path}: no 2-D image HDU")
            chosen = images[0]
        else:
            try:
                chosen = hdus[hdu]
            except (KeyError, IndexError, TypeError) as err:
                raise PsfError(f"PSF file {path}: no HDU {hdu!r}") from err
            if not chosen.is_image or chosen.data is None:
                raise PsfError(f"PSF file {path}: HDU {hdu!r} holds no image")
        return cls(chosen.data, source=f"PSF file {path}")

    def describe(self) -> str:
        return f"pixelized PSF image of {self.image.shape[0]} x {self.image.shape[1]} px, the same everywhere, shifted with Lanczos-5"

    def models(self, x: np.ndarray, y: np.ndarray, xp: Any, put: Put) -> Array:
        """The one image, for every position."""
        return put(self.image)

    def shape(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """(N, 3) adaptive moments ``Ixx, Iyy, Ixy`` of the PSF image, pixels^2."""
        x, _ = _positions(x, y)
        return np.tile(self._shape, (x.size, 1))


_PSFEX_KEYS = ("POLNAXIS", "POLNGRP", "POLGRP1", "POLGRP2", "POLNAME1", "POLNAME2", "POLZERO1",
               "POLZERO2", "POLSCAL1", "POLSCAL2", "POLDEG1", "PSF_SAMP", "PSFNAXIS",
               "PSFAXIS1", "PSFAXIS2", "PSFAXIS3")


def psfex_powers(degree: int) -> np.ndarray:
    """(nbasis, 2) exponents (p, q) of the PSFEx monomials ``X^p Y^q``, p + q <= degree,
    in PSFEx's order (q, then p)."""
    return np.array([(p, q) for q in range(degree + 1) for p in range(degree + 1 - q)])


class PsfexPsf(ResampledPsf):
    """A PSFEx model: basis images weighted by a polynomial in the position.

    The model at 0-based local position (x, y) is ``sum_k c_k(X, Y) basis_k`` with
    ``X = (x + offset_x - zero_x) / scale_x`` (likewise Y) and ``c_k`` the monomials
    ``X^p Y^q``, ``p + q <= degree``, ordered by q then p (PSFEx's order). Basis images are
    sampled every ``sample_scale`` image pixels, centred on their middle pixel; stamps
    interpolate them with Lanczos-3 (as GalSim's ``des.DES_PSFEx`` and PSFEx's own
    ``vignet_resample`` do) and are normalised to sum 1. Stamp side: the smallest odd side
    covering the model, ``2 ceil((B//2) sample_scale) + 1``.

    From a ``.psf`` file (:meth:`from_file`) the offset is 1 (PSFEx's ``X_IMAGE`` is 1-based);
    from an LSST archive it is the exposure's origin (afw evaluates at parent pixels).
    """

    lanczos_order = 3

    def __init__(self, basis: np.ndarray, degree: int, zero: tuple[float, float], scale: tuple[float, float],
                 sample_scale: float, offset: tuple[float, float], source: str):
        basis = np.asarray(basis, dtype=np.float64)
        self.powers = psfex_powers(check_degree(source, degree))
        check_sampling(source, sample_scale)
        if basis.ndim == 3:
            check_psf_size(source, "basis image side", basis.shape[1], MAX_PSF_MODEL_PX)
        if basis.ndim != 3 or basis.shape[0] != len(self.powers) or basis.shape[1] != basis.shape[2] or basis.shape[1] % 2 == 0:
            raise PsfError(f"{source}: basis images of shape {basis.shape} do not match a degree-{degree} polynomial "
                           f"({len(self.powers)} square images of odd side)")
        if not np.all(np.isfinite(basis)):
            raise PsfError(f"{source}: basis images have non-finite values")
        if not (math.isfinite(sample_scale) and sample_scale > 0):
            raise PsfError(f"{source}: sample spacing {sample_scale} is not positive")
        if not np.all(np.asarray(scale, np.float64) != 0):
            raise PsfError(f"{source}: polynomial scales must be non-zero")
        self.basis, self.sample_scale = basis, float(sample_scale)
        self.zero = np.asarray(zero, np.float64) - np.asarray(offset, np.float64)
        self.scale = np.asarray(scale, np.float64)
        self.stamp_size = 2 * math.ceil((basis.shape[1] // 2) * self.sample_scale - 1e-9) + 1
        check_psf_size(source, f"stamp side ({basis.shape[1]} px sampled every {self.sample_scale:g} px)", self.stamp_size, MAX_PSF_STAMP_PX)

    @classmethod
    def from_file(cls, path: str) -> "PsfexPsf":
        """Read a ``.psf`` file (``PSF_DATA`` binary table; one polynomial group in
        ``X*_IMAGE``, ``Y*_IMAGE``)."""
        path = str(path)
        hdus = _read_fits(path)
        if "PSF_DATA" not in hdus:
            raise PsfError(f"PSFEx file {path}: no PSF_DATA extension")
        table = hdus["PSF_DATA"]
        header = table.header
        missing = [key for key in _PSFEX_KEYS if key not in header]
        if missing:
            raise PsfError(f"PSFEx file {path}: PSF_DATA header lacks {', '.join(missing)}")
        not_numbers = [key for key in _PSFEX_KEYS if not key.startswith("POLNAME")
                       and (isinstance(header[key], bool) or not isinstance(header[key], (int, float)))]
        if not_numbers:
            raise PsfError(f"PSFEx file {path}: PSF_DATA keywords {', '.join(not_numbers)} are not numbers")
        _check_psfex_context(path, header)
        source = f"PSFEx file {path}"
        check_sampling(source + " PSF_SAMP", header["PSF_SAMP"])
        for key in ("PSFAXIS1", "PSFAXIS2"):
            check_psf_size(source, key, header[key], MAX_PSF_MODEL_PX)
        degree = check_degree(source + " POLDEG1", header["POLDEG1"])
        side, nbasis = int(header["PSFAXIS1"]), int(header["PSFAXIS3"])
        if side != header["PSFAXIS2"] or side % 2 == 0:
            raise PsfError(f"PSFEx file {path}: basis images are {header['PSFAXIS2']}x{side} "
                           "(rows x columns), not square with an odd side")
        if nbasis != len(psfex_powers(degree)):
            raise PsfError(f"PSFEx file {path}: PSFAXIS3 = {nbasis} basis images, but degree "
                           f"{degree} needs {len(psfex_powers(degree))}")
        if table.columns is None or "PSF_MASK" not in table.columns.names or len(table.data) < 1:
            raise PsfError(f"PSFEx file {path}: PSF_DATA has no PSF_MASK row")
        basis = np.asarray(table.data["PSF_MASK"][0], dtype=np.float64)
        if basis.shape != (nbasis, side, side):
            raise PsfError(f"PSFEx file {path}: PSF_MASK shape {basis.shape} does not match "
                           f"PSFAXIS3, PSFAXIS2, PSFAXIS1 = {(nbasis, side, side)}")
        return cls(basis, degree, (header["POLZERO1"], header["POLZERO2"]), (header["POLSCAL1"], header["POLSCAL2"]),
                   float(header["PSF_SAMP"]), (1.0, 1.0), f"PSFEx file {path}")

    def coefficients(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """(N, nbasis) polynomial coefficients of the basis images at 0-based local (x, y)."""
        x, y = _positions(x, y)
        u = (x - self.zero[0]) / self.scale[0]
        v = (y - self.zero[1]) / self.scale[1]
        return u[:, None] ** self.powers[:, 0] * v[:, None] ** self.powers[:, 1]

    def models(self, x: np.ndarray, y: np.ndarray, xp: Any, put: Put) -> Array:
        """(N, B, B) model images: basis images weighted by the polynomial at (x, y)."""
        nbasis, side, _ = self.basis.shape
        coeffs = put(self.coefficients(x, y))
        basis = put(self.basis.reshape(nbasis, side * side))
        return xp.reshape(xp.matmul(coeffs, basis), (coeffs.shape[0], side, side))

    def describe(self) -> str:
        degree = int(self.powers.max()) if len(self.powers) else 0
        return (f"PSFEx model, polynomial of degree {degree} in X_IMAGE, Y_IMAGE, sampled every {self.sample_scale:.3g} px, "
                "resampled with Lanczos-3")


def _check_psfex_context(path: str, header: fits.Header) -> None:
    """PsfError unless the polynomial is one group in X*_IMAGE, Y*_IMAGE."""
    names = (str(header["POLNAME1"]).strip(), str(header["POLNAME2"]).strip())
    groups = (header["POLNGRP"], header["POLGRP1"], header["POLGRP2"])
    if header["POLNAXIS"] != 2 or groups != (1, 1, 1):
        raise PsfError(f"PSFEx file {path}: unsupported polynomial (POLNAXIS={header['POLNAXIS']}, "
                       f"POLNGRP={header['POLNGRP']}); need one group in X_IMAGE, Y_IMAGE")
    if not (names[0].startswith("X") and names[0].endswith("IMAGE")
            and names[1].startswith("Y") and names[1].endswith("IMAGE")):
        raise PsfError(f"PSFEx file {path}: context parameters {names} are not X_IMAGE, Y_IMAGE")
    if header["PSFNAXIS"] != 3:
        raise PsfError(f"PSFEx file {path}: need PSFNAXIS = 3")


SIGMA_CELL_PX = 128.0


PSF_FWHM_KEYWORD = "PSF_FWHM"  # Gaussian PSF FWHM in pixels; the demo generator writes it
# A Gaussian FWHM outside this range is taken for a mistake: below 0.5 px a PSF is a
# single pixel (nothing to fit, no background annulus), above 20 px arcsec were likely
# given for pixels.
MIN_PSF_FWHM_PX = 0.5
MAX_PSF_FWHM_PX = 20.0


def header_fwhm_pixels(header, source: str) -> float | None:
    """The Gaussian PSF FWHM (pixels) an exposure header declares in ``PSF_FWHM``.

    None when the keyword is absent; :class:`PsfError` naming ``source`` when it is not a
    number.
    """
    if PSF_FWHM_KEYWORD not in header:
        return None
    try:
        return float(header[PSF_FWHM_KEYWORD])
    except (TypeError, ValueError):
        raise PsfError(f"{source}: header keyword {PSF_FWHM_KEYWORD} is not a number") from None


def load_psf(*, fwhm_pixels: float | None = None, path: str | None = None,
             hdu: int | str | None = None) -> PsfModel:
    """Build the PSF model from exactly one of a FWHM (pixels) or a file.

    A path ending in ``.psf``, or any FITS file with a ``PSF_DATA`` extension, is read as a
    PSFEx model; any other FITS file as a PSF image (``hdu``: index or EXTNAME, default the
    first 2-D image HDU).
    """
    if (fwhm_pixels is None) == (path is None):
        raise PsfError("give exactly one of fwhm_pixels or path for the PSF")
    if fwhm_pixels is not None:
        return GaussianPsf(fwhm_pixels)
    path = str(path)
    if path.lower().endswith(".psf") or "PSF_DATA" in _read_fits(path):
        return PsfexPsf.from_file(path)
    return ImagePsf.from_fits(path, hdu)


def check_psf_fwhm(value: float, source: str) -> float:
    """A usable Gaussian FWHM in pixels, else :class:`PsfError` naming ``source``."""
    if not (math.isfinite(value) and MIN_PSF_FWHM_PX <= value <= MAX_PSF_FWHM_PX):
        raise PsfError(f"{source}: PSF FWHM {value!r} px is outside [{MIN_PSF_FWHM_PX:g}, {MAX_PSF_FWHM_PX:g}] px")
    return value


def gaussian_widths(psf: PsfModel) -> float | np.ndarray | None:
    """The width (px, before pixel integration) of the circular pixel-integrated Gaussian
    stamps ``psf`` makes: one for a :class:`GaussianPsf`, one per object for a
    :class:`StackedPsf` of them; None for stamps of any other kind."""
    if type(psf) is GaussianPsf:
        return psf.sigma_pixels
    if type(psf) is StackedPsf and all(type(model) is GaussianPsf for model in psf.models):
        return np.repeat([model.sigma_pixels for model in psf.models], psf.counts)
    return None


def gaussian_recipe(psf: PsfModel, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """For a PSF whose stamps are circular Gaussians (:func:`gaussian_widths`), what each
    of its stamps for objects at local ``(x, y)`` is made from: centre in stamp coordinates
    (x, y) and width, px, each ``(N,)``; None for other PSFs."""
    sigma = gaussian_widths(psf)
    if sigma is None:
        return None
    cx, cy = _stamp_centres(*_positions(x, y), psf.stamp_size)
    return cx, cy, np.broadcast_to(np.asarray(sigma, np.float64), cx.shape)


def describe_psf(model: PsfModel) -> str:
    """The PSF in words, with where it came from when :func:`choose_psf` chose it."""
    origin = getattr(model, "origin", None)
    return model.describe() + (f" ({origin})" if origin else "")


class StackedPsf:
    """The PSFs of consecutive runs of objects measured in one kernel call (the epochs of a
    light curve, each with its own model): ``models[i]`` for the next ``counts[i]`` objects.
    All models make stamps of one side. Gaussian models are evaluated together (one call);
    others each on its own run, the stamps concatenated."""

    def __init__(self, models: list[PsfModel], counts: list[int]):
        sizes = {model.stamp_size for model in models}
        if len(sizes) != 1 or len(models) != len(counts):
            raise ValueError(f"stacked PSF models need one stamp side and a count each, got sides {sorted(sizes)}")
        self.models, self.counts, self.stamp_size = list(models), [int(c) for c in counts], sizes.pop()

    def _runs(self) -> list[tuple[PsfModel, slice]]:
        bounds = np.cumsum([0, *self.counts])
        return [(model, slice(int(lo), int(hi))) for model, lo, hi in zip(self.models, bounds[:-1], bounds[1:])]

    def stamps(self, x: np.ndarray, y: np.ndarray, xp: Any, put: Put | None = None) -> Array:
        """(N, K, K) stamps, each object's from its own model (see :meth:`PsfModel.stamps`)."""
        sigma = gaussian_widths(self)
        if sigma is not None:
            return _gaussian_stamps(x, y, sigma, self.stamp_size, xp, put)
        x, y = _positions(x, y)
        return xp.concat([model.stamps(x[run], y[run], xp, put) for model, run in self._runs()], axis=0)

    def sigma(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """(N,) PSF determinant radius of each object's model, pixels."""
        x, y = _positions(x, y)
        return np.concatenate([model.sigma(x[run], y[run]) for model, run in self._runs()])

    def describe(self) -> str:
        return "; ".join(dict.fromkeys(model.describe() for model in self.models))
