"""Dynamic batching: concurrent measurements coalesced into fewer kernel calls, same results."""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import pytest
from scenes import render_stars, sip_wcs, write_exposure

from forcedphot.photometry.config import MeasurementConfig
from forcedphot.photometry.exposure import open_exposure
from forcedphot.photometry.measure import measure
from forcedphot.photometry.objects import validate_objects
from forcedphot.photometry.psf_models import GaussianPsf
from forcedphot.serving.batching import KernelBatcher

SIDE = 200


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    rng = np.random.default_rng(12)
    x, y = rng.uniform(20, 180, 80), rng.uniform(20, 180, 80)
    image = render_stars((SIDE, SIDE), x, y, rng.uniform(1e3, 1e4, 80), 1.3) + rng.normal(0, 2, (SIDE, SIDE))
    wcs = sip_wcs(SIDE, SIDE)
    path = write_exposure(tmp_path_factory.mktemp("batch") / "calexp.fits", image, np.full(image.shape, 4.0), wcs=wcs)
    ra, dec = wcs.all_pix2world(x, y, 0)
    objects = validate_objects(pd.DataFrame({"diaObjectId": np.arange(80), "ra": ra, "dec": dec}))
    return path, [objects.iloc[k::8].reset_index(drop=True) for k in range(8)]


def measured_columns(catalog):
    return catalog.drop(columns=["timeProcessedMjdTai"]).reset_index(drop=True)


def test_concurrent_requests_share_kernel_calls_and_results_are_unchanged(scene):
    path, requests = scene
    psf, config = GaussianPsf(3.0), MeasurementConfig(backend="numpy")
    with open_exposure(path) as exposure:
        alone = [measure(exposure, objects, psf, config).catalog for objects in requests]
        batcher = KernelBatcher(max_wait_seconds=0.2)
        try:
            with ThreadPoolExecutor(8) as pool:
                futures = [pool.submit(measure, exposure, o, psf, config, execute=batcher.execute) for o in requests]
                together = [f.result().catalog for f in futures]
        finally:
            batcher.close()
    for a, b in zip(alone, together):
        pd.testing.assert_frame_equal(measured_columns(a), measured_columns(b))
    assert batcher.stats.requests == 8 and batcher.stats.objects == 80
    assert batcher.stats.kernel_calls < 8  # a 200 ms window coalesces 8 concurrent requests


def test_errors_reach_every_caller_and_the_batcher_survives(scene):
    path, requests = scene
    batcher = KernelBatcher(max_wait_seconds=0.0)
    try:
        with open_exposure(path) as exposure:
            # a kernel that raises: negative radius, past the config's own validation
            broken = MeasurementConfig.model_construct(apertures_px=(-1.0,), backend="numpy")
            with pytest.raises(ValueError, match="aperture radius"):
                measure(exposure, requests[0], GaussianPsf(3.0), broken, execute=batcher.execute)
            ok = measure(exposure, requests[1], GaussianPsf(3.0), MeasurementConfig(backend="numpy"), execute=batcher.execute)
        assert len(ok.catalog) == len(requests[1])
    finally:
        batcher.close()


def test_bad_settings_are_refused():
    with pytest.raises(ValueError):
        KernelBatcher(max_wait_seconds=-1)


def test_service_coalesces_concurrent_requests(tmp_path):
    """Through the app: concurrent requests share kernel calls, answers equal the engine's."""
    import io

    from fastapi.testclient import TestClient
    from service_helpers import AUTH, FWHM, assert_same_catalog, data_id, engine_catalog, make_repository, settings_for

    from forcedphot.api.app import create_app

    repo = make_repository(tmp_path / "repo")
    settings = settings_for(repo["root"], tmp_path / "data", batch_wait_ms=300.0, measure_threads=8)
    request = {"exposure": data_id("calexp"), "objects": {"uri": "tables/objects.parquet"}, "psf_fwhm": FWHM}
    with TestClient(create_app(settings), headers=AUTH) as client:
        assert client.post("/v1/forced-photometry", json=request).status_code == 200  # warm the cache
        with ThreadPoolExecutor(6) as pool:
            responses = list(pool.map(lambda _: client.post("/v1/forced-photometry", json=request), range(6)))
        metrics = client.get("/metrics").text
    expected = engine_catalog(repo["calexp"], repo["objects"])
    for response in responses:
        assert response.status_code == 200
        assert_same_catalog(pd.read_parquet(io.BytesIO(response.content)), expected)
    value = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines() if line.startswith("forcedphot_batcher_")}
    assert value["forcedphot_batcher_requests"] == 7
    assert value["forcedphot_batcher_kernel_calls"] < 7
