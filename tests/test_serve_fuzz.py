"""Schemathesis against the API's own OpenAPI spec: whatever a client sends, the running
API answers with a documented status, content type and body, and never a 5xx.

Cases come from the spec (``rayfin.serve.app.openapi_spec``) and, with the
``negative`` mode, from outside it (wrong types, missing fields, bad formats). They run
against the real app on Ray Serve (the session's ``api_server``) with a trade key, so the
write paths (promote, upload) are exercised too; the production alias is put back after.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from api_fixtures import ApiServer
from hypothesis import HealthCheck, settings

from rayfin.serve.app import openapi_spec
from rayfin.trading.registry import ModelRegistry

pytestmark = [pytest.mark.integration, pytest.mark.model]

schema = schemathesis.openapi.from_dict(openapi_spec())
schema.config.generation.update(
    modes=[schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE]
)
# Refusing a body as too large (413) is as right as refusing it as invalid: a body past
# max_body_bytes is refused before it is read, whatever else is wrong with it.
schema.config.checks.negative_data_rejection.expected_statuses.append("413")
# What the schema cannot say: which features the model in production needs (422
# missing_features), and whether uploaded text is a LightGBM model (422 bad_model).
schema.config.checks.positive_data_acceptance.expected_statuses.extend(["413", "422"])


@pytest.fixture(scope="module")
def fuzzed_api(api_server: ApiServer) -> Iterator[ApiServer]:
    """The API, its ``production`` alias restored after the fuzzing promoted at random."""
    registry = ModelRegistry(api_server.registry)
    production = registry.get("market", "production").version
    yield api_server
    registry.promote("market", production)


LLM = r"^/v1/(sentiment|generate)$"
"""The endpoints that run the swarm: a second or more a case on CPUs, so fewer cases."""


def _call(case: schemathesis.Case, api: ApiServer) -> None:
    case.call_and_validate(base_url=api.url, headers={"X-API-Key": api.trade_key}, timeout=120)


@schema.exclude(path_regex=LLM).parametrize()
@settings(
    max_examples=25,
    deadline=None,
    derandomize=True,  # the same cases every run: CI is not a lottery
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
def test_no_input_breaks_the_api(case: schemathesis.Case, fuzzed_api: ApiServer) -> None:
    _call(case, fuzzed_api)


@schema.include(path_regex=LLM).parametrize()
@settings(
    max_examples=10,
    deadline=None,
    derandomize=True,  # the same cases every run: CI is not a lottery
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
def test_no_input_breaks_the_llm_endpoints(case: schemathesis.Case, fuzzed_api: ApiServer) -> None:
    _call(case, fuzzed_api)
