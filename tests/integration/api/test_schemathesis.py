"""Schemathesis against the real API over HTTP: generated requests (examples, coverage,
fuzzing), then stateful sequences (create, then read, change and delete what was made,
following the OpenAPI links), must get no 5xx and no response that breaks the document.

The number of examples and the stateful time are bounded so CI stays quick;
NUBES_SCHEMATHESIS_EXAMPLES and NUBES_SCHEMATHESIS_STATEFUL_SECONDS raise them for a deeper
run. The seed is printed so a failure can be replayed.
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.support.api_server import serve_api

pytestmark = pytest.mark.integration

ST = Path(sys.executable).with_name("st")
EXAMPLES = int(os.environ.get("NUBES_SCHEMATHESIS_EXAMPLES", "15"))
# Stateful scenarios draw their data from true randomness, so Hypothesis sees a small search
# space and stops after a few dozen scenarios whatever --max-examples says; a time budget
# is what makes it follow the links deep (create, read, change, delete; two minutes reach
# every kind).
STATEFUL_SECONDS = int(os.environ.get("NUBES_SCHEMATHESIS_STATEFUL_SECONDS", "60"))
# Far below what a run reaches (about 90 in 60 s), far above what it reached without
# examples and explicit links (2): a floor that catches links the schema stopped giving.
MIN_LINKS_COVERED = 30
HOOKS = "tests.integration.api.schemathesis_hooks"
REPO = Path(__file__).resolve().parents[3]

# What a run must not find. Left out: negative_data_rejection, because pydantic reads
# JSON leniently by design (it takes `false` or "1" where an integer is expected), and
# positive_data_acceptance, because much of what makes input valid (a CIDR, an SSH key,
# a bzImage) cannot be said in JSON Schema: such input gets a 4xx with a code, as it should.
CHECKS = [
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
    "response_headers_conformance",
    "missing_required_header",
    "unsupported_method",
    "allow_header_conformance",
    "use_after_free",
    # ensure_resource_availability, narrowed to the created resource (see the hooks module)
    "created_resource_available",
    "ignored_auth",
]
# Left out: the watch streams without end (server-sent events), and revoking tokens would
# log the run itself out (everything after would be a 401 that tests nothing).
EXCLUDED_PATHS = r"^/v1/(watch|events/watch|auth/token$|auth/tokens/)"


def test_generated_requests_find_no_server_error_and_no_schema_violation(
    tmp_path: Path,
) -> None:
    seed = str(secrets.randbelow(2**32))
    with serve_api(tmp_path, import_allow=()) as api:
        token = api.token()
        # The examples name this image; an upload's body is bytes, which examples cannot give.
        uploaded = httpx.post(
            f"{api.url}/v1/images",
            params={"name": "example-image", "format": "raw"},
            content=bytes(1 << 20),
            headers={"Authorization": f"Bearer {token}"},
            timeout=60,
        )
        assert uploaded.status_code == 201, uploaded.text
        # Both runs share the server, so the stateful one starts among what the first made.
        runs = [
            _schemathesis(api.url, token, seed, tmp_path, "examples,coverage,fuzzing"),
            _schemathesis(
                api.url, token, seed, tmp_path, "stateful", "--max-time", str(STATEFUL_SECONDS)
            ),
        ]
    output = "\n".join(result.stdout + result.stderr for result in runs)
    (tmp_path / "schemathesis.txt").write_text(output)
    for result in runs:
        report = result.stdout[-20_000:] + result.stderr[-5_000:]
        assert result.returncode == 0, f"schemathesis (seed {seed}) found problems:\n{report}"
        assert "Tested:" in result.stdout, report
    # The stateful run must get deep: links followed with data a create really returned.
    covered = re.search(r"API Links:\s+(\d+) covered", runs[1].stdout)
    assert covered is not None, runs[1].stdout
    assert int(covered[1]) >= MIN_LINKS_COVERED, runs[1].stdout[-20_000:]


def _schemathesis(
    url: str, token: str, seed: str, directory: Path, phases: str, *options: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            str(ST),
            "run",
            f"{url}/openapi.json",
            "--header",
            f"Authorization: Bearer {token}",
            "--checks",
            ",".join(CHECKS),
            "--phases",
            phases,
            "--max-examples",
            str(EXAMPLES),
            "--exclude-path-regex",
            EXCLUDED_PATHS,
            "--workers",
            "1",
            "--seed",
            seed,
            "--request-timeout",
            "20",
            "--no-color",
            *options,
        ],
        capture_output=True,
        text=True,
        timeout=1200,
        cwd=directory,
        check=False,
        env={**os.environ, "SCHEMATHESIS_HOOKS": HOOKS, "PYTHONPATH": str(REPO)},
    )
