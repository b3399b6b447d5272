"""Build the DiaForcedSource catalog from the kernels' results.

Columns follow lsst/sdm_schemas' DiaForcedSource, plus the LSST forced-source extras
(``x``, ``y`` in PARENT pixels, ``psfFlux_*`` diagnostics, ``apFlux_<r>``,
``localBackground_*``, ``pixelFlags_*``, ``localPhotoCalib``, ``localWcs_CDMatrix_*``).
Fluxes named ``*Flux``/``*FluxErr``/``apFlux_*`` are in nJy; ``*_instFlux`` in image units.
The catalog is built as an Arrow table (one array per column, no pandas on the
request path); each column's unit is in its field metadata. Writing it is
:mod:`forcedphot.photometry.formats`'s job.
"""

from dataclasses import dataclass, fields
from functools import lru_cache
import time
from types import SimpleNamespace

from astropy.time import Time
import numpy as np
import pyarrow as pa

from forcedphot.kernels import PsfFluxResult
from forcedphot.photometry.config import MeasurementConfig
from forcedphot.photometry.objects import ObjectArrays
from forcedphot.photometry.runner import PIXEL_FLAG_NAMES, KernelResults, unmeasured

_MASK63 = np.uint64((1 << 63) - 1)


def _splitmix64(values: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser: a bijection of uint64 that scatters nearby inputs."""
    z = values.astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        z += np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def forced_source_ids(dia_object_ids: np.ndarray, visit: int | np.ndarray | None, detector: int | np.ndarray | None) -> np.ndarray:
    """Deterministic ``diaForcedSourceId`` for each (diaObjectId, visit, detector); ``visit``
    and ``detector`` one for all rows or one per row (None or 0: unknown).

    ``id = splitmix64(diaObjectId + splitmix64(visit * 2**16 + detector))`` with the top
    bit cleared (positive int64). The same triple always gives the same id (retries are
    idempotent); within one exposure ids are distinct unless two objects collide in 63
    bits, which :func:`catalog_columns` checks. Across a survey the collision probability
    for n sources is about n**2 / 2**64.
    """
    visit, detector = (np.asarray(0 if value is None else value, dtype=np.int64) for value in (visit, detector))
    exposure_key = np.atleast_1d(visit * (1 << 16) + detector)
    salt = _splitmix64(exposure_key.view(np.uint64))
    with np.errstate(over="ignore"):
        mixed = _splitmix64(np.asarray(dia_object_ids, dtype=np.int64).view(np.uint64) + salt)
    return (mixed & _MASK63).astype(np.int64)


NJY = "nJy"
UNITS: dict[str, str] = {
    "ra": "deg",
    "dec": "deg",
    "x": "pixel",
    "y": "pixel",
    "psfFlux": NJY,
    "psfFluxErr": NJY,
    "scienceFlux": NJY,
    "scienceFluxErr": NJY,
    "midpointMjdTai": "d",
    "psfFlux_instFlux": "count",
    "psfFlux_instFluxErr": "count",
    "psfFlux_area": "pixel",
    "localBackground_instFlux": "count / pixel",
    "localBackground_instFluxErr": "count / pixel",
    "localPhotoCalib": "nJy / count",
    "localPhotoCalibErr": "nJy / count",
    "localWcs_CDMatrix_1_1": "rad / pixel",
    "localWcs_CDMatrix_1_2": "rad / pixel",
    "localWcs_CDMatrix_2_1": "rad / pixel",
    "localWcs_CDMatrix_2_2": "rad / pixel",
    "psfMag": "mag",
    "psfMagErr": "mag",
    "psfMagLim5Sigma": "mag",
    "scienceMag": "mag",
    "scienceMagErr": "mag",
    "scienceMagLim5Sigma": "mag",
    "psfFluxCorrected": NJY,  # light-curve products (lightcurve_products)
    "psfFluxErrRescaled": NJY,
    "mjdMin": "d",
    "mjdMax": "d",
}


def aperture_name(radius: float) -> str:
    """Column stem for an aperture radius in pixels: 4.5 -> 'apFlux_4_5', 6 -> 'apFlux_6'."""
    text = f"{radius:g}".replace(".", "_")
    return f"apFlux_{text}"


def _in_njy(inst_flux: np.ndarray, inst_flux_err: np.ndarray, calibration: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Instrumental fluxes and errors (counts) in nJy (float64), as afw's
    ``PhotoCalib.instFluxToNanojansky`` since afw 29 (March 2025): flux = instFlux c,
    error = instFluxErr c, with ``c`` the calibration at the row (nJy per count). The
    calibration's own error is not added (it stays in ``localPhotoCalibErr``)."""
    return inst_flux * calibration, inst_flux_err * calibration


def _njy_columns(flux: np.ndarray, error: np.ndarray, null: np.ndarray) -> tuple[np.ndarray | pa.Array, np.ndarray | pa.Array]:
    """float32 columns, null at the rows ``null`` marks (an exposure without calibration)."""
    if not null.any():
        return flux.astype(np.float32), error.astype(np.float32)
    return pa.array(flux.astype(np.float32), mask=null), pa.array(error.astype(np.float32), mask=null)


def unit_of(column: str) -> str | None:
    """The unit of a catalog column, or None for ids, counts and flags."""
    if column in UNITS:
        return UNITS[column]
    if column.endswith(("_instFlux", "_instFluxErr")) and column.startswith("apFlux_"):
        return "count"
    if column.startswith(("apFlux_", "apFluxErr_")) and "_flag" not in column:
        return NJY
    return None


def table_with_units(columns: dict[str, pa.Array | np.ndarray]) -> pa.Table:
    """An Arrow table of ``columns`` whose fields carry their unit (see :func:`unit_of`)."""
    arrays = [c if isinstance(c, pa.Array) else pa.array(c) for c in columns.values()]
    return pa.Table.from_arrays(arrays, schema=_schema_with_units(tuple(zip(columns, (a.type for a in arrays)))))


@lru_cache(maxsize=64)
def _schema_with_units(names_and_types: tuple[tuple[str, pa.DataType], ...]) -> pa.Schema:
    """The schema of columns (name, type), each field with its unit (one per catalog layout)."""
    return pa.schema([pa.field(name, dtype, metadata={"unit": unit} if (unit := unit_of(name)) else None)
                      for name, dtype in names_and_types])


@dataclass
class ExposureRows:
    """What the catalog takes from the exposure of each row: one exposure's values repeated,
    or, in a light curve, each epoch's for its rows (see :meth:`concat`). Unknown visits and
    detectors are 0 with ``*_known`` False; an unknown midpoint is NaN."""

    visit: np.ndarray  # (n,) int64
    visit_known: np.ndarray  # (n,) bool
    detector: np.ndarray  # (n,) int64
    detector_known: np.ndarray  # (n,) bool
    midpoint_mjd_tai: np.ndarray  # (n,) float64, d
    band: np.ndarray  # (n,) object: str or None
    calibration: np.ndarray  # (n,) nJy per image unit at the row (the measured image's)
    calibration_err: np.ndarray  # (n,) its 1-sigma error
    calibrated: np.ndarray  # (n,) bool: the row's exposure has a calibration (else its nJy columns are null)
    has_science: np.ndarray  # (n,) bool: a direct image gives scienceFlux (difference mode)
    science_calibration: np.ndarray  # (n,) nJy per image unit on the direct image (NaN without one)
    science_calibrated: np.ndarray  # (n,) bool

    @classmethod
    def of(cls, primary, science, x_parent: np.ndarray, y_parent: np.ndarray) -> "ExposureRows":
        """The rows at parent positions ``(x_parent, y_parent)`` of ``primary`` (the image
        measured), with its direct image ``science`` (None outside difference mode), which
        shares its pixel grid."""
        n = len(x_parent)
        calibration = primary.local_calibration(x_parent, y_parent)
        if science is not None:
            science_calibration = science.local_calibration(x_parent, y_parent)
        else:
            science_calibration = np.full(n, np.nan)

        def repeated(value, dtype, unknown):
            return np.full(n, unknown if value is None else value, dtype), np.full(n, value is not None)

        visit, visit_known = repeated(primary.visit, np.int64, 0)
        detector, detector_known = repeated(primary.detector, np.int64, 0)
        band = np.empty(n, object)
        band[:] = primary.band
        return cls(visit, visit_known, detector, detector_known, repeated(primary.midpoint_mjd_tai, np.float64, np.nan)[0], band,
                   calibration, np.full(n, primary.calibration_err, np.float64), np.full(n, np.isfinite(calibration).any()),
                   np.full(n, science is not None), science_calibration, np.full(n, np.isfinite(science_calibration).any()))

    @classmethod
    def concat(cls, parts: list["ExposureRows"]) -> "ExposureRows":
        """The rows of ``parts``, one after the other."""
        return cls(*(np.concatenate([getattr(part, f.name) for part in parts]) for f in fields(cls)))


def _known(values: np.ndarray, known: np.ndarray, arrow_type: pa.DataType, dtype: type) -> np.ndarray | pa.Array:
    """``values`` as a column: NumPy when every row is known, else Arrow with nulls."""
    if known.all():
        return values.astype(dtype)
    if not known.any():
        return pa.nulls(len(values), arrow_type)
    return pa.array(values.astype(dtype), mask=~known)


@dataclass
class CatalogRows:
    """Everything but the kernels' results that the catalog's rows are made of (one exposure's
    rows, or a light curve's: see :meth:`concat`)."""

    objects: ObjectArrays  # the row's DiaObject
    x_parent: np.ndarray  # (n,) PARENT pixel position, px
    y_parent: np.ndarray
    on_image: np.ndarray  # (n,) bool: measured (the others are flagged offimage)
    coord_valid: np.ndarray  # (n,) bool
    invalid_psf: np.ndarray  # (n,) bool: measured without a usable PSF model there
    cd_matrix: np.ndarray  # (n, 2, 2) local CD matrix, rad per px
    exposure: ExposureRows

    @classmethod
    def concat(cls, parts: list["CatalogRows"]) -> "CatalogRows":
        """The rows of ``parts``, one after the other."""
        def joined(name: str):
            pieces = [getattr(part, name) for part in parts]
            if name == "objects":
                return ObjectArrays.concat(pieces)
            if name == "exposure":
                return ExposureRows.concat(pieces)
            return np.concatenate(pieces)

        return cls(*(joined(f.name) for f in fields(cls)))


def catalog_columns(
    rows: CatalogRows,
    results: KernelResults,
    *,
    science_psf: PsfFluxResult | None = None,
    apertures_px=(),
    extra_columns: bool = False,
    measurements: str = "all",
) -> dict[str, pa.Array | np.ndarray]:
    """The DiaForcedSource catalog's columns (NumPy or Arrow arrays, in order), one row per
    row of ``rows`` (objects validated).

    ``results`` holds the kernels' instrumental outputs, one row per row (NaN/False
    for rows not measured); rows not ``on_image`` are flagged offimage; ``coord_valid``
    False gives ``coord_flag`` (ra/dec non-finite or out of range); ``invalid_psf`` marks
    measured rows without a usable PSF model at their position (``invalidPsfFlag``, LSST's
    ``base_InvalidPsf_flag``: fluxes NaN and flagged). ``rows.exposure`` holds what each
    row takes from its exposure (the image measured: the difference image in difference
    mode); ``science_psf`` (the PSF fit on the direct image, for the rows
    ``exposure.has_science`` marks) gives ``scienceFlux``. ``measurements`` as
    :attr:`~forcedphot.photometry.config.MeasurementConfig.measurements`: with ``"psf"`` the
    aperture, local background and pixel flag columns (but ``pixelFlags_offimage``) are left
    out, whatever ``results`` holds.
    """
    objects, exposure, x_parent, y_parent = rows.objects, rows.exposure, rows.x_parent, rows.y_parent
    on_image, coord_valid, invalid_psf, cd_matrix = rows.on_image, rows.coord_valid, rows.invalid_psf, rows.cd_matrix
    n = len(objects)
    calib = exposure.calibration
    off = ~np.asarray(on_image, dtype=bool)
    ids = objects.ids
    source_ids = forced_source_ids(ids, exposure.visit, exposure.detector)
    if len(np.unique(source_ids)) != n:
        raise RuntimeError("diaForcedSourceId collision; report this with the input table")
    psf, apertures, background, flags = results

    columns: dict[str, pa.Array | np.ndarray] = {
        "diaForcedSourceId": source_ids,
        "diaObjectId": ids,
        "ra": objects.ra,
        "dec": objects.dec,
        "visit": _known(exposure.visit, exposure.visit_known, pa.int64(), np.int64),
        "detector": _known(exposure.detector, exposure.detector_known, pa.int16(), np.int16),
    }
    uncalibrated = ~exposure.calibrated
    psf_njy = _in_njy(psf.inst_flux, psf.inst_flux_err, calib)
    columns["psfFlux"], columns["psfFluxErr"] = _njy_columns(*psf_njy, uncalibrated)
    science = exposure.has_science if science_psf is not None else np.zeros(n, bool)  # a difference image shares its science image's grid
    if science.any():
        flux, error = _in_njy(science_psf.inst_flux, science_psf.inst_flux_err, exposure.science_calibration)
        columns["scienceFlux"], columns["scienceFluxErr"] = _njy_columns(np.where(science, flux, np.nan), np.where(science, error, np.nan),
                                                                         science & ~exposure.science_calibrated)
        columns["scienceFlux_flag"] = np.where(science, science_psf.flag | off, True)
    else:
        columns["scienceFlux"] = np.full(n, np.nan, dtype=np.float32)
        columns["scienceFluxErr"] = np.full(n, np.nan, dtype=np.float32)
        columns["scienceFlux_flag"] = np.ones(n, dtype=bool)
    columns.update(
        midpointMjdTai=exposure.midpoint_mjd_tai,
        band=pa.array(exposure.band, pa.string()),
        timeProcessedMjdTai=np.full(n, _now_mjd_tai()),
        timeWithdrawnMjdTai=pa.nulls(n, pa.float64()),  # not withdrawn (the APDB's null)
        x=np.asarray(x_parent, dtype=np.float64),
        y=np.asarray(y_parent, dtype=np.float64),
        psfFlux_instFlux=psf.inst_flux,
        psfFlux_instFluxErr=psf.inst_flux_err,
        psfFlux_area=psf.area.astype(np.float32),
        psfFlux_chi2=psf.chi2.astype(np.float32),
        psfFlux_npixels=psf.npixels.astype(np.int32),
        psfFlux_flag=psf.flag | off,
        psfFlux_flag_edge=psf.flag_edge | off,
        psfFlux_flag_noGoodPixels=psf.flag_no_good_pixels | off,
    )
    every = measurements == "all"
    for k, radius in enumerate(apertures_px if every else ()):
        stem = aperture_name(radius)
        value, error = apertures.flux[:, k], apertures.flux_err[:, k]
        truncated = apertures.truncated[:, k] | off
        columns[stem], columns[stem.replace("apFlux_", "apFluxErr_")] = _njy_columns(*_in_njy(value, error, calib), uncalibrated)
        columns[f"{stem}_instFlux"] = value.astype(np.float32)
        columns[f"{stem}_instFluxErr"] = error.astype(np.float32)
        columns[f"{stem}_flag"] = truncated | ~np.isfinite(value)
        columns[f"{stem}_flag_apertureTruncated"] = truncated
    if every:
        background_no_good = background.flag_no_good_pixels | off
        columns.update(
            localBackground_instFlux=background.mean.astype(np.float32),
            localBackground_instFluxErr=background.std.astype(np.float32),
            localBackground_flag=background_no_good | ~np.isfinite(background.mean),
            localBackground_flag_noGoodPixels=background_no_good,
        )
    columns["coord_flag"] = ~np.asarray(coord_valid, dtype=bool)
    columns["invalidPsfFlag"] = np.asarray(invalid_psf, dtype=bool)
    columns["pixelFlags_offimage"] = off
    for name, values in flags.as_dict(PIXEL_FLAG_NAMES).items() if every else ():
        # offimage sets every edge flag (LSST)
        columns[f"pixelFlags_{name}"] = values | off if name.startswith("edge") else values
    if extra_columns:
        columns.update(snr_columns(*psf_njy))
        columns.update(snr_columns(columns["scienceFlux"], columns["scienceFluxErr"], "science"))
    columns.update(
        localPhotoCalib=np.asarray(calib, dtype=np.float64),
        localPhotoCalibErr=exposure.calibration_err,
        localWcs_CDMatrix_1_1=cd_matrix[:, 0, 0],
        localWcs_CDMatrix_1_2=cd_matrix[:, 0, 1],
        localWcs_CDMatrix_2_1=cd_matrix[:, 1, 0],
        localWcs_CDMatrix_2_2=cd_matrix[:, 1, 1],
    )
    return columns


_UNIX_EPOCH_MJD = 40587.0  # 1970-01-01T00:00:00 UTC


@lru_cache(maxsize=4)
def _tai_minus_utc(utc_day: int) -> float:
    """TAI - UTC in seconds on a UTC day (days since 1970), from astropy's leap-second table."""
    day = Time(_UNIX_EPOCH_MJD + utc_day, format="mjd", scale="utc")
    return float((day.tai.mjd - day.mjd) * 86400.0)


def _now_mjd_tai() -> float:
    """Now as a TAI MJD: the system clock (UTC) plus TAI - UTC, which astropy gives once a day
    (a Time conversion costs ~0.7 ms; a leap second is only ever inserted at the end of a day)."""
    now = time.time()
    return _UNIX_EPOCH_MJD + (now + _tai_minus_utc(int(now // 86400))) / 86400.0


def snr_columns(flux_njy: np.ndarray, error_njy: np.ndarray, prefix: str = "psf") -> dict[str, np.ndarray]:
    """``<prefix>Flux_snr = flux / error`` (float32): ``psfFlux_snr`` of the difference flux,
    ``scienceFlux_snr`` of the direct image's. The magnitudes, limits and epochStatus of
    ``extra_columns`` come from :func:`~forcedphot.photometry.lightcurve_products.with_epoch_columns`."""
    flux, error = np.asarray(flux_njy, np.float64), np.asarray(error_njy, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return {f"{prefix}Flux_snr": (flux / error).astype(np.float32)}


def empty_catalog(config: MeasurementConfig) -> pa.Table:
    """A catalog of no rows, with every column and unit that ``config`` gives (for answers that found nothing)."""
    nothing = SimpleNamespace(calibration_err=np.nan, visit=None, detector=None, midpoint_mjd_tai=None, band=None,
                              local_calibration=lambda x, y: np.full(len(x), np.nan))
    empty = np.zeros(0)
    rows = CatalogRows(ObjectArrays(np.zeros(0, np.int64), empty, empty, np.zeros(0, bool)), empty, empty, np.zeros(0, bool),
                       np.zeros(0, bool), np.zeros(0, bool), np.zeros((0, 2, 2)), ExposureRows.of(nothing, None, empty, empty))
    return table_with_units(catalog_columns(rows, unmeasured(0, len(config.apertures_px)), apertures_px=config.apertures_px,
                                            measurements=config.measurements))

