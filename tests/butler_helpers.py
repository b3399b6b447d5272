"""Real Butler repositories for the tests (``lsst-daf-butler``, no LSST stack): files under
names no path template could guess, datastore records that name obs_base's formatter as a
Rubin-written repository's do, and a registry with regions and timespans."""

from pathlib import Path
import shutil
import sqlite3
import uuid

import astropy.time
from lsst.daf.butler import Butler, DatasetRef, FileDataset, Timespan
from lsst.daf.butler.tests import addDataIdValue, addDatasetType
import lsst.sphgeom as sphgeom

from forcedphot.photometry.exposure import open_exposure

RUN = "LSSTCam/runs/forced-test"
INSTRUMENT = "LSSTCam"
OBS_BASE_FORMATTER = "lsst.obs.base.formatters.fitsExposure.FitsExposureFormatter"


def make_butler_repository(root: Path, exposures: list[tuple[int, int, Path, Path | None]], *, registry_url: str | None = None) -> Path:
    """A Butler repository at ``root`` holding, for each ``(visit, detector, science file,
    difference file or None)``, a ``visit_image`` (and ``difference_image``) copied under an
    unguessable name, with the visit's timespan, band and each detector's region."""
    config = None
    if registry_url:
        config = {"registry": {"db": registry_url, "namespace": f"butler_{uuid.uuid4().hex[:8]}"}}
    Butler.makeRepo(str(root), config=config)
    butler = Butler.from_config(str(root), writeable=True, run=RUN)
    addDataIdValue(butler, "instrument", INSTRUMENT)
    addDataIdValue(butler, "physical_filter", "r_57", band="r")
    addDataIdValue(butler, "day_obs", 20260101)
    science_type = addDatasetType(butler, "visit_image", {"instrument", "visit", "detector"}, "ExposureF")
    difference_type = addDatasetType(butler, "difference_image", {"instrument", "visit", "detector"}, "ExposureF")
    store = root / "datastore-files"
    store.mkdir(exist_ok=True)
    datasets = []
    for visit, detector, science, difference in exposures:
        with open_exposure(science) as exposure:
            corners = exposure.wcs.calc_footprint()
            midpoint, half = exposure.midpoint_mjd_tai, 15.0 / 86400
        region = sphgeom.ConvexPolygon([sphgeom.UnitVector3d(sphgeom.LonLat.fromDegrees(float(r), float(d))) for r, d in corners])
        if not any(record.id == detector for record in butler.query_dimension_records("detector", explain=False)):
            addDataIdValue(butler, "detector", detector)
        timespan = Timespan(astropy.time.Time(midpoint - half, format="mjd", scale="tai"), astropy.time.Time(midpoint + half, format="mjd", scale="tai"))
        if not any(record.id == visit for record in butler.query_dimension_records("visit", explain=False)):
            butler.registry.insertDimensionData("visit", {"instrument": INSTRUMENT, "id": visit, "physical_filter": "r_57", "day_obs": 20260101,
                                                          "name": str(visit), "timespan": timespan, "region": region, "exposure_time": 30.0})
        butler.registry.insertDimensionData("visit_detector_region", {"instrument": INSTRUMENT, "visit": visit, "detector": detector, "region": region})
        data_id = butler.registry.expandDataId(instrument=INSTRUMENT, visit=visit, detector=detector)
        for dataset_type, path in ((science_type, science), (difference_type, difference)):
            if path is None:
                continue
            copy = store / f"{uuid.uuid4().hex}_{dataset_type.name[:3]}.fits"
            shutil.copy(path, copy)
            datasets.append(FileDataset(path=str(copy), refs=[DatasetRef(dataset_type, data_id, run=RUN)],
                                        formatter="lsst.daf.butler.formatters.file.FileFormatter"))
    butler.ingest(*datasets, transfer="direct")
    if registry_url is None:  # the records a Rubin-written repository has: obs_base's formatter, which is not installed here
        with sqlite3.connect(root / "gen3.sqlite3") as db:
            db.execute("UPDATE file_datastore_records SET formatter = ?", (OBS_BASE_FORMATTER,))
    return root
