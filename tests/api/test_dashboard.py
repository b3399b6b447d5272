"""The dashboard and the offline API docs in a real browser (Debian's Chromium, driven by
Playwright; nothing is downloaded at test time), and the stamps API.

The browser test loads ``/`` from a real ``forcedphot serve`` (demo mode), measures the
light curve of a demo supernova, checks the plot holds one point per epoch, opens the
stamps of one epoch, reads the status panel, and records console errors and every request
made to a host other than the server (there must be none). It saves a screenshot.
"""

import io
from pathlib import Path
import shutil

from astropy.io import fits
from astropy.wcs import WCS
from fastapi.testclient import TestClient
import numpy as np
import pandas as pd
import pytest
from server_helpers import Server
from service_helpers import AUTH, DETECTOR, VISIT, settings_for

from forcedphot.api.app import create_app
from forcedphot.demo.survey import DETECTOR as DEMO_DETECTOR

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "dashboard.png"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    running = Server(tmp_path_factory.mktemp("dash"), FORCEDPHOT_MEASURE_PROCESSES="2").start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("no Chromium on this machine: .ci/run installs Debian's chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        launched = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        yield launched
        launched.close()


def watched_page(browser, server):
    page = browser.new_page(viewport={"width": 1400, "height": 1100})
    errors, foreign = [], []
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("request", lambda request: None if request.url.startswith((server.url, "data:", "blob:")) else foreign.append(request.url))
    return page, errors, foreign


def test_the_dashboard_draws_a_light_curve_and_its_stamps(browser, server, tmp_path):
    demo = server.data_dir / "demo-repository"
    truth = pd.read_parquet(demo / "truth.parquet")
    kinds = pd.read_parquet(demo / "objects.parquet").set_index("diaObjectId")["kind"]
    covered = truth[truth["on_detector"]].groupby("diaObjectId").size()
    supernova = covered[kinds[covered.index] == "supernova"].idxmax()
    epochs = int(covered[supernova])

    page, errors, foreign = watched_page(browser, server)
    page.goto(server.url + "/")
    page.wait_for_function("document.querySelector('#status-list dd') !== null")
    assert page.evaluate("getComputedStyle(document.getElementById('stamps')).display") == "none"  # no empty images before a search
    page.fill("#object-id", str(supernova))
    page.click("#search button[type=submit]")
    page.wait_for_function("document.querySelectorAll('#rows tbody tr').length > 0", timeout=30_000)
    points = page.evaluate("document.getElementById('plot').data.filter(t => t.yaxis === 'y').reduce((n, t) => n + t.x.length, 0)")
    assert points == epochs == page.locator("#rows tbody tr").count()
    # the axes are titled as drawn (plotly ignores string titles) and MJD ticks are written in full
    titles = page.evaluate("[...document.querySelectorAll('#plot .xtitle, #plot .ytitle, #plot .y2title, #plot .annotation-text')].map(t => t.textContent)")
    assert {"midpoint, MJD (TAI)", "difference flux psfFlux [nJy]", "science flux scienceFlux [nJy]", "difference image"} <= set(titles)
    ticks = page.evaluate("[...document.querySelectorAll('#plot .xtick text')].map(t => t.textContent)")
    assert ticks and all(t.replace(".", "").isdigit() and float(t) > 60000 for t in ticks), ticks
    assert page.inner_text("#rows tbody tr:first-child td:first-child") == str(supernova)  # all 19 digits
    mjd = page.inner_text("#rows tbody tr:first-child td:nth-child(5)")
    assert len(mjd.split(".")[1]) == 5  # to about a second, not 0.1 d
    page.locator("#rows tbody tr").nth(2).click()
    page.wait_for_function("['science', 'difference'].every(k => document.getElementById('stamp-' + k).naturalWidth > 0)")
    assert page.evaluate("document.getElementById('stamp-science').naturalWidth") == 48 * 4
    status = page.inner_text("#status")
    assert "numpy:cpu" in status and "indexed exposures" in status and "24" in status
    page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
    if not SCREENSHOT.exists():  # delete docs/dashboard.png to take a new one for the README
        shutil.copy(tmp_path / "dashboard.png", SCREENSHOT)
    # issue 23, item 8: a position no exposure covers says so, and nothing of the last object stays
    page.fill("#object-id", "")
    page.fill("#ra", "10.0")
    page.fill("#dec", "-40.0")
    page.click("#search button[type=submit]")
    page.wait_for_function("document.getElementById('message').textContent.includes('no exposure covers')", timeout=30_000)
    assert page.locator("#rows tbody tr").count() == 0 and page.evaluate("document.getElementById('stamps').hidden")
    assert page.evaluate("!document.getElementById('plot').data") and page.evaluate("document.getElementById('downloads').hidden")
    page.close()
    assert errors == [] and foreign == []


def test_the_dashboard_draws_magnitudes_limits_bins_and_a_baseline(browser, server):
    """Issue 24: the magnitude view draws upper limits at their 5-sigma limit (reversed axis),
    every point says its status on hover, bins of nights come as their own points, and a
    baseline window makes the difference panel baseline-corrected."""
    demo = server.data_dir / "demo-repository"
    truth = pd.read_parquet(demo / "truth.parquet")
    kinds = pd.read_parquet(demo / "objects.parquet").set_index("diaObjectId")["kind"]
    covered = truth[truth["on_detector"]].groupby("diaObjectId").size()
    constant = covered[kinds[covered.index] == "constant"].idxmax()

    page, errors, foreign = watched_page(browser, server)
    page.goto(server.url + "/")
    page.wait_for_function("document.querySelector('#status-list dd') !== null")
    page.fill("#object-id", str(constant))
    page.select_option("#view", "mag")
    page.click("#search button[type=submit]")
    page.wait_for_function("document.querySelectorAll('#rows tbody tr').length > 0", timeout=30_000)
    traces = page.evaluate("document.getElementById('plot').data.map(t => ({name: t.name, symbol: t.marker.symbol, y: t.y, "
                           "text: t.hovertext, axis: t.yaxis}))")
    limits = [t for t in traces if t["name"].endswith("limit") and t["axis"] == "y"]
    assert limits and all(t["symbol"] == "triangle-down-open" for t in limits)  # a constant object: its difference flux is a limit
    assert all(y > 20 for t in limits for y in t["y"])  # drawn at psfMagLim5Sigma, AB magnitudes
    assert any("status: good" in text for t in traces for text in t["text"])
    assert page.evaluate("(r => r[0] > r[1])(document.getElementById('plot')._fullLayout.yaxis.range)")  # bright up: the axis reversed
    rows = page.locator("#rows tbody tr").count()

    page.select_option("#view", "flux")
    page.select_option("#bin", "night")
    page.fill("#baseline-max", "70000")  # every epoch: a constant object's baseline is its mean level
    page.click("#search button[type=submit]")
    page.wait_for_function("document.getElementById('message').textContent.includes('bins')", timeout=30_000)
    traces = page.evaluate("document.getElementById('plot').data.map(t => ({name: t.name, n: t.x.length, axis: t.yaxis}))")
    nights = truth[(truth["diaObjectId"] == constant) & truth["on_detector"]]
    bins = sum(t["n"] for t in traces if t["name"].endswith("bins") and t["axis"] == "y")
    assert 0 < bins <= nights.assign(night=np.floor(nights["midpointMjdTai"] - 0.5)).groupby(["band", "night"]).ngroups  # per band and night
    assert "less baseline" in page.evaluate("document.getElementById('plot').layout.yaxis.title.text")
    assert page.locator("#rows tbody tr").count() == rows
    page.close()
    assert errors == [] and foreign == []


def test_the_dashboard_shows_what_the_apdb_stored_beside_fresh_measurements(browser, server):
    """The demo's DiaObjects are in its APDB: store the DiaForcedSources of two visits through
    the API, then the object's light curve shows them as their own trace."""
    import httpx

    demo = server.data_dir / "demo-repository"
    truth = pd.read_parquet(demo / "truth.parquet")
    first_two = sorted(truth["visit"].unique())[:2]
    on_both = truth[truth["visit"].isin(first_two) & truth["on_detector"]].groupby("diaObjectId").size()
    chosen = int(on_both[on_both == 2].index[0])
    for visit in first_two:
        reference = {"visit": int(visit), "detector": DEMO_DETECTOR}
        answer = httpx.post(server.url + "/v1/forced-photometry", timeout=60, json={
            "exposure": {**reference, "datasetType": "calexp"}, "difference": {**reference, "datasetType": "difference"},
            "objects": {"apdb": {"min_dia_sources": 1}}, "store": True})
        assert answer.status_code == 200 and int(answer.headers["X-Apdb-Rows-Stored"]) > 0, answer.text

    page, errors, foreign = watched_page(browser, server)
    page.goto(server.url + "/")
    page.wait_for_function("document.querySelector('#status-list dd') !== null")
    page.fill("#object-id", str(chosen))
    page.click("#search button[type=submit]")
    page.wait_for_function("document.querySelectorAll('#rows tbody tr').length > 0", timeout=30_000)
    stored = page.evaluate("document.getElementById('plot').data.filter(t => t.name === 'stored in the APDB').map(t => t.x.length)")
    assert stored == [2] and "2 DiaForcedSources stored in the APDB" in page.inner_text("#message")
    page.close()
    assert errors == [] and foreign == []


def test_the_dashboard_asks_for_the_api_key_once(browser, server, tmp_path):
    """A server of a repository (the demo's files) with an API key: the page asks for it,
    keeps it in the session, and then works."""
    key = "dashboard-key-0123456789"
    keyed = Server(tmp_path, "--repository", str(server.data_dir / "demo-repository"), FORCEDPHOT_API_KEYS=key).start()
    try:
        page, errors, foreign = watched_page(browser, keyed)
        page.goto(keyed.url + "/")
        page.wait_for_selector("#key-panel:not([hidden])")
        page.fill("#key", "not-the-key-0123456789")
        page.click("#use-key")
        page.wait_for_function("document.getElementById('message').textContent.includes('refused')")
        page.fill("#key", key)
        page.click("#use-key")
        page.wait_for_function("document.querySelector('#status-list dd') !== null")
        assert page.inner_text("#message") == ""  # the refusal is gone once a right key is in
        assert page.evaluate("sessionStorage.getItem('forcedphot-key')") == key
        page.fill("#ra", "150.1")
        page.fill("#dec", "2.2")
        page.click("#search button[type=submit]")
        page.wait_for_function("document.querySelectorAll('#rows tbody tr').length === 24", timeout=30_000)
        page.close()
    finally:
        keyed.stop()
    assert foreign == [] and [e for e in errors if "401" not in e] == []  # the first, keyless call is refused


@pytest.mark.parametrize("path, selector", [("/docs", ".opblock"), ("/redoc", "[data-section-id]")])
def test_the_api_docs_render_offline(browser, server, path, selector):
    page, errors, foreign = watched_page(browser, server)
    page.goto(server.url + path)
    page.wait_for_selector(selector, timeout=30_000)
    assert page.locator(selector).count() >= 10
    page.close()
    assert errors == [] and foreign == []


def test_no_page_refers_to_another_host(server):
    import re

    import httpx

    for path in ("/", "/docs", "/redoc", "/static/app/dashboard.js"):
        text = httpx.get(server.url + path).text
        assert not re.search(r"(src|href)=[\"']?(https?:)?//", text), path


@pytest.fixture(scope="module")
def client(repo, tmp_path_factory):
    with TestClient(create_app(settings_for(repo["root"], tmp_path_factory.mktemp("data"))), headers=AUTH) as c:
        yield c


def stamp_query(repo, **extra):
    ra, dec = repo["objects"]["ra"][0], repo["objects"]["dec"][0]
    return {"visit": VISIT, "detector": DETECTOR, "ra": ra, "dec": dec, **extra}


def test_fits_stamps_round_trip_pixels_and_wcs(client, repo):
    response = client.get("/v1/stamps", params=stamp_query(repo, size=32))
    assert response.status_code == 200 and response.headers["content-type"] == "application/fits"
    with fits.open(io.BytesIO(response.content)) as hdul:
        stamp, wcs = hdul[0].data, WCS(hdul[0].header)
    with fits.open(repo["calexp"]) as full:
        image, full_wcs = full["IMAGE"].data, WCS(full["IMAGE"].header)
    x, y = full_wcs.all_world2pix(repo["objects"]["ra"][0], repo["objects"]["dec"][0], 0)
    x0, y0 = int(np.floor(x + 0.5)) - 16, int(np.floor(y + 0.5)) - 16
    np.testing.assert_array_equal(stamp, image[y0:y0 + 32, x0:x0 + 32])
    sx, sy = wcs.all_world2pix(repo["objects"]["ra"][0], repo["objects"]["dec"][0], 0)
    np.testing.assert_allclose([sx + x0, sy + y0], [x, y], atol=1e-6)


def test_png_stamps_have_their_size_and_bad_parameters_are_4xx(client, repo):
    png = client.get("/v1/stamps", params=stamp_query(repo, size=40, kind="difference"), headers={"Accept": "image/png"})
    assert png.status_code == 200 and png.content[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(png.content[16:20], "big"), int.from_bytes(png.content[20:24], "big")
    assert (width, height) == (160, 160)
    assert client.get("/v1/stamps", params=stamp_query(repo, size=10_000)).status_code == 422
    assert client.get("/v1/stamps", params=stamp_query(repo, ra=10.0, dec=-60.0)).status_code == 422
    assert client.get("/v1/stamps", params=stamp_query(repo, visit=1)).status_code == 404
    assert client.get("/v1/stamps", params=stamp_query(repo), headers={"Accept": "text/html"}).status_code == 406
