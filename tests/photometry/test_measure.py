"""The engine end to end on LSST-layout files: selection, flux, flags, ids, difference mode."""

import numpy as np
import pandas as pd
import pytest
from scenes import MASK_BITS, render_stars, sip_wcs, write_exposure

from forcedphot.photometry.config import MeasurementConfig
from forcedphot.photometry.exposure import open_exposure
from forcedphot.photometry.measure import measure
from forcedphot.photometry.objects import validate_objects
from forcedphot.photometry.psf_models import GaussianPsf

WIDTH, HEIGHT = 260, 220
X0, Y0 = 1000, 2000  # parent origin
FWHM = 3.0
SIGMA = FWHM / (2 * np.sqrt(2 * np.log(2)))
CALIB = 2.0  # nJy per count
SKY_VARIANCE = 25.0


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    """Stars on a grid well inside the image, plus objects on edges and off the image."""
    rng = np.random.default_rng(5)
    grid = np.arange(40, 200, 30)
    gx, gy = np.meshgrid(grid, grid[:-1])
    x = gx.ravel() + rng.uniform(-0.5, 0.5, gx.size)
    y = gy.ravel() + rng.uniform(-0.5, 0.5, gx.size)
    flux = rng.uniform(1e3, 2e4, x.size)
    image = render_stars((HEIGHT, WIDTH), x, y, flux, SIGMA)
    wcs = sip_wcs(WIDTH, HEIGHT)
    path = write_exposure(tmp_path_factory.mktemp("engine") / "calexp.fits", image, np.full(image.shape, SKY_VARIANCE), wcs=wcs, x0=X0, y0=Y0, calibration=CALIB)
    extra_x = np.array([1.0, WIDTH - 1.3, 130.0, -40.0, 500.0])
    extra_y = np.array([110.0, 30.0, HEIGHT - 0.6, 50.0, 50.0])
    all_x, all_y = np.concatenate([x, extra_x]), np.concatenate([y, extra_y])
    ra, dec = wcs.all_pix2world(all_x, all_y, 0)
    objects = validate_objects(pd.DataFrame({"diaObjectId": np.arange(len(ra)) * 11 + 5, "ra": ra, "dec": dec}))
    return {"path": path, "objects": objects, "x": all_x, "y": all_y, "flux": flux, "n_grid": x.size, "image": image, "wcs": wcs}


def run(path, objects, **config):
    with open_exposure(path) as exposure:
        return measure(exposure, objects, GaussianPsf(FWHM), MeasurementConfig(backend="numpy", **config))


def test_noiseless_stars_recovered_and_positions_in_parent_pixels(scene):
    result = run(scene["path"], scene["objects"])
    n = scene["n_grid"]
    assert result.n_input == n + 5 and result.n_on_detector == n + 3 and result.n_off_detector == 2
    cat = result.catalog.set_index("diaObjectId").loc[scene["objects"]["diaObjectId"][:n]]
    np.testing.assert_allclose(cat["psfFlux"], scene["flux"] * CALIB, rtol=1e-4)
    np.testing.assert_allclose(cat["psfFlux_instFlux"], scene["flux"], rtol=1e-4)
    np.testing.assert_allclose(cat["x"], scene["x"][:n] + X0, atol=1e-6)
    np.testing.assert_allclose(cat["y"], scene["y"][:n] + Y0, atol=1e-6)
    # apertures: analytic enclosed flux of a Gaussian; 12 px holds it all
    np.testing.assert_allclose(cat["apFlux_12"], scene["flux"] * CALIB, rtol=1e-4)
    # r = 3 px: analytic enclosed flux, less the pixelisation bias of an exact-overlap
    # aperture on pixel-integrated data, -r^2 exp(-r^2 / 2 sigma^2) / (12 sigma^4) to
    # second order (derived and checked in test_aperture.py)
    r = 3.0
    enclosed = 1 - np.exp(-(r**2) / (2 * SIGMA**2))
    bias = -(r**2) * np.exp(-(r**2) / (2 * SIGMA**2)) / (12 * SIGMA**4)
    np.testing.assert_allclose(cat["apFlux_3"], scene["flux"] * CALIB * (enclosed + bias), rtol=0.003)
    # noiseless and empty around the stars: zero background, nothing flagged
    np.testing.assert_allclose(cat["localBackground_instFlux"], 0.0, atol=1e-3)
    assert not cat["psfFlux_flag"].any() and not cat["pixelFlags_offimage"].any()
    # instFluxErr = sqrt(V / sum P^2) = sqrt(V * area), area ~ 4 pi (sigma^2 + 1/12)
    # afw's instFluxToNanojansky since afw 29: the pixel noise times the calibration (its 0.01 nJy/count error is not added)
    pixel_noise = np.sqrt(SKY_VARIANCE * 4 * np.pi * (SIGMA**2 + 1 / 12))
    np.testing.assert_allclose(cat["psfFlux_instFluxErr"], pixel_noise, rtol=0.02)
    np.testing.assert_allclose(cat["psfFluxErr"], CALIB * cat["psfFlux_instFluxErr"], rtol=1e-6)
    assert (cat["visit"] == 1234).all() and (cat["detector"] == 42).all() and (cat["band"] == "r").all()
    np.testing.assert_allclose(cat["midpointMjdTai"], 61000.25, atol=1e-8)
    np.testing.assert_allclose(cat["localPhotoCalib"], CALIB)


def test_edge_objects_are_flagged(scene):
    cat = run(scene["path"], scene["objects"]).catalog.set_index("diaObjectId")
    ids = scene["objects"]["diaObjectId"].to_numpy()
    n = scene["n_grid"]
    for k in (n, n + 1, n + 2):  # near the left, right and top edges
        row = cat.loc[ids[k]]
        assert row["psfFlux_flag_edge"] and row["psfFlux_flag"]
        assert row["apFlux_12_flag_apertureTruncated"] and row["apFlux_12_flag"]
        assert not row["pixelFlags_offimage"]
    assert ids[n + 3] not in cat.index and ids[n + 4] not in cat.index


def test_offimage_objects_returned_on_request(scene):
    m = run(scene["path"], scene["objects"], include_offimage=True)
    cat = m.catalog.set_index("diaObjectId")
    flags = cat.filter(regex="^pixelFlags_").any(axis=1) | cat["psfFlux_flag"]
    assert 0 < m.n_flagged == int(flags.sum()) < len(cat)  # edge and off-image rows, not the rest
    ids = scene["objects"]["diaObjectId"].to_numpy()
    assert len(cat) == len(ids)
    for k in (-2, -1):
        row = cat.loc[ids[k]]
        assert row["pixelFlags_offimage"] and row["pixelFlags_edge"] and row["pixelFlags_edgeCenter"] and row["pixelFlags_edgeCenterAll"]
        assert np.isnan(row["psfFlux"]) and row["psfFlux_flag"]
    assert not cat.loc[ids[0], "pixelFlags_offimage"]


def test_planted_mask_bits_set_pixel_flags(scene, tmp_path):
    mask = np.zeros((HEIGHT, WIDTH), np.int32)
    x, y = scene["x"], scene["y"]
    ix, iy = np.floor(x + 0.5).astype(int), np.floor(y + 0.5).astype(int)
    mask[iy[0], ix[0]] |= 1 << MASK_BITS["SAT"]  # centre pixel of object 0
    mask[iy[1] + 3, ix[1]] |= 1 << MASK_BITS["CR"]  # in the 3-sigma footprint, outside the 3x3 centre
    mask[iy[2] - 1 : iy[2] + 2, ix[2] - 1 : ix[2] + 2] |= 1 << MASK_BITS["INTRP"]  # the whole 3x3 centre
    mask[iy[3] + 12, ix[3]] |= 1 << MASK_BITS["BAD"]  # far outside the footprint
    path = write_exposure(tmp_path / "masked.fits", scene["image"], np.full(mask.shape, SKY_VARIANCE), mask, wcs=scene["wcs"], x0=X0, y0=Y0)
    cat = run(path, scene["objects"]).catalog.set_index("diaObjectId")
    ids = scene["objects"]["diaObjectId"].to_numpy()
    o0, o1, o2, o3 = (cat.loc[ids[k]] for k in range(4))
    assert o0["pixelFlags_saturated"] and o0["pixelFlags_saturatedCenter"] and not o0["pixelFlags_saturatedCenterAll"]
    assert o1["pixelFlags_cr"] and not o1["pixelFlags_crCenter"]
    assert o2["pixelFlags_interpolated"] and o2["pixelFlags_interpolatedCenter"] and o2["pixelFlags_interpolatedCenterAll"]
    assert not o3["pixelFlags_bad"]
    others = cat.loc[ids[4 : scene["n_grid"]]]
    flag_columns = [c for c in cat.columns if c.startswith("pixelFlags_")]
    assert not others[flag_columns].to_numpy().any()


def test_ids_deterministic_and_batches_do_not_change_results(scene):
    objects = scene["objects"]
    a = run(scene["path"], objects).catalog
    shuffled = objects.sample(frac=1.0, random_state=3).reset_index(drop=True)
    b = run(scene["path"], shuffled, batch_bytes=200_000).catalog
    a, b = a.set_index("diaObjectId").sort_index(), b.set_index("diaObjectId").sort_index()
    pd.testing.assert_series_equal(a["diaForcedSourceId"], b["diaForcedSourceId"])
    measured = [c for c in a.columns if c != "timeProcessedMjdTai"]
    pd.testing.assert_frame_equal(a[measured], b[measured])


def test_noise_pulls_end_to_end(tmp_path):
    """psfFlux pulls on many noisy stars (sky + shot noise) from files through the engine."""
    rng = np.random.default_rng(11)
    side = 600
    grid = np.arange(30, side - 30, 22)
    gx, gy = np.meshgrid(grid, grid)
    x = gx.ravel() + rng.uniform(-0.5, 0.5, gx.size)
    y = gy.ravel() + rng.uniform(-0.5, 0.5, gx.size)
    flux = rng.uniform(300, 3000, x.size)
    model = render_stars((side, side), x, y, flux, SIGMA)
    variance = SKY_VARIANCE + model
    image = model + rng.normal(size=model.shape) * np.sqrt(variance)
    wcs = sip_wcs(side, side)
    path = write_exposure(tmp_path / "noisy.fits", image, variance, wcs=wcs, calibration=CALIB)
    ra, dec = wcs.all_pix2world(x, y, 0)
    objects = validate_objects(pd.DataFrame({"diaObjectId": np.arange(x.size), "ra": ra, "dec": dec}))
    cat = run(path, objects).catalog.sort_values("diaObjectId")
    pull = (cat["psfFlux"].to_numpy() - flux * CALIB) / cat["psfFluxErr"].to_numpy()
    assert x.size > 500
    assert abs(pull.mean()) < 0.1 and abs(pull.std() - 1) < 0.07
    ap_pull = (cat["apFlux_12"].to_numpy() - flux * CALIB) / cat["apFluxErr_12"].to_numpy()
    assert abs(ap_pull.mean()) < 0.1 and abs(ap_pull.std() - 1) < 0.07
    # background: the annulus holds only sky noise of std 5
    np.testing.assert_allclose(np.median(cat["localBackground_instFluxErr"]), np.sqrt(SKY_VARIANCE), rtol=0.05)


def test_difference_mode(scene, tmp_path):
    """psfFlux from the difference image, scienceFlux from the direct image."""
    n = scene["n_grid"]
    diff_flux = np.linspace(-500, 500, n)
    diff = render_stars((HEIGHT, WIDTH), scene["x"][:n], scene["y"][:n], diff_flux, SIGMA)
    diff_path = write_exposure(tmp_path / "diff.fits", diff, np.full(diff.shape, 2 * SKY_VARIANCE), wcs=scene["wcs"], x0=X0, y0=Y0)
    calls = []
    with open_exposure(scene["path"]) as science, open_exposure(diff_path) as difference:
        result = measure(science, scene["objects"], GaussianPsf(FWHM), MeasurementConfig(backend="numpy", batch_bytes=2**14),
                         difference=difference, progress=lambda done, total: calls.append((done, total)))
    # progress counts objects (not object-images): it ends at the number measured
    assert len(calls) > 1 and calls[-1] == (result.n_on_detector, result.n_on_detector)
    assert all(total == result.n_on_detector for _, total in calls)
    cat = result.catalog.set_index("diaObjectId").loc[scene["objects"]["diaObjectId"][:n]]
    np.testing.assert_allclose(cat["psfFlux"], diff_flux * CALIB, rtol=1e-4, atol=1e-2)
    np.testing.assert_allclose(cat["scienceFlux"], scene["flux"] * CALIB, rtol=1e-4)
    assert not cat["scienceFlux_flag"].any()
    assert result.provenance["science"]["path"] == str(scene["path"])


def test_rows_with_bad_coordinates_come_back_flagged(scene):
    objects = scene["objects"].copy()
    objects.loc[0, "ra"] = np.nan
    objects.loc[1, "dec"] = 91.0
    result = run(scene["path"], validate_objects(objects.drop(columns="coord_valid")))
    cat = result.catalog.set_index("diaObjectId")
    ids = objects["diaObjectId"].to_numpy()
    assert result.n_invalid_coords == 2 and result.n_on_detector == scene["n_grid"] + 1
    for k in (0, 1):
        assert cat.loc[ids[k], "coord_flag"] and cat.loc[ids[k], "pixelFlags_offimage"]
        assert np.isnan(cat.loc[ids[k], "psfFlux"])
    assert not cat.loc[ids[2], "coord_flag"]
    assert ids[-1] not in cat.index  # off the detector, valid coordinates: left out


def test_psfex_model_through_the_engine(tmp_path):
    """Stars drawn with the real DES PSFEx model are recovered through the CLI path.

    The image origin is far from (0, 0): the PSF must be evaluated at LOCAL array
    coordinates (PSFEx was fitted on the array), which the exact recovery checks.
    """
    from pathlib import Path

    from forcedphot.photometry.psf_models import PsfexPsf

    psf_path = Path(__file__).parents[1] / "data" / "des" / "DECam_00154912_12_psfcat.psf"
    psf = PsfexPsf.from_file(str(psf_path))
    side, h = 300, psf.stamp_size // 2
    rng = np.random.default_rng(8)
    grid = np.arange(40, side - 40, 40)
    gx, gy = np.meshgrid(grid, grid)
    x, y = gx.ravel() + rng.uniform(-0.5, 0.5, gx.size), gy.ravel() + rng.uniform(-0.5, 0.5, gx.size)
    flux = rng.uniform(1e3, 1e4, x.size)
    image = np.zeros((side, side))
    ix, iy = np.floor(x + 0.5).astype(int), np.floor(y + 0.5).astype(int)
    for k, stamp in enumerate(psf.stamps(x, y, np)):
        image[iy[k] - h : iy[k] + h + 1, ix[k] - h : ix[k] + h + 1] += flux[k] * stamp
    wcs = sip_wcs(side, side)
    path = write_exposure(tmp_path / "psfex.fits", image, np.full(image.shape, 1.0), wcs=wcs, x0=1500, y0=3000)
    ra, dec = wcs.all_pix2world(x, y, 0)
    objects = validate_objects(pd.DataFrame({"diaObjectId": np.arange(x.size), "ra": ra, "dec": dec}))
    with open_exposure(path) as exposure:
        cat = measure(exposure, objects, psf, MeasurementConfig(backend="numpy")).catalog.sort_values("diaObjectId")
    np.testing.assert_allclose(cat["psfFlux_instFlux"], flux, rtol=1e-6)
    # the same objects with a PSF evaluated at parent coordinates would be fitted worse
    shifted = psf.stamps(x + 1500, y + 3000, np)
    assert np.max(np.abs(shifted - psf.stamps(x, y, np))) > 1e-4


def test_batched_execution_equals_separate_runs(scene):
    """Inputs of two requests measured in one kernel call give each request's own results."""
    from forcedphot.photometry.runner import Scope, map_arrays, run_directly

    seen = []

    def record(runner, inputs, scope):
        seen.append((runner, inputs))
        return run_directly(runner, inputs, scope)

    objects = scene["objects"]
    with open_exposure(scene["path"]) as exposure:
        psf, config = GaussianPsf(FWHM), MeasurementConfig(backend="numpy")
        first = measure(exposure, objects.iloc[:10].reset_index(drop=True), psf, config, execute=record)
        second = measure(exposure, objects.iloc[10:].reset_index(drop=True), psf, config, execute=record)
    (runner_a, a), (runner_b, b) = seen
    assert runner_a.key == runner_b.key and a.shape_key == b.shape_key
    together = runner_a.run([a, b], Scope.ALL)
    for inputs, result in zip((a, b), together):
        alone = run_directly(runner_a, inputs, Scope.ALL)
        assert type(alone) is type(result)
        map_arrays(np.testing.assert_array_equal, alone, result)
    assert len(first.catalog) == 10 and len(second.catalog) == len(objects) - 10 - 2


def test_a_nan_pixel_in_the_psf_fit_region_gives_nan_and_the_flag_as_lsst(scene, tmp_path):
    """A NaN pixel two pixels from an object makes its PSF flux NaN and flagged (LSST), a
    NaN far outside every fit region changes nothing; localPhotoCalib is float64."""
    image = scene["image"].copy()
    x0, y0 = scene["x"][0], scene["y"][0]
    image[int(round(y0)), int(round(x0)) + 2] = np.nan
    image[5, 5] = np.nan  # far from every object's PSF stamp
    path = write_exposure(tmp_path / "nan.fits", image, np.full(image.shape, SKY_VARIANCE), wcs=scene["wcs"], x0=X0, y0=Y0,
                          calibration=CALIB)
    clean = run(scene["path"], scene["objects"]).catalog.set_index("diaObjectId")
    with_nan = run(path, scene["objects"]).catalog.set_index("diaObjectId")
    first = scene["objects"]["diaObjectId"][0]
    assert np.isnan(with_nan.loc[first, "psfFlux"]) and with_nan.loc[first, "psfFlux_flag"]
    others = scene["objects"]["diaObjectId"][1:scene["n_grid"]]
    np.testing.assert_array_equal(with_nan.loc[others, "psfFlux"], clean.loc[others, "psfFlux"])
    assert str(with_nan["localPhotoCalib"].dtype) == "float64"


def test_fused_batches_count_the_band_only_where_reading_it_copies(scene):
    """A memory-mapped file's band of rows is a view (it costs nothing until gathered), and
    the fused kernels read its windows in place: an object costs its PSF stamp and results
    (a window crossing the edge too: it is padded in the kernel's copy); a Gaussian PSF's
    stamps, made in the kernel one at a time, cost nothing. Read from the file, the band is
    a copy and bounds the batch too. Same catalog either way, and at any batch size."""
    from forcedphot.photometry.backend import select_backend
    from forcedphot.photometry.cutouts import BYTES_PER_IN_PLACE_OBJECT
    from forcedphot.photometry.measure import batches
    from forcedphot.photometry.psf_models import SampledGaussianPsf
    from forcedphot.serving.exposure_cache import InMemoryExposure

    size, per_batch = 21, 12
    stamp = SampledGaussianPsf(SIGMA, 15, 15)  # stamps made before the kernel, 15 x 15
    config = MeasurementConfig(backend="numpy", batch_bytes=per_batch * (15 * 15 * 8 + BYTES_PER_IN_PLACE_OBJECT))
    x, y = scene["x"][:scene["n_grid"]], scene["y"][:scene["n_grid"]]  # all well inside the image
    edge_x, edge_y = np.array([1.0, 130.0, 250.0]), np.array([110.0, HEIGHT - 2.0, 5.0])
    backend = select_backend("numpy")
    sizes = {}
    for memory_map in (True, False):
        with open_exposure(scene["path"], memory_map=memory_map) as exposure:
            assert exposure.rows_in_place is memory_map
            sizes[memory_map] = [len(windows) for windows, _ in batches(exposure, backend, x, y, size, config, stamp)]
            if memory_map:
                assert InMemoryExposure.load(exposure).rows_in_place
                on_edge = [len(w) for w, _ in batches(exposure, backend, np.r_[x, edge_x], np.r_[y, edge_y], size, config, stamp)]
    assert max(sizes[True]) == per_batch and len(sizes[True]) == -(-len(x) // per_batch)
    assert max(sizes[False]) < per_batch  # the band's rows, read, cost more
    assert max(on_edge) == per_batch and len(on_edge) == -(-(len(x) + len(edge_x)) // per_batch)
    with open_exposure(scene["path"]) as exposure:
        gaussian = [len(w) for w, _ in batches(exposure, backend, x, y, size, config, GaussianPsf(FWHM, stamp_size=15))]
    assert max(gaussian) == min(len(x), config.batch_bytes // BYTES_PER_IN_PLACE_OBJECT)
    reference = run(scene["path"], scene["objects"]).catalog.drop(columns="timeProcessedMjdTai")
    for memory_map in (True, False):
        with open_exposure(scene["path"], memory_map=memory_map) as exposure:
            small = measure(exposure, scene["objects"], GaussianPsf(FWHM), config).catalog.drop(columns="timeProcessedMjdTai")
        pd.testing.assert_frame_equal(small, reference)


@pytest.mark.parametrize("threads", [2, 3])
def test_batches_run_side_by_side_give_the_catalog_of_one_at_a_time(scene, tmp_path, threads):
    """The fused CPU kernels run as many batches at once as they have threads: the same
    catalog (difference mode: both images) as batches one at a time, every object counted
    once in the progress, which rises batch by batch to the total."""
    from forcedphot.kernels import fused_cpu

    diff_path = write_exposure(tmp_path / "diff.fits", scene["image"] * 0.5, np.full(scene["image"].shape, 2 * SKY_VARIANCE),
                               wcs=scene["wcs"], x0=X0, y0=Y0)
    catalogs, progress = {}, {}
    try:
        for count in (1, threads):
            fused_cpu.set_threads(count)
            calls = progress[count] = []
            with open_exposure(scene["path"]) as science, open_exposure(diff_path) as difference:
                result = measure(science, scene["objects"], GaussianPsf(FWHM), MeasurementConfig(backend="numpy", batch_bytes=2**12),
                                 difference=difference, progress=lambda done, total, calls=calls: calls.append(done))
            catalogs[count] = result.catalog.drop(columns="timeProcessedMjdTai")
    finally:
        fused_cpu.set_threads(None)
    pd.testing.assert_frame_equal(catalogs[threads], catalogs[1])
    assert progress[threads] == progress[1] and len(progress[1]) > threads
    assert np.all(np.diff(progress[1]) > 0) and progress[1][-1] == result.n_on_detector
