"""An OpenAI-compatible chat-completions VLM back-end (what a vLLM server exposes), on the standard library only.

Timeouts, retries with exponential backoff (connection errors, timeouts, HTTP 429/5xx, bodies that are not a
chat-completions answer) and bounded concurrency: at most ``max_concurrency`` requests are in flight from one back-end,
however many threads call it. The base URL and key come from the config or from environment variables the config
names; nothing is hard-coded.

``timeout_s`` is a deadline for the whole request (connect, send, headers and body), not a per-read timeout: a server
that trickles its answer a byte at a time is cut off at the deadline. Redirects are never followed: a 3xx answer is an
error naming its ``Location`` (following one would send the API key to another host and score the answer to a
body-less GET). The connection goes straight to the base URL's host (HTTP proxy environment variables are not used).
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import logging
import os
import socket
import threading
import urllib.parse
from dataclasses import dataclass
from typing import Sequence

from PIL import Image

from .protocol import BackendError, JudgeError, RetryPolicy, call_with_retries, describe_error

logger = logging.getLogger(__name__)


@dataclass
class OpenAIChatConfig:
    """Where and how to reach an OpenAI-compatible chat-completions server.

    Attributes:
        model: the model name the server serves (vLLM: the path or ``--served-model-name``).
        base_url: e.g. ``http://127.0.0.1:8000/v1``; or leave empty and set `base_url_env`.
        base_url_env: name of an environment variable holding the base URL (used when `base_url` is empty).
        api_key_env: name of an environment variable holding the API key (none sent when unset or empty).
        timeout_s: deadline in seconds for one whole request (connect, send and the complete answer); a request still
            unanswered at the deadline is aborted and counts as a timeout (retried like one).
        max_attempts: attempts per request (1 = no retry).
        backoff_s: wait before the first retry; doubles each time, capped at `max_backoff_s`.
        max_backoff_s: cap on one wait.
        max_concurrency: requests in flight at once from this back-end.
        max_tokens: default answer length.
        image_format: "PNG" (lossless) or "JPEG" for the data URLs.
    """

    model: str = ""
    base_url: str = ""
    base_url_env: str = ""
    api_key_env: str = ""
    timeout_s: float = 60.0
    max_attempts: int = 3
    backoff_s: float = 1.0
    max_backoff_s: float = 16.0
    max_concurrency: int = 8
    max_tokens: int = 512
    image_format: str = "PNG"

    def __post_init__(self):
        if not self.model:
            raise ValueError("an OpenAI-compatible judge needs `model`: the model name the server serves")
        if not self.base_url and not self.base_url_env:
            raise ValueError("set `base_url` (e.g. http://127.0.0.1:8000/v1) or `base_url_env` (the name of an "
                             "environment variable that holds it)")
        if self.max_concurrency < 1 or self.timeout_s <= 0 or self.max_attempts < 1:
            raise ValueError("max_concurrency and max_attempts must be >= 1 and timeout_s > 0")
        if self.image_format.upper() not in ("PNG", "JPEG"):
            raise ValueError(f"image_format must be 'PNG' or 'JPEG', got {self.image_format!r}")

    def resolve_base_url(self) -> str:
        url = self.base_url or os.environ.get(self.base_url_env, "")
        if not url:
            raise ValueError(f"no base URL: `base_url` is empty and the environment variable {self.base_url_env!r} "
                             "is not set")
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"the judge base URL must be http(s)://host[:port]/path, got {url!r}")
        return url.rstrip("/")

    def resolve_api_key(self) -> str | None:
        return os.environ.get(self.api_key_env) or None if self.api_key_env else None


class _RetryableHTTPError(JudgeError):
    """A transport failure worth another attempt."""


def image_data_url(image: Image.Image, image_format: str = "PNG") -> str:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format=image_format.upper())
    mime = "image/png" if image_format.upper() == "PNG" else "image/jpeg"
    return f"data:{mime};base64,{base64.b64encode(buffer.getvalue()).decode('ascii')}"


class OpenAIChatVLM:
    """VLM back-end over HTTP: one chat-completions request per question."""

    def __init__(self, config: OpenAIChatConfig):
        self.config = config
        self.url = config.resolve_base_url() + "/chat/completions"
        self.max_concurrency = config.max_concurrency
        self._slots = threading.BoundedSemaphore(config.max_concurrency)
        self._policy = RetryPolicy(config.max_attempts, config.backoff_s, 2.0, config.max_backoff_s)

    def ask(self, images: Sequence[Image.Image], prompt: str, *, temperature: float = 0.0,
            max_tokens: int | None = None) -> str:
        """Send the images (in order) and the prompt; return the answer text.

        Raises:
            BackendError: when every attempt failed (the last failure is in the message).
        """
        content = [{"type": "image_url", "image_url": {"url": image_data_url(im, self.config.image_format)}}
                   for im in images]
        content.append({"type": "text", "text": prompt})
        payload = {
            "model": self.config.model,
            "messages": [{"role": "user", "content": content}],
            "temperature": temperature,
            "max_tokens": max_tokens or self.config.max_tokens,
        }
        body = json.dumps(payload).encode("utf-8")
        try:
            return call_with_retries(lambda: self._post(body), self._policy, retry_on=(_RetryableHTTPError,),
                                     no_retry=())
        except JudgeError as err:
            raise BackendError(f"{self.config.max_attempts} attempt(s) to {self.url} failed; last: "
                               f"{describe_error(err)}") from err

    def _post(self, body: bytes) -> str:
        headers = {"Content-Type": "application/json"}
        key = self.config.resolve_api_key()
        if key:
            headers["Authorization"] = f"Bearer {key}"
        with self._slots:
            status, location, raw = _post_with_deadline(self.url, body, headers, self.config.timeout_s)
        if 300 <= status < 400:
            raise JudgeError(f"HTTP {status} redirect to {location or '(no Location)'} (not followed: point "
                             f"`base_url` at the server itself)")
        if status == 429 or status >= 500:
            raise _RetryableHTTPError(f"HTTP {status}: {raw[:200].decode('utf-8', 'replace')}")
        if status >= 400 or status < 200:
            raise JudgeError(f"HTTP {status} (not retried): {raw[:200].decode('utf-8', 'replace')}")
        return _answer_text(raw)


def _post_with_deadline(url: str, body: bytes, headers: dict, timeout_s: float) -> tuple[int, str, bytes]:
    """POST `body` to `url` and return ``(status, Location header, whole body)``, all within `timeout_s` seconds.

    A watchdog shuts the socket down at the deadline, so a blocked read returns at once however slowly the server
    sends; the request then fails as a timeout even if part of the body arrived. Redirects are returned, not followed.

    Raises:
        _RetryableHTTPError: on a connection failure or when the deadline passed.
    """
    parts = urllib.parse.urlsplit(url)
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    connection_class = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    connection = connection_class(parts.hostname, parts.port, timeout=timeout_s)
    expired = threading.Event()
    sockets: list[socket.socket] = []  # the connected socket (the connection drops its own reference when the
    # server says it will close, while the response still reads from it)

    def abort() -> None:
        expired.set()
        for sock in sockets or [connection.sock]:
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    watchdog = threading.Timer(timeout_s, abort)
    watchdog.daemon = True
    watchdog.start()
    try:
        connection.connect()
        sockets.append(connection.sock)
        if expired.is_set():  # the deadline passed while connecting
            abort()
        connection.request("POST", path, body=body, headers=headers)
        response = connection.getresponse()
        location = response.getheader("Location", "")
        raw = response.read()
    except (OSError, http.client.HTTPException) as err:
        if expired.is_set() or isinstance(err, (socket.timeout, TimeoutError)):
            raise _RetryableHTTPError(f"request failed: timed out (no complete answer within {timeout_s:g} s)") \
                from None
        raise _RetryableHTTPError(f"request failed: {getattr(err, 'reason', None) or err!r}") from None
    finally:
        watchdog.cancel()
        connection.close()
    if expired.is_set():  # a body read until the connection closed may be cut short by the watchdog
        raise _RetryableHTTPError(f"request failed: timed out (no complete answer within {timeout_s:g} s)")
    return response.status, location, raw


def _answer_text(raw: bytes) -> str:
    """The first choice's message text of a chat-completions body; a retryable error for anything else."""
    try:
        data = json.loads(raw)
        content = data["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise _RetryableHTTPError(f"not a chat-completions answer: {raw[:120]!r}") from None
    if isinstance(content, list):  # some servers return content parts
        content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
    if not isinstance(content, str):
        raise _RetryableHTTPError(f"answer content is {type(content).__name__}, not text")
    return content
