"""Output formats: every one reads back with astropy (same columns, same units), the
provenance travels, and the magnitude columns follow their formulas."""

import io
import json
import warnings

from astropy import units as u
from astropy.io import fits
from astropy.io.votable import parse_single_table
from astropy.table import Table
import numpy as np
import pytest
from scenes import render_stars, sip_wcs, write_exposure

from forcedphot.photometry.config import MeasurementConfig
from forcedphot.photometry.exposure import open_exposure
from forcedphot.photometry.formats import FORMATS, encode_catalog, output_format, read_provenance, write_catalog
from forcedphot.photometry.measure import measure
from forcedphot.photometry.objects import validate_objects
from forcedphot.photometry.psf_models import load_psf

ASTROPY = {"parquet": "parquet", "csv": "ascii.ecsv", "ecsv": "ascii.ecsv", "fits": "fits", "votable": "votable"}


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    import pandas as pd

    path = tmp_path_factory.mktemp("fmt") / "e.fits"
    rng = np.random.default_rng(2)
    x, y = rng.uniform(20, 100, 12), rng.uniform(20, 100, 12)
    image = render_stars((120, 120), x, y, rng.uniform(500, 5000, 12), 1.5) + rng.normal(0, 1, (120, 120))
    wcs = sip_wcs(120, 120)
    write_exposure(path, image, np.ones_like(image), wcs=wcs)
    ra, dec = wcs.all_pix2world(x, y, 0)
    objects = validate_objects(pd.DataFrame({"diaObjectId": np.arange(12) + 7, "ra": ra, "dec": dec}))
    with open_exposure(path) as exposure:
        return measure(exposure, objects, load_psf(fwhm_pixels=3.5), MeasurementConfig(backend="numpy", extra_columns=True))


@pytest.mark.parametrize("fmt", [f for f in FORMATS if f != "json"])
def test_astropy_reads_every_format_with_the_same_columns_and_units(result, fmt):
    data = encode_catalog(result.table, result.provenance, fmt)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "No table::len::band found" and the like
        table = Table.read(io.BytesIO(data), format=ASTROPY[fmt])
    assert table.colnames == result.table.column_names
    expected = {f.name: u.Unit(f.metadata[b"unit"].decode()) for f in result.table.schema if f.metadata and b"unit" in f.metadata}
    got = {name: table[name].unit for name in table.colnames if table[name].unit is not None}
    assert got == expected and got["psfFlux"] == u.nJy and got["psfMag"] == u.mag
    np.testing.assert_allclose(np.asarray(table["psfFlux"], float), result.table["psfFlux"].to_numpy(), rtol=1e-6)
    assert list(table["diaObjectId"]) == result.table["diaObjectId"].to_pylist()


def test_the_provenance_travels(result, tmp_path):
    for fmt in ("parquet", "fits", "votable", "ecsv"):
        write_catalog(result.table, result.provenance, tmp_path / f"c.{fmt}")
    assert read_provenance(tmp_path / "c.parquet")["psf"].startswith("circular Gaussian of FWHM 3.5 px")
    assert json.loads(fits.getheader(tmp_path / "c.fits", 1)["PROVJSON"])["software"] == "forcedphot"
    assert "circular Gaussian of FWHM 3.5 px" in " ".join(parse_single_table(tmp_path / "c.votable").description.split())
    assert Table.read(tmp_path / "c.ecsv").meta["forcedphot"]["psf"].startswith("circular Gaussian")
    from_parquet = Table.read(tmp_path / "c.parquet").meta["forcedphot"]  # issue 23, item 12: as astropy users look for it
    assert from_parquet == read_provenance(tmp_path / "c.parquet") and from_parquet["psf"].startswith("circular Gaussian")
    assert not list(tmp_path.glob(".*.partial"))


def test_unknown_output_suffix_names_the_choices():
    assert output_format("a.fit") == "fits" and output_format("a.vot") == "votable" and output_format("a") == "parquet"
    with pytest.raises(ValueError, match=r"unknown output format '\.xlsx'.*\.ecsv"):
        output_format("out.xlsx")


def test_extra_columns_are_the_light_curves_products(result):
    """``extra_columns``: magnitudes, limits and epochStatus as light curves have them (issue 24)."""
    catalog = result.table.to_pandas()
    detected = catalog["psfFlux"] / catalog["psfFluxErr"] >= 3
    np.testing.assert_allclose(catalog.loc[detected, "psfMag"], 31.4 - 2.5 * np.log10(catalog.loc[detected, "psfFlux"]), rtol=1e-5)
    assert catalog.loc[~detected, "psfMag"].isna().all() and (catalog["isUpperLimit"] == ~detected).all()
    np.testing.assert_allclose(catalog["psfFlux_snr"], catalog["psfFlux"] / catalog["psfFluxErr"], rtol=1e-5)
    np.testing.assert_allclose(catalog["psfMagLim5Sigma"], 31.4 - 2.5 * np.log10(5 * catalog["psfFluxErr"]), rtol=1e-5)


def test_extra_columns_are_asked_for(result):
    assert MeasurementConfig().extra_columns is False and "psfMag" in result.table.column_names
