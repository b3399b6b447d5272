"""Real LSST files (tests/data/lsst, see its README): both afw FITS layouts, and integer
planes stored with BZERO/BSCALE, read exactly and a band of rows at a time."""

from pathlib import Path

from astropy.io import fits
import numpy as np
import pytest
from scenes import sip_wcs

from forcedphot.photometry.exposure import open_exposure
from forcedphot.photometry.lsst_fits import write_lsst_exposure

LSST = Path(__file__).resolve().parents[1] / "data" / "lsst"


@pytest.mark.parametrize("name, shape, origin", [("meas_base_exposure.fits", (201, 201), (0, 0)),
                                                 ("meas_modelfit_calexp.fits", (101, 101), (1868, 2100))])
def test_the_pre_2019_layout_opens_and_its_uint16_mask_reads_exactly(name, shape, origin):
    """HDUs named by EXTTYPE only, MASK stored as BITPIX 16 with BZERO 32768."""
    path = LSST / name
    with fits.open(path, memmap=False) as hdul:
        assert "EXTNAME" not in hdul[1].header and hdul[2].header["BZERO"] == 32768
        image, mask, variance = (hdul[i].data for i in (1, 2, 3))
        mask = mask.astype(np.int64)
    with open_exposure(path) as exposure:
        assert (exposure.height, exposure.width) == shape and (exposure.x0, exposure.y0) == origin
        assert exposure.mask_planes["CR"] == 3 and exposure.calibration_source == "FLUXMAG0"
        got_image, got_variance, got_mask = exposure.read_rows(0, exposure.height)
        band = exposure.read_rows(40, 47)[2]
    np.testing.assert_array_equal(got_image, image)
    np.testing.assert_array_equal(got_variance, variance)
    np.testing.assert_array_equal(got_mask.astype(np.int64), mask)
    np.testing.assert_array_equal(band.astype(np.int64), mask[40:47])
    assert mask.max() > 0  # some bits are set, so the comparison means something


def test_a_scaled_integer_image_reads_as_its_physical_values(tmp_path):
    rng = np.random.default_rng(1)
    values = rng.normal(100.0, 10.0, (40, 50)).astype(np.float32)
    hdu = fits.ImageHDU(values.copy(), header=sip_wcs(50, 40).to_header(relax=True), name="IMAGE")  # scale() works in place
    hdu.scale("int16", bscale=0.01, bzero=100.0)
    fits.HDUList([fits.PrimaryHDU(), hdu]).writeto(tmp_path / "scaled.fits")
    with open_exposure(tmp_path / "scaled.fits") as exposure:
        got = exposure.read_rows(10, 20)[0]
    np.testing.assert_allclose(got, values[10:20], atol=0.006)  # the int16 quantisation: bscale / 2


def test_the_archive_gaussian_psf_is_used_without_a_psf_option_and_matches_meas_base_truth():
    """meas_base's synthetic exposure: its archive GaussianPsf (sigma 2 px, 17 x 17) is
    chosen with no PSF option; the isolated point source (truth row 0, second moments 4 px^2
    = sigma^2) comes out at its true flux within 1% (well within 3 sigma). Rows 3-4 are a
    blend and rows 1-2 extended: a PSF flux is not their flux."""
    import pandas as pd

    from forcedphot.photometry.config import MeasurementConfig
    from forcedphot.photometry.measure import measure
    from forcedphot.photometry.objects import validate_objects
    from forcedphot.photometry.psf_choice import choose_psf
    from forcedphot.photometry.psf_models import describe_psf

    truth = fits.getdata(LSST / "meas_base_truth.fits")
    assert truth["truth_xx"][0] == truth["truth_yy"][0] == 4.0
    with open_exposure(LSST / "meas_base_exposure.fits") as exposure:
        psf = choose_psf(exposure, "meas_base_exposure.fits")
        ra, dec = exposure.wcs.all_pix2world(truth["truth_x"] - exposure.x0, truth["truth_y"] - exposure.y0, 0)
        objects = validate_objects(pd.DataFrame({"diaObjectId": np.arange(len(ra)), "ra": ra, "dec": dec}))
        catalog = measure(exposure, objects, psf, MeasurementConfig(backend="numpy")).catalog
    assert describe_psf(psf).startswith("LSST GaussianPsf of sigma 2 px on 17 x 17 px") and "from the archive" in describe_psf(psf)
    flux, error = catalog["psfFlux_instFlux"][0], catalog["psfFlux_instFluxErr"][0]
    assert abs(flux / truth["truth_flux"][0] - 1) < 0.01 and abs(flux - truth["truth_flux"][0]) < 3 * error


def test_the_obs_base_calexp_reads_its_psf_calibration_and_visit():
    from forcedphot.photometry.psf_choice import choose_psf
    from forcedphot.photometry.psf_models import describe_psf

    with open_exposure(LSST / "obs_base_calexp.fits") as exposure:
        assert (exposure.width, exposure.height) == (64, 32)
        assert exposure.calibration_source == "PhotoCalib" and exposure.calibration_mean > 0
        assert exposure.visit == 180802004 and exposure.band == "i" and exposure.midpoint_mjd_tai is not None
        psf = choose_psf(exposure, "calexp")
    assert "GaussianPsf of sigma 4 px on 3 x 3 px" in describe_psf(psf)


def _chebyshev_t(n, u):
    """T_n(u) from its definition cos(n arccos u), |u| <= 1 (independent of NumPy's chebval)."""
    return np.cos(n * np.arccos(u))


def test_a_varying_photocalib_gives_each_row_the_chebyshev_field_at_its_position(tmp_path):
    """A PhotoCalib whose field is a ChebyshevBoundedField (order 2, over a parent bbox offset
    from the image origin) is evaluated at each row's parent position; fluxes and errors are
    afw's instFluxToNanojansky."""
    import pandas as pd
    from scenes import render_stars

    from forcedphot.cli import main
    from forcedphot.photometry.lsst_fits import write_lsst_exposure
    from forcedphot.photometry.photocalib import ChebyshevField

    x0, y0, shape = 1000, 2000, (120, 160)
    coefficients = np.array([[2.0, 0.3, -0.1], [0.2, 0.05, 0.0], [-0.15, 0.0, 0.0]])  # [y order, x order]
    field = ChebyshevField(x0, y0, x0 + shape[1] - 1, y0 + shape[0] - 1, coefficients)
    x = np.array([10.0, 40.3, 80.7, 120.2, 150.0])
    y = np.array([12.0, 100.6, 60.2, 20.9, 110.0])
    image = render_stars(shape, x, y, np.full(5, 5000.0), 1.5) + np.random.default_rng(3).normal(0, 1, shape)
    wcs = sip_wcs(shape[1], shape[0])
    path = tmp_path / "calexp.fits"
    write_lsst_exposure(path, image, np.ones(shape), np.zeros(shape, np.int32), wcs, x0=x0, y0=y0,
                        calibration_mean=2.0, calibration_err=0.03, calibration_field=field)
    ra, dec = wcs.all_pix2world(x, y, 0)
    pd.DataFrame({"diaObjectId": np.arange(5), "ra": ra, "dec": dec}).to_parquet(tmp_path / "o.parquet")
    assert main(["measure", str(path), str(tmp_path / "o.parquet"), "-o", str(tmp_path / "out.parquet"), "--psf-fwhm", "3.53",
                 "--backend", "numpy"]) == 0
    table = pd.read_parquet(tmp_path / "out.parquet")

    np.testing.assert_allclose(table["x"], x + x0, atol=1e-6)
    u = (2 * table["x"] - (2 * x0 + shape[1] - 1)) / shape[1]  # Box2D: pixel edges map to -1, +1
    v = (2 * table["y"] - (2 * y0 + shape[0] - 1)) / shape[0]
    expected = sum(coefficients[j, i] * _chebyshev_t(i, u) * _chebyshev_t(j, v) for j in range(3) for i in range(3))
    np.testing.assert_allclose(table["localPhotoCalib"], expected, rtol=1e-12)
    assert np.ptp(expected) > 0.5  # the field really varies over these positions
    assert table["localPhotoCalib"].dtype == np.float64 and (table["localPhotoCalibErr"] == 0.03).all()
    flux, err = table["psfFlux_instFlux"], table["psfFlux_instFluxErr"]
    np.testing.assert_allclose(table["psfFlux"], flux * expected, rtol=1e-6)
    np.testing.assert_allclose(table["psfFluxErr"], err * expected, rtol=1e-6)  # afw >= 29: the calibration error is not added


def _stars(tmp_path, name, fwhm, calibrated=True):
    """A 120 x 120 exposure of three stars of 1000, 2000, 3000 counts with a Gaussian PSF."""
    from scenes import render_stars, write_exposure

    x, y = np.array([30.2, 60.7, 90.1]), np.array([40.4, 70.6, 50.3])
    image = render_stars((120, 120), x, y, np.array([1000.0, 2000.0, 3000.0]), fwhm / 2.3548)
    wcs = sip_wcs(120, 120)
    if calibrated:
        path = write_exposure(tmp_path / name, image, np.ones_like(image), wcs=wcs)
        fits.setval(path, "PSF_FWHM", value=fwhm)
    else:  # plain FITS: image and WCS, no calibration of any kind
        path = tmp_path / name
        fits.PrimaryHDU(image.astype(np.float32), header=wcs.to_header(relax=True)).writeto(path)
    ra, dec = wcs.all_pix2world(x, y, 0)
    return path, ra, dec


def test_each_image_is_measured_with_its_own_psf(tmp_path):
    """DiaForcedSourceTask: the difference image's PSF for psfFlux, the science image's for scienceFlux."""
    import pandas as pd

    from forcedphot.cli import main
    from forcedphot.photometry.formats import read_provenance

    science, ra, dec = _stars(tmp_path, "calexp.fits", 3.0)
    difference, _, _ = _stars(tmp_path, "difference.fits", 5.0)
    pd.DataFrame({"diaObjectId": [1, 2, 3], "ra": ra, "dec": dec}).to_parquet(tmp_path / "o.parquet")
    out = tmp_path / "out.parquet"
    assert main(["measure", str(science), str(tmp_path / "o.parquet"), "--difference", str(difference), "-o", str(out),
                 "--backend", "numpy"]) == 0
    table = pd.read_parquet(out)
    counts = np.array([1000.0, 2000.0, 3000.0])
    np.testing.assert_allclose(table["psfFlux_instFlux"], counts, rtol=2e-3)  # a mismatched PSF would be off by tens of %
    np.testing.assert_allclose(table["scienceFlux"] / table["psfFlux"], 1.0, rtol=2e-3)
    provenance = read_provenance(out)
    assert "FWHM 5 px" in provenance["psf"] and "FWHM 3 px" in provenance["science_psf"]


def test_an_image_without_calibration_keeps_counts_and_nulls_nanojansky(tmp_path, capsys):
    import pandas as pd
    import pyarrow.parquet as pq

    from forcedphot.cli import main

    plain, ra, dec = _stars(tmp_path, "plain.fits", 3.0, calibrated=False)
    calibrated, _, _ = _stars(tmp_path, "calexp.fits", 3.0)
    pd.DataFrame({"diaObjectId": [1, 2, 3], "ra": ra, "dec": dec}).to_parquet(tmp_path / "o.parquet")
    outputs = {}
    for name, path in (("plain", plain), ("calibrated", calibrated)):
        outputs[name] = tmp_path / f"{name}.parquet"
        assert main(["measure", str(path), str(tmp_path / "o.parquet"), "-o", str(outputs[name]), "--psf-fwhm", "3",
                     "--backend", "numpy"]) == 0
    summary = capsys.readouterr().out
    assert summary.count("has no photometric calibration") == 1
    plain_table, calibrated_table = pq.read_table(outputs["plain"]), pq.read_table(outputs["calibrated"])
    assert plain_table.column_names == calibrated_table.column_names  # same columns either way
    for column in ("psfFlux", "psfFluxErr", "apFlux_6", "apFluxErr_6"):
        assert plain_table[column].null_count == 3 and calibrated_table[column].null_count == 0
    np.testing.assert_allclose(plain_table["apFlux_12_instFlux"].to_numpy(), [1000.0, 2000.0, 3000.0], rtol=1e-3)
    assert plain_table.schema.field("apFlux_12_instFlux").metadata[b"unit"] == b"count"
    assert not any(plain_table["apFlux_6_flag"].to_pylist())


def _pca_kernel_image(path, x_parent, y_parent):
    """meas_modelfit's PcaPsf kernel image at a parent position, read from the raw archive
    tables with astropy and NumPy's Chebyshev series (independent of the project's reader)."""
    from numpy.polynomial import chebyshev

    with fits.open(path) as hdul:
        tables = {hdu.header["AR_NAME"].strip(): hdu.data for hdu in hdul[5:9]}
        ids = {int(row["id"]): int(row["row0"]) for row in hdul[4].data}
    combination = tables["LinearCombinationKernel"][0]
    image = np.zeros((25, 25))
    total = 0.0
    for component, function in zip(combination["components"], combination["spatialfunctions"]):
        kernel = tables["FixedKernel"][ids[int(component)]]["image"].reshape(25, 25)
        row = tables["Chebyshev1Function2D"][ids[int(function)]]
        lower, upper = row["min"], row["max"]
        u, v = ((np.array([x_parent, y_parent]) - (lower + upper) / 2) / ((upper - lower) / 2))
        matrix = np.zeros((3, 3))  # [x order, y order]: c0; c1 T1(x), c2 T1(y); c3 T2(x), c4 T1(x)T1(y), c5 T2(y)
        for c, (a, b) in zip(row["coefficients"], [(0, 0), (1, 0), (0, 1), (2, 0), (1, 1), (0, 2)]):
            matrix[a, b] = c
        weight = chebyshev.chebval2d(u, v, matrix)
        image += weight * kernel
        total += weight * kernel.sum()
    return image / total


def test_the_pca_psf_of_meas_modelfit_is_read_from_the_archive_and_evaluated_as_afw_does(tmp_path):
    """PcaPsf: eight 25 x 25 FixedKernels weighted by order-2 Chebyshev functions of the parent
    position. At an integer position the stamp is the normalised kernel image (computed
    independently from the raw tables); it varies over the detector; and a star drawn with it
    at an integer position and measured through the whole engine comes back at its flux."""
    import pandas as pd

    from forcedphot.photometry.config import MeasurementConfig
    from forcedphot.photometry.lsst_fits import write_lsst_exposure
    from forcedphot.photometry.measure import measure
    from forcedphot.photometry.objects import validate_objects
    from forcedphot.photometry.psf_choice import choose_psf
    from forcedphot.photometry.psf_models import describe_psf

    path = LSST / "meas_modelfit_calexp.fits"
    with open_exposure(path) as exposure:
        psf = choose_psf(exposure, "calexp")  # no PSF option: the archive's
        wcs = exposure.wcs
    assert describe_psf(psf).startswith("LSST PcaPsf: 8 kernel images of 25 x 25 px")
    corners = psf.stamps(np.array([5.0, 95.0]), np.array([5.0, 95.0]), np)
    for (x, y), stamp in zip([(5, 5), (95, 95)], corners):
        np.testing.assert_allclose(stamp, _pca_kernel_image(path, x + 1868, y + 2100), rtol=1e-10, atol=1e-15)
    far = psf.stamps(np.array([100.0 - 1868, 3900.0 - 1868]), np.array([100.0 - 2100, 4000.0 - 2100]), np)
    assert np.abs(far[0] - far[1]).max() > 5e-4 * far[0].max()  # it varies (by 0.1% of the peak) over the 4000 px detector
    shifted = psf.stamps(np.array([50.3]), np.array([49.8]), np)[0]  # centred on pixel (50, 50): centroid moves by (0.3, -0.2)
    grid = np.arange(25) - 12
    assert abs((shifted.sum(axis=0) * grid).sum() - (corners[0].sum(axis=0) * grid).sum() - 0.3) < 0.02
    assert abs((shifted.sum(axis=1) * grid).sum() - (corners[0].sum(axis=1) * grid).sum() + 0.2) < 0.02

    # a star of 20000 counts drawn with the model at local (40, 60), sky noise sigma 5
    rng = np.random.default_rng(7)
    image = rng.normal(0.0, 5.0, (101, 101))
    image[48:73, 28:53] += 20000.0 * _pca_kernel_image(path, 40 + 1868, 60 + 2100)
    star = tmp_path / "star.fits"
    write_lsst_exposure(star, image, np.full(image.shape, 25.0), np.zeros(image.shape, np.int32), wcs, x0=1868, y0=2100)
    with fits.open(path) as original, fits.open(star) as ours:  # our pixels, the original header and archive (PcaPsf)
        fits.HDUList([original[0].copy(), *[ours[i].copy() for i in (1, 2, 3)], *[hdu.copy() for hdu in original[4:]]]).writeto(
            star, overwrite=True)
    ra, dec = wcs.all_pix2world([40.0], [60.0], 0)
    with open_exposure(star) as exposure:
        catalog = measure(exposure, validate_objects(pd.DataFrame({"diaObjectId": [1], "ra": ra, "dec": dec})),
                          choose_psf(exposure, "star"), MeasurementConfig(backend="numpy")).catalog
    flux, error = catalog["psfFlux_instFlux"][0], catalog["psfFlux_instFluxErr"][0]
    assert abs(flux - 20000.0) < 3 * error and error < 0.01 * flux and not catalog["psfFlux_flag"][0]


@pytest.mark.parametrize("x, y", [(0, 0), (10, 100), (-200, 30)])
def test_the_piff_psf_equals_lsst_compute_image_at_its_reference_points(x, y):
    """meas_extensions_piff's test exposure: its archive PiffPsf (pickled with Piff < 1.4)
    drawn at parent (x, y) equals LSST's ``computeImage(Point2D(x, y))`` saved beside it,
    pixel for pixel (both sum to 1; tolerance 1e-12 of the peak)."""
    from forcedphot.photometry.psf_choice import choose_psf
    from forcedphot.photometry.psf_models import describe_psf

    reference = fits.open(LSST / "piff" / f"psfIm_{x}_{y}.fits")[0]
    corner = (reference.header["CRVAL1A"], reference.header["CRVAL2A"])  # the image's xy0 in parent pixels
    with open_exposure(LSST / "piff" / "exp.fits") as exposure:
        psf = choose_psf(exposure, "exp.fits")
        stamp = psf.stamps(np.array([x - exposure.x0], float), np.array([y - exposure.y0], float), np)[0]
    assert "LSST PiffPsf" in describe_psf(psf) and stamp.shape == reference.data.shape == (25, 25)
    assert corner == (x - 12, y - 12)  # LSST's bbox is centred on the same pixel as our stamp
    np.testing.assert_allclose(stamp, reference.data, rtol=0, atol=1e-12 * reference.data.max())


def test_a_piff_psf_without_the_piff_package_says_how_to_install_it(monkeypatch):
    import sys

    from forcedphot.photometry.psf_choice import choose_psf
    from forcedphot.photometry.psf_models import PsfError

    monkeypatch.setitem(sys.modules, "piff", None)  # import piff now raises ImportError
    with open_exposure(LSST / "piff" / "exp.fits") as exposure:
        with pytest.raises(PsfError, match=r"exp.fits: its archive holds a PiffPsf, which needs .*pip install 'forcedphot\[piff\]'"):
            choose_psf(exposure, "exp.fits")


def test_an_archive_psfex_psf_is_read_as_meas_extensions_psfex_does(tmp_path):
    """A PsfexPsf written in meas_extensions_psfex's archive layout (two catalogs: sizes, then
    arrays) from the DES model: same polynomial and basis as the .psf file, evaluated at parent
    pixels, and its pixel data read transposed, as meas_extensions_psfex's computeImage does."""
    from forcedphot.photometry.psf_choice import choose_psf
    from forcedphot.photometry.psf_models import PsfexPsf

    des = Path(__file__).resolve().parents[1] / "data" / "des" / "DECam_00154912_12_psfcat.psf"
    header, basis = fits.getheader(des, "PSF_DATA"), fits.getdata(des, "PSF_DATA")["PSF_MASK"][0].astype(np.float64)
    x0, y0 = 100, 300
    path = tmp_path / "calexp.fits"
    write_lsst_exposure(path, np.zeros((50, 60)), np.ones((50, 60)), np.zeros((50, 60), np.int32), sip_wcs(60, 50), x0=x0, y0=y0)
    first = [header["POLZERO1"] - 1.0, header["POLZERO2"] - 1.0]  # parent 0-based = X_IMAGE - 1 when x0 = 0
    index = fits.BinTableHDU.from_columns([fits.Column("id", "J", array=[1, 1]), fits.Column("cat.archive", "J", array=[1, 2]),
                                           fits.Column("cat.persistable", "J", array=[0, 0]), fits.Column("row0", "J", array=[0, 0]),
                                           fits.Column("nrows", "J", array=[1, 1]), fits.Column("name", "64A", array=["PsfexPsf"] * 2)])
    sizes = fits.BinTableHDU.from_columns([fits.Column(name, "J", array=[value]) for name, value in
                                           (("ndim", 2), ("ngroup", 1), ("ncoeff", 6), ("_size_size", 3), ("_comp_size", basis.size),
                                            ("_context_size", 2))]
                                          + [fits.Column("averagePosition", "2D", array=[[1000.0, 2000.0]]),
                                             fits.Column("_pixstep", "E", array=[header["PSF_SAMP"]])])
    arrays = fits.BinTableHDU.from_columns([
        fits.Column("group", "2J", array=[[0, 0]]), fits.Column("degree", "1J", array=[[2]]),
        fits.Column("basis", "6D", array=[np.zeros(6)]), fits.Column("coeff", "6D", array=[np.zeros(6)]),
        fits.Column("_size", "3J", array=[[25, 25, 6]]), fits.Column("_comp", f"{basis.size}E", array=[basis.ravel()]),
        fits.Column("_context_first", "2D", array=[first]),
        fits.Column("_context_second", "2D", array=[[header["POLSCAL1"], header["POLSCAL2"]]])])
    for hdu, kind, number in ((index, "ARCHIVE_INDEX", 0), (sizes, "ARCHIVE_DATA", 1), (arrays, "ARCHIVE_DATA", 2)):
        hdu.header.update(EXTTYPE=kind, AR_CATN=number, AR_NAME="PsfexPsf" if number else "")
    with fits.open(path) as hdul:
        primary = hdul[0].copy()
        primary.header.update(AR_HDU=5, ARCHIVE_ID_PSF=1)
        fits.HDUList([primary, *[hdul[i].copy() for i in (1, 2, 3)], index, sizes, arrays]).writeto(path, overwrite=True)

    with open_exposure(path) as exposure:
        psf = choose_psf(exposure, "calexp")
    from_file = PsfexPsf.from_file(str(des))
    local = np.array([10.3, 40.3]), np.array([20.3, 5.3])  # equal fractions in x and y: the transpose keeps the centre
    for ours, theirs in zip(psf.stamps(*local, np), from_file.stamps(local[0] + x0, local[1] + y0, np)):
        np.testing.assert_allclose(ours, theirs.T, rtol=1e-6, atol=1e-9)
    assert not np.allclose(basis[1], basis[1].T, rtol=0.05)  # the transpose is visible in this model
