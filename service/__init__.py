"""forcedphot: batched forced photometry of DiaObjects on LSST-style exposures.

The Python API, for use without the service::

    from forcedphot import measure, open_exposure, load_psf, read_objects, write_catalog

    objects = read_objects("diaObjects.parquet")
    with open_exposure("calexp.fits") as science, open_exposure("difference.fits") as difference:
        result = measure(science, objects, load_psf(fwhm_pixels=3.5), difference=difference)
    write_catalog(result.table, result.provenance, "forced.parquet")

Layers, each importing only those below it: ``api`` (FastAPI) -> ``serving`` (executors,
cache, jobs) -> ``demo`` (synthetic visits) -> ``photometry`` (file -> catalog) ->
``kernels`` (array-API functions). The names here load on first use, so importing
``forcedphot.kernels`` alone stays light.
"""

from importlib import import_module

from forcedphot.version import __version__

_API = {
    "measure": "forcedphot.photometry.measure",
    "Measurement": "forcedphot.photometry.measure",
    "MeasurementConfig": "forcedphot.photometry.config",
    "open_exposure": "forcedphot.photometry.exposure",
    "read_objects": "forcedphot.photometry.objects",
    "load_psf": "forcedphot.photometry.psf_models",
    "choose_psf": "forcedphot.photometry.psf_choice",
    "write_catalog": "forcedphot.photometry.formats",
    "encode_catalog": "forcedphot.photometry.formats",
    "make_products": "forcedphot.photometry.lightcurve_products",
    "Products": "forcedphot.photometry.lightcurve_products",
    "BaselineWindow": "forcedphot.photometry.lightcurve_products",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        return getattr(import_module(_API[name]), name)
    raise AttributeError(f"module 'forcedphot' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
