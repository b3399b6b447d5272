"""The README's first examples, run as written: the light-curve command line, and the
curl request against the served demo."""

import io
import json
from pathlib import Path
import shlex

from fastapi.testclient import TestClient
import pandas as pd
from service_helpers import wait_until

from forcedphot.api.app import create_app
from forcedphot.api.settings import Settings
from forcedphot.cli import main as cli

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
TOP = README.split("\n---\n", 1)[0]


def test_the_light_curve_command_line_runs(tmp_path, monkeypatch):
    line = next(line.strip() for line in TOP.splitlines() if "forcedphot lightcurve" in line)
    monkeypatch.chdir(tmp_path)
    for command in line.split("&&"):
        words = shlex.split(command)
        assert words[0].endswith("forcedphot")
        assert cli(words[1:] + (["--backend", "numpy"] if words[1] == "lightcurve" else [])) == 0
    table = pd.read_parquet(tmp_path / "lc.parquet")
    assert len(table) == 24 and set(table["diaObjectId"]) == {0} and (tmp_path / "lc.png").stat().st_size > 10_000


def test_the_curl_example_answers_on_the_served_demo(tmp_path):
    line = next(line.strip() for line in TOP.splitlines() if line.strip().startswith("curl"))
    words = shlex.split(line)
    url = words[words.index("-X") + 2]
    headers = dict(h.split(": ", 1) for h in (words[i + 1] for i, w in enumerate(words) if w == "-H"))
    body = json.loads(words[words.index("-d") + 1])
    with TestClient(create_app(Settings(data_dir=tmp_path, backend="numpy", measure_processes=0))) as client:
        wait_until(lambda: client.get("/v1/exposures", params={"ra": 150.1, "dec": 2.2}).status_code == 200, timeout=60)
        response = client.post(url.replace("http://127.0.0.1:8000", ""), json=body, headers=headers)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/csv"), response.text
    table = pd.read_csv(io.StringIO(response.text), comment="#")
    assert len(table) == 24 and set(table["band"]) == {"g", "r"}
