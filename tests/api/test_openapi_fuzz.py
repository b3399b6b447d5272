"""Schemathesis fuzzing of the OpenAPI schema, in-process: no generated request gets a 5xx.

Valid and invalid bodies, parameters and headers are generated from the schema for every
operation (bounded number of examples so the whole file runs in well under a minute);
requests carry the API key so they reach the measurement code, not just the auth check.
"""

import collections

from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
import pytest
import schemathesis
from schemathesis.generation import GenerationMode
from service_helpers import AUTH, FWHM, data_id, make_repository, settings_for

from forcedphot.api.app import create_app


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory):
    repo = make_repository(tmp_path_factory.mktemp("repo"))
    app = create_app(settings_for(repo["root"], tmp_path_factory.mktemp("data"), max_objects=2000))
    app.state.runtime.refresh_index()  # the light-curve operations answer once the index is built
    loaded = schemathesis.openapi.from_asgi("/openapi.json", app)
    return loaded


def with_known_exposure(case, known_objects: bool = False):
    """Point a generated JSON body at a real exposure (and PSF, and objects if ``known_objects``),
    so the random objects or options reach the engine."""
    if isinstance(case.body, dict) and case.media_type == "application/json":
        if case.operation.path == "/v1/forced-photometry":
            case.body["exposure"] = data_id()
        elif case.operation.path == "/v1/jobs":
            case.body["exposures"] = [{"exposure": data_id()}]
        if case.body.get("psf_fwhm") is None:
            case.body["psf_fwhm"] = FWHM
        if known_objects:
            case.body["objects"] = {"uri": "tables/objects.parquet"}
    return case


def check_operation(operation, strategy, *, may_be_empty: bool = False) -> None:
    """Run the generated cases; ``may_be_empty``: the schema may admit no such case (no negative
    examples exist for an operation without parameters or body)."""
    @given(case=strategy)
    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None)
    def no_server_error(case):
        response = case.call(headers=AUTH)
        statuses[operation.label][response.status_code] += 1
        assert response.status_code < 500, f"{case.method} {case.path}: {response.status_code} {response.text[:500]}"
        if response.status_code >= 400:
            media_type = response.headers["content-type"][0]  # schemathesis keeps every header as a list
            assert media_type.startswith("application/problem+json"), response.text[:200]

    try:
        no_server_error()
    except Unsatisfiable:
        if not may_be_empty:
            raise


statuses: dict = collections.defaultdict(collections.Counter)


def test_every_operation_answers_without_server_errors(api_schema):
    # (schemathesis.pytest.from_fixture fails under pytest 9, so operations are driven here)
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) == 16
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            check_operation(operation, operation.as_strategy(mode), may_be_empty=mode == GenerationMode.NEGATIVE)
        if operation.method.upper() == "POST":
            for known_objects in (False, True):
                strategy = operation.as_strategy(GenerationMode.POSITIVE, media_type="application/json")
                check_operation(operation, strategy.map(lambda case, k=known_objects: with_known_exposure(case, k)))
    # the fuzzing reached the measurement itself, and refused bad input with 4xx
    measured = statuses["POST /v1/forced-photometry"]
    assert measured[200] > 0 and measured[422] > 0, measured
    assert statuses["POST /v1/jobs"][202] > 0, statuses["POST /v1/jobs"]
    assert statuses["POST /v1/lightcurves"][200] > 0, statuses["POST /v1/lightcurves"]
