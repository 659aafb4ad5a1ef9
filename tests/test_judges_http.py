"""The OpenAI-compatible HTTP judge against a real server on 127.0.0.1: answers, timeouts, garbage, 500s, limits."""

import base64
import io
import threading

import pytest
from PIL import Image

from editr2.bench.judges import (
    BackendError,
    GAConfig,
    GAJudge,
    IFConfig,
    IFJudge,
    OpenAIChatConfig,
    OpenAIChatVLM,
    RetryPolicy,
    TurnRequest,
)
from judge_fakes import FakeChatServer, prompt_of

FAST = RetryPolicy(max_attempts=2, initial_backoff_s=0.0)


def config(server, **kwargs):
    values = dict(model="tiny-judge", base_url=server.base_url, timeout_s=2.0, max_attempts=3, backoff_s=0.01,
                  max_backoff_s=0.02, max_concurrency=4)
    values.update(kwargs)
    return OpenAIChatConfig(**values)


def color_request(i=0):
    src = Image.new("RGB", (24, 16), (i, 0, 0))
    return TurnRequest(turn=0, instruction="make the cup red", task_type="color_alter",
                       formatted_instruction="Change the color of [cup] to [red]", source_image=src,
                       input_image=src, output_image=Image.new("RGB", (24, 16), (200, 0, 0)), history_images=(src,))


def test_normal_answer_payload_and_key_from_env(monkeypatch):
    monkeypatch.setenv("EDITR2_TEST_JUDGE_KEY", "sk-test-123")
    seen = {}

    def answer(payload):
        seen.update(payload)
        return "Yes."

    with FakeChatServer(answer) as server:
        vlm = OpenAIChatVLM(config(server, api_key_env="EDITR2_TEST_JUDGE_KEY", max_tokens=7))
        images = [Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 255))]
        assert vlm.ask(images, "Is it red?", temperature=0.3) == "Yes."
    assert seen["model"] == "tiny-judge" and seen["temperature"] == 0.3 and seen["max_tokens"] == 7
    parts = seen["messages"][0]["content"]
    assert [p["type"] for p in parts] == ["image_url", "image_url", "text"] and parts[2]["text"] == "Is it red?"
    first = parts[0]["image_url"]["url"]
    assert first.startswith("data:image/png;base64,")
    decoded = Image.open(io.BytesIO(base64.b64decode(first.split(",", 1)[1])))
    assert decoded.getpixel((0, 0)) == (255, 0, 0)  # images arrive in order and lossless


def test_authorization_header(monkeypatch):
    headers = {}

    class Recording(FakeChatServer):
        def _handle(self, handler):
            headers["auth"] = handler.headers.get("Authorization")
            super()._handle(handler)

    monkeypatch.setenv("EDITR2_TEST_JUDGE_KEY", "sk-abc")
    with Recording() as server:
        OpenAIChatVLM(config(server, api_key_env="EDITR2_TEST_JUDGE_KEY")).ask([], "hi")
        assert headers["auth"] == "Bearer sk-abc"
        monkeypatch.delenv("EDITR2_TEST_JUDGE_KEY")
        OpenAIChatVLM(config(server, api_key_env="EDITR2_TEST_JUDGE_KEY")).ask([], "hi")
        assert headers["auth"] is None  # no key, no header


def test_base_url_from_env_and_config_errors(monkeypatch):
    with FakeChatServer() as server:
        monkeypatch.setenv("EDITR2_TEST_JUDGE_URL", server.base_url)
        vlm = OpenAIChatVLM(OpenAIChatConfig(model="m", base_url_env="EDITR2_TEST_JUDGE_URL"))
        assert vlm.ask([], "q") == "yes"
    with pytest.raises(ValueError, match="base_url"):
        OpenAIChatConfig(model="m")
    with pytest.raises(ValueError, match="model"):
        OpenAIChatConfig(base_url="http://127.0.0.1:1/v1")
    monkeypatch.delenv("EDITR2_TEST_JUDGE_URL")
    with pytest.raises(ValueError, match="EDITR2_TEST_JUDGE_URL"):
        OpenAIChatVLM(OpenAIChatConfig(model="m", base_url_env="EDITR2_TEST_JUDGE_URL"))


@pytest.mark.parametrize("mode, message", [("timeout", "timed out"), ("garbage", "not a chat-completions answer"),
                                           ("500", "HTTP 500")])
@pytest.mark.slow
def test_failing_server_is_retried_then_missing(mode, message):
    with FakeChatServer(mode=mode, hang_s=1.0) as server:
        vlm = OpenAIChatVLM(config(server, timeout_s=0.3, max_attempts=3))
        with pytest.raises(BackendError, match=message):
            vlm.ask([], "q")
        assert server.requests == 3  # every attempt reached the server
        judge = IFJudge(vlm, None, IFConfig(num_votes=2), FAST)
        judgement = judge.judge(color_request())
        assert judgement.is_missing and judgement.score is None and message in judgement.reason
        # back-end errors are not retried again by the judge: 2 votes x 3 attempts
        assert server.requests == 3 + 2 * 3


def test_unreachable_server_is_missing():
    vlm = OpenAIChatVLM(OpenAIChatConfig(model="m", base_url="http://127.0.0.1:9/v1", timeout_s=0.5,
                                         max_attempts=2, backoff_s=0.0))
    judgement = IFJudge(vlm, None, IFConfig(num_votes=1), FAST).judge(color_request())
    assert judgement.is_missing and "request failed" in judgement.reason


def test_unparsable_answer_retried_by_the_judge():
    answers = iter(["perhaps", "Yes", "hmm", "unclear", "NO"])
    lock = threading.Lock()

    def answer(payload):
        with lock:
            return next(answers)

    with FakeChatServer(answer) as server:
        judge = IFJudge(OpenAIChatVLM(config(server, max_concurrency=1)), None, IFConfig(num_votes=2),
                        RetryPolicy(3, 0.0))
        judgement = judge.judge(color_request())
    assert judgement.votes == (1.0, 0.0) and judgement.score == 0.5 and server.requests == 5


def test_client_errors_are_not_retried():
    class NotFound(FakeChatServer):
        def _handle(self, handler):
            handler.path = "/v1/elsewhere"
            super()._handle(handler)

    with NotFound() as server:
        with pytest.raises(BackendError, match="HTTP 404"):
            OpenAIChatVLM(config(server)).ask([], "q")
        assert server.requests == 1


@pytest.mark.slow
def test_bounded_concurrency_is_respected():
    with FakeChatServer(delay_s=0.15) as server:
        vlm = OpenAIChatVLM(config(server, max_concurrency=3))
        judge = IFJudge(vlm, None, IFConfig(num_votes=1), FAST)
        judge.max_workers = 12  # more caller threads than the back-end allows
        results = judge.judge_many([color_request(i) for i in range(12)])
        assert [j.score for j in results] == [1.0] * 12
        assert server.requests == 12
        assert 2 <= server.max_in_flight <= 3


def test_ga_over_http_sends_the_whole_sequence():
    def answer(payload):
        text = prompt_of(payload)
        assert "Turn 2: add a hat" in text
        return "<turn_1>yes</turn_1><turn_2>no</turn_2><final>no</final>"

    with FakeChatServer(answer) as server:
        judge = GAJudge(OpenAIChatVLM(config(server)), GAConfig(num_votes=2), FAST)
        images = [Image.new("RGB", (8, 8), (i * 60, 0, 0)) for i in range(3)]
        result = judge.judge_session(images, ["make it red", "add a hat"])
        assert [j.score for j in result] == [1.0, 0.0]
        assert all(len(p["messages"][0]["content"]) == 4 for p in server.payloads)  # 3 images + text
        assert all(p["temperature"] == 0.6 for p in server.payloads)


class _RawServer:
    """A one-purpose HTTP server on 127.0.0.1: ``reply(handler)`` writes the answer itself (trickles, redirects)."""

    def __init__(self, reply):
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        owner = self
        self.requests = []

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _any(self):
                length = int(self.headers.get("Content-Length", 0))
                owner.requests.append((self.command, self.path, self.headers.get("Authorization"),
                                       self.rfile.read(length)))
                try:
                    reply(self)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            do_POST = do_GET = _any

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def __enter__(self):
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self._server.shutdown()
        self._server.server_close()


def _trickle(handler, *, stop):
    body = b'{"choices": [{"message": {"content": "yes"}}]}'
    handler.send_response(200)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.flush()
    for byte in body:  # one byte every 0.1 s: each read is fast, the whole answer takes ~5 s
        if stop.wait(0.1):
            return
        handler.wfile.write(bytes([byte]))
        handler.wfile.flush()


@pytest.mark.parametrize("length", [True, False])
@pytest.mark.slow
def test_trickling_server_hits_the_total_deadline(length):
    import time

    stop = threading.Event()

    def reply(handler):
        if length:
            _trickle(handler, stop=stop)
            return
        handler.send_response(200)  # no Content-Length: the body runs until the connection closes
        handler.end_headers()
        handler.wfile.flush()
        while not stop.wait(0.1):
            handler.wfile.write(b" ")
            handler.wfile.flush()

    with _RawServer(reply) as server:
        vlm = OpenAIChatVLM(config(server, timeout_s=0.5, max_attempts=2, backoff_s=0.0))
        start = time.monotonic()
        try:
            with pytest.raises(BackendError, match="timed out"):
                vlm.ask([], "q")
        finally:
            stop.set()
        elapsed = time.monotonic() - start
    assert elapsed < 2.0, f"two attempts with a 0.5 s deadline took {elapsed:.1f} s"
    assert len(server.requests) == 2


def test_redirect_is_an_error_and_not_followed(monkeypatch):
    monkeypatch.setenv("EDITR2_TEST_JUDGE_KEY", "sk-secret")

    def reply(handler):
        if handler.command == "GET":
            body = b'{"choices": [{"message": {"content": "yes"}}]}'
            handler.send_response(200)
            handler.send_header("Content-Length", str(len(body)))
            handler.end_headers()
            handler.wfile.write(body)
            return
        handler.send_response(302)
        handler.send_header("Location", "/elsewhere/answer")
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    with _RawServer(reply) as server:
        vlm = OpenAIChatVLM(config(server, api_key_env="EDITR2_TEST_JUDGE_KEY"))
        with pytest.raises(BackendError, match="302 redirect to /elsewhere/answer"):
            vlm.ask([], "q")
        judgement = IFJudge(vlm, None, IFConfig(num_votes=1), FAST).judge(color_request())
    assert judgement.is_missing and "redirect" in judgement.reason
    assert [r[0] for r in server.requests] == ["POST", "POST"]  # not retried, the redirect target never asked


def test_base_url_must_be_http():
    with pytest.raises(ValueError, match="http"):
        OpenAIChatVLM(OpenAIChatConfig(model="m", base_url="127.0.0.1:8000/v1"))
