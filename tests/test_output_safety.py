"""What imgcls prints and stores: no credential given in a URL, no control character from a name."""

from __future__ import annotations

import io

import pytest

from imgcls.errors import hide_secrets, shown_url, url_secrets
from imgcls.terminal import console, safe


@pytest.mark.parametrize("url, secret", [
    ("postgresql+psycopg://me@host/db?password=hunter2", "hunter2"),
    ("postgresql://me:hunter2@host:5432/db", "hunter2"),
    ("postgresql://me:hun%40ter2@host/db", "hun@ter2"),  # percent-encoded in the URL, decoded in a driver's error
    ("mysql://host/db?sslpassword=hunter2&charset=utf8", "hunter2"),
    ("http://user:hunter2@mlflow.example:5000", "hunter2"),
    ("https://mlflow.example/?token=hunter2", "hunter2"),
    ("s3://bucket/x?aws_secret_access_key=hunter2", "hunter2"),
])
def test_every_credential_form_is_hidden(url, secret):
    assert secret in url_secrets(url)
    assert secret not in shown_url(url) and "***" in shown_url(url)
    said = f"could not connect with {url} (password {secret!s} refused)"
    assert secret not in hide_secrets(said, url)


@pytest.mark.parametrize("url", ["sqlite:////tmp/a/study.db", "http://127.0.0.1:5000", "postgresql://me@host/db",
                                 "not a url at all", "https://host/?page=2"])
def test_urls_without_credentials_are_shown_as_they_are(url):
    assert url_secrets(url) == [] and shown_url(url) == url


def test_control_characters_are_shown_not_obeyed():
    name = "\x1b[2J\x1b[31mfake\x07\x9b.png"
    assert safe(f"error: {name}\n\tnext") == "error: \\x1b[2J\\x1b[31mfake\\x07\\x9b.png\n\tnext"
    buf = io.StringIO()
    console(file=buf, width=200).print(f"class {name}", markup=False, soft_wrap=True)
    assert "\x1b" not in buf.getvalue() and "\\x1b[2J" in buf.getvalue()
