"""Light curves end to end: the demo survey measured against its truth, the HTTP answer
equal to the CLI's, a large request accepted as a job, coverage listings, and a
repository laid out by another template and written by other code."""

import io
import json

from fastapi.testclient import TestClient
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from scenes import render_stars, sip_wcs, write_exposure
from service_helpers import AUTH, settings_for, wait_until

from forcedphot.api.app import create_app
from forcedphot.cli import main as cli
from forcedphot.demo.survey import make_demo_survey

VISITS, SIZE, OBJECTS = 24, 384, 100
# a saturated, cosmic-ray or bad pixel anywhere in the 3-sigma footprint disturbs the PSF fit
CLEAN = ["psfFlux_flag", "scienceFlux_flag", "pixelFlags_saturated", "pixelFlags_cr", "pixelFlags_bad", "pixelFlags_edge"]


@pytest.fixture(scope="module")
def survey(tmp_path_factory):
    root = tmp_path_factory.mktemp("survey")
    made = make_demo_survey(root, visits=VISITS, size=SIZE, n_objects=OBJECTS, seed=3)
    return {"root": root, "made": made, "truth": pd.read_parquet(root / "truth.parquet"),
            "objects": pd.read_parquet(root / "diaObjects.parquet")}


@pytest.fixture(scope="module")
def measured(survey, tmp_path_factory):
    out = tmp_path_factory.mktemp("lc") / "lc.parquet"
    assert cli(["lightcurve", str(survey["root"]), "--objects", str(survey["root"] / "diaObjects.parquet"), "-o", str(out),
                "--backend", "numpy", "--plot", str(out.with_suffix(".png"))]) == 0
    return pd.read_parquet(out), out


def test_a_light_curve_on_the_command_line_shows_its_progress(survey, tmp_path, capsys, monkeypatch):
    from forcedphot import cli as cli_module

    monkeypatch.setattr(cli_module._ProgressLine, "after", 0.0)  # a line at every step, however fast
    monkeypatch.setattr(cli_module._ProgressLine, "every", 0.0)
    assert cli(["lightcurve", str(survey["root"]), "--ra", str(survey["objects"]["ra"][0]), "--dec", str(survey["objects"]["dec"][0]),
                "-o", str(tmp_path / "lc.parquet"), "--backend", "numpy"]) == 0
    err = capsys.readouterr().err
    epochs = pd.read_parquet(tmp_path / "lc.parquet")["visit"].nunique()
    assert f"measured {epochs - 1}/{epochs} exposures" in err and "exposures (" in err


def test_the_demo_survey_spans_two_bands_and_60_days_with_varying_coverage(survey):
    truth, made = survey["truth"], survey["made"]
    assert made.mjd_range[1] - made.mjd_range[0] >= 60 and set(truth["band"]) == {"g", "r"}
    per_visit = truth.groupby("visit")["on_detector"].sum()
    assert per_visit.min() < per_visit.max() < OBJECTS  # dithering: coverage varies, never everything
    kinds = pd.read_parquet(survey["root"] / "objects.parquet")["kind"].value_counts()
    assert set(kinds.index) == {"supernova", "periodic", "constant"} and kinds.min() > OBJECTS / 6


def test_every_covering_pair_is_measured_at_its_time(survey, measured):
    catalog, _ = measured
    truth = survey["truth"]
    expected = truth[truth["on_detector"]]
    # the index and the measurement agree with the truth's WCS test, except within 0.1 px of the border
    border = np.minimum.reduce([np.abs(truth["x"] + 0.5), np.abs(truth["x"] - SIZE + 0.5), np.abs(truth["y"] + 0.5),
                                np.abs(truth["y"] - SIZE + 0.5)])
    sure = set(map(tuple, truth.loc[border > 0.1, ["diaObjectId", "visit"]].to_numpy()))
    got = set(map(tuple, catalog[["diaObjectId", "visit"]].to_numpy()))
    want = set(map(tuple, expected[["diaObjectId", "visit"]].to_numpy()))
    assert (got ^ want) <= (got | want) - sure
    assert len(got) > 0.9 * len(want) and len(catalog) == len(got)  # one row per pair
    merged = catalog.merge(expected, on=["diaObjectId", "visit"], suffixes=("", "_truth"))
    np.testing.assert_allclose(merged["midpointMjdTai"], merged["midpointMjdTai_truth"], rtol=0, atol=1e-8)
    assert (merged["band"] == merged["band_truth"]).all()
    ordered = catalog[["diaObjectId", "midpointMjdTai"]].to_numpy()
    assert (np.lexsort((ordered[:, 1], ordered[:, 0])) == np.arange(len(ordered))).all()  # sorted by object, then time


def test_flux_pulls_against_the_truth(survey, measured):
    """Difference and science fluxes of unflagged rows: pulls of mean 0 and standard
    deviation 1, each within 0.05."""
    catalog, _ = measured
    merged = catalog.merge(survey["truth"], on=["diaObjectId", "visit"], suffixes=("", "_truth"))
    clean = merged[~merged[CLEAN].any(axis=1)]
    assert len(clean) > 0.8 * len(merged)
    for flux, truth in (("psfFlux", "difference_flux_nJy"), ("scienceFlux", "science_flux_nJy")):
        pull = (clean[flux] - clean[truth]) / clean[flux + "Err"]
        assert abs(pull.mean()) < 0.05 and abs(pull.std() - 1) < 0.05, (flux, pull.mean(), pull.std())


def test_a_variable_object_is_seen_to_vary(survey, measured):
    """A bright supernova's difference flux rises and falls as its truth does."""
    catalog, _ = measured
    truth = survey["truth"]
    amplitudes = truth.groupby("diaObjectId")["difference_flux_nJy"].agg(lambda f: f.max() - f.min())
    kinds = pd.read_parquet(survey["root"] / "objects.parquet").set_index("diaObjectId")["kind"]
    brightest = amplitudes[kinds[amplitudes.index] == "supernova"].idxmax()
    rows = catalog[catalog["diaObjectId"] == brightest].merge(truth, on=["diaObjectId", "visit"], suffixes=("", "_truth"))
    assert len(rows) >= 8
    assert np.corrcoef(rows["psfFlux"], rows["difference_flux_nJy"])[0, 1] > 0.9


def test_the_plot_is_written(measured):
    _, out = measured
    png = out.with_suffix(".png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000


@pytest.fixture(scope="module")
def client(survey, tmp_path_factory):
    settings = settings_for(survey["root"], tmp_path_factory.mktemp("data"), max_lightcurve_pairs=400)
    with TestClient(create_app(settings), headers=AUTH) as c:
        wait_until(lambda: c.get("/v1/exposures", params={"ra": 150.1, "dec": 2.2}).status_code == 200, timeout=30)
        yield c


def _sorted(frame: pd.DataFrame) -> pd.DataFrame:
    columns = [c for c in frame.columns if c != "timeProcessedMjdTai"]
    return frame.sort_values(["diaObjectId", "visit"]).reset_index(drop=True)[columns]


def test_http_answer_equals_the_cli(client, survey, tmp_path):
    objects = survey["objects"].head(12)
    response = client.post("/v1/lightcurves", json={"objects": objects.to_dict(orient="records"), "psf_fwhm": 3.5})
    assert response.status_code == 200, response.text
    served = pd.read_parquet(io.BytesIO(response.content))
    objects.to_parquet(tmp_path / "some.parquet")
    assert cli(["lightcurve", str(survey["root"]), "--objects", str(tmp_path / "some.parquet"), "-o", str(tmp_path / "cli.parquet"),
                "--index", str(tmp_path / "index.sqlite"), "--psf-fwhm", "3.5", "--backend", "numpy"]) == 0
    pd.testing.assert_frame_equal(_sorted(served), _sorted(pd.read_parquet(tmp_path / "cli.parquet")), check_dtype=False)
    assert int(response.headers["x-measurements"]) == len(served) and int(response.headers["x-epochs"]) <= VISITS


def test_products_over_http_and_on_the_command_line(client, survey, tmp_path):
    """Issue 24: every light curve has its magnitudes, limits and epochStatus; a baseline and
    bins when asked, the same over HTTP and on the command line."""
    from forcedphot.photometry.formats import read_provenance

    objects = survey["objects"].head(12)
    records = objects.to_dict(orient="records")
    epochs = pd.read_parquet(io.BytesIO(client.post("/v1/lightcurves", json={"objects": records, "psf_fwhm": 3.5}).content))
    assert {"psfMag", "psfMagLim5Sigma", "isUpperLimit", "scienceMag", "epochStatus"} <= set(epochs.columns)
    assert epochs.loc[epochs["isUpperLimit"], "psfMag"].isna().all() and (epochs["epochStatus"] == 0).mean() > 0.5
    window = float(np.median(epochs["midpointMjdTai"]))
    body = {"objects": records, "psf_fwhm": 3.5, "baseline": {"mjd_max": window, "min_epochs": 3}, "bin": "night"}
    answer = client.post("/v1/lightcurves", json=body)
    assert answer.status_code == 200, answer.text
    binned = pd.read_parquet(io.BytesIO(answer.content))
    good = epochs[epochs["epochStatus"] == 0]
    assert len(binned) == good.groupby(["diaObjectId", "band", np.floor(good["midpointMjdTai"] - 0.5)]).ngroups
    assert {"nEpochs", "mjdMin", "mjdMax", "psfFluxCorrected", "psfFluxErrRescaled", "psfMag"} <= set(binned.columns)
    objects.to_parquet(tmp_path / "some.parquet")
    out = tmp_path / "binned.parquet"
    assert cli(["lightcurve", str(survey["root"]), "--objects", str(tmp_path / "some.parquet"), "-o", str(out), "--index",
                str(tmp_path / "index.sqlite"), "--psf-fwhm", "3.5", "--backend", "numpy", "--baseline-mjd-max", str(window),
                "--baseline-min-epochs", "3", "--bin", "night", "--plot", str(tmp_path / "mag.png"), "--plot-magnitudes"]) == 0
    assert (tmp_path / "mag.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from_cli = pd.read_parquet(out)
    pd.testing.assert_frame_equal(from_cli, binned, check_dtype=False)
    done = read_provenance(out)["products"]
    assert done["bin"].startswith("night") and done["epochStatus"]["0"] == "good"
    assert {(s["diaObjectId"], s["band"]) for s in done["baseline"]} == set(zip(epochs["diaObjectId"], epochs["band"]))
    for fmt, media_type in (("fits", "application/fits"), ("votable", "application/x-votable+xml"), ("ecsv", "text/x-ecsv")):
        for request in (body, {"objects": records, "psf_fwhm": 3.5}):  # bins, and epochs with their products (nulls in bool columns)
            encoded = client.post("/v1/lightcurves", json=request, headers={"Accept": media_type})
            assert encoded.status_code == 200, (fmt, encoded.text)
    refused = client.post("/v1/lightcurves", json={**body, "baseline": {"mjd_max": 1.0, "mjd_min": 2.0}})
    assert refused.status_code == 422 and "baseline window is empty" in refused.json()["detail"]
    assert cli(["lightcurve", str(survey["root"]), "--ra", "150", "--dec", "2", "-o", str(out), "--bin", "weekly"]) == 2


def test_one_position_time_range_and_bands(client, survey):
    obj = survey["objects"].iloc[0]
    everything = client.post("/v1/lightcurves", json={"objects": {"ra": obj["ra"], "dec": obj["dec"]}},
                             headers={"Accept": "application/json"}).json()
    assert {row["diaObjectId"] for row in everything} == {0}
    times = sorted(row["midpointMjdTai"] for row in everything)
    middle = times[len(times) // 2]
    some = client.post("/v1/lightcurves", json={"objects": {"ra": obj["ra"], "dec": obj["dec"]}, "mjd_min": middle, "bands": ["g"]},
                       headers={"Accept": "application/json"}).json()
    assert some and all(row["midpointMjdTai"] >= middle and row["band"] == "g" for row in some)
    assert len(some) < len(everything)
    listed = client.get("/v1/exposures", params={"ra": obj["ra"], "dec": obj["dec"]}).json()
    assert listed["count"] == len(everything) and [e["midpointMjdTai"] for e in listed["exposures"]] == times
    assert "footprint" in listed["exposures"][0] and "path" not in str(listed)


def test_a_large_request_becomes_a_job_with_the_same_rows(client, survey):
    body = {"objects": survey["objects"].head(40).to_dict(orient="records")}
    accepted = client.post("/v1/lightcurves", json=body, headers={"Idempotency-Key": "lc-1"})
    assert accepted.status_code == 202 and accepted.headers["location"].startswith("/v1/jobs/"), accepted.text
    assert int(accepted.headers["x-pairs"]) > 400
    again = client.post("/v1/lightcurves", json=body, headers={"Idempotency-Key": "lc-1"})
    assert again.status_code == 200 and again.json()["id"] == accepted.json()["id"]
    status = wait_until(lambda: (s := client.get(accepted.headers["location"]).json())["state"] in ("succeeded", "failed") and s, timeout=60)
    assert status["state"] == "succeeded", status
    result = pd.read_parquet(io.BytesIO(client.get(status["result"]).content))
    ordered = result[["diaObjectId", "midpointMjdTai"]].to_numpy()
    assert (np.lexsort((ordered[:, 1], ordered[:, 0])) == np.arange(len(ordered))).all()
    truth = survey["truth"]
    covered = truth[truth["on_detector"] & truth["diaObjectId"].isin(survey["objects"].head(40)["diaObjectId"])]
    assert abs(len(result) - len(covered)) <= 2


def test_a_job_sized_light_curve_gets_its_baseline_and_bins(client, survey, tmp_path):
    """Issue 24: a request too large to answer at once is a job whose result is made into
    the same products, one range of objects at a time, as an answer at once would be."""
    from forcedphot.photometry.formats import read_provenance

    records = survey["objects"].head(40).to_dict(orient="records")
    body = {"objects": records, "baseline": {"mjd_max": 61060.0, "min_epochs": 3}, "bin": {"days": 5}}
    accepted = client.post("/v1/lightcurves", json=body)
    assert accepted.status_code == 202, accepted.text
    status = wait_until(lambda: (s := client.get(accepted.headers["location"]).json())["state"] in ("succeeded", "failed") and s, timeout=60)
    assert status["state"] == "succeeded", status
    result = client.get(status["result"]).content
    binned = pd.read_parquet(io.BytesIO(result))
    assert {"nEpochs", "mjdMin", "mjdMax", "psfFluxCorrected", "psfMag", "isUpperLimit"} <= set(binned.columns)
    assert (binned["mjdMax"] - binned["mjdMin"] < 5).all() and binned["nEpochs"].min() >= 1
    assert len(binned.groupby(["diaObjectId", "band", "bin"])) == len(binned)
    (tmp_path / "job.parquet").write_bytes(result)
    done = read_provenance(tmp_path / "job.parquet")["products"]
    assert done["bin"] == "5 d" and {s["diaObjectId"] for s in done["baseline"]} <= {r["diaObjectId"] for r in records}


def test_bad_light_curve_requests_are_named(client):
    assert client.post("/v1/lightcurves", json={"objects": {"ra": 400, "dec": 0}}).status_code == 422
    assert client.post("/v1/lightcurves", json={"objects": {"ra": 1, "dec": 0}, "bands": []}).status_code == 422
    assert client.get("/v1/exposures", params={"ra": 10, "dec": 95}).status_code == 422
    nothing = client.post("/v1/lightcurves", json={"objects": {"ra": 10.0, "dec": -40.0}})
    assert nothing.status_code == 200 and pd.read_parquet(io.BytesIO(nothing.content)).empty
    assert "psfFlux" in pd.read_parquet(io.BytesIO(nothing.content)).columns


def test_any_repository_laid_out_by_a_template(tmp_path):
    """Files written by other code, under another template, without PSF_FWHM keywords."""
    root = tmp_path / "other"
    rng = np.random.default_rng(1)
    wcs = sip_wcs(120, 120, ra=20.0, dec=-5.0)
    ra, dec = wcs.all_pix2world([60.3], [59.7], 0)
    for visit in range(5):
        image = render_stars((120, 120), np.array([60.3]), np.array([59.7]), np.array([1000.0 * (visit + 1)]), 1.5)
        image += rng.normal(0, 1, image.shape)
        for kind in ("calexp", "difference"):
            (root / kind).mkdir(parents=True, exist_ok=True)
            write_exposure(root / kind / f"{visit + 10}-3.fits", image, np.ones_like(image), wcs=wcs, visit=visit + 10, detector=3)
    out = tmp_path / "lc.csv"
    code = cli(["lightcurve", str(root), "--template", "{datasetType}/{visit}-{detector}.fits", "--ra", str(ra[0]), "--dec", str(dec[0]),
                "--psf-fwhm", str(1.5 * 2.3548), "-o", str(out), "--backend", "numpy"])
    assert code == 0
    table = pd.read_csv(out, comment="#")
    assert list(table["visit"]) == [10, 11, 12, 13, 14]
    np.testing.assert_allclose(table["psfFlux_instFlux"], 1000.0 * np.arange(1, 6), rtol=0.02)


def test_a_light_curve_job_runs_on_a_dask_cluster_with_the_same_rows(survey, tmp_path, client):
    """With a Dask scheduler configured, a light-curve job runs as a campaign there (one task
    per exposure, 2 workers) and its result equals the one measured in the server."""
    from distributed import LocalCluster

    body = {"objects": survey["objects"].head(40).to_dict(orient="records")}
    here = client.post("/v1/lightcurves", json=body)
    assert here.status_code == 202
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        settings = settings_for(survey["root"], tmp_path, max_lightcurve_pairs=400, dask_scheduler=cluster.scheduler_address)
        with TestClient(create_app(settings), headers=AUTH) as on_dask:
            wait_until(lambda: on_dask.get("/v1/exposures", params={"ra": 150.1, "dec": 2.2}).status_code == 200, timeout=30)
            accepted = on_dask.post("/v1/lightcurves", json=body)
            status = wait_until(lambda: (s := on_dask.get(accepted.headers["location"]).json())["state"] in ("succeeded", "failed") and s,
                                timeout=120)
            content = on_dask.get(status["result"]).content
    result = pd.read_parquet(io.BytesIO(content))
    provenance = json.loads(pq.read_schema(io.BytesIO(content)).metadata[b"forcedphot"])
    expected_status = wait_until(lambda: (s := client.get(here.headers["location"]).json())["state"] in ("succeeded", "failed") and s,
                                 timeout=120)
    expected = pd.read_parquet(io.BytesIO(client.get(expected_status["result"]).content))
    assert status["state"] == "succeeded" and status["errors"] == [] and status["progress"]["fraction"] == 1.0
    assert status["progress"]["exposures_total"] == expected_status["progress"]["exposures_total"] > 5
    pd.testing.assert_frame_equal(_sorted(result), _sorted(expected), check_dtype=False)
    ordered = result[["diaObjectId", "midpointMjdTai"]].to_numpy()
    assert (np.lexsort((ordered[:, 1], ordered[:, 0])) == np.arange(len(ordered))).all()
    (campaign,) = provenance["exposures"]  # measured as one campaign, on the cluster's two workers
    assert campaign["campaign"]["where"] == f"dask {cluster.scheduler_address}, 2 workers" and campaign["campaign"]["epochs"] > 5


def test_impossible_requests_are_refused_and_empty_ones_say_so(client, survey, tmp_path, capsys):
    """Issue 23, item 8: an empty time range or a position off the sky is 422 (exit 2)
    naming the fields; a request that covers nothing is 200 with a note (X-Note; a note
    on stderr), not a silent empty table."""
    position = {"ra": float(survey["objects"]["ra"][0]), "dec": float(survey["objects"]["dec"][0])}
    refused = client.post("/v1/lightcurves", json={"objects": position, "mjd_min": 61001, "mjd_max": 61000})
    assert refused.status_code == 422 and "mjd_min (61001.0) is after mjd_max" in refused.json()["detail"]
    assert client.post("/v1/lightcurves", json={"objects": {"ra": 10.0, "dec": 95.0}}).status_code == 422
    empty = client.post("/v1/lightcurves", json={"objects": position, "bands": ["z"]}, headers={"Accept": "application/json"})
    assert empty.status_code == 200 and empty.json() == [] and empty.headers["x-epochs"] == "0"
    assert "no exposure covers" in empty.headers["x-note"]
    root, out = str(survey["root"]), str(tmp_path / "lc.parquet")
    assert cli(["lightcurve", root, "--ra", "10", "--dec", "95", "-o", out]) == 2
    assert "--dec 95 is not a sky position" in capsys.readouterr().err
    assert cli(["lightcurve", root, "--ra", str(position["ra"]), "--dec", str(position["dec"]), "--mjd-min", "61001", "--mjd-max", "61000",
                "-o", out]) == 2
    assert "--mjd-min 61001 is after --mjd-max 61000" in capsys.readouterr().err
    assert cli(["lightcurve", root, "--ra", str(position["ra"]), "--dec", str(position["dec"]), "--band", "z", "-o", out,
                "--index", str(tmp_path / "index.sqlite"), "--backend", "numpy"]) == 0
    assert "no exposure covers these objects" in capsys.readouterr().err
