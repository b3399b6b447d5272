"""The engine on the stand-in device (array_api_strict's ``Device("device1")``): arrays there
refuse ``np.asarray`` and cannot mix with host arrays, as on CuPy. The whole engine runs on
it and equals NumPy; exposures are uploaded once and cutouts gathered on the device; per
kernel call it uploads windows and positions (not pixels), downloads once and reads no
scalar back from the device."""

from pathlib import Path
import threading

import numpy as np
import pandas as pd
import pytest

from forcedphot.cli import main
from forcedphot.photometry.backend import select_backend
from forcedphot.photometry.config import MeasurementConfig
from forcedphot.photometry.exposure import open_exposure
from forcedphot.photometry.measure import measure, stays_on_device
from forcedphot.photometry.objects import read_objects
from forcedphot.photometry.psf_models import GaussianPsf, ImagePsf, PsfexPsf
from forcedphot.photometry.runner import KernelRunner, Scope, run_directly
from forcedphot.serving.batching import KernelBatcher
from forcedphot.serving.exposure_cache import ExposureCache

DATA = Path(__file__).resolve().parents[1] / "data"
SIZE = 600  # demo detector side, px
PLANE_BYTES = SIZE * SIZE * 12  # image + variance (float32) + mask (int32)
UPLOADS_PER_FULL_CALL = 3  # packed windows and positions, PSF stamp centres, annulus pixel indices
UPLOADS_PER_PSF_CALL = 2  # the science image's PSF fit: windows and positions, PSF stamp centres


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("demo")
    assert main(["demo", str(folder), "--size", str(SIZE), "--objects", "500", "--seed", "5"]) == 0
    return folder


def _recorder(backend, calls: list, execute=run_directly):
    def record(runner: KernelRunner, inputs, scope: Scope):
        before = backend.counts.snapshot()
        results = execute(runner, inputs, scope)
        calls.append((scope, len(inputs), backend.counts.since(before)))
        return results

    return record


def _measure(demo: Path, backend, objects: pd.DataFrame, batch_bytes: int, execute) -> pd.DataFrame:
    """Difference mode; on a device both exposures' planes are put there first, as the
    service's exposure cache does."""
    config = MeasurementConfig(batch_bytes=batch_bytes)
    with open_exposure(demo / "calexp.fits") as science, open_exposure(demo / "difference.fits") as difference:
        if backend.name != "numpy":
            science.resident_planes(backend), difference.resident_planes(backend)
        return measure(science, objects, GaussianPsf(3.5), config, difference=difference, backend=backend, execute=execute).catalog


def assert_same_catalog(device: pd.DataFrame, host: pd.DataFrame) -> None:
    assert len(device) == len(host) and list(device.columns) == list(host.columns)
    for column in host.columns:
        if column == "timeProcessedMjdTai":
            continue
        if host[column].dtype == bool or host[column].dtype.kind in "iuO":
            assert host[column].equals(device[column]), column
        else:
            np.testing.assert_allclose(device[column], host[column], rtol=1e-12, atol=0, err_msg=column, equal_nan=True)


def test_the_engine_on_the_stand_in_device_equals_numpy_with_bounded_transfers(demo):
    objects = read_objects(demo / "diaObjects.parquet")
    host = _measure(demo, select_backend("numpy"), objects, 64 * 1024, run_directly)
    backend, calls = select_backend("stand-in"), []
    before = backend.counts.snapshot()
    device = _measure(demo, backend, objects, 64 * 1024, _recorder(backend, calls))
    total = backend.counts.since(before)
    assert len(host) > 400
    assert_same_catalog(device, host)
    raised = [c for c in host.columns if c.startswith("pixelFlags_") and host[c].any()]
    assert len(raised) >= 3, raised  # the flags compared are not all False

    assert sum(scope is Scope.ALL for scope, *_ in calls) > 3  # several batches
    for scope, n, counts in calls:
        assert counts.scalar_reads == 0 and counts.downloads == 1
        assert counts.uploads == (UPLOADS_PER_FULL_CALL if scope is Scope.ALL else UPLOADS_PER_PSF_CALL)
    # outside the kernel calls: each exposure's three planes, once
    in_calls = sum(c.uploads for *_, c in calls), sum(c.upload_bytes for *_, c in calls)
    assert (total.uploads - in_calls[0], total.upload_bytes - in_calls[1]) == (6, 2 * PLANE_BYTES)
    assert total.scalar_reads == 0


def test_windows_and_positions_cost_under_a_kilobyte_per_object_and_planes_stay_resident(demo):
    objects = read_objects(demo / "diaObjects.parquet")
    backend, config = select_backend("stand-in"), MeasurementConfig()
    with open_exposure(demo / "calexp.fits") as science:
        calls = []
        first = measure(science, objects, GaussianPsf(3.5), config, backend=backend, execute=_recorder(backend, calls))
        before = backend.counts.snapshot()
        calls = []
        measure(science, objects, GaussianPsf(3.5), config, backend=backend, execute=_recorder(backend, calls))
        again = backend.counts.since(before)
    (scope, n, counts), = calls  # one batch
    assert n == first.n_on_detector > 400
    assert counts.upload_bytes / n < 1024, counts
    assert again.uploads == counts.uploads  # the second measurement uploads no planes


def test_concurrent_requests_share_one_kernel_call_on_the_device(demo):
    """The batcher on the device: two requests' batches run as one call, each gathering from
    its own exposure's planes, and each gets what it would have got alone."""
    objects = read_objects(demo / "diaObjects.parquet")
    halves = objects.iloc[::2].reset_index(drop=True), objects.iloc[1::2].reset_index(drop=True)
    host = [_measure(demo, select_backend("numpy"), half, 2**30, run_directly) for half in halves]
    batcher = KernelBatcher(max_wait_seconds=1.0, max_objects=10**6)
    backend, results = select_backend("stand-in"), [None, None]
    calls = []
    record = _recorder(backend, calls, lambda runner, inputs, scope: batcher.execute(runner, inputs, scope))

    def request(i):
        results[i] = _measure(demo, backend, halves[i], 2**30, record)

    try:
        threads = [threading.Thread(target=request, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        batcher.close()
    for device, expected in zip(results, host):
        assert_same_catalog(device, expected)
    assert batcher.stats.requests == 4 and batcher.stats.kernel_calls == 2  # full calls together, PSF calls together


def test_a_few_objects_upload_their_cutouts_instead_of_the_exposure(demo):
    objects = read_objects(demo / "diaObjects.parquet").iloc[:3].reset_index(drop=True)
    backend = select_backend("stand-in")
    with open_exposure(demo / "calexp.fits") as science:
        assert stays_on_device(science, backend, 3, 41) is None  # 3 x 41^2 cutout pixels < 600^2
        assert stays_on_device(science, select_backend("numpy"), 10**6, 41) is None
        before = backend.counts.snapshot()
        device = measure(science, objects, GaussianPsf(3.5), MeasurementConfig(), backend=backend).catalog
        moved = backend.counts.since(before)
        host = measure(science, objects, GaussianPsf(3.5), MeasurementConfig(backend="numpy")).catalog
        assert science.resident_planes(backend, upload=False) is None
    assert_same_catalog(device, host)
    assert moved.upload_bytes < PLANE_BYTES / 10 and moved.scalar_reads == 0


def test_the_exposure_cache_holds_the_device_copy_within_its_bytes(demo):
    backend = select_backend("stand-in")
    cache = ExposureCache(10 * 2 * PLANE_BYTES, backend=backend)
    with cache.lease(demo / "calexp.fits") as (exposure, outcome):
        assert outcome == "miss"
        resident = exposure.resident_planes(backend, upload=False)
        assert resident is not None and resident.nbytes == PLANE_BYTES
    assert cache.nbytes == 2 * PLANE_BYTES  # host and device copies
    before = backend.counts.snapshot()
    with cache.lease(demo / "calexp.fits") as (exposure, outcome):
        assert outcome == "hit" and exposure.resident_planes(backend) is resident  # views share the copy
    assert backend.counts.since(before).uploads == 0
    small = ExposureCache(2 * PLANE_BYTES - 1, backend=backend)  # room for the host copy only: not cached
    with small.lease(demo / "calexp.fits") as (_, outcome):
        assert outcome == "bypass"


def test_a_kernel_without_the_hosts_windows_reads_scalars_on_the_stand_in_device():
    """The counter sees scalar reads: the kernels' stand-alone fallbacks make them."""
    from forcedphot.kernels import pixel_flags

    backend = select_backend("stand-in")
    to = backend.to_device
    before = backend.counts.snapshot()
    pixel_flags(to(np.zeros((2, 9, 9), np.int32)), to(np.ones((2, 9, 9), bool)), to(np.array([4.0, 4.2])), to(np.array([4.0, 3.9])),
                to(np.array([2.0, 2.0])), {"edge": 4})
    assert backend.counts.since(before).scalar_reads > 0


def _archive_psf(name: str):
    from forcedphot.photometry.psf_choice import choose_psf

    with open_exposure(DATA / "lsst" / name) as exposure:
        return choose_psf(exposure, name)


@pytest.mark.parametrize("make", [
    lambda: GaussianPsf(3.5),
    lambda: ImagePsf(GaussianPsf(2.5, stamp_size=15).stamps(np.array([7.0]), np.array([7.0]), np)[0]),
    lambda: PsfexPsf.from_file(str(DATA / "des" / "DECam_00154912_12_psfcat.psf")),
    lambda: _archive_psf("meas_base_exposure.fits"),  # GaussianPsf
    lambda: _archive_psf("meas_modelfit_calexp.fits"),  # PcaPsf
    lambda: _archive_psf("piff/exp.fits"),  # PiffPsf: drawn on the host, its stamps uploaded
], ids=["gaussian", "image", "psfex", "afw-gaussian", "afw-pca", "afw-piff"])
def test_every_psf_model_makes_its_stamps_on_the_device(make):
    psf, backend = make(), select_backend("stand-in")
    x, y = np.array([10.2, 55.7, 80.0]), np.array([12.9, 40.5, 70.3])
    before = backend.counts.snapshot()
    on_device = psf.stamps(x, y, backend.xp, backend.to_device)
    assert backend.counts.since(before).scalar_reads == 0
    np.testing.assert_allclose(backend.to_host(on_device), psf.stamps(x, y, np), rtol=1e-12, atol=1e-15)
