"""The exposure index: build, incremental refresh, unreadable files, and coverage queries
checked against a brute-force WCS test (near detector edges, across RA = 0, near a pole)."""

from pathlib import Path

from astropy.io import fits
import numpy as np
import pytest
from scenes import sip_wcs, write_exposure

from forcedphot.serving.index import ExposureIndex

TEMPLATE = "{visit}/{detector}/{datasetType}.fits"
SIDE = 200
SCALE = 2.0  # arcsec per pixel: a 400 arcsec detector


def write(root: Path, visit: int, ra: float, dec: float, detector: int = 1, difference: bool = True) -> Path:
    folder = root / str(visit) / str(detector)
    folder.mkdir(parents=True, exist_ok=True)
    image = np.zeros((SIDE, SIDE))
    wcs = sip_wcs(SIDE, SIDE, ra=ra, dec=dec, scale_arcsec=SCALE)
    write_exposure(folder / "calexp.fits", image, image + 1, wcs=wcs, visit=visit, detector=detector)
    if difference:
        write_exposure(folder / "difference.fits", image, image + 1, wcs=wcs, visit=visit, detector=detector)
    return folder / "calexp.fits"


def test_build_refresh_and_unreadable_files(tmp_path):
    root = tmp_path / "repo"
    write(root, 1, 10.0, 5.0)
    write(root, 2, 10.01, 5.0, difference=False)
    (root / "3" / "1").mkdir(parents=True)
    (root / "3" / "1" / "calexp.fits").write_bytes(b"SIMPLE  =                    T" + b" " * 50)
    (root / "notes.txt").write_text("not an exposure")
    index = ExposureIndex(tmp_path / "index.sqlite")

    first = index.refresh([root], TEMPLATE)
    assert (first.added, first.updated, first.removed) == (2, 0, 0)
    assert list(first.unreadable) == ["3/1/calexp.fits"] and "truncated" in first.unreadable["3/1/calexp.fits"]
    assert str(root) not in first.unreadable["3/1/calexp.fits"]
    assert index.count() == 2
    covering = index.covering(10.0, 5.0)
    assert [e.visit for e in covering] == [1, 2]
    assert covering[0].difference_path and covering[1].difference_path is None
    assert covering[0].band == "r" and covering[0].midpoint_mjd_tai == pytest.approx(61000.25) and covering[0].exposure_time == 30.0

    again = index.refresh([root], TEMPLATE)
    assert (again.added, again.updated, again.removed, again.unchanged) == (0, 0, 0, 2)
    assert list(again.unreadable) == ["3/1/calexp.fits"]  # still listed, not read again

    write(root, 4, 40.0, -30.0)  # new
    with fits.open(root / "1" / "1" / "calexp.fits", mode="update") as hdul:  # changed: now band g
        hdul[0].header["BAND"] = "g"
        hdul[0].header["LSST BUTLER DATAID BAND"] = "g"
    (root / "2" / "1" / "calexp.fits").unlink()  # gone
    third = index.refresh([root], TEMPLATE)
    assert (third.added, third.updated, third.removed, third.unchanged) == (1, 1, 1, 0)
    assert [e.band for e in index.covering(10.0, 5.0)] == ["g"]
    assert [e.visit for e in index.covering(40.0, -30.0, bands=["r"])] == [4]
    assert index.covering(40.0, -30.0, bands=["g"]) == []
    assert index.covering(40.0, -30.0, mjd_min=61000.3) == [] and len(index.covering(40.0, -30.0, mjd_max=61000.3)) == 1


def _brute_force(path: Path, ra: np.ndarray, dec: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inside the detector's Box2D by the WCS itself, and the distance (px) to its border."""
    from forcedphot.photometry.exposure import open_exposure

    with open_exposure(path) as exposure:
        x, y = exposure.wcs.all_world2pix(ra, dec, 0, quiet=True)
    inside = (x >= -0.5) & (x < SIDE - 0.5) & (y >= -0.5) & (y < SIDE - 0.5)
    border = np.minimum.reduce([np.abs(x + 0.5), np.abs(x - SIDE + 0.5), np.abs(y + 0.5), np.abs(y - SIDE + 0.5)])
    return inside, border


@pytest.mark.parametrize("ra, dec", [(150.0, 2.0), (0.02, -10.0), (359.98, 45.0), (33.0, 89.93), (200.0, -89.95)])
def test_coverage_agrees_with_the_wcs(tmp_path, ra, dec):
    """Random positions around the detector and within 3 px of its border; the index and
    the WCS agree except within 0.1 px of the border (the footprint polygon's sampling)."""
    path = write(tmp_path / "repo", 7, ra, dec, difference=False)
    index = ExposureIndex(tmp_path / "index.sqlite")
    index.refresh([tmp_path / "repo"], TEMPLATE)
    rng = np.random.default_rng(4)
    from forcedphot.photometry.exposure import open_exposure

    with open_exposure(path) as exposure:
        n = 3000
        x = rng.uniform(-60, SIDE + 60, n)
        y = rng.uniform(-60, SIDE + 60, n)
        along = rng.uniform(-0.5, SIDE - 0.5, 1000)
        offset = rng.uniform(-3, 3, 1000)
        side = rng.integers(0, 4, 1000)
        edge_x = np.where(side == 0, -0.5 + offset, np.where(side == 1, SIDE - 0.5 + offset, along))
        edge_y = np.where(side == 2, -0.5 + offset, np.where(side == 3, SIDE - 0.5 + offset, along))
        pra, pdec = exposure.wcs.all_pix2world(np.concatenate([x, edge_x]), np.concatenate([y, edge_y]), 0)
    pra = np.mod(pra, 360.0)
    truth, border = _brute_force(path, pra, pdec)
    found = index.covering_many(pra, pdec)
    got = np.zeros(len(pra), bool)
    for _, rows in found:
        got[rows] = True
    disagree = got != truth
    assert truth.sum() > 1000 and (~truth).sum() > 1000
    assert np.all(border[disagree] < 0.1), f"{disagree.sum()} disagreements, up to {border[disagree].max():.2f} px from the border"


def test_radius_queries_find_neighbouring_exposures(tmp_path):
    root = tmp_path / "repo"
    write(root, 1, 100.0, 20.0, difference=False)
    index = ExposureIndex(tmp_path / "index.sqlite")
    index.refresh([root], TEMPLATE)
    outside = (100.0, 20.0 + 300 / 3600)  # 100 arcsec beyond the detector's half-width of 200 arcsec
    assert index.covering(*outside) == []
    assert index.covering(*outside, radius_deg=60 / 3600) == []
    assert [e.visit for e in index.covering(*outside, radius_deg=150 / 3600)] == [1]


def test_a_query_over_10k_exposures_takes_milliseconds(tmp_path):
    """A synthetic index (LSST-sized footprints all over the sky): the query must not scan.
    (``bench/lightcurves.py`` times 100k exposures.)"""
    import time

    rng = np.random.default_rng(9)
    index = ExposureIndex(tmp_path / "big.sqlite")
    n = 10_000
    ra, dec = rng.uniform(0, 360, n), np.degrees(np.arcsin(rng.uniform(-1, 1, n)))
    half = 0.1  # deg
    records = []
    for i in range(n):
        c = np.cos(np.radians(dec[i])) or 1e-6
        corners = [(ra[i] + dx * half / c, dec[i] + dy * half) for dx, dy in ((-1, -1), (1, -1), (1, 1), (-1, 1))]
        corners = [(r % 360.0, float(np.clip(d, -89.999, 89.999))) for r, d in corners]
        records.append({"visit": i, "detector": 0, "band": "r", "midpoint_mjd_tai": 61000.0 + i * 1e-3, "exposure_time": 30.0,
                        "footprint": corners, "psf_fwhm_px": 3.5, "calibration": 1.0, "science_path": f"/nowhere/{i}",
                        "difference_path": None})
    index.add(records)
    assert index.count() == n
    seconds = []
    for i in rng.integers(0, n, 50):
        start = time.perf_counter()
        found = index.covering(ra[i], dec[i])
        seconds.append(time.perf_counter() - start)
        assert i in [e.visit for e in found]
    assert np.median(seconds) < 0.02, f"median {np.median(seconds) * 1e3:.1f} ms"


def test_files_reached_through_links_out_of_the_repository_are_not_indexed(tmp_path):
    """The rule references follow: a symbolic link (to a file or a folder) that leads out of
    the root is refused, so nothing outside a repository becomes an epoch of its light curves."""
    root, elsewhere = tmp_path / "repo", tmp_path / "elsewhere"
    write(root, 1, 10.0, 5.0)
    outside = write(elsewhere, 2, 10.0, 5.0)
    (root / "2").mkdir()
    (root / "2" / "1").symlink_to(outside.parent, target_is_directory=True)  # a folder link
    (root / "3" / "1").mkdir(parents=True)
    (root / "3" / "1" / "calexp.fits").symlink_to(outside)  # a file link
    (root / "4" / "1").mkdir(parents=True)
    (root / "4" / "1" / "calexp.fits").symlink_to(root / "1" / "1" / "calexp.fits")  # inside: allowed
    report = ExposureIndex(tmp_path / "index.sqlite").refresh([root], TEMPLATE)
    assert report.added == 2  # visits 1 and 4
    assert sorted(report.unreadable) == ["2/1/calexp.fits", "2/1/difference.fits", "3/1/calexp.fits"]
    assert all("leads out of the repository" in reason for reason in report.unreadable.values())
