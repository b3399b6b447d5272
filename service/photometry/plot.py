"""Light-curve figures (matplotlib, no display needed): flux against time, per band."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the non-interactive backend)
import pandas as pd  # noqa: E402

BAND_COLOURS = {"u": "#56b4e9", "g": "#009e73", "r": "#d55e00", "i": "#cc79a7", "z": "#0072b2", "y": "#e69f00"}
FLAGS = ["psfFlux_flag", "pixelFlags_saturated", "pixelFlags_cr", "pixelFlags_bad"]


def flagged(catalog: pd.DataFrame) -> pd.Series:
    """Rows whose difference flux should not be trusted (PSF fit flagged, or a saturated,
    cosmic-ray or bad pixel in the 3-sigma footprint)."""
    marks = pd.Series(False, index=catalog.index)
    for column in FLAGS:
        if column in catalog:
            marks |= catalog[column].astype(bool)
    return marks


def points(group: pd.DataFrame, kind: str, magnitudes: bool) -> tuple[pd.DataFrame, pd.DataFrame]:
    """What a panel draws of one band's rows: ``(measured, limits)``, each with columns
    ``x`` (MJD), ``y`` and ``err``. ``kind`` "psf" (difference) or "science". Fluxes in nJy
    (the baseline-corrected difference flux with its rescaled error where a baseline was
    subtracted), or AB magnitudes (``magnitudes``), where upper limits are drawn apart at
    their 5-sigma limiting magnitude; a table without magnitudes has no limits."""
    x = group["midpointMjdTai"]
    if magnitudes:
        upper = group.get("isUpperLimit" if kind == "psf" else "scienceIsUpperLimit", pd.Series(False, index=group.index))
        upper = upper.fillna(False).astype(bool)
        measured = pd.DataFrame({"x": x, "y": group[f"{kind}Mag"], "err": group[f"{kind}MagErr"]})[~upper]
        limits = pd.DataFrame({"x": x, "y": group[f"{kind}MagLim5Sigma"], "err": 0.0})[upper]
        return measured, limits
    if kind == "psf" and "psfFluxCorrected" in group and group["psfFluxCorrected"].notna().any():
        value, error = group["psfFluxCorrected"], group["psfFluxErrRescaled"]
    else:
        value, error = group[f"{kind}Flux"], group[f"{kind}FluxErr"]
    return pd.DataFrame({"x": x, "y": value, "err": error}), pd.DataFrame({"x": [], "y": [], "err": []})


def plot_lightcurves(catalog: pd.DataFrame, path: str | Path, *, max_objects: int = 6, magnitudes: bool = False) -> Path:
    """Write a PNG of the light curves in ``catalog`` (a light-curve table): for each of
    the first ``max_objects`` objects, difference and science flux in nJy (or AB magnitudes,
    ``magnitudes``: upper limits as downward triangles at their 5-sigma limit, the axis
    reversed) against ``midpointMjdTai``, one colour per band, error bars, flagged points
    drawn hollow with a cross (see :func:`points`)."""
    ids = list(dict.fromkeys(catalog["diaObjectId"]))[:max_objects]
    fig, axes = plt.subplots(len(ids) or 1, 2, figsize=(11, 2.6 * max(1, len(ids))), squeeze=False, sharex=True)
    bad = flagged(catalog)
    unit = "AB mag" if magnitudes else "nJy"
    for row, object_id in enumerate(ids):
        rows = catalog["diaObjectId"] == object_id
        for col, (kind, label) in enumerate((("psf", f"difference [{unit}]"), ("science", f"science [{unit}]"))):
            ax = axes[row][col]
            for band, group in catalog[rows].groupby("band", dropna=False):
                colour = BAND_COLOURS.get(str(band), "0.3")
                measured, limits = points(group, kind, magnitudes)
                good, marked = measured[~bad[measured.index]], measured[bad[measured.index]]
                ax.errorbar(good["x"], good["y"], yerr=good["err"], fmt="o", ms=4, color=colour, label=str(band))
                if len(marked):
                    ax.errorbar(marked["x"], marked["y"], yerr=marked["err"], fmt="x", ms=6, color=colour, mfc="none", label=f"{band} flagged")
                if len(limits):
                    ax.plot(limits["x"], limits["y"], "v", ms=5, color=colour, mfc="none", label=f"{band} 5-sigma limit")
            if magnitudes:
                ax.invert_yaxis()
            else:
                ax.axhline(0.0, color="0.7", lw=0.8)
            ax.set_ylabel(label)
            ax.set_title(f"diaObjectId {object_id}", fontsize=9)
            ax.legend(fontsize=7, loc="best")
    for ax in axes[-1]:
        ax.set_xlabel("MJD (TAI)")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
