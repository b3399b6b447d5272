"""Hostile clients against a real ``forcedphot serve``, round 3 (loopback only, bounded
loops): trickled headers on every request of a connection, more connections than the
server takes, clients that never read their answers, metric labels from any method, and
files rewritten under a reader. Each test reproduces one finding of the probe."""

import os
from pathlib import Path
import select
import socket
import time

import httpx
import pytest
from server_helpers import assert_closed_by_server, demo_request, demo_visits, many_objects, read_answer, serving, visit_dir
from service_helpers import wait_until

SETTINGS = {
    "FORCEDPHOT_MEASURE_PROCESSES": "1",
    "FORCEDPHOT_HEADER_TIMEOUT_SECONDS": "1",
    "FORCEDPHOT_WRITE_TIMEOUT_SECONDS": "2",
    "FORCEDPHOT_MAX_CONNECTIONS": "40",
    "FORCEDPHOT_KEEP_ALIVE_SECONDS": "30",
}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from serving(tmp_path_factory, "round3", **SETTINGS)


@pytest.fixture(scope="module")
def visits(server):
    return demo_visits(server)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_trickled_headers_are_cut_off_on_later_requests_of_a_connection(server):
    s = socket.create_connection(("127.0.0.1", server.port))
    try:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_answer(s).startswith(b"HTTP/1.1 200")
        time.sleep(1.5)  # idle past the header deadline: keep-alive (30 s) allows it, no request has begun
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_answer(s).startswith(b"HTTP/1.1 200")
        s.sendall(b"GET /healthz HTTP/1.1\r\nHo")  # a second request's headers, never finished
    except BaseException:
        s.close()
        raise
    assert_closed_by_server(s)


def test_connections_beyond_the_cap_are_refused_with_503(server):
    held = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(60)]
    try:
        refused = 0
        for s in held:
            s.settimeout(0.5)
            try:
                refused += s.recv(200).startswith(b"HTTP/1.1 503")
            except TimeoutError:
                pass
        assert refused >= 20  # 60 opened, 40 taken
        descriptors = len(os.listdir(f"/proc/{server.process.pid}/fd"))
        assert descriptors < 40 + 60  # the refused ones were closed at once
    finally:
        for s in held:
            s.close()
    assert wait_until(lambda: httpx.get(f"{server.url}/healthz").status_code == 200, timeout=5)


def test_a_client_that_never_reads_its_answer_is_disconnected(server, visits):
    visit = visits[0]
    body = demo_request(visit, many_objects(server.data_dir, visit, 20_000))
    body["include_offimage"] = True
    request = httpx.Request("POST", f"{server.url}/v1/forced-photometry", json=body, headers={"Accept": "application/json"})
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", server.port))
    try:
        head = f"POST /v1/forced-photometry HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nAccept: application/json\r\n"
        content = request.read()
        s.sendall(head.encode() + f"Content-Length: {len(content)}\r\n\r\n".encode() + content)
        before = rss_mib(server.process.pid)
        # the answer starts arriving once measured (a few s; longer on a busy machine), then waits
        # for a reader: the write timeout is 2 s
        assert select.select([s], [], [], 120)[0], "no answer began within 120 s"
        time.sleep(6)
        received = b""
        s.settimeout(5)
        try:
            while chunk := s.recv(1 << 20):
                received += chunk
        except (ConnectionResetError, TimeoutError):
            pass
    finally:
        s.close()
    assert b"content-length: " in received, received[:300]
    length = int(received.split(b"content-length: ")[1].split(b"\r\n")[0])
    assert len(received.partition(b"\r\n\r\n")[2]) < length  # the server gave up on it: the answer was dropped
    assert rss_mib(server.process.pid) < before + 200
    assert httpx.get(f"{server.url}/healthz").status_code == 200


def test_any_method_token_is_one_metric_label(server):
    # httptools refuses methods it does not know (400, connection closed); h11 takes any token
    # to the application: either way no token becomes a label. PROPFIND reaches it under both.
    for method in [f"X{'M' * 5000}{i}" for i in range(20)] + ["PROPFIND"]:
        with socket.create_connection(("127.0.0.1", server.port)) as s:
            s.sendall(f"{method} /healthz HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            assert read_answer(s).split(b" ")[1] in (b"400", b"405")
    metrics = httpx.get(f"{server.url}/metrics").text
    assert "MMMM" not in metrics and 'method="other"' in metrics and len(metrics) < 200_000


def test_a_file_rewritten_under_a_reader_is_a_clean_answer(server, visits):
    visit = visits[-1]
    position = many_objects(server.data_dir, visit, 1)[0]
    query = {"visit": visit["visit"], "detector": visit["detector"], "ra": position["ra"], "dec": position["dec"], "size": 32}
    assert httpx.get(f"{server.url}/v1/stamps", params=query).status_code == 200
    calexp = visit_dir(server.data_dir, visit) / "calexp.fits"
    data = calexp.read_bytes()
    with open(calexp, "r+b") as f:  # in place: same inode, shorter
        f.truncate(len(data) // 3)
    answers = [httpx.get(f"{server.url}/v1/stamps", params=query) for _ in range(3)]
    assert all(a.status_code in (409, 422) and a.headers["content-type"] == "application/problem+json" for a in answers), \
        [a.text for a in answers]
    assert "calexp" in answers[0].json()["detail"] and str(server.data_dir) not in answers[0].text
    assert server.process.poll() is None and httpx.get(f"{server.url}/healthz").status_code == 200
