"""Judge replies: strict parsing, malformed output re-asked once, then left unscored."""

from __future__ import annotations

import threading
from contextlib import contextmanager

import pytest

from llama_omni.data.chat_server import make_server
from llama_omni.data.llm_backends import ChatBackend, LLMError
from llama_omni.eval.judge import Judge, Judgement, JudgeParseError, parse_judgement


@contextmanager
def serving(server):
    """Serve on loopback in a thread; yields the base URL."""
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    try:
        yield f"http://{host}:{port}/v1"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("reply", [
    '{"content": 4, "style": 2}',
    '  {"style": 2, "content": 4}\n',
    '```json\n{"content": 4, "style": 2}\n```',
    '```\n{"content": 4, "style": 2, "reason": "fine"}\n```',
])
def test_well_formed_replies(reply):
    assert parse_judgement(reply) == Judgement(content=4, style=2)


@pytest.mark.parametrize("reply, reason", [
    ("Content: 4, Style: 2", "not a JSON object"),
    ('Sure! {"content": 4, "style": 2}', "not a JSON object"),
    ('{"content": 4, "style": 2} I hope this helps', "not a JSON object"),
    ('{"content": 4, "style": 2', "not a JSON object"),
    ("", "not a JSON object"),
    ("[4, 2]", "expected a JSON object"),
    ('{"content": 4}', "missing key 'style'"),
    ('{"content": "4", "style": 2}', "must be an integer"),
    ('{"content": 4.0, "style": 2}', "must be an integer"),
    ('{"content": true, "style": 2}', "must be an integer"),
    ('{"content": 4, "style": null}', "must be an integer"),
    ('{"content": 6, "style": 2}', "from 1 to 5"),
    ('{"content": 0, "style": 2}', "from 1 to 5"),
])
def test_malformed_replies(reply, reason):
    with pytest.raises(JudgeParseError, match=reason):
        parse_judgement(reply)


class Scripted(ChatBackend):
    """Replies by the answer text: 'good' -> valid; 'late' -> malformed once, then valid;
    'bad' -> always malformed. Records every conversation it was sent."""

    def __init__(self):
        self.sent = []

    def chat(self, conversations, max_new_tokens, temperature=0.0):
        replies = []
        for messages in conversations:
            self.sent.append(messages)
            answer = messages[1]["content"].rsplit("\n", 1)[-1]
            asked_again = len(messages) > 2
            if answer == "good" or (answer == "late" and asked_again):
                replies.append('{"content": 5, "style": 3}')
            elif answer == "fail":
                replies.append(LLMError("scripted", "the judge broke"))
            else:
                replies.append("I would give it a 5.")
        return replies


def test_judge_reasks_once_then_leaves_unscored():
    backend = Scripted()
    with serving(make_server(backend, "scripted")) as url:
        judge = Judge(url, "scripted", max_retries=0)
        results = judge.score([("q1", "good"), ("q2", "late"), ("q3", "bad"), ("q4", "fail")])
    assert results[0] == {"content": 5, "style": 3}
    assert results[1] == {"content": 5, "style": 3}  # fixed on the second ask
    assert results[2]["content"] is None and results[2]["style"] is None
    assert results[2]["error"].startswith("malformed: not a JSON object")
    assert results[2]["reply"] == "I would give it a 5."
    assert results[3]["content"] is None and "request failed" in results[3]["error"]
    # 4 first asks + one re-ask each for "late" and "bad"; the re-ask carries the reason
    assert len(backend.sent) == 6
    reask = [m for m in backend.sent if len(m) > 2]
    assert len(reask) == 2 and "malformed" in reask[0][-1]["content"]
