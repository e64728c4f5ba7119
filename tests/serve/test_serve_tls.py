"""TLS as documented: `nds serve --ssl-keyfile/--ssl-certfile`, clients verify with --cacert."""

from __future__ import annotations

import json
import ssl
import subprocess
import sys

import httpx
import pytest
from servehelpers import REPO, ServeProcess, synth, synthetic_scores, tokens  # noqa: F401

from nds.client.request import fetch_bundle_http, request_selection
from nds.errors import StorageError


@pytest.fixture
def cert(tmp_path):
    key, crt = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(crt),
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    return key, crt


def test_https_with_a_private_certificate(synth, cert, tmp_path):
    ws, info = synth
    key, crt = cert
    token = tokens(ws, "alice")["alice"]
    scores = tmp_path / "scores.json"
    scores.write_text(json.dumps(synthetic_scores(info)))
    with ServeProcess(ws.root, "--ssl-keyfile", str(key), "--ssl-certfile", str(crt), cacert=crt) as server:
        assert server.url.startswith("https://")
        summary = request_selection(server.url, token, scores, tmp_path / "sel", budget=10, cacert=str(crt))
        assert summary["rows"] == 10
        assert fetch_bundle_http(f"{server.url}/v1/bundle", _empty(tmp_path / "b"), cacert=str(crt)) > 0
        with pytest.raises(StorageError, match="CERTIFICATE_VERIFY_FAILED"):  # no trust without the CA
            request_selection(server.url, token, scores, tmp_path / "sel2", budget=10, retries=0)
        with pytest.raises(httpx.HTTPError):  # plain HTTP is not served on the TLS port
            httpx.get(f"http://127.0.0.1:{server.port}/v1/health", timeout=5).raise_for_status()
        ok = httpx.get(f"{server.url}/v1/health", verify=ssl.create_default_context(cafile=str(crt)))
        assert ok.status_code == 200


def _empty(path):
    path.mkdir()
    return path


def test_tls_options_are_checked_first(synth, cert):
    ws, _ = synth
    key, _ = cert
    r = subprocess.run([sys.executable, "-m", "flows.cli", "--root", str(ws.root), "serve", "--ssl-keyfile", str(key)],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip() == "error: give both --ssl-keyfile and --ssl-certfile for TLS (or neither)"
