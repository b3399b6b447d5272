"""What an astronomer does with a light curve before using it, done once: per-epoch
magnitudes, limits and a status code; a baseline subtracted with rescaled errors; bins.

Recipes, as the surveys that serve forced photometry publish them:

- **Magnitudes and limits** (AB, fluxes in nJy): ``psfMag = 31.4 - 2.5 log10 psfFlux``,
  ``psfMagErr = 2.5 / ln 10 * psfFluxErr / psfFlux``, ``psfMagLim5Sigma = 31.4 - 2.5 log10
  (5 psfFluxErr)``; ``isUpperLimit`` where ``psfFlux / psfFluxErr < snr_limit`` (default 3),
  and there ``psfMag`` is null: plot the limit. The same for ``scienceFlux`` (``scienceMag``,
  ``scienceMagErr``, ``scienceMagLim5Sigma``, ``scienceIsUpperLimit``).
- **epochStatus**: one small integer per row, :data:`EPOCH_STATUS`, the first that applies
  (0: good), so that a row can be kept or dropped by one column.
- **Baseline** (ZTF's Bright Transient Survey recipe): per object and band, the median
  ``psfFlux`` of the good epochs in a window (before the event) is the baseline; with fewer
  than ``min_epochs`` (default 10) there is none, and the summary says so.
  ``psfFluxCorrected = psfFlux - baseline``; ``psfFluxErrRescaled = psfFluxErr x
  sqrt(chi2_red)`` when the baseline epochs scatter more than their errors say
  (``chi2_red = sum((f - baseline) / err)^2 / (n - 1) > 1``), else ``psfFluxErr``.
- **Bins** of ``days`` or nights (Rubin's ``day_obs``: ``floor(MJD - 0.5)``, the date at
  UTC-12 h), per object and band, over good epochs: inverse-variance weighted means of the
  fluxes, ``1 / sqrt(sum w)`` as their errors, the count, the mean MJD and the span.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
import math

import numpy as np
import pandas as pd
import pyarrow as pa

from forcedphot.photometry.catalog import table_with_units
from forcedphot.photometry.exposure import AB_MAG_OF_ONE_NJY

__all__ = ["EPOCH_STATUS", "BaselineWindow", "Products", "bin_lightcurves", "correct_baseline", "epoch_status", "magnitudes",
           "make_products", "with_epoch_columns"]

DEFAULT_SNR_LIMIT = 3.0
DEFAULT_BASELINE_MIN_EPOCHS = 10

#: epochStatus codes, in the order they are tested (the first that applies is the row's)
EPOCH_STATUS: dict[int, str] = {
    0: "good",
    1: "off the detector (pixelFlags_offimage)",
    2: "invalid PSF: the model cannot be evaluated there (invalidPsfFlag)",
    3: "calibration missing (localPhotoCalib not finite): no nJy flux",
    4: "NaN pixel in the PSF fit region (psfFlux NaN, psfFlux_flag)",
    5: "PSF fit failed otherwise: stamp off the edge, no good pixel (psfFlux_flag)",
    6: "saturated pixel in the footprint (pixelFlags_saturated)",
    7: "cosmic ray in the footprint (pixelFlags_cr)",
    8: "bad pixel in the footprint (pixelFlags_bad)",
    9: "no-data pixel in the footprint (pixelFlags_nodata)",
    10: "edge pixel in the footprint (pixelFlags_edge)",
}
_PIXEL_CODES = ((6, "pixelFlags_saturated"), (7, "pixelFlags_cr"), (8, "pixelFlags_bad"), (9, "pixelFlags_nodata"),
                (10, "pixelFlags_edge"))


def epoch_status(frame: pd.DataFrame) -> np.ndarray:
    """(N,) int16 :data:`EPOCH_STATUS` codes of light-curve rows (a catalog as a DataFrame)."""
    n = len(frame)

    def flag(column: str) -> np.ndarray:
        return frame[column].fillna(False).to_numpy(bool) if column in frame else np.zeros(n, bool)

    flux = frame["psfFlux_instFlux"].to_numpy(np.float64) if "psfFlux_instFlux" in frame else np.full(n, np.nan)
    calibration = frame["localPhotoCalib"].to_numpy(np.float64) if "localPhotoCalib" in frame else np.full(n, np.nan)
    fit_failed = flag("psfFlux_flag")
    nan_in_fit = fit_failed & ~np.isfinite(flux) & ~flag("psfFlux_flag_edge") & ~flag("psfFlux_flag_noGoodPixels")
    tests = [(1, flag("pixelFlags_offimage")), (2, flag("invalidPsfFlag")), (3, ~np.isfinite(calibration)), (4, nan_in_fit),
             (5, fit_failed), *((code, flag(column)) for code, column in _PIXEL_CODES)]
    status = np.zeros(n, np.int16)  # not int8: VOTable has no byte-sized integer
    for code, applies in reversed(tests):  # the first test that applies wins
        status[applies] = code
    return status


def magnitudes(flux: np.ndarray, error: np.ndarray, prefix: str, snr_limit: float) -> dict[str, pa.Array]:
    """``<prefix>Mag``, ``<prefix>MagErr``, ``<prefix>MagLim5Sigma`` and the upper-limit flag
    of fluxes in nJy (see the module docstring); magnitudes null where the flux is an upper
    limit or not finite."""
    flux, error = np.asarray(flux, np.float64), np.asarray(error, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        limit = flux / error < snr_limit
        measured = np.isfinite(flux) & np.isfinite(error) & ~limit & (flux > 0)
        mag = AB_MAG_OF_ONE_NJY - 2.5 * np.log10(np.where(measured, flux, 1.0))
        mag_err = 2.5 / math.log(10.0) * error / np.where(measured, flux, 1.0)
        lim = AB_MAG_OF_ONE_NJY - 2.5 * np.log10(5.0 * error)
    upper = "isUpperLimit" if prefix == "psf" else f"{prefix}IsUpperLimit"
    return {
        f"{prefix}Mag": pa.array(mag.astype(np.float32), mask=~measured),
        f"{prefix}MagErr": pa.array(mag_err.astype(np.float32), mask=~measured),
        f"{prefix}MagLim5Sigma": pa.array(lim.astype(np.float32), mask=~np.isfinite(lim)),
        upper: pa.array(limit & np.isfinite(error), mask=~(np.isfinite(flux) & np.isfinite(error))),
    }


def with_epoch_columns(table: pa.Table, snr_limit: float = DEFAULT_SNR_LIMIT) -> pa.Table:
    """``table`` (light-curve rows) with its magnitudes, limits and ``epochStatus`` (see the
    module docstring); columns of those names already there are replaced."""
    frame = table.to_pandas()
    added = {**magnitudes(_column(frame, "psfFlux"), _column(frame, "psfFluxErr"), "psf", snr_limit),
             **magnitudes(_column(frame, "scienceFlux"), _column(frame, "scienceFluxErr"), "science", snr_limit),
             "epochStatus": pa.array(epoch_status(frame))}
    return _append(table.drop_columns([c for c in added if c in table.column_names]), added)


def _column(frame: pd.DataFrame, name: str) -> np.ndarray:
    return frame[name].to_numpy(np.float64, na_value=np.nan) if name in frame else np.full(len(frame), np.nan)


def _append(table: pa.Table, columns: dict[str, pa.Array | np.ndarray]) -> pa.Table:
    """``table`` with ``columns`` after its own, each with its unit."""
    extra = table_with_units(columns)
    for field, column in zip(extra.schema, extra.columns):
        table = table.append_column(field, column)
    return table


@dataclass(frozen=True)
class BaselineWindow:
    """Where the baseline is: good epochs with ``mjd_min <= midpointMjdTai <= mjd_max``
    (TAI; ``mjd_min`` None: from the first), at least ``min_epochs`` of them."""

    mjd_max: float
    mjd_min: float | None = None
    min_epochs: int = DEFAULT_BASELINE_MIN_EPOCHS


def correct_baseline(table: pa.Table, window: BaselineWindow) -> tuple[pa.Table, list[dict]]:
    """Subtract each object's and band's baseline (see the module docstring).

    ``table`` must have its epoch columns (:func:`with_epoch_columns`). Returns the table
    with ``psfFluxCorrected`` and ``psfFluxErrRescaled`` (nJy; null where the object has no
    baseline in that band) and one summary per object and band: ``diaObjectId``, ``band``,
    ``epochs`` (good epochs in the window), and ``baseline``, ``baselineErr`` (nJy), ``chi2``
    (reduced, about the baseline), ``errorScale``, or a ``note`` saying why there is none.
    """
    frame = table.select(["diaObjectId", "band", "midpointMjdTai", "psfFlux", "psfFluxErr", "epochStatus"]).to_pandas()
    flux, error = _column(frame, "psfFlux"), _column(frame, "psfFluxErr")
    mjd = frame["midpointMjdTai"].to_numpy(np.float64, na_value=np.nan)
    inside = (mjd <= window.mjd_max) & (mjd >= (window.mjd_min if window.mjd_min is not None else -np.inf))
    usable = inside & (frame["epochStatus"].to_numpy() == 0) & np.isfinite(flux) & np.isfinite(error) & (error > 0)
    corrected, rescaled = np.full(len(frame), np.nan), np.full(len(frame), np.nan)
    summaries = []
    for (object_id, band), rows in frame.groupby(["diaObjectId", "band"], sort=True, dropna=False).indices.items():
        good = rows[usable[rows]]
        summary = {"diaObjectId": int(object_id), "band": None if pd.isna(band) else str(band), "epochs": int(good.size)}
        if good.size < window.min_epochs:
            summaries.append({**summary, "note": f"no baseline: {good.size} good epochs in the window, fewer than {window.min_epochs}"})
            continue
        level = float(np.median(flux[good]))
        chi2 = float(np.sum(((flux[good] - level) / error[good]) ** 2) / (good.size - 1))
        scale = math.sqrt(chi2) if chi2 > 1 else 1.0
        level_err = math.sqrt(math.pi / 2) / math.sqrt(float(np.sum((error[good] * scale) ** -2)))  # the median's, for Gaussian scatter
        corrected[rows] = flux[rows] - level
        rescaled[rows] = error[rows] * scale
        summaries.append({**summary, "baseline": level, "baselineErr": level_err, "chi2": chi2, "errorScale": scale})
    columns = {name: pa.array(values.astype(np.float32), mask=~np.isfinite(values))
               for name, values in (("psfFluxCorrected", corrected), ("psfFluxErrRescaled", rescaled))}
    return _append(table.drop_columns([c for c in columns if c in table.column_names]), columns), summaries


def bin_lightcurves(table: pa.Table, *, days: float | None = None, night: bool = False,
                    snr_limit: float = DEFAULT_SNR_LIMIT) -> pa.Table:
    """Bins of ``days`` (bin ``floor(MJD / days)``) or nights (``night``: ``day_obs`` =
    ``floor(MJD - 0.5)``) per object and band, over the good epochs (``epochStatus`` 0) of
    ``table`` (see the module docstring). Columns: ``diaObjectId``, ``band``, ``bin`` (the
    bin number, or the night's MJD), ``nEpochs``, ``midpointMjdTai`` (mean), ``mjdMin``,
    ``mjdMax``, ``psfFlux(Err)``, ``scienceFlux(Err)`` and, where the baseline was
    subtracted, ``psfFluxCorrected`` with ``psfFluxErrRescaled``; then magnitudes and limits
    of the binned fluxes."""
    if (days is None) == (not night):
        raise ValueError("bin by days or by night, one of the two")
    if days is not None and not (math.isfinite(days) and days > 0):
        raise ValueError(f"bin days must be a positive number, not {days}")
    frame = table.to_pandas()
    frame = frame[frame["epochStatus"] == 0] if len(frame) else frame
    mjd = frame["midpointMjdTai"].to_numpy(np.float64)
    frame = frame.assign(bin=np.floor(mjd - 0.5) if night else np.floor(mjd / days))
    pairs = [("psfFlux", "psfFluxErr"), ("scienceFlux", "scienceFluxErr")]
    if "psfFluxCorrected" in frame:
        pairs.append(("psfFluxCorrected", "psfFluxErrRescaled"))
    out: dict[str, list] = {name: [] for name in ("diaObjectId", "band", "bin", "nEpochs", "midpointMjdTai", "mjdMin", "mjdMax")}
    for value, error in pairs:
        out[value], out[error] = [], []
    for (object_id, band, number), rows in frame.groupby(["diaObjectId", "band", "bin"], sort=True, dropna=False).indices.items():
        times = mjd[rows]
        out["diaObjectId"].append(int(object_id))
        out["band"].append(None if pd.isna(band) else str(band))
        out["bin"].append(float(number))
        out["nEpochs"].append(len(rows))
        out["midpointMjdTai"].append(float(times.mean()))
        out["mjdMin"].append(float(times.min()))
        out["mjdMax"].append(float(times.max()))
        for value, error in pairs:
            mean, mean_err = _weighted_mean(_column(frame, value)[rows], _column(frame, error)[rows])
            out[value].append(mean)
            out[error].append(mean_err)
    columns: dict[str, pa.Array | np.ndarray] = {
        "diaObjectId": np.asarray(out["diaObjectId"], np.int64), "band": pa.array(out["band"], pa.string()),
        "bin": np.asarray(out["bin"], np.float64), "nEpochs": np.asarray(out["nEpochs"], np.int32),
        "midpointMjdTai": np.asarray(out["midpointMjdTai"], np.float64), "mjdMin": np.asarray(out["mjdMin"], np.float64),
        "mjdMax": np.asarray(out["mjdMax"], np.float64)}
    for value, error in pairs:
        for name in (value, error):
            values = np.asarray(out[name], np.float64)
            columns[name] = pa.array(values.astype(np.float32), mask=~np.isfinite(values))
    columns.update(magnitudes(np.asarray(out["psfFlux"], np.float64), np.asarray(out["psfFluxErr"], np.float64), "psf", snr_limit))
    columns.update(magnitudes(np.asarray(out["scienceFlux"], np.float64), np.asarray(out["scienceFluxErr"], np.float64), "science",
                              snr_limit))
    return table_with_units(columns)


def _weighted_mean(values: np.ndarray, errors: np.ndarray) -> tuple[float, float]:
    """Inverse-variance weighted mean of the finite values with positive errors, and its
    error ``1 / sqrt(sum w)``; NaN for none."""
    usable = np.isfinite(values) & np.isfinite(errors) & (errors > 0)
    if not usable.any():
        return math.nan, math.nan
    weights = errors[usable] ** -2.0
    return float(np.sum(weights * values[usable]) / np.sum(weights)), float(1.0 / math.sqrt(np.sum(weights)))




@dataclass(frozen=True)
class Products:
    """What to make of a light curve: ``snr_limit`` for upper limits, a baseline window (or
    None), and bins of ``bin_days`` or nights (``bin_night``); none: the epochs."""

    snr_limit: float = DEFAULT_SNR_LIMIT
    baseline: BaselineWindow | None = None
    bin_days: float | None = None
    bin_night: bool = False

    @property
    def binned(self) -> bool:
        return self.bin_days is not None or self.bin_night

    def to_json(self) -> dict:
        """As stored with a job (see :meth:`from_json`)."""
        return asdict(self)

    @classmethod
    def from_json(cls, stored: dict) -> Products:
        baseline = stored.get("baseline")
        return cls(**{**stored, "baseline": BaselineWindow(**baseline) if baseline else None})


def make_products(table: pa.Table, products: Products) -> tuple[pa.Table, dict]:
    """The light-curve table a caller gets: its epochs with their magnitudes, limits and
    status, baseline-corrected when asked, binned when asked; and what was done, for the
    provenance (``snr_limit``, ``epochStatus`` codes, ``baseline`` summaries, ``bin``)."""
    table = with_epoch_columns(table, products.snr_limit)
    done: dict = {"snr_limit": products.snr_limit, "epochStatus": {str(code): text for code, text in EPOCH_STATUS.items()}}
    if products.baseline is not None:
        table, done["baseline"] = correct_baseline(table, products.baseline)
    if products.binned:
        table = bin_lightcurves(table, days=products.bin_days, night=products.bin_night, snr_limit=products.snr_limit)
        done["bin"] = "night (day_obs = floor(MJD - 0.5))" if products.bin_night else f"{products.bin_days:g} d"
    return table, done
