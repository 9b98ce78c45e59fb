"""Schema fuzzing (issue 15): schemathesis generates requests from the server's own /openapi.json,
valid and invalid, for every operation, with no key, the api key and the admin key. Whatever it
sends, the server answers within a per-request timeout, never with a 5xx, and every error is
OpenAI's error object.

The server is real (the embedded model in float32) but small: --max-model-len 64 bounds every
generation, --max-queue 8 refuses large `n` with 429, and its adapter directory is its own, so the
adapter routes can change nothing the other tests see.
"""

from __future__ import annotations

import json

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from tests.test_server import ServerProcess

pytestmark = [pytest.mark.slow]

API_KEY, ADMIN_KEY = "fuzz-user", "fuzz-admin"
AUTHS = {"none": {}, "user": {"Authorization": f"Bearer {API_KEY}"},
         "admin": {"Authorization": f"Bearer {ADMIN_KEY}"}}
EXAMPLES = 12  # per operation and key: 13 operations x 3 keys x 12 = ~470 requests
REQUEST_TIMEOUT_S = 30


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    server = ServerProcess(root / "adapters", root / "fuzz.log", "--api-key", API_KEY, "--admin-key",
                           ADMIN_KEY, "--max-model-len", "64", "--max-queue", "8", "--max-num-seqs", "4",
                           "--max-upload-mib", "1")
    server.start()
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def _check(case, response) -> None:
    where = f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:500]}\n" \
            f"{case.as_curl_command()}"
    assert response.status_code < 500, where
    if response.status_code >= 400:
        err = json.loads(response.text)["error"]
        assert set(err) == {"message", "type", "param", "code"}, where
        assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str), where


def _fuzz(strategy, url: str, headers: dict[str, str]) -> None:
    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(case=strategy)
    def fuzz(case) -> None:
        _check(case, case.call(base_url=url, headers=headers, timeout=REQUEST_TIMEOUT_S))

    fuzz()


def test_fuzz_every_operation_with_and_without_keys(fuzz_server):
    schema = schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    labels = sorted(op.label for op in operations)
    assert "POST /v1/adapters" in labels and "POST /v1/chat/completions" in labels, labels
    upload = next(op for op in operations if op.label == "POST /v1/adapters")
    assert upload.get_request_payload_content_types() == ["multipart/form-data"]  # described by hand
    for op in operations:
        strategy = st.one_of(op.as_strategy(GenerationMode.POSITIVE), op.as_strategy(GenerationMode.NEGATIVE))
        for headers in AUTHS.values():
            _fuzz(strategy, fuzz_server.url, headers)
    assert fuzz_server.proc.poll() is None, fuzz_server.log_tail()
