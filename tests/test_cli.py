"""The command line contract: outputs, summary line, exit code 2 with a named problem."""

import json

from astropy.io import fits
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from scenes import render_stars, sip_wcs, write_exposure

from forcedphot.cli import main
from forcedphot.photometry.formats import read_provenance

SIDE = 160
SIGMA = 1.5


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    rng = np.random.default_rng(4)
    x, y = rng.uniform(20, 140, 30), rng.uniform(20, 140, 30)
    flux = rng.uniform(1e3, 1e4, 30)
    wcs = sip_wcs(SIDE, SIDE)
    image = render_stars((SIDE, SIDE), x, y, flux, SIGMA) + rng.normal(0, 3, (SIDE, SIDE))
    exposure = write_exposure(d / "calexp.fits", image, np.full(image.shape, 9.0), wcs=wcs)
    ra, dec = wcs.all_pix2world(np.append(x, 900.0), np.append(y, 900.0), 0)
    objects = pd.DataFrame({"diaObjectId": np.arange(31) + 100, "ra": ra, "dec": dec})
    objects.to_parquet(d / "objects.parquet")
    objects.to_csv(d / "objects.csv", index=False)
    return {"dir": d, "exposure": exposure, "objects": d / "objects.parquet", "csv": d / "objects.csv", "wcs": wcs}


def measure(files, *extra, objects=None, exposure=None):
    out = files["dir"] / "out.parquet"
    args = ["measure", str(exposure or files["exposure"]), str(objects or files["objects"]), "-o", str(out), "--backend", "numpy", *extra]
    return main(args), out


def test_measure_writes_parquet_with_units_and_provenance(files, capsys):
    code, out = measure(files, "--psf-fwhm", "3.53", "--apertures", "3,6")
    assert code == 0
    summary = capsys.readouterr().out
    assert "31 objects in, 30 on the detector, 1 off" in summary and "numpy:cpu" in summary
    table = pq.read_table(out)
    assert table.num_rows == 30
    assert {"apFlux_3", "apFlux_6", "apFluxErr_6", "psfFlux", "pixelFlags_offimage"} <= set(table.column_names)
    assert "apFlux_4_5" not in table.column_names
    assert table.schema.field("psfFlux").metadata[b"unit"] == b"nJy"
    provenance = read_provenance(out)
    assert provenance["exposure"]["path"] == str(files["exposure"])
    assert provenance["config"]["apertures_px"] == [3.0, 6.0]


def test_csv_objects_and_csv_output(files):
    out = files["dir"] / "out.csv"
    code = main(["measure", str(files["exposure"]), str(files["csv"]), "-o", str(out), "--psf-fwhm", "3.5", "--backend", "numpy"])
    assert code == 0
    assert len(pd.read_csv(out, comment="#")) == 30


def bad_objects(files, name, frame):
    path = files["dir"] / name
    frame.to_parquet(path)
    return path


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing_column", "missing column(s) dec"),
        ("duplicate", "duplicate diaObjectId 5"),
        ("empty", "empty"),
        ("no_psf", "no PSF given"),
        ("bad_psf", "bad.psf"),
        ("no_wcs", "WCS"),
        ("truncated", "truncated.fits"),
        ("not_fits", "notfits.fits: not a FITS file (it does not start with the SIMPLE card"),
        ("cupy", "cupy"),
    ],
)
def test_bad_input_exits_2_with_a_named_problem(files, capsys, case, message):
    psf = ["--psf-fwhm", "3.5"]
    kwargs = {}
    d = files["dir"]
    if case == "missing_column":
        kwargs["objects"] = bad_objects(files, "nodec.parquet", pd.DataFrame({"diaObjectId": [1], "ra": [1.0]}))
    elif case == "duplicate":
        kwargs["objects"] = bad_objects(files, "dup.parquet", pd.DataFrame({"diaObjectId": [5, 5], "ra": [1.0, 2.0], "dec": [0.0, 0.0]}))
    elif case == "empty":
        kwargs["objects"] = bad_objects(files, "empty.parquet", pd.DataFrame({"diaObjectId": pd.Series([], dtype="int64"), "ra": [], "dec": []}))
    elif case == "no_psf":
        psf = []
    elif case == "bad_psf":
        (d / "bad.psf").write_bytes(b"SIMPLE  = this is not a PSFEx file")
        psf = ["--psf", str(d / "bad.psf")]
    elif case == "no_wcs":
        fits.HDUList([fits.PrimaryHDU(np.zeros((10, 10), np.float32))]).writeto(d / "nowcs.fits", overwrite=True)
        kwargs["exposure"] = d / "nowcs.fits"
    elif case == "truncated":
        data = files["exposure"].read_bytes()
        (d / "truncated.fits").write_bytes(data[: len(data) // 2])
        kwargs["exposure"] = d / "truncated.fits"
    elif case == "not_fits":
        (d / "notfits.fits").write_text("hello")
        kwargs["exposure"] = d / "notfits.fits"
    elif case == "cupy":
        psf = psf + ["--backend", "cupy"]
    code, _ = measure(files, *psf, **kwargs)
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and "Traceback" not in err and "ignore_missing_simple" not in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("command", [
    ["measure", "{exposure}", "{objects}", "--psf-fwhm", "3.5", "-o", "{missing}/out.parquet"],
    ["lightcurve", "{dir}", "--ra", "1", "--dec", "1", "-o", "{missing}/lc.parquet"],
    ["lightcurve", "{dir}", "--ra", "1", "--dec", "1", "-o", "{dir}/lc.parquet", "--plot", "{missing}/lc.png"],
    ["campaign", "{dir}", "--objects", "{objects}", "-o", "{missing}/dataset"],
])
def test_an_output_folder_that_does_not_exist_is_named_before_any_work(files, capsys, command):
    """Issue 23, item 10: the option and the folder, not an internal temporary file."""
    names = {"exposure": files["exposure"], "objects": files["objects"], "dir": files["dir"], "missing": files["dir"] / "no-such-folder"}
    assert main([part.format(**names) for part in command]) == 2
    err = capsys.readouterr().err
    assert "the folder" in err and "no-such-folder does not exist" in err and ".partial" not in err and len(err.strip().splitlines()) == 1


def test_a_missing_psf_is_explained_in_the_words_of_both_interfaces(repo, tmp_path, capsys):
    """Issue 23, item 10: not "send psf_fwhm" on the command line (the light-curve path
    goes through the service's executor, which cannot know which interface called it)."""
    objects = repo["root"] / "tables" / "objects.parquet"
    assert main(["lightcurve", str(repo["root"]), "--objects", str(objects), "-o", str(tmp_path / "lc.parquet")]) == 0
    err = capsys.readouterr().err
    assert err.count("no PSF given and no PSF_FWHM keyword in its header; give a PSF FWHM in pixels "
                     "(psf_fwhm in a request, --psf-fwhm on the command line)") == 2


def test_demo_then_measure_recovers_the_truth(tmp_path, capsys):
    """The README path: `forcedphot demo` then `forcedphot measure --difference`."""
    demo = tmp_path / "demo"
    assert main(["demo", str(demo), "--size", "1024", "--objects", "400", "--seed", "3"]) == 0
    out = tmp_path / "forced.parquet"
    code = main(["measure", str(demo / "calexp.fits"), str(demo / "diaObjects.parquet"), "--difference", str(demo / "difference.fits"), "-o", str(out)])
    assert code == 0
    assert "400 objects in" in capsys.readouterr().out
    truth = pd.read_parquet(demo / "truth.parquet").set_index("diaObjectId")
    cat = pd.read_parquet(out).set_index("diaObjectId")
    assert set(cat.index) == set(truth.index[truth["on_detector"]])
    clean = cat[~cat["psfFlux_flag"] & ~cat["pixelFlags_saturatedCenter"] & ~cat["pixelFlags_crCenter"] & ~cat["pixelFlags_badCenter"]]
    assert len(clean) > 0.8 * len(cat)
    t = truth.loc[clean.index]
    pull = (clean["psfFlux"] - t["difference_flux_nJy"]) / clean["psfFluxErr"]
    assert abs(pull.mean()) < 0.15 and abs(pull.std() - 1) < 0.1
    # catalog x, y are PARENT pixels: the truth's local pixels plus the image origin
    from forcedphot.photometry.exposure import open_exposure

    with open_exposure(demo / "calexp.fits") as exposure:
        assert exposure.x0 != 0
        np.testing.assert_allclose(clean["x"], t["x"] + exposure.x0, atol=1e-6)
        np.testing.assert_allclose(clean["y"], t["y"] + exposure.y0, atol=1e-6)
    # the direct image holds blends with field stars: compare robustly
    science_pull = (clean["scienceFlux"] - t["science_flux_nJy"]) / clean["scienceFluxErr"]
    assert abs(np.median(science_pull)) < 0.2


# --- manners: what a user of the command line expects ------------------------------------


def test_an_unknown_output_format_fails_before_measuring(files, capsys, monkeypatch):
    import forcedphot.photometry.measure as engine

    def never(*args, **kwargs):
        raise AssertionError("measured before checking the output format")

    monkeypatch.setattr(engine, "measure", never)
    code = main(["measure", str(files["exposure"]), str(files["objects"]), "-o", str(files["dir"] / "out.ecsvx"), "--psf-fwhm", "3.5"])
    assert code == 2 and "unknown output format '.ecsvx'" in capsys.readouterr().err


@pytest.mark.parametrize("suffix", ["ecsv", "fits", "vot", "csv"])
def test_astronomy_formats_by_suffix(files, suffix):
    from astropy.table import Table

    out = files["dir"] / f"out.{suffix}"
    assert main(["measure", str(files["exposure"]), str(files["objects"]), "-o", str(out), "--psf-fwhm", "3.5", "--backend", "numpy"]) == 0
    table = Table.read(out, format={"ecsv": "ascii.ecsv", "csv": "ascii.ecsv", "fits": "fits", "vot": "votable"}[suffix])
    assert len(table) == 30 and str(table["psfFlux"].unit) == "nJy"


def test_ctrl_c_prints_one_line_exits_130_and_leaves_no_file(files, capsys, monkeypatch):
    import forcedphot.photometry.measure as engine

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(engine, "measure", interrupted)
    out = files["dir"] / "interrupted.parquet"
    code = main(["measure", str(files["exposure"]), str(files["objects"]), "-o", str(out), "--psf-fwhm", "3.5", "--backend", "numpy"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 130 and err == ["forcedphot measure: interrupted; nothing was written"]
    assert not out.exists() and not list(files["dir"].glob(".*partial"))


def test_an_interrupted_write_leaves_no_partial_file(files, monkeypatch):
    import forcedphot.photometry.formats as formats

    def broken(*args, **kwargs):
        raise KeyboardInterrupt

    catalog = pq.read_table(measure(files, "--psf-fwhm", "3.5")[1])  # measured (and written) before the interruption is armed
    monkeypatch.setattr(formats.os, "replace", broken)
    out = files["dir"] / "half.parquet"
    with pytest.raises(KeyboardInterrupt):
        formats.write_catalog(catalog, {}, out)
    assert not out.exists() and not list(files["dir"].glob(".half*"))


def test_every_option_has_help_and_every_command_an_example():
    from forcedphot.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    assert set(commands) == {"measure", "demo", "index", "lightcurve", "campaign", "serve"}
    for name, sub in commands.items():
        assert "example:" in (sub.epilog or ""), name
        for action in sub._actions:
            if action.dest != "help":
                assert action.help, f"{name} {action.option_strings or action.dest} has no help"


def test_header_warnings_become_one_line_and_flagged_is_explained(files, tmp_path, capsys):
    """Cards astropy cannot parse (here two unterminated strings) warn once each; the user
    sees one summary line."""
    noisy = tmp_path / "noisy.fits"
    with fits.open(files["exposure"]) as hdul:
        hdul[0].header["FPTEST1"] = "placeholder"
        hdul[0].header["FPTEST2"] = "placeholder"
        hdul.writeto(noisy)
    raw = noisy.read_bytes()
    for key in (b"FPTEST1", b"FPTEST2"):
        raw = raw.replace(key + b" = 'placeholder'", key + b" = 'placeholder ")
    noisy.write_bytes(raw)
    code = main(["measure", str(noisy), str(files["objects"]), "-o", str(tmp_path / "o.parquet"), "--psf-fwhm", "3.5", "--backend", "numpy"])
    captured = capsys.readouterr()
    assert code == 0
    warning_lines = [line for line in captured.err.splitlines() if "warning" in line.lower()]
    assert len(warning_lines) == 1 and "astropy warning(s) about the FITS headers" in warning_lines[0], captured.err
    assert "flagged (PSF fit failed, or an edge/saturated/cosmic-ray/bad/... mask bit" in captured.out


def test_measurements_psf_writes_the_psf_columns_of_the_full_catalog(files):
    _, out = measure(files, "--psf-fwhm", "3.5", "--difference", str(files["exposure"]))
    every = pq.read_table(out)
    _, out = measure(files, "--psf-fwhm", "3.5", "--difference", str(files["exposure"]), "--measurements", "psf")
    psf = pq.read_table(out)
    assert "apFlux_3" in every.column_names and "localBackground_instFlux" in every.column_names
    assert psf.column_names == [c for c in every.column_names if not c.startswith(("apFlux", "localBackground_", "pixelFlags_"))
                                or c == "pixelFlags_offimage"]
    assert json.loads(psf.schema.metadata[b"forcedphot"])["config"]["measurements"] == "psf"
    for name in ("psfFlux", "psfFluxErr", "scienceFlux", "psfFlux_flag"):
        assert psf.column(name).equals(every.column(name)), name


def test_extra_columns_on_request_only(files):
    _, out = measure(files, "--psf-fwhm", "3.5")
    assert "psfMag" not in pq.read_table(out).column_names
    _, out = measure(files, "--psf-fwhm", "3.5", "--extra-columns")
    table = pq.read_table(out).to_pandas()
    detected = table["psfFlux"] / table["psfFluxErr"] >= 3  # below: an upper limit, psfMag null (issue 24)
    assert detected.sum() > 10 and table.loc[~detected, "psfMag"].isna().all() and (table["isUpperLimit"] == ~detected).all()
    np.testing.assert_allclose(table.loc[detected, "psfMag"], 31.4 - 2.5 * np.log10(table.loc[detected, "psfFlux"]), rtol=1e-5)
    assert "epochStatus" in table and "psfFlux_snr" in table
    # issue 23, item 11: the direct image's flux has its magnitudes too
    _, out = measure(files, "--psf-fwhm", "3.5", "--extra-columns", "--difference", str(files["exposure"]))
    table = pq.read_table(out).to_pandas()
    bright = table["scienceFlux"] / table["scienceFluxErr"] >= 3
    assert bright.sum() > 20
    np.testing.assert_allclose(table.loc[bright, "scienceMag"], 31.4 - 2.5 * np.log10(table.loc[bright, "scienceFlux"]), rtol=1e-5)
    np.testing.assert_allclose(table["scienceMagLim5Sigma"], 31.4 - 2.5 * np.log10(5 * table["scienceFluxErr"]), rtol=1e-5)
    assert pq.read_schema(out).field("scienceMag").metadata[b"unit"] == b"mag"


def test_counts_agree_with_their_nouns():
    """Issue 23, item 12: "1 objects" no more."""
    from forcedphot.cli import plural

    assert (plural(1, "object"), plural(0, "object"), plural(2, "covering exposure")) == ("1 object", "0 objects", "2 covering exposures")


def test_serve_on_a_busy_port_says_so_in_one_line_before_preparing_anything(tmp_path, monkeypatch, capsys):
    """Issue 23, item 10: the bind error came last, after "serving on ...", the demo and 15 INFO lines."""
    import socket
    import time

    monkeypatch.setenv("FORCEDPHOT_DATA_DIR", str(tmp_path))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        start = time.perf_counter()
        assert main(["serve", "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"cannot listen on 127.0.0.1:{port}" in err and "in use" in err, err
    assert time.perf_counter() - start < 5 and not (tmp_path / "demo-repository").exists()


def test_help_loads_no_engine():
    """--help and argument errors answer before NumPy, pandas, astropy or pydantic load (~1 s)."""
    import subprocess
    import sys

    code = ("import sys; from forcedphot.cli import build_parser; build_parser().format_help(); "
            "print(sorted(m for m in ('numpy', 'pandas', 'astropy', 'pydantic', 'pyarrow', 'numba') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_an_interrupted_demo_leaves_nothing_and_a_used_folder_is_refused(tmp_path, capsys, monkeypatch):
    """Issue 23, item 5: ``demo --visits N`` writes its repository whole or not at all, and
    never mixes new visits with an older repository's."""
    import forcedphot.demo.survey as survey

    real = survey.make_demo_survey

    def interrupted(root, **options):
        real(root, **{**options, "visits": 2})  # some visits are written, then Ctrl-C
        raise KeyboardInterrupt

    monkeypatch.setattr(survey, "make_demo_survey", interrupted)
    assert main(["demo", str(tmp_path / "survey"), "--visits", "5", "--size", "64", "--objects", "5"]) == 130
    assert "nothing was written" in capsys.readouterr().err and list(tmp_path.iterdir()) == []
    monkeypatch.setattr(survey, "make_demo_survey", real)
    assert main(["demo", str(tmp_path / "survey"), "--visits", "3", "--size", "64", "--objects", "5"]) == 0
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == ["survey"] and len([p for p in (tmp_path / "survey").iterdir() if p.name.isdigit()]) == 3
    capsys.readouterr()
    assert main(["demo", str(tmp_path / "survey"), "--visits", "2", "--size", "64", "--objects", "5"]) == 2
    assert "survey exists and is not an empty folder; give a new one" in capsys.readouterr().err
