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


def plot_lightcurves(catalog: pd.DataFrame, path: str | Path, *, max_objects: int = 6) -> Path:
    """Write a PNG of the light curves in ``catalog`` (a light-curve table): for each of
    the first ``max_objects`` objects, difference flux (psfFlux) and science flux
    (scienceFlux) in nJy against ``midpointMjdTai``, one colour per band, error bars,
    flagged points drawn hollow with a cross."""
    ids = list(dict.fromkeys(catalog["diaObjectId"]))[:max_objects]
    fig, axes = plt.subplots(len(ids) or 1, 2, figsize=(11, 2.6 * max(1, len(ids))), squeeze=False, sharex=True)
    bad = flagged(catalog)
    for row, object_id in enumerate(ids):
        rows = catalog["diaObjectId"] == object_id
        for col, (flux, label) in enumerate((("psfFlux", "difference flux [nJy]"), ("scienceFlux", "science flux [nJy]"))):
            ax = axes[row][col]
            for band, group in catalog[rows].groupby("band", dropna=False):
                colour = BAND_COLOURS.get(str(band), "0.3")
                good = group[~bad[group.index]]
                ax.errorbar(good["midpointMjdTai"], good[flux], yerr=good[flux + "Err"], fmt="o", ms=4, color=colour, label=str(band))
                marked = group[bad[group.index]]
                if len(marked):
                    ax.errorbar(marked["midpointMjdTai"], marked[flux], yerr=marked[flux + "Err"], fmt="x", ms=6, color=colour,
                                mfc="none", label=f"{band} flagged")
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
