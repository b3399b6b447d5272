"""The dashboard at ``/``: a static page and script, plotly.js from the installed plotly
package (nothing is fetched from another host), and ``GET /v1/objects/{id}`` (with its
DiaForcedSources stored in the APDB) for its search."""

from __future__ import annotations

from functools import lru_cache
import json
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi import Path as FastApiPath
from fastapi.openapi.docs import get_redoc_html
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles
import fastapi_offline
import pandas as pd
import plotly
from starlette.concurrency import run_in_threadpool

from forcedphot.api.dependencies import AUTH, Runtime, problems
from forcedphot.api.problems import Problem
from forcedphot.serving.apdb import objects_by_id, open_apdb, stored_forced_sources

STATIC = Path(__file__).resolve().parent.parent / "static"
PLOTLY_JS = Path(plotly.__file__).resolve().parent / "package_data" / "plotly.min.js"
OFFLINE_STATIC = Path(fastapi_offline.__file__).resolve().parent / "static"
DOCS_STATIC = "/static/docs"  # where the application serves fastapi-offline's files
REDOC_LOGO = b"https://cdn.redoc.ly/redoc/logo-mini.svg"
OBJECT_TABLE = "diaObjects.parquet"  # a repository root may hold its DiaObjects here (the demo does)

router = APIRouter()


@router.get("/redoc", include_in_schema=False)
async def redoc(request: Request) -> HTMLResponse:
    """ReDoc, its script and favicon from the fastapi-offline package."""
    return get_redoc_html(openapi_url=request.app.openapi_url, title="forcedphot - ReDoc", redoc_js_url="/static/redoc.standalone.js",
                          with_google_fonts=False, redoc_favicon_url=f"{DOCS_STATIC}/favicon.png")


@router.get("/static/redoc.standalone.js", include_in_schema=False)
async def redoc_js() -> Response:
    return Response(_redoc_script(), media_type="text/javascript")


@lru_cache(maxsize=1)
def _redoc_script() -> bytes:
    """The packaged ReDoc script, its one external image (a logo on a CDN) pointed at a
    local one: no page of this service loads anything from another host."""
    return (OFFLINE_STATIC / "redoc.standalone.js").read_bytes().replace(REDOC_LOGO, f"{DOCS_STATIC}/favicon.png".encode())


@router.get("/", include_in_schema=False)
async def dashboard() -> FileResponse:
    return FileResponse(STATIC / "dashboard.html", media_type="text/html")


@router.get("/static/plotly.min.js", include_in_schema=False)
async def plotly_js() -> FileResponse:
    return FileResponse(PLOTLY_JS, media_type="text/javascript")


ObjectId = Annotated[int, FastApiPath(ge=-(2**63), le=2**63 - 1, description="a DiaObject id (int64)")]


@router.get("/v1/objects/{dia_object_id}", dependencies=AUTH, tags=["light curves"], responses=problems(401, 404, 503))
async def find_object(dia_object_id: ObjectId, runtime: Runtime) -> dict:
    """A DiaObject's position (ICRS deg): from the server's APDB when it has one (with
    ``nDiaSources``), else from the ``diaObjects.parquet`` table at a repository root."""
    intake = runtime.intake()

    def look_up() -> dict | None:
        if intake.apdb is not None:
            found = objects_by_id(open_apdb(intake.apdb), [dia_object_id])
            if len(found):
                return {"diaObjectId": int(found["diaObjectId"].iloc[0]), "ra": float(found["ra"].iloc[0]), "dec": float(found["dec"].iloc[0]),
                        "nDiaSources": int(found["nDiaSources"].iloc[0]), "source": "apdb"}
            return None
        for root in intake.repository.roots:
            table = root / OBJECT_TABLE
            if table.is_file():
                found = pd.read_parquet(table, columns=["diaObjectId", "ra", "dec"], filters=[("diaObjectId", "==", dia_object_id)])
                if len(found):
                    # by column: a row of int64 and float64 values would pass the id through float64
                    return {"diaObjectId": int(found["diaObjectId"].iloc[0]), "ra": float(found["ra"].iloc[0]),
                            "dec": float(found["dec"].iloc[0]), "source": OBJECT_TABLE}
        return None

    found = await run_in_threadpool(look_up)
    if found is None:
        where = "the APDB" if intake.apdb is not None else f"the repository's {OBJECT_TABLE}"
        raise Problem(404, "unknown-object", f"no DiaObject {dia_object_id} in {where}")
    return found


@router.get("/v1/objects/{dia_object_id}/forced-sources", dependencies=AUTH, tags=["light curves"], responses=problems(401, 422, 503))
async def stored_sources(dia_object_id: ObjectId, runtime: Runtime) -> list[dict]:
    """The DiaForcedSources of a DiaObject stored in the server's APDB (apdb.yaml columns;
    fluxes in nJy, times MJD TAI), oldest first; shown beside fresh measurements."""
    intake = runtime.intake()
    if intake.apdb is None:
        raise Problem(422, "no-apdb", "this server has no APDB, so no stored DiaForcedSources")

    def read() -> list[dict]:
        rows = stored_forced_sources(open_apdb(intake.apdb), [dia_object_id]).sort_values("midpointMjdTai")
        return json.loads(rows.to_json(orient="records"))

    return await run_in_threadpool(read)


def mount_static(app: FastAPI) -> None:
    """The dashboard's own files under ``/static/app``."""
    app.mount("/static/app", StaticFiles(directory=STATIC), name="dashboard")
