"""Register exposure files in a Butler repository, as the Rubin pipelines' outputs are.

For the embedded demo (its survey served through a real Butler, so that the first command
a newcomer runs takes the code paths of a Rubin deployment) and for tests. Each (visit,
detector) gets its ``visit`` record (band, TAI timespan from the file's midpoint and
exposure time), its ``visit_detector_region`` (the footprint of the file's WCS) and its
datasets, ``visit_image`` and ``difference_image``, ingested in place (``direct``) with
daf_butler's plain file formatter: the files are read by this package, never by a Butler
formatter. No instrument package is needed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import astropy.time
from lsst.daf.butler import Butler, DatasetRef, FileDataset, Timespan
from lsst.daf.butler.tests import addDataIdValue, addDatasetType
import lsst.sphgeom as sphgeom

from forcedphot.photometry.exposure import open_exposure

INSTRUMENT = "LSSTCam"
RUN = "LSSTCam/runs/forcedphot-demo"
DAY_OBS = 20261124
SCIENCE_TYPE, DIFFERENCE_TYPE = "visit_image", "difference_image"
FILE_FORMATTER = "lsst.daf.butler.formatters.file.FileFormatter"


@dataclass(frozen=True)
class Registered:
    """One (visit, detector) to register: its science file and its difference file, if any."""

    visit: int
    detector: int
    science: Path
    difference: Path | None = None


def register_exposures(root: Path, exposures: list[Registered], *, run: str = RUN, registry: dict | None = None) -> Path:
    """Make a Butler repository at ``root`` (``registry``: a registry configuration, e.g.
    ``{"db": "postgresql://...", "namespace": ...}``; default SQLite in ``root``) holding
    ``exposures`` in the collection ``run``; returns ``root``."""
    Butler.makeRepo(str(root), config={"registry": registry} if registry else None)
    butler = Butler.from_config(str(root), writeable=True, run=run)
    addDataIdValue(butler, "instrument", INSTRUMENT)
    addDataIdValue(butler, "day_obs", DAY_OBS)
    types = {kind: addDatasetType(butler, kind, {"instrument", "visit", "detector"}, "ExposureF") for kind in (SCIENCE_TYPE, DIFFERENCE_TYPE)}
    filters, detectors, visits, datasets = set(), set(), set(), []
    for item in exposures:
        with open_exposure(item.science, memory_map=False) as exposure:
            corners, band = exposure.wcs.calc_footprint(), exposure.band or "unknown"
            midpoint, exposure_time = exposure.midpoint_mjd_tai, float(exposure.header.get("EXPTIME", 0.0) or 0.0)
        region = sphgeom.ConvexPolygon([sphgeom.UnitVector3d(sphgeom.LonLat.fromDegrees(float(r), float(d))) for r, d in corners])
        physical_filter = f"{band}_demo"
        if physical_filter not in filters:
            addDataIdValue(butler, "physical_filter", physical_filter, band=band)
            filters.add(physical_filter)
        if item.detector not in detectors:
            addDataIdValue(butler, "detector", item.detector)
            detectors.add(item.detector)
        if item.visit not in visits:
            record = {"instrument": INSTRUMENT, "id": item.visit, "physical_filter": physical_filter, "day_obs": DAY_OBS,
                      "name": str(item.visit), "region": region, "exposure_time": exposure_time}
            if midpoint is not None:
                half = exposure_time / 2 / 86400
                record["timespan"] = Timespan(astropy.time.Time(midpoint - half, format="mjd", scale="tai"),
                                              astropy.time.Time(midpoint + half, format="mjd", scale="tai"))
            butler.registry.insertDimensionData("visit", record)
            visits.add(item.visit)
        butler.registry.insertDimensionData("visit_detector_region",
                                            {"instrument": INSTRUMENT, "visit": item.visit, "detector": item.detector, "region": region})
        data_id = butler.registry.expandDataId(instrument=INSTRUMENT, visit=item.visit, detector=item.detector)
        for kind, path in ((SCIENCE_TYPE, item.science), (DIFFERENCE_TYPE, item.difference)):
            if path is not None:
                datasets.append(FileDataset(path=str(Path(path).resolve()), refs=[DatasetRef(types[kind], data_id, run=run)],
                                            formatter=FILE_FORMATTER))
    butler.ingest(*datasets, transfer="direct")
    return root
