"""The engine on the stand-in device (array_api_strict's ``Device("device1")``): arrays there
refuse ``np.asarray`` and cannot mix with host arrays, as on CuPy. The whole engine runs on
it, equals NumPy, and per kernel call moves a bounded set of arrays, downloads once and
reads no scalar back from the device."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from forcedphot.cli import main
from forcedphot.photometry.backend import select_backend
from forcedphot.photometry.config import MeasurementConfig
from forcedphot.photometry.exposure import open_exposure
from forcedphot.photometry.measure import measure
from forcedphot.photometry.objects import read_objects
from forcedphot.photometry.psf_models import GaussianPsf
from forcedphot.photometry.runner import KernelRunner, run_directly

UPLOADS_PER_FULL_CALL = 7  # image, variance, mask, inside, PSF stamps, positions (cx, cy, sigma), annulus pixel indices
UPLOADS_PER_PSF_CALL = 5  # the science image's PSF fit: planes and stamps


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("demo")
    assert main(["demo", str(folder), "--size", "600", "--objects", "500", "--seed", "5"]) == 0
    return folder


def _measure(demo: Path, backend_name: str, calls: list) -> pd.DataFrame:
    """Difference-mode measurement in batches of ~64 KB of cutouts, recording each kernel
    call's transfers."""
    backend = select_backend(backend_name)

    def execute(runner: KernelRunner, inputs, full: bool):
        before = backend.counts.snapshot()
        results = run_directly(runner, inputs, full)
        calls.append((full, len(inputs), backend.counts.since(before)))
        return results

    config = MeasurementConfig(batch_bytes=64 * 1024)
    objects = read_objects(demo / "diaObjects.parquet")
    with open_exposure(demo / "calexp.fits") as science, open_exposure(demo / "difference.fits") as difference:
        return measure(science, objects, GaussianPsf(3.5), config, difference=difference, backend=backend, execute=execute).catalog


def test_the_engine_on_the_stand_in_device_equals_numpy_with_bounded_transfers(demo):
    host_calls, device_calls = [], []
    host = _measure(demo, "numpy", host_calls)
    device = _measure(demo, "stand-in", device_calls)
    assert len(device) == len(host) > 400 and list(device.columns) == list(host.columns)
    for column in host.columns:
        if column == "timeProcessedMjdTai":
            continue
        if host[column].dtype == bool or host[column].dtype.kind in "iuO":
            assert host[column].equals(device[column]), column
        else:
            np.testing.assert_allclose(device[column], host[column], rtol=1e-12, atol=0, err_msg=column, equal_nan=True)
    raised = [c for c in host.columns if c.startswith("pixelFlags_") and host[c].any()]
    assert len(raised) >= 3, raised  # the flags compared are not all False

    full_calls = [counts for full, _, counts in device_calls if full]
    assert len(full_calls) > 3  # several batches
    for full, n, counts in device_calls:
        assert counts.scalar_reads == 0 and counts.downloads == 1
        assert counts.uploads == (UPLOADS_PER_FULL_CALL if full else UPLOADS_PER_PSF_CALL)
    assert [c for *_, c in host_calls] == [c for *_, c in device_calls]  # NumPy counts the same calls


def test_a_kernel_without_the_hosts_windows_reads_scalars_on_the_stand_in_device():
    """The counter sees scalar reads: the kernels' stand-alone fallbacks make them."""
    from forcedphot.kernels import pixel_flags

    backend = select_backend("stand-in")
    to = backend.to_device
    before = backend.counts.snapshot()
    pixel_flags(to(np.zeros((2, 9, 9), np.int32)), to(np.ones((2, 9, 9), bool)), to(np.array([4.0, 4.2])), to(np.array([4.0, 3.9])),
                to(np.array([2.0, 2.0])), {"edge": 4})
    assert backend.counts.since(before).scalar_reads > 0
