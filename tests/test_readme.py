"""The README's examples, run as written: the light-curve command line, and every curl
request against the served demo (after the command line wrote the survey the upload
example names)."""

import io
import json
from pathlib import Path
import re
import shlex

from fastapi.testclient import TestClient
import pandas as pd
import pytest
from service_helpers import wait_until

from forcedphot.api.app import create_app
from forcedphot.api.settings import Settings
from forcedphot.cli import main as cli

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
TOP = README.split("\n---\n", 1)[0]
CURLS = [" ".join(block.split()) for block in re.findall(r"^ {4}(curl .*?)(?:\n\n|\Z)", README.replace("\\\n", " "), re.M | re.S)]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """The README's light-curve command line, run in a fresh directory."""
    directory = tmp_path_factory.mktemp("readme")
    line = next(line.strip() for line in TOP.splitlines() if "forcedphot lightcurve" in line)
    cwd = Path.cwd()
    import os

    os.chdir(directory)
    try:
        for command in line.split("&&"):
            words = shlex.split(command)
            assert words[0].endswith("forcedphot")
            assert cli(words[1:] + (["--backend", "numpy"] if words[1] == "lightcurve" else [])) == 0
    finally:
        os.chdir(cwd)
    return directory


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    settings = Settings(data_dir=tmp_path_factory.mktemp("served"), backend="numpy", measure_processes=0)
    with TestClient(create_app(settings)) as c:
        wait_until(lambda: c.get("/v1/exposures", params={"ra": 150.1, "dec": 2.2}).status_code == 200, timeout=60)
        yield c


def test_the_light_curve_command_line_runs(workdir):
    table = pd.read_parquet(workdir / "lc.parquet")
    assert len(table) == 24 and set(table["diaObjectId"]) == {0} and (workdir / "lc.png").stat().st_size > 10_000


def test_the_readme_has_the_examples():
    assert len(CURLS) >= 3 and any("lightcurves" in c for c in CURLS) and any(" -F " in c for c in CURLS)


@pytest.mark.parametrize("number", range(3))
def test_each_curl_example_answers_on_the_served_demo(number, workdir, client):
    words = shlex.split(CURLS[number])
    url = next(w for w in words if w.startswith("http://127.0.0.1:8000"))
    headers = dict(h.split(": ", 1) for h in (words[i + 1] for i, w in enumerate(words) if w == "-H"))
    headers.pop("Content-Type", None)
    path = url.replace("http://127.0.0.1:8000", "")
    if "-d" in words:
        response = client.post(path, json=json.loads(words[words.index("-d") + 1]), headers=headers)
    else:
        files, data = {}, {}
        for value in (words[i + 1] for i, w in enumerate(words) if w == "-F"):
            name, _, content = value.partition("=")
            if content.startswith("@"):
                files[name] = (Path(content[1:]).name, (workdir / content[1:]).read_bytes())
            else:
                data[name] = content
        response = client.post(path, files=files, data=data, headers=headers)
    assert response.status_code == 200, response.text
    kind = response.headers["content-type"]
    if kind.startswith("text/csv"):
        table = pd.read_csv(io.StringIO(response.text), comment="#")
    else:
        table = pd.read_parquet(io.BytesIO(response.content))
    assert len(table) > 0 and "psfFlux" in table
    if "lightcurves" in path:
        assert len(table) == 24 and set(table["band"]) == {"g", "r"}
    if "extra_columns=true" in CURLS[number]:
        assert "psfMag" in table and "psfMagLim5Sigma" in table
