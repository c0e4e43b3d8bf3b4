"""Fuzzing the HTTP API from its own OpenAPI document (schemathesis): every operation with generated valid and
invalid requests (JSON and multipart bodies, path and query parameters), then the stateful phase that follows the
document's links (POST /v1/videos -> GET / content / DELETE /v1/videos/{id}). No response may be a 5xx, and every
response must be one the document declares (status, content type and body schema).

The server's limits keep each case cheap (tiny models, at most 8 steps, 128x128 pixels and 5 frames, cheap methods
only; most cases are refused in milliseconds, a generation takes well under a second), so the whole file sends
about 1,400 requests in one and a half minutes on two cores."""

import collections

import hypothesis
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.errors import FailureGroup
from schemathesis.specs.openapi.checks import (
    allow_header_conformance,
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from server_fixtures import LiveServer

KEY = "fuzz-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          allow_header_conformance]
# the model defaults (tiny-flux: 8 steps at 128x128; tiny-wan: 5 frames) fit, so requests that leave them out run
LIMITS = dict(max_steps=8, max_pixels=128 * 128, max_frames=5, max_n=2, max_prompt_chars=300, max_batch_wait_ms=0,
              request_timeout_s=600, queue_size=64, shutdown_grace_s=0,
              allowed_methods=["abcache", "fbcache", "sortblock", "prune"])
SETTINGS = dict(deadline=None, database=None, suppress_health_check=list(HealthCheck), derandomize=True)
EXAMPLES = 60  # per operation and mode; operations without inputs stop at their few distinct cases
SENT: list[str] = []  # one entry per request sent, for the total checked last


@pytest.fixture(scope="module")
def live():
    models = [{"id": "tiny-flux", "source": "tiny-flux"}, {"id": "tiny-wan", "source": "tiny-wan"}]
    with LiveServer(models=models, warmup=False, api_keys=[KEY], **LIMITS) as server:
        yield server


@pytest.fixture(scope="module")
def api(live):
    return schemathesis.openapi.from_url(live.url + "/openapi.json")


OPERATIONS = ["POST /v1/images/generations", "POST /v1/videos", "GET /v1/videos", "GET /v1/videos/{video_id}",
              "GET /v1/videos/{video_id}/content", "DELETE /v1/videos/{video_id}", "GET /v1/models",
              "GET /v1/accelerators", "GET /health", "GET /ready", "GET /metrics"]
NO_INPUTS = {"GET /health", "GET /ready", "GET /metrics"}  # public, no parameters


def without_deadline(case):
    """A request's own `timeout`, when shorter than its work, is answered 504 by design (test_server.py's
    test_timeout_gives_504_and_stops_the_work): the fuzz leaves the deadline to the server's default instead."""
    if isinstance(case.body, dict):
        case.body.pop("timeout", None)
    return case


def call_and_check(case) -> None:
    response = case.call(headers=AUTH, timeout=60)
    SENT.append(f"{case.operation.label} {response.status_code}")
    case.validate_response(response, checks=CHECKS)


def test_every_operation_is_fuzzed(api):
    assert sorted(result.ok().label for result in api.get_all_operations()) == sorted(OPERATIONS)


@pytest.mark.parametrize("label, mode", [
    (label, mode) for label in OPERATIONS for mode in GenerationMode
    if mode == GenerationMode.POSITIVE or label not in NO_INPUTS  # nothing there to make invalid
], ids=str)
def test_operation(api, label, mode):
    method, path = label.split(" ")
    operation = api[path][method]

    @hypothesis.given(case=operation.as_strategy(generation_mode=mode).map(without_deadline))
    @hypothesis.settings(max_examples=EXAMPLES, **SETTINGS)
    def fuzz(case):
        call_and_check(case)

    fuzz()


def test_linked_video_operations(api):
    """The stateful phase: scenarios that create a video job and use its id in the linked operations. Failures are
    collected rather than raised: a scenario against a live server cannot be replayed draw for draw (job ids and
    outcomes differ), so Hypothesis' replay would only report its own inconsistency."""
    failures, start = [], len(SENT)

    class Scenarios(api.as_state_machine()):
        def get_call_kwargs(self, case):
            return {"headers": AUTH, "timeout": 60}

        def validate_response(self, response, case, additional_checks=None, **kwargs):
            SENT.append(f"{case.operation.label} {response.status_code}")
            try:
                case.validate_response(response, checks=CHECKS)
            except FailureGroup as exc:
                failures.append(f"{case.method} {case.formatted_path} -> {response.status_code}: {exc}")

    try:
        Scenarios.run(settings=hypothesis.settings(max_examples=60, stateful_step_count=6, phases=[Phase.generate],
                                                   **SETTINGS))
    except hypothesis.errors.Flaky:
        pass  # see above: the failures, if any, are in `failures`
    assert not failures, failures[:3]
    assert any("{video_id}" in entry and entry.endswith(" 200") for entry in SENT[start:]), "no link was followed"


def test_the_run_sent_enough_requests():
    """Placed last: the whole file must have sent at least 1,000 requests."""
    counts = collections.Counter(SENT)
    print(f"{len(SENT)} requests: {counts}")
    assert len(SENT) >= 1000, counts
