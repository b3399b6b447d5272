"""Light-curve products (issue 24): magnitudes and limits, epochStatus, baseline correction
with error rescaling, and bins, against truth and against computations written out here."""

import math

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from forcedphot.photometry.lightcurve_products import (EPOCH_STATUS, BaselineWindow, bin_lightcurves, correct_baseline,
                                                       with_epoch_columns)

EVENT = 61030.0  # sources switch on after this MJD


def survey(rng, n_objects=200, n_epochs=60, sigma=100.0, under=1.0, bands=("g", "r")):
    """Light-curve rows of ``n_objects`` objects: half constant at 0 nJy, half switching on
    to 2000 nJy after EVENT; noise ``sigma``, reported errors ``sigma / under`` (``under`` >
    1: the variance planes underestimate the noise)."""
    mjd = np.sort(rng.uniform(61000.0, 61060.0, n_epochs))
    rows = []
    for object_id in range(n_objects):
        transient = object_id % 2 == 1
        for i, t in enumerate(mjd):
            truth = 2000.0 if transient and t > EVENT else 0.0
            rows.append({"diaObjectId": object_id, "band": bands[i % len(bands)], "midpointMjdTai": t,
                         "psfFlux": truth + rng.normal(0, sigma), "psfFluxErr": sigma / under,
                         "scienceFlux": 5e4 + truth + rng.normal(0, 2 * sigma), "scienceFluxErr": 2 * sigma / under,
                         "psfFlux_instFlux": 1.0, "psfFlux_flag": False, "psfFlux_flag_edge": False,
                         "psfFlux_flag_noGoodPixels": False, "localPhotoCalib": 0.5, "invalidPsfFlag": False,
                         "pixelFlags_offimage": False, "pixelFlags_saturated": False, "pixelFlags_cr": False,
                         "pixelFlags_bad": False, "pixelFlags_nodata": False, "pixelFlags_edge": False, "truth": truth})
    return pd.DataFrame(rows)


def table(frame):
    return pa.Table.from_pandas(frame.drop(columns="truth"), preserve_index=False)


def test_magnitudes_limits_and_upper_limits_follow_their_definitions(rng):
    frame = survey(rng, n_objects=4, n_epochs=40)
    out = with_epoch_columns(table(frame)).to_pandas()
    flux, err = frame["psfFlux"].to_numpy(), frame["psfFluxErr"].to_numpy()
    upper = flux / err < 3
    assert (out["isUpperLimit"].to_numpy() == upper).all() and out.loc[upper, "psfMag"].isna().all()
    np.testing.assert_allclose(out.loc[~upper, "psfMag"], 31.4 - 2.5 * np.log10(flux[~upper]), rtol=1e-6)
    np.testing.assert_allclose(out.loc[~upper, "psfMagErr"], 2.5 / math.log(10) * err[~upper] / flux[~upper], rtol=1e-5)
    np.testing.assert_allclose(out["psfMagLim5Sigma"], 31.4 - 2.5 * np.log10(5 * err), rtol=1e-6)
    np.testing.assert_allclose(out["scienceMag"], 31.4 - 2.5 * np.log10(frame["scienceFlux"]), rtol=1e-6)
    assert not out["scienceIsUpperLimit"].any() and (out["epochStatus"] == 0).all()
    assert with_epoch_columns(table(frame), snr_limit=100.0).to_pandas()["isUpperLimit"].all()


@pytest.mark.parametrize("column, value, code", [
    ("pixelFlags_offimage", True, 1), ("invalidPsfFlag", True, 2), ("localPhotoCalib", np.nan, 3),
    ("pixelFlags_saturated", True, 6), ("pixelFlags_cr", True, 7), ("pixelFlags_bad", True, 8),
    ("pixelFlags_nodata", True, 9), ("pixelFlags_edge", True, 10),
])
def test_epoch_status_codes_name_the_first_problem(rng, column, value, code):
    frame = survey(rng, n_objects=1, n_epochs=4)
    frame.loc[1, column] = value
    frame.loc[2, ["psfFlux_flag", "psfFlux_instFlux"]] = [True, np.nan]  # a NaN pixel in the fit region
    frame.loc[3, ["psfFlux_flag", "psfFlux_flag_edge"]] = [True, True]  # a stamp off the edge
    status = with_epoch_columns(table(frame)).to_pandas()["epochStatus"].tolist()
    assert status == [0, code, 4, 5] and all(c in EPOCH_STATUS for c in status)
    frame.loc[1, "pixelFlags_cr"] = True  # a later problem does not hide an earlier one
    assert with_epoch_columns(table(frame)).to_pandas()["epochStatus"][1] == min(code, 7)


def test_a_constant_object_corrects_to_zero_and_a_later_source_keeps_its_flux(rng):
    frame = survey(rng)
    corrected, summaries = correct_baseline(with_epoch_columns(table(frame)), BaselineWindow(mjd_max=EVENT))
    out = corrected.to_pandas()
    pulls = (out["psfFluxCorrected"] - frame["truth"]) / out["psfFluxErrRescaled"]
    # errors right to begin with: the recipe only ever scales them up (by sqrt(chi2) of ~15
    # baseline epochs, above 1 for half the objects by chance), so the pulls come out a little narrow
    assert abs(pulls.mean()) < 0.05 and 0.88 < pulls.std() < 1.0
    late = frame["truth"] > 0
    assert abs(out.loc[late, "psfFluxCorrected"].mean() - 2000.0) < 10
    scales = np.array([s["errorScale"] for s in summaries])
    assert len(summaries) == 400 and (scales >= 1).all() and np.median(scales) < 1.1 and scales.max() < 2
    first = summaries[0]
    assert first["baselineErr"] == pytest.approx(math.sqrt(math.pi / 2) * 100 / math.sqrt(first["epochs"]), rel=0.3)


def test_underestimated_errors_are_rescaled_to_pulls_of_one(rng):
    """Variance planes 2.25x too small (errors 1.5x): the baseline's reduced chi^2 brings the
    pulls' standard deviation back to 1 within 5%."""
    frame = survey(rng, n_epochs=80, under=1.5)
    out = correct_baseline(with_epoch_columns(table(frame)), BaselineWindow(mjd_max=EVENT))[0].to_pandas()
    raw = (frame["psfFlux"] - frame["truth"]) / frame["psfFluxErr"]
    rescaled = (out["psfFluxCorrected"] - frame["truth"]) / out["psfFluxErrRescaled"]
    assert raw.std() == pytest.approx(1.5, rel=0.05) and rescaled.std() == pytest.approx(1.0, abs=0.05)


def test_too_few_baseline_epochs_give_no_baseline_and_say_so(rng):
    frame = survey(rng, n_objects=2, n_epochs=60)
    out, summaries = correct_baseline(with_epoch_columns(table(frame)), BaselineWindow(mjd_min=61000.0, mjd_max=61005.0))
    assert out.column("psfFluxCorrected").null_count == len(frame)
    assert all("fewer than 10" in s["note"] for s in summaries)
    flagged = frame.assign(pixelFlags_cr=True)  # no good epoch at all
    assert all(s["epochs"] == 0 for s in correct_baseline(with_epoch_columns(table(flagged)), BaselineWindow(mjd_max=EVENT))[1])


@pytest.mark.parametrize("how", [{"night": True}, {"days": 7.0}])
def test_bins_are_inverse_variance_means_of_good_epochs(rng, how):
    frame = survey(rng, n_objects=3, n_epochs=90)
    frame.loc[5, "pixelFlags_bad"] = True  # left out of its bin
    frame["psfFluxErr"] = rng.uniform(50, 150, len(frame))
    binned = bin_lightcurves(with_epoch_columns(table(frame)), **how).to_pandas()
    good = frame.drop(index=5)
    key = np.floor(good["midpointMjdTai"] - 0.5) if how.get("night") else np.floor(good["midpointMjdTai"] / 7.0)
    expected = []
    for (object_id, band, number), group in good.assign(bin=key).groupby(["diaObjectId", "band", "bin"]):
        w = 1 / group["psfFluxErr"] ** 2
        expected.append((object_id, band, number, len(group), (w * group["psfFlux"]).sum() / w.sum(), 1 / math.sqrt(w.sum()),
                         group["midpointMjdTai"].mean(), group["midpointMjdTai"].max() - group["midpointMjdTai"].min()))
    expected = pd.DataFrame(expected, columns=["diaObjectId", "band", "bin", "n", "flux", "err", "mjd", "span"])
    assert len(binned) == len(expected)
    np.testing.assert_array_equal(binned["nEpochs"], expected["n"])
    np.testing.assert_allclose(binned["psfFlux"], expected["flux"], rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(binned["psfFluxErr"], expected["err"], rtol=1e-5)
    np.testing.assert_allclose(binned["midpointMjdTai"], expected["mjd"], rtol=1e-12)
    np.testing.assert_allclose(binned["mjdMax"] - binned["mjdMin"], expected["span"], atol=1e-9)
    np.testing.assert_allclose(binned["psfMagLim5Sigma"], 31.4 - 2.5 * np.log10(5 * binned["psfFluxErr"]), rtol=1e-6)
    with pytest.raises(ValueError, match="one of the two"):
        bin_lightcurves(with_epoch_columns(table(frame)), days=1.0, night=True)


def test_the_plot_draws_limits_apart_and_the_corrected_flux(rng, tmp_path):
    from forcedphot.photometry.plot import plot_lightcurves, points

    frame = survey(rng, n_objects=2, n_epochs=40)
    epochs = with_epoch_columns(table(frame)).to_pandas()
    measured, limits = points(epochs, "psf", magnitudes=True)
    assert len(measured) + len(limits) == len(epochs) and len(limits) == epochs["isUpperLimit"].sum() > 0
    np.testing.assert_allclose(limits["y"], epochs.loc[epochs["isUpperLimit"], "psfMagLim5Sigma"])
    corrected = correct_baseline(with_epoch_columns(table(frame)), BaselineWindow(mjd_max=EVENT))[0].to_pandas()
    shown, none = points(corrected, "psf", magnitudes=False)
    np.testing.assert_allclose(shown["y"], corrected["psfFluxCorrected"])
    np.testing.assert_allclose(shown["err"], corrected["psfFluxErrRescaled"])
    assert none.empty
    png = plot_lightcurves(corrected, tmp_path / "lc.png", magnitudes=True).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000


def test_ab_magnitudes_of_known_fluxes():
    from forcedphot.photometry.lightcurve_products import magnitudes

    flux = np.array([3631e9, 1.0, -5.0, 100.0, np.nan])
    error = np.array([3631e8, 0.2, 1.0, 20.0, 1.0])
    columns = {name: column.to_numpy(zero_copy_only=False) for name, column in magnitudes(flux, error, "psf", 3.0).items()}
    np.testing.assert_allclose(columns["psfMag"][[0, 1, 3]].astype(float), [0.0, 31.4, 31.4 - 5.0], atol=1e-4)  # 3631 Jy is AB 0
    assert np.isnan(columns["psfMag"][2]) and np.isnan(columns["psfMag"][4])  # an upper limit; no flux
    np.testing.assert_allclose(columns["psfMagErr"][[0, 3]].astype(float), 2.5 / np.log(10) * 0.1 * np.array([1, 2]), rtol=1e-5)
    # a 5-sigma source at the limit has S/N 5: its magnitude is the limit
    np.testing.assert_allclose(columns["psfMagLim5Sigma"].astype(float), 31.4 - 2.5 * np.log10(5 * error), rtol=1e-6)
    assert list(columns["isUpperLimit"]) == [False, False, True, False, None]


def test_pulls_of_rescaled_errors_on_a_field_with_underestimated_variance(tmp_path):
    """Issue 24: a demo survey whose difference images' variance planes are 2.25x too small
    (errors 1.5x), measured as light curves: the constant objects' raw pulls are ~1.5 wide,
    the baseline-corrected ones with rescaled errors 1 within 5%."""
    from astropy.io import fits

    from forcedphot.cli import main
    from forcedphot.demo.survey import make_demo_survey

    root = tmp_path / "survey"
    make_demo_survey(root, visits=40, size=256, n_objects=150, seed=8)
    for path in root.glob("*/*/difference.fits"):
        with fits.open(path, mode="update") as hdus:
            hdus["VARIANCE"].data = hdus["VARIANCE"].data / 2.25
    out = tmp_path / "lc.parquet"
    assert main(["lightcurve", str(root), "--objects", str(root / "diaObjects.parquet"), "-o", str(out), "--backend", "numpy",
                 "--baseline-mjd-max", "100000"]) == 0
    kinds = pd.read_parquet(root / "objects.parquet").set_index("diaObjectId")["kind"]
    rows = pd.read_parquet(out)
    constant = rows[(kinds[rows["diaObjectId"]].to_numpy() == "constant") & (rows["epochStatus"] == 0) & rows["psfFluxCorrected"].notna()]
    assert len(constant) > 700  # 805 with this seed
    raw = constant["psfFlux"] / constant["psfFluxErr"]
    rescaled = constant["psfFluxCorrected"] / constant["psfFluxErrRescaled"]
    assert raw.std() == pytest.approx(1.5, rel=0.1) and rescaled.std() == pytest.approx(1.0, abs=0.05)
