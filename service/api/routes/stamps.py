"""``GET /v1/stamps``: pixels around a position on one exposure, FITS (with WCS) or PNG."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from forcedphot.api.dependencies import AUTH, Runtime, problems
from forcedphot.api.problems import Problem
from forcedphot.photometry.stamps import MAX_STAMP_PX, cutout, stamp_fits, stamp_png
from forcedphot.serving.repository import DataIdRef

router = APIRouter(tags=["light curves"], dependencies=AUTH)
MEDIA = {"fits": "application/fits", "png": "image/png"}


@router.get("/v1/stamps", response_class=Response, responses={200: {"content": {m: {} for m in MEDIA.values()}},
                                                           **problems(401, 403, 404, 406, 422)})
async def stamps(request: Request, runtime: Runtime,
                 visit: Annotated[int, Query(ge=0, le=2**63 - 1)], detector: Annotated[int, Query(ge=0, le=2**31 - 1)],
                 ra: Annotated[float, Query(ge=0, lt=360, allow_inf_nan=False, description="deg")],
                 dec: Annotated[float, Query(ge=-90, le=90, allow_inf_nan=False, description="deg")],
                 size: Annotated[int, Query(ge=8, le=MAX_STAMP_PX, description="side, pixels")] = 48,
                 kind: Annotated[Literal["science", "difference"], Query(description="which image")] = "science") -> Response:
    """A stamp of ``size`` pixels centred on (ra, dec): FITS with its WCS (default), or a PNG
    (ZScale, asinh stretch, the position marked) with ``Accept: image/png``."""
    accept = request.headers.get("accept", "")
    fmt = "png" if "image/png" in accept else "fits" if ("application/fits" in accept or "*/*" in accept or not accept) else None
    if fmt is None:
        raise Problem(406, "not-acceptable", f"stamps come as {' or '.join(MEDIA.values())}")
    ref = DataIdRef(visit=visit, detector=detector, datasetType="calexp" if kind == "science" else "difference")
    source = runtime.intake().exposure(ref)

    def render() -> bytes:
        with runtime.service.handles.lease(source.path, source.label) as exposure:
            pixels, header, position = cutout(exposure, ra, dec, size)
        return stamp_png(pixels, position) if fmt == "png" else stamp_fits(pixels, header)

    return Response(await run_in_threadpool(render), media_type=MEDIA[fmt])
