"""Light-curve planning: from DiaObjects and a time range to the epochs that cover them.

The exposure index finds, for every object, the exposures whose footprint holds it;
each becomes an epoch (its science and difference files, the rows of the objects it
covers). The plan is a :class:`~forcedphot.serving.executor.LightCurveTask`, measured by
:class:`~forcedphot.serving.executor.MeasureService` in this thread (CLI, jobs) or spread
over the measurement processes (requests).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from forcedphot.photometry.config import MeasurementConfig
from forcedphot.serving.executor import EpochInput, ExposureInput, LightCurveTask
from forcedphot.serving.index import DIFFERENCE, SCIENCE, ExposureIndex, IndexedExposure
from forcedphot.serving.repository import DataIdRef, describe


def exposure_inputs(exposure: IndexedExposure) -> tuple[ExposureInput, ExposureInput | None]:
    """The science and difference files of an indexed exposure, named by their data ids,
    with the index's summaries (a cold light curve opens them without reading their headers)."""

    def named(path: str, kind: str, summary: str | None) -> ExposureInput:
        return ExposureInput(Path(path), describe(DataIdRef(visit=exposure.visit, detector=exposure.detector, datasetType=kind)),
                             summary=summary)

    science = named(exposure.science_path, SCIENCE, exposure.science_summary)
    return science, named(exposure.difference_path, DIFFERENCE, exposure.difference_summary) if exposure.difference_path else None


def plan_lightcurves(index: ExposureIndex, objects: pd.DataFrame, config: MeasurementConfig, *, mjd_min: float | None = None,
                     mjd_max: float | None = None, bands: list[str] | None = None, psf_fwhm: float | None = None) -> LightCurveTask:
    """Every (exposure, objects it covers) for validated ``objects``, in time order.

    Objects with unusable coordinates (``coord_valid`` False) are covered by nothing.
    """
    usable = objects[objects["coord_valid"]]
    found = index.covering_many(usable["ra"].to_numpy(), usable["dec"].to_numpy(), bands=bands, mjd_min=mjd_min, mjd_max=mjd_max)
    positions = usable.index.to_numpy()
    epochs = [EpochInput(*exposure_inputs(exposure), rows=positions[rows]) for exposure, rows in found]
    return LightCurveTask(epochs=epochs, objects=objects, config=config, psf_fwhm=psf_fwhm)
