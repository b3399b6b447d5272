"""Defaults and names shared by the engine, the service and the command line, importable
without NumPy, pandas or pydantic (so that ``forcedphot --help`` answers at once)."""

from typing import Literal

#: array backends: ``auto`` is CuPy when a CUDA device answers, else NumPy
BackendName = Literal["auto", "numpy", "cupy", "stand-in"]
DEFAULT_APERTURES_PX = (3.0, 4.5, 6.0, 9.0, 12.0)  # circular aperture radii, px
DEFAULT_BATCH_BYTES = 128 * 2**20  # memory bound of one batch of cutouts and its kernel work
DEFAULT_PATH_TEMPLATE = "{visit}/{detector}/{datasetType}.fits"  # files of a plain repository
DEFAULT_MIN_DIA_SOURCES = 2  # ap_association's DiaForcedSourceTask measures objects seen at least twice

#: catalog format -> the media type answered with it
FORMATS = {"parquet": "application/vnd.apache.parquet", "csv": "text/csv", "json": "application/json",
           "ecsv": "text/x-ecsv", "fits": "application/fits", "votable": "application/x-votable+xml"}
#: other names accepted for a format: media type aliases and file suffixes
ALIASES = {"application/x-parquet": "parquet", "application/csv": "csv", "pq": "parquet", "fit": "fits", "vot": "votable",
           "image/fits": "fits", "application/x-fits": "fits", "text/xml": "votable", "application/xml": "votable"}
#: formats that the catalog encoder writes but no object table is read from
OUTPUT_ONLY = ("ecsv", "fits", "votable")
DEFAULT_FORMAT = "parquet"
