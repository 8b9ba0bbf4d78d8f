"""The README's serving example is a request that works."""
from __future__ import annotations

import json
import re
from pathlib import Path

from tests.server.server_process import MODEL

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_curl() -> tuple[str, dict]:
    """(path, JSON body) of the curl request in the README's Serve section."""
    serve = README.read_text().split("## Serve", 1)[1]
    match = re.search(r"curl http://127\.0\.0\.1:8000(/v1/\S+) .*?-d '(\{.*?\})'", serve, re.DOTALL)
    assert match, "the README's Serve section has no curl request"
    return match.group(1), json.loads(match.group(2))


def test_readme_serve_command_and_curl_request_work(server):
    assert "run-model qwen3 --model tiny --serve" in README.read_text()
    path, body = readme_curl()
    assert body["model"] == "tiny"                 # `--model tiny` serves under that name
    reply = server.request("POST", path, {**body, "model": MODEL})
    assert reply.status == 200, reply.body
    answer = reply.json()
    assert answer["object"] == "chat.completion"
    assert answer["usage"]["completion_tokens"] <= body["max_tokens"]
