"""HTTP keep-alive clients: many generate requests over one persistent connection all succeed on
that connection (the server neither closes it nor mixes up answers), errors included."""

import http.client
import json

import pytest

from paged_engine import SamplingParams

pytestmark = pytest.mark.server

PROMPTS = ["Hello world!", "The quick brown fox", "日本語のテキスト"]


def test_one_connection_many_requests(triton, offline_llm):
    expected = {p: o.text for p, o in zip(PROMPTS, offline_llm.generate(
        PROMPTS, SamplingParams(max_tokens=4, temperature=0.0)))}
    host, port = triton.http_url.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        sockets = set()
        for i in range(30):
            prompt = PROMPTS[i % len(PROMPTS)]
            body = {"text_input": prompt, "max_tokens": 4, "temperature": 0,
                    "exclude_input_in_output": True}
            if i % 10 == 9:  # an error in between keeps the connection too
                body["max_tokenz"] = 1
            conn.request("POST", "/v2/models/paged_llm/generate", json.dumps(body),
                         {"Content-Type": "application/json"})
            response = conn.getresponse()
            reply = json.loads(response.read())
            sockets.add(id(conn.sock))
            if i % 10 == 9:
                assert response.status == 400 and "max_tokenz" in reply["error"]
            else:
                assert response.status == 200, reply
                assert reply["text_output"] == expected[prompt]
            assert (response.getheader("Connection") or "").lower() != "close"
        assert len(sockets) == 1, "the server closed the keep-alive connection"
    finally:
        conn.close()
