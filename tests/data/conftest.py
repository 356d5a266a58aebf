"""A local HTTP server for the download tests: official formats served from 127.0.0.1."""

import functools
import http.server
import threading

import pytest


class CountingHandler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder and records every requested path."""

    def do_GET(self):
        self.server.requests.append(self.path)
        super().do_GET()

    def log_message(self, *args):  # keep test output quiet
        pass


@pytest.fixture
def server(tmp_path):
    """An HTTP server on 127.0.0.1 serving tmp_path/served; yields (base_url, folder, requests)."""
    folder = tmp_path / "served"
    folder.mkdir()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(CountingHandler, directory=str(folder)))
    httpd.requests = []
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", folder, httpd.requests
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()
