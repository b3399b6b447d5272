"""The exposure cache on its own: LRU in bytes, single flight, replaced files."""

import os
import threading

import numpy as np
import pytest
from scenes import sip_wcs, write_exposure

from forcedphot.photometry.exposure import ExposureError, open_exposure
from forcedphot.serving import exposure_cache
from forcedphot.serving.exposure_cache import BYTES_PER_PIXEL, ExposureCache

SIDE = 64
ENTRY_BYTES = SIDE * SIDE * BYTES_PER_PIXEL


@pytest.fixture
def files(tmp_path):
    rng = np.random.default_rng(3)
    paths = []
    for i in range(3):
        image = rng.normal(0, 1, (SIDE, SIDE))
        paths.append(write_exposure(tmp_path / f"e{i}.fits", image, np.ones_like(image), wcs=sip_wcs(SIDE, SIDE), visit=i))
    return paths


@pytest.fixture
def opened(monkeypatch):
    """Counts open_exposure calls made by the cache."""
    calls = []

    def counting(path, **options):
        calls.append(str(path))
        return open_exposure(path, **options)

    monkeypatch.setattr(exposure_cache, "open_exposure", counting)
    return calls


def test_lease_gives_the_file_pixels_and_metadata(files):
    cache = ExposureCache(10 * ENTRY_BYTES)
    with cache.lease(files[0]) as (cached, outcome), open_exposure(files[0]) as direct:
        assert outcome == "miss"
        for got, want in zip(cached.read_rows(5, 20), direct.read_rows(5, 20)):
            np.testing.assert_array_equal(got, want)
        assert (cached.width, cached.height, cached.visit, cached.calibration_mean) == (direct.width, direct.height, 0, direct.calibration_mean)
        assert cached.wcs is not direct.wcs and np.allclose(cached.wcs.all_pix2world(3.0, 4.0, 0), direct.wcs.all_pix2world(3.0, 4.0, 0))
        with pytest.raises(ValueError):
            cached.read_rows(0, 1)[0][0, 0] = 1.0  # cached planes are read-only
        with pytest.raises(ExposureError, match="outside"):
            cached.read_rows(0, SIDE + 1)
    assert cache.nbytes == ENTRY_BYTES


def test_lru_eviction_is_bounded_in_bytes(files, opened):
    cache = ExposureCache(2 * ENTRY_BYTES)
    outcomes = []
    for path in (files[0], files[1], files[0], files[2], files[1], files[0]):
        with cache.lease(path) as (_, outcome):
            outcomes.append(outcome)
            assert cache.nbytes <= 2 * ENTRY_BYTES
    # e0 miss, e1 miss, e0 hit, e2 miss evicts e1 (least recent), e1 miss evicts e0, e0 miss
    assert outcomes == ["miss", "miss", "hit", "miss", "miss", "miss"]
    assert len(opened) == 5


def test_concurrent_leases_open_the_file_once(files, opened, monkeypatch):
    cache = ExposureCache(10 * ENTRY_BYTES)
    gate = threading.Barrier(8)
    slow_load = exposure_cache.InMemoryExposure.load

    def load(exposure):
        threading.Event().wait(0.2)  # hold the load so every thread arrives meanwhile
        return slow_load(exposure)

    monkeypatch.setattr(exposure_cache.InMemoryExposure, "load", staticmethod(load))
    outcomes = []

    def worker():
        gate.wait()
        with cache.lease(files[0]) as (exposure, outcome):
            outcomes.append((outcome, float(exposure.read_rows(0, 1)[0][0, 0])))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(opened) == 1
    assert sorted(o for o, _ in outcomes) == ["hit"] * 7 + ["miss"]
    assert len({v for _, v in outcomes}) == 1


def test_replaced_file_is_read_again_and_too_large_bypasses(files, opened, tmp_path):
    cache = ExposureCache(10 * ENTRY_BYTES)
    with cache.lease(files[0]):
        pass
    os.replace(files[1], files[0])
    with cache.lease(files[0]) as (exposure, outcome):
        assert outcome == "miss" and exposure.visit == 1
    small = ExposureCache(ENTRY_BYTES - 1)
    with small.lease(files[2]) as (exposure, outcome):
        assert outcome == "bypass" and exposure.height == SIDE
    assert small.nbytes == 0
    with pytest.raises(ExposureError, match="cannot read"):
        with cache.lease(tmp_path / "missing.fits"):
            pass


def test_failed_load_is_not_cached_and_reaches_every_waiter(tmp_path, opened):
    bad = tmp_path / "bad.fits"
    bad.write_bytes(b"not fits at all" * 100)
    cache = ExposureCache(10 * ENTRY_BYTES)
    for _ in range(2):
        with pytest.raises(ExposureError, match="bad.fits"):
            with cache.lease(bad):
                pass
    assert len(opened) == 2 and cache.nbytes == 0


def test_a_cached_lsst_exposure_keeps_its_archive_psf_after_its_file_is_closed():
    """The cache closes the file after loading: the archive (here a PcaPsf) is loaded too,
    so a hit still finds the exposure's own PSF."""
    from pathlib import Path

    from forcedphot.photometry.psf_choice import choose_psf

    path = Path(__file__).resolve().parents[1] / "data" / "lsst" / "meas_modelfit_calexp.fits"
    cache = ExposureCache(10**9)
    described = []
    for expected in ("miss", "hit"):
        with cache.lease(path) as (exposure, outcome):
            assert outcome == expected
            described.append(choose_psf(exposure, "calexp").describe())
    assert described[0] == described[1] and described[0].startswith("LSST PcaPsf")
