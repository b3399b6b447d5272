"""Shared pieces of the service tests: a small exposure repository and app construction."""

from contextlib import ExitStack
import io
from pathlib import Path
import time

import numpy as np
import pandas as pd
from scenes import render_stars, sip_wcs, write_exposure

from forcedphot.api.settings import Settings
from forcedphot.photometry.config import MeasurementConfig
from forcedphot.photometry.exposure import open_exposure
from forcedphot.photometry.measure import measure
from forcedphot.photometry.objects import validate_objects
from forcedphot.photometry.psf_models import load_psf

SIDE = 160
FWHM = 3.5
VISIT, DETECTOR = 1234, 42
API_KEY = "test-key-0123456789abcdef"
N_ON = 30  # objects placed on the detector; one more is placed off it


def make_repository(root: Path) -> dict:
    """``<root>/<visit>/<detector>/{calexp,difference}.fits`` and ``tables/objects.{parquet,csv}``."""
    rng = np.random.default_rng(11)
    x, y = rng.uniform(15, SIDE - 15, N_ON), rng.uniform(15, SIDE - 15, N_ON)
    flux = rng.uniform(2e3, 2e4, N_ON)
    sigma = FWHM / 2.3548
    wcs = sip_wcs(SIDE, SIDE)
    image = render_stars((SIDE, SIDE), x, y, flux, sigma) + rng.normal(0, 3, (SIDE, SIDE))
    change = render_stars((SIDE, SIDE), x, y, 0.1 * flux, sigma) + rng.normal(0, 3, (SIDE, SIDE))
    folder = root / str(VISIT) / str(DETECTOR)
    folder.mkdir(parents=True)
    variance = np.full(image.shape, 9.0)
    write_exposure(folder / "calexp.fits", image, variance, wcs=wcs, visit=VISIT, detector=DETECTOR)
    write_exposure(folder / "difference.fits", change, 2 * variance, wcs=wcs, visit=VISIT, detector=DETECTOR)
    second = root / str(VISIT + 1) / str(DETECTOR)
    second.mkdir(parents=True)
    image2 = render_stars((SIDE, SIDE), x, y, flux, sigma) + rng.normal(0, 3, (SIDE, SIDE))
    write_exposure(second / "calexp.fits", image2, variance, wcs=wcs, visit=VISIT + 1, detector=DETECTOR)
    ra, dec = wcs.all_pix2world(np.append(x, 900.0), np.append(y, 900.0), 0)
    objects = pd.DataFrame({"diaObjectId": np.arange(N_ON + 1) + 100, "ra": ra, "dec": dec})
    (root / "tables").mkdir()
    objects.to_parquet(root / "tables" / "objects.parquet", index=False)
    objects.to_csv(root / "tables" / "objects.csv", index=False)
    return {"root": root, "calexp": folder / "calexp.fits", "difference": folder / "difference.fits",
            "calexp2": second / "calexp.fits", "objects": objects}


def data_id(kind: str = "calexp", visit: int = VISIT) -> dict:
    return {"visit": visit, "detector": DETECTOR, "datasetType": kind}


def settings_for(root: Path | None, data_dir: Path, **overrides) -> Settings:
    """Test settings; requests are measured in-process (threads) unless ``measure_processes``
    is given. ``root`` None: no folder of files (a Butler repository in ``overrides``)."""
    overrides.setdefault("measure_processes", 0)
    overrides.setdefault("api_keys", [API_KEY])
    return Settings(repository_roots=[root] if root is not None else [], data_dir=data_dir, backend="numpy", **overrides)


AUTH = {"Authorization": f"Bearer {API_KEY}"}


def engine_catalog(calexp: Path, objects: pd.DataFrame, difference: Path | None = None, **config) -> pd.DataFrame:
    """The engine's own catalog for the same inputs (the peer of every service answer)."""
    with ExitStack() as stack:
        science = stack.enter_context(open_exposure(calexp))
        diff = stack.enter_context(open_exposure(difference)) if difference else None
        result = measure(science, validate_objects(objects), load_psf(fwhm_pixels=FWHM),
                         MeasurementConfig(backend="numpy", **config), difference=diff)
    return result.catalog


def assert_same_catalog(got: pd.DataFrame, expected: pd.DataFrame) -> None:
    """Equal row for row in every column except the processing time."""
    got = got.sort_values("diaObjectId").reset_index(drop=True)
    expected = expected.sort_values("diaObjectId").reset_index(drop=True)
    assert list(got.columns) == list(expected.columns)
    columns = [c for c in expected.columns if c != "timeProcessedMjdTai"]
    pd.testing.assert_frame_equal(got[columns], expected[columns], check_dtype=False, rtol=0, atol=0)


def read_parquet(content: bytes) -> pd.DataFrame:
    return pd.read_parquet(io.BytesIO(content))


def wait_until(predicate, timeout: float = 20.0, interval: float = 0.05):
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s")
