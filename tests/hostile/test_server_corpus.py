"""The server part of the hostile-input corpus (server_corpus.py), against a live keyed server: every bad
request gets a 4xx, never a 500 or a dropped connection (except where the guard answers early and closes), no
stack trace or server path in the body, and a good request still succeeds after them all."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from server_corpus import KEY, battery, good_request, judge_answer, send

pytest.importorskip("uvicorn")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "serving"))  # live_server.py, shared with test_guard
from live_server import ServerThread  # after the path it lives on

REQUESTS = {r.id: r for r in battery()}


@pytest.fixture(scope="module")
def server(tmp_path_factory, data_dir_env, one_thread):
    import imgcls
    from imgcls.serving.app import create_app

    run = imgcls.train(out=str(tmp_path_factory.mktemp("runs")), name="hostile", epochs=1,
                       model_option={"widths": [8, 16, 16]}, quiet=True, report=False).path
    with ServerThread(create_app(run, api_key=KEY, client_timeout=5.0)) as live:
        live.secrets = (str(run), str(Path(__file__).resolve().parents[2]))  # no answer may name these paths
        yield live


@pytest.mark.parametrize("request_id", list(REQUESTS))
def test_a_bad_request_gets_a_clean_4xx(server, request_id):
    req = REQUESTS[request_id]
    answer = send(server.port, req)
    assert not judge_answer(req, answer, server.secrets), (answer.status, answer.error, answer.body[:500])
    if not answer.dropped:
        assert answer.status in req.expect


def test_a_good_request_succeeds_after_every_bad_one(server):
    problems = {r.id: p for r in battery() if (p := judge_answer(r, send(server.port, r), server.secrets))}
    answer = send(server.port, good_request())
    assert answer.status == 200 and b'"predictions"' in answer.body, answer.body[:500]
    assert not problems, problems
    assert not Path("/tmp/imgcls-hostile.png").exists()  # a file name is never a path on the server
