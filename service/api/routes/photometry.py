"""``POST /v1/forced-photometry``: one exposure, measured now (JSON references or uploads)."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

from forcedphot.api.dependencies import AUTH, CATALOG_RESPONSE, OutputFormat, Runtime, problems, run_measurement, within_body_timeout
from forcedphot.api.intake import remove_uploads
from forcedphot.api.problems import Problem
from forcedphot.photometry.formats import FORMATS
from forcedphot.serving.executor import MeasureOutcome

PATH = "/v1/forced-photometry"
router = APIRouter(tags=["measure"])

#: the multipart form, for the OpenAPI schema (the route parses its body itself)
MULTIPART_SCHEMA = {
    "type": "object",
    "properties": {
        "exposure": {"type": "string", "format": "binary", "description": "science exposure, FITS"},
        "exposure_ref": {"type": "string", "description": "or a JSON reference to it, e.g. {\"uri\": \"...\"}"},
        "difference": {"type": "string", "format": "binary", "description": "difference image, FITS"},
        "difference_ref": {"type": "string", "description": "or a JSON reference to it"},
        "objects": {"type": "string", "format": "binary", "description": "DiaObject table: parquet, CSV or JSON"},
        "objects_ref": {"type": "string", "description": "or a JSON {\"uri\": ...} to a table in the repository"},
        "psf": {"type": "string", "format": "binary", "description": "PSF file: PSFEx .psf, or a FITS PSF image (wins over psf_fwhm)"},
        "psf_fwhm": {"type": "number", "description": "Gaussian PSF FWHM, pixels"},
        "extra_columns": {"type": "boolean", "description": "add AB magnitudes and limits as light curves have them: psfMag, psfMagErr, psfMagLim5Sigma (5-sigma limiting magnitude), isUpperLimit (S/N below 3: psfMag null), the same for scienceFlux (scienceMag, ...), psfFlux_snr, scienceFlux_snr and epochStatus"},
        "apertures": {"type": "string", "description": "aperture radii in pixels, comma-separated"},
        "include_offimage": {"type": "boolean"},
        "subtract_background": {"type": "string", "enum": ["auto", "on", "off"],
                                "description": "subtract each object's local background from its fluxes (auto: plain FITS direct images)"},
        "measurements": {"type": "string", "enum": ["all", "psf"],
                         "description": "all: every measurement; psf: the PSF fluxes alone, as Rubin's DiaForcedSourceTask"},
    },
}


def _measurement_headers(outcome: MeasureOutcome, parse_seconds: float, encode_seconds: float) -> dict[str, str]:
    m = outcome.measurement
    timings = {"parse": parse_seconds, **outcome.timings(), "encode": encode_seconds}
    return {
        "X-Objects-In": str(m.n_input),
        "X-Objects-Measured": str(m.n_on_detector),
        "X-Objects-Off-Detector": str(m.n_off_detector),
        "X-Objects-Invalid-Coordinates": str(m.n_invalid_coords),
        "X-Objects-Flagged": str(m.n_flagged),
        "X-Backend": m.backend,
        "X-Exposure-Cache": outcome.cache,
        "Server-Timing": ", ".join(f"{name};dur={seconds * 1e3:.2f}" for name, seconds in timings.items()),
        **({"X-Apdb-Rows-Stored": str(outcome.stored)} if outcome.stored is not None else {}),
    }


@router.post(PATH, dependencies=AUTH, response_class=Response,
             responses={200: CATALOG_RESPONSE, **problems(400, 401, 403, 404, 406, 408, 413, 415, 422, 429, 503, 504)})
async def forced_photometry(request: Request, runtime: Runtime, fmt: OutputFormat) -> Response:
    """Measure DiaObjects on one exposure (JSON with references, or multipart uploads)."""
    intake = runtime.intake()
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    start = time.perf_counter()
    uploads = []
    try:
        if media_type == "application/json":
            body = await within_body_timeout(runtime, request.body())
            task = await run_in_threadpool(intake.from_json, body)
        elif media_type == "multipart/form-data":
            form = await within_body_timeout(runtime, request.form(max_files=4, max_fields=16))
            try:
                task, uploads = await run_in_threadpool(intake.from_form, form)
            finally:
                await form.close()
        else:
            raise Problem(415, "unsupported-media-type",
                          f"send application/json (references) or multipart/form-data (uploads), not {media_type or 'no Content-Type'!r}")
        parse_seconds = time.perf_counter() - start
        outcome, content, encode_seconds = await run_measurement(request, runtime, lambda: runtime.service.measure_encoded(task, fmt))
    finally:
        if uploads:
            await run_in_threadpool(remove_uploads, uploads)
    runtime.metrics.objects.inc(outcome.measurement.n_on_detector)
    for stage, seconds in outcome.timings().items():
        runtime.metrics.measure_seconds.labels(stage).observe(seconds)
    return Response(content, media_type=FORMATS[fmt], headers=_measurement_headers(outcome, parse_seconds, encode_seconds))


def describe_body(schema: dict[str, Any], request_schema: dict[str, Any]) -> None:
    """Put the route's two request bodies (JSON ``MeasureRequest``, multipart upload) in
    the OpenAPI ``schema``; ``request_schema`` is MeasureRequest's JSON schema."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components.update(request_schema.pop("$defs", {}))
    components["MeasureRequest"] = request_schema
    components["MeasureUpload"] = MULTIPART_SCHEMA
    schema["paths"][PATH]["post"]["requestBody"] = {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/MeasureRequest"}},
            "multipart/form-data": {"schema": {"$ref": "#/components/schemas/MeasureUpload"}},
        },
    }
