"""Request and response bodies of the HTTP API (pydantic models; they make the OpenAPI schema)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator

from forcedphot.photometry.config import MeasurementConfig
from forcedphot.photometry.lightcurve_products import DEFAULT_BASELINE_MIN_EPOCHS, DEFAULT_SNR_LIMIT, BaselineWindow, Products
from forcedphot.photometry.psf_models import MAX_PSF_FWHM_PX, MIN_PSF_FWHM_PX
from forcedphot.serving.apdb import DEFAULT_MIN_DIA_SOURCES
from forcedphot.serving.job_store import JobError, JobProgress, JobStatus
from forcedphot.serving.repository import DataIdRef, UriRef

__all__ = ["ApdbObjectsRef", "ApdbQuery", "Health", "JobError", "JobExposure", "JobList", "JobProgress", "JobRequest", "JobStatus", "LightCurveRequest", "MeasureOptions",
           "MeasureRequest", "Position"]

MAX_APERTURE_PX = 50.0
MAX_APERTURES = 16

Radius = Annotated[float, Field(gt=0, le=MAX_APERTURE_PX, allow_inf_nan=False)]
ObjectRecord = dict[str, Any]
DiaObjectId = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]


class ApdbQuery(BaseModel):
    """Which DiaObjects of the server's APDB: those named, or (one exposure) those on it."""

    model_config = ConfigDict(extra="forbid")

    min_dia_sources: int = Field(DEFAULT_MIN_DIA_SOURCES, ge=1, le=2**31 - 1,
                                 description="the DiaObjects overlapping the exposure with at least this many DiaSources "
                                             "(Rubin's DiaForcedSourceTask: 2; 1 takes all)")
    diaObjectIds: list[DiaObjectId] | None = Field(None, min_length=1, description="these DiaObjects instead, wherever they are")

    @model_validator(mode="after")
    def _one_selection(self) -> ApdbQuery:
        if self.diaObjectIds is not None and "min_dia_sources" in self.model_fields_set:
            raise ValueError("give either diaObjectIds or min_dia_sources: named DiaObjects are measured whatever their nDiaSources")
        return self


class ApdbObjectsRef(BaseModel):
    """DiaObjects read from the server's APDB."""

    model_config = ConfigDict(extra="forbid")

    apdb: ApdbQuery


class Position(BaseModel):
    """One sky position, measured as diaObjectId 0."""

    model_config = ConfigDict(extra="forbid")

    ra: float = Field(ge=0, lt=360, allow_inf_nan=False, description="ICRS right ascension, deg")
    dec: float = Field(ge=-90, le=90, allow_inf_nan=False, description="ICRS declination, deg")


_FORM_OF_KEY = {"uri": "uri", "apdb": "apdb", "ra": "position", "dec": "position", "visit": "dataId", "detector": "dataId",
                "datasetType": "dataId", "instrument": "dataId"}
_FORM_OF_MODEL = {UriRef: "uri", ApdbObjectsRef: "apdb", Position: "position", DataIdRef: "dataId"}
UNION_FIELDS = frozenset({"objects", "exposure", "difference"})  # the fields whose forms are told apart by _form
UNION_TAGS = frozenset({"records", *_FORM_OF_KEY.values()})


def _form(value: Any) -> str | None:
    """Which member of a union a value is meant to be, from its type or its first telling
    key, so that a 422 lists the errors of that form alone (not one per member)."""
    if isinstance(value, list):
        return "records"
    if isinstance(value, dict):
        return next((_FORM_OF_KEY[key] for key in value if key in _FORM_OF_KEY), None)
    return _FORM_OF_MODEL.get(type(value))


ExposureReference = Annotated[
    Annotated[UriRef, Tag("uri")] | Annotated[DataIdRef, Tag("dataId")],
    Discriminator(_form, custom_error_type="exposure_reference",
                  custom_error_message="an exposure is {\"uri\": path in the repository} or a data id "
                                       "{\"visit\", \"detector\", \"datasetType\"}"),
]
Objects = Annotated[
    Annotated[list[ObjectRecord], Tag("records")] | Annotated[UriRef, Tag("uri")] | Annotated[ApdbObjectsRef, Tag("apdb")],
    Discriminator(_form, custom_error_type="objects_form",
                  custom_error_message="objects are a list of records (diaObjectId, ra, dec), {\"uri\": table in the "
                                       "repository} or {\"apdb\": {...}}"),
    Field(description="DiaObjects: inline records with diaObjectId, ra, dec (ICRS deg; 'decl' accepted), "
                      "{\"uri\": ...} naming a parquet/CSV/JSON table in the repository, "
                      "or {\"apdb\": {...}}: DiaObjects of the server's APDB"),
]
ObjectsOrPosition = Annotated[
    Annotated[list[ObjectRecord], Tag("records")] | Annotated[UriRef, Tag("uri")] | Annotated[ApdbObjectsRef, Tag("apdb")]
    | Annotated[Position, Tag("position")],
    Discriminator(_form, custom_error_type="objects_form",
                  custom_error_message="objects are a list of records (diaObjectId, ra, dec), {\"uri\": table in the "
                                       "repository}, {\"apdb\": {...}} or one position {\"ra\", \"dec\"}"),
    Field(description="DiaObjects: inline records (diaObjectId, ra, dec), a {\"uri\": ...} table in the repository, "
                      "{\"apdb\": {\"diaObjectIds\": [...]}} from the server's APDB, or one position {\"ra\", \"dec\"}"),
]


class MeasureOptions(BaseModel):
    """How to measure; every field is optional."""

    model_config = ConfigDict(extra="forbid")

    psf_fwhm: float | None = Field(None, ge=MIN_PSF_FWHM_PX, le=MAX_PSF_FWHM_PX, allow_inf_nan=False,
                                   description="circular Gaussian PSF FWHM, pixels; default: the exposure's PSF_FWHM keyword")
    apertures: list[Radius] | None = Field(None, min_length=1, max_length=MAX_APERTURES,
                                           description="aperture radii in pixels (default 3, 4.5, 6, 9, 12)")
    include_offimage: bool = Field(False, description="also return objects off the detector, flagged pixelFlags_offimage")
    extra_columns: bool = Field(False, description="add AB magnitudes and limits as light curves have them: psfMag, psfMagErr, psfMagLim5Sigma (5-sigma limiting magnitude), isUpperLimit (S/N below 3: psfMag null), the same for scienceFlux (scienceMag, ...), psfFlux_snr, scienceFlux_snr and epochStatus")
    subtract_background: Literal["auto", "on", "off"] = Field(
        "auto", description="subtract each object's local background from its PSF and aperture fluxes: 'auto' on direct images "
                            "in plain FITS (their sky is still in the pixels), never on LSST files or difference images")
    measurements: Literal["all", "psf"] = Field("all", description=MeasurementConfig.model_fields["measurements"].description)


class MeasureRequest(MeasureOptions):
    """One exposure (optionally with its difference image) and the DiaObjects to measure on it."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "exposure": {"visit": 2026112400042, "detector": 94, "datasetType": "calexp"},
        "difference": {"visit": 2026112400042, "detector": 94, "datasetType": "difference"},
        "objects": [{"diaObjectId": 1, "ra": 150.0, "dec": 2.0}],
    }]})

    exposure: ExposureReference = Field(description="the science (direct) exposure")
    difference: ExposureReference | None = Field(None, description="its difference image: psfFlux is measured there, scienceFlux on the exposure")
    objects: Objects
    store: bool = Field(False, description="store the DiaForcedSources measured in the server's APDB (idempotent: rows already "
                                           "stored for this visit and detector are left alone); X-Apdb-Rows-Stored says how many were written")


class JobExposure(BaseModel):
    """One exposure of a job, optionally with its difference image."""

    model_config = ConfigDict(extra="forbid")

    exposure: ExposureReference
    difference: ExposureReference | None = None
    psf: UriRef | None = Field(None, description="a PSF file in the repository for this exposure (PSFEx .psf or FITS image); "
                                                 "default: psf_fwhm, else the exposure's PSF_FWHM keyword")


class JobRequest(MeasureOptions):
    """Many exposures, one DiaObject table: one catalog with the rows of every exposure."""

    model_config = ConfigDict(extra="forbid")

    exposures: list[JobExposure] = Field(min_length=1, description="exposures to measure the objects on")
    objects: Objects
    store: bool = Field(False, description="store each exposure's DiaForcedSources in the server's APDB as it is measured "
                                           "(idempotent); the counts are in the result's provenance, failures in the job's errors")


class BaselineRequest(BaseModel):
    """The window whose good epochs make each object's and band's baseline (ZTF's recipe)."""

    model_config = ConfigDict(extra="forbid")

    mjd_max: float = Field(allow_inf_nan=False, description="last midpoint of the window, MJD (TAI): before the event")
    mjd_min: float | None = Field(None, allow_inf_nan=False, description="first midpoint of the window, MJD (TAI); default: the first epoch")
    min_epochs: int = Field(DEFAULT_BASELINE_MIN_EPOCHS, ge=2, le=100_000,
                            description="fewer good epochs in the window: no baseline (the provenance says so)")

    @model_validator(mode="after")
    def _window(self) -> BaselineRequest:
        if self.mjd_min is not None and self.mjd_min > self.mjd_max:
            raise ValueError(f"mjd_min ({self.mjd_min}) is after mjd_max ({self.mjd_max}): the baseline window is empty")
        return self


class BinRequest(BaseModel):
    """Bins of a number of days."""

    model_config = ConfigDict(extra="forbid")

    days: float = Field(gt=0, le=36_500, allow_inf_nan=False, description="bin width, days (bin = floor(MJD / days))")


class LightCurveRequest(MeasureOptions):
    """DiaObjects (or one position) measured on every indexed exposure that covers them."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"objects": {"ra": 150.1, "dec": 2.2}, "mjd_min": 61040, "bands": ["g", "r"]},
    ]})

    objects: ObjectsOrPosition
    mjd_min: float | None = Field(None, allow_inf_nan=False, description="earliest exposure midpoint, MJD (TAI)")
    mjd_max: float | None = Field(None, allow_inf_nan=False, description="latest exposure midpoint, MJD (TAI)")
    bands: list[Annotated[str, Field(min_length=1, max_length=16)]] | None = Field(None, min_length=1, max_length=16,
                                                                                  description="only these bands")
    snr_limit: float = Field(DEFAULT_SNR_LIMIT, gt=0, le=1000, allow_inf_nan=False,
                             description="psfFlux / psfFluxErr below this: isUpperLimit, psfMag null (plot psfMagLim5Sigma)")
    baseline: BaselineRequest | None = Field(None, description="subtract each object's and band's baseline (median of the good "
                                                               "epochs in this window): psfFluxCorrected, psfFluxErrRescaled")
    bin: BinRequest | Literal["night"] | None = Field(None, description="answer bins instead of epochs: {\"days\": D}, or "
                                                                        "\"night\" (Rubin's day_obs, floor(MJD - 0.5))")

    @model_validator(mode="after")
    def _time_range(self) -> LightCurveRequest:
        if self.mjd_min is not None and self.mjd_max is not None and self.mjd_min > self.mjd_max:
            raise ValueError(f"mjd_min ({self.mjd_min}) is after mjd_max ({self.mjd_max}): the time range is empty")
        return self

    def products(self) -> Products:
        """What to make of the measured epochs (see :mod:`~forcedphot.photometry.lightcurve_products`)."""
        baseline = None if self.baseline is None else BaselineWindow(self.baseline.mjd_max, self.baseline.mjd_min, self.baseline.min_epochs)
        return Products(self.snr_limit, baseline, self.bin.days if isinstance(self.bin, BinRequest) else None, self.bin == "night")


class JobList(BaseModel):
    """A page of the caller's jobs, newest first."""

    jobs: list[JobStatus]
    next: str | None = Field(None, description="URL path of the next page, if any")


class Health(BaseModel):
    status: str
    checks: dict[str, str] = {}
