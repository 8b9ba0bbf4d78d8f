"""--api-key: /v1/* needs the bearer token; /health stays open for load balancers."""
from __future__ import annotations

import openai
import pytest

from tests.server.server_process import MODEL, error_of, start_server

KEY = "sk-test-0123456789"


@pytest.fixture(scope="module")
def keyed_server(tiny_qwen3, tmp_path_factory):
    handle = start_server(tiny_qwen3, tmp_path_factory.mktemp("keyed") / "server.log", "--api-key", KEY)
    yield handle
    handle.stop()


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong-key"}, {"Authorization": KEY},
                                     {"Authorization": f"Basic {KEY}"}],
                         ids=["missing", "wrong", "no scheme", "not bearer"])
def test_request_without_the_right_key_gets_401(keyed_server, headers):
    for method, path in [("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions")]:
        reply = keyed_server.request(method, path, {"model": MODEL, "prompt": "Hi"}, headers)
        assert reply.status == 401, (path, reply.body)
        assert error_of(reply)["code"] == "invalid_api_key"


def test_malformed_body_without_a_key_is_still_401(keyed_server):
    assert keyed_server.request("POST", "/v1/completions", "{not json").status == 401


def test_openai_client_with_a_wrong_key_raises_authentication_error(keyed_server):
    with pytest.raises(openai.AuthenticationError):
        keyed_server.client(api_key="wrong-key").completions.create(model=MODEL, prompt="Hi", max_tokens=2)


def test_right_key_is_served(keyed_server):
    reply = keyed_server.client(api_key=KEY).completions.create(model=MODEL, prompt="Hi", max_tokens=2)
    assert reply.usage.completion_tokens >= 1


def test_health_and_metrics_need_no_key(keyed_server):
    assert keyed_server.request("GET", "/health").status == 200
    assert keyed_server.request("GET", "/metrics").status == 200
