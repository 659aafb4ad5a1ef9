"""Test helpers for the judges: scripted back-ends, a local chat-completions server, tiny random model folders.

- `ScriptedVLM`, `ScriptedDetector`, `PixelFeatures`: deterministic stand-ins with known answers (vote aggregation,
  cumulative GA, CC arithmetic are checked exactly with them).
- `FakeChatServer`: a real HTTP server on 127.0.0.1 speaking the chat-completions protocol, with a fixed delay and
  failure modes (timeout, garbage, HTTP 500); it counts requests and the most requests in flight at once.
- `build_tiny_detector` / `build_tiny_features` / `build_tiny_vlm`: folders with random tiny GroundingDINO, DINOv2 and
  Qwen2.5-VL models of the real transformers classes (built from configs, nothing downloaded), loadable by `local.py`.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from editr2.bench.judges.backends import Detection

# ---------------------------------------------------------------------------------------------------------------------
# Scripted back-ends
# ---------------------------------------------------------------------------------------------------------------------


class ScriptedVLM:
    """A VLM whose answers are scripted.

    Args:
        answers: a list of answers used in order (the last one repeats), or ``fn(images, prompt, call_index) -> str``.
            An answer that is an exception instance is raised instead of returned.
        max_concurrency: advertised concurrency (judges use it for their thread pools).
    """

    def __init__(self, answers: Sequence[str | BaseException] | Callable, max_concurrency: int = 1):
        self.answers = answers
        self.max_concurrency = max_concurrency
        self.calls: list[tuple[int, str, float]] = []  # (number of images, prompt, temperature)
        self._lock = threading.Lock()

    def ask(self, images, prompt, *, temperature=0.0, max_tokens=None) -> str:
        with self._lock:
            index = len(self.calls)
            self.calls.append((len(images), prompt, temperature))
        if callable(self.answers):
            answer = self.answers(images, prompt, index)
        else:
            answer = self.answers[min(index, len(self.answers) - 1)]
        if isinstance(answer, BaseException):
            raise answer
        return answer


class ScriptedDetector:
    """Detections from ``fn(image, phrase) -> list[Detection]`` (or a dict ``{phrase: [Detection, ...]}``)."""

    def __init__(self, boxes: Callable | dict):
        self.boxes = boxes
        self.calls: list[str] = []

    def detect(self, image, phrase, *, threshold=None) -> list[Detection]:
        self.calls.append(phrase)
        if callable(self.boxes):
            return list(self.boxes(image, phrase))
        return list(self.boxes.get(phrase, []))


class PixelFeatures:
    """Deterministic "DINO" features from pixels: images resized to ``grid * patch`` pixels; each patch token is the
    patch's mean RGB (centred) plus a constant channel; the CLS token is the mean of the patch tokens."""

    def __init__(self, grid: tuple[int, int] = (4, 4), patch: int = 4):
        self.grid, self.patch = grid, patch

    def features(self, images) -> tuple[torch.Tensor, int, tuple[int, int]]:
        rows, cols = self.grid
        batch = []
        for image in images:
            pixels = np.asarray(image.convert("RGB").resize((cols * self.patch, rows * self.patch), Image.BOX),
                                dtype=np.float32) / 255.0
            patches = pixels.reshape(rows, self.patch, cols, self.patch, 3).mean(axis=(1, 3)).reshape(-1, 3)
            tokens = np.concatenate([patches - 0.5, np.full((rows * cols, 1), 0.1, np.float32)], axis=1)  # (N, 4)
            batch.append(np.concatenate([tokens.mean(axis=0, keepdims=True), tokens], axis=0))  # (1 + N, 4)
        return torch.from_numpy(np.stack(batch)), 1, self.grid


# ---------------------------------------------------------------------------------------------------------------------
# A chat-completions server on 127.0.0.1
# ---------------------------------------------------------------------------------------------------------------------


class FakeChatServer:
    """A threaded HTTP server answering ``POST /v1/chat/completions`` like an OpenAI-compatible endpoint.

    Args:
        answer: ``fn(payload) -> str`` giving the message content (default: "yes").
        delay_s: fixed delay before answering each request.
        mode: "ok", "timeout" (sleeps `hang_s` before answering), "garbage" (a 200 body that is not JSON) or "500".
        hang_s: how long "timeout" mode sleeps.
        server_slots: requests the server works on at once (others queue, like a saturated vLLM); None = no limit.

    Use as a context manager; `base_url` is ``http://127.0.0.1:<port>/v1``. Counters: `requests`, `max_in_flight`.
    """

    def __init__(self, answer: Callable[[dict], str] | None = None, *, delay_s: float = 0.0, mode: str = "ok",
                 hang_s: float = 2.0, server_slots: int | None = None):
        if mode not in ("ok", "timeout", "garbage", "500"):
            raise ValueError(f"mode must be ok, timeout, garbage or 500, got {mode!r}")
        self.answer = answer or (lambda payload: "yes")
        self.delay_s, self.mode, self.hang_s = delay_s, mode, hang_s
        self.requests = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.payloads: list[dict] = []
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(server_slots) if server_slots else None
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1"

    def __enter__(self) -> "FakeChatServer":
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def do_POST(self):  # noqa: N802 - http.server's naming
                owner._handle(self)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.02},
                                        daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        with self._lock:
            self.requests += 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            status, body = self._respond(handler)
        finally:
            # Leave the in-flight count before replying: a client may send its next request as soon as it reads this
            # reply, and that request must not be counted as overlapping with this one.
            with self._lock:
                self.in_flight -= 1
        try:
            self._reply(handler, status, body)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
            pass

    def _respond(self, handler: BaseHTTPRequestHandler) -> tuple[int, bytes]:
        length = int(handler.headers.get("Content-Length", 0))
        payload = json.loads(handler.rfile.read(length) or b"{}")
        with self._lock:
            self.payloads.append(payload)
        if self._slots is not None:
            with self._slots:
                time.sleep(self.delay_s)
        else:
            time.sleep(self.delay_s)
        if self.mode == "timeout":
            time.sleep(self.hang_s)
        if not handler.path.endswith("/chat/completions"):
            return 404, b'{"error": "not found"}'
        if self.mode == "500":
            return 500, b'{"error": "internal server error"}'
        if self.mode == "garbage":
            return 200, b"<html>this is not json</html>"
        body = {"id": "x", "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": self.answer(payload)},
                             "finish_reason": "stop"}]}
        return 200, json.dumps(body).encode()

    @staticmethod
    def _reply(handler: BaseHTTPRequestHandler, status: int, body: bytes) -> None:
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)


def prompt_of(payload: dict) -> str:
    """The text part of a chat-completions request's user message."""
    parts = payload["messages"][-1]["content"]
    return " ".join(p.get("text", "") for p in parts if p.get("type") == "text")


# ---------------------------------------------------------------------------------------------------------------------
# Tiny random transformers models (real classes, built from configs)
# ---------------------------------------------------------------------------------------------------------------------

_WORDS = ("dog cat tree shirt robot teapot red blue green white black left right above below background text "
          "yes no the a of is there in this image count one two three").split()


def build_tiny_detector(directory: str | Path, seed: int = 0) -> Path:
    """A random tiny GroundingDINO (Swin backbone, BERT text encoder) + processor saved to `directory`."""
    from transformers import (BertConfig, BertTokenizer, GroundingDinoConfig, GroundingDinoForObjectDetection,
                              GroundingDinoProcessor, SwinConfig)
    from transformers.models.grounding_dino.image_processing_pil_grounding_dino import GroundingDinoImageProcessorPil

    directory = Path(directory)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "."] + list(_WORDS)
    tokenizer = BertTokenizer(vocab={word: i for i, word in enumerate(vocab)})
    backbone = SwinConfig(image_size=64, patch_size=4, embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
                          window_size=2, out_features=["stage2", "stage3", "stage4"])
    text = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=32, max_position_embeddings=64)
    config = GroundingDinoConfig(backbone_config=backbone, text_config=text, d_model=32, encoder_layers=1,
                                 decoder_layers=2, encoder_ffn_dim=32, decoder_ffn_dim=32, encoder_attention_heads=2,
                                 decoder_attention_heads=2, num_queries=10, num_feature_levels=3, max_text_len=32,
                                 encoder_n_points=1, decoder_n_points=1)
    torch.manual_seed(seed)
    GroundingDinoForObjectDetection(config).eval().save_pretrained(directory)
    image_processor = GroundingDinoImageProcessorPil(size={"shortest_edge": 64, "longest_edge": 64})
    GroundingDinoProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(directory)
    return directory


def build_tiny_features(directory: str | Path, seed: int = 0) -> Path:
    """A random tiny DINOv2 (``AutoModel``) + image processor saved to `directory`."""
    from transformers import Dinov2Config, Dinov2Model
    from transformers.models.bit.image_processing_pil_bit import BitImageProcessorPil

    directory = Path(directory)
    config = Dinov2Config(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                          intermediate_size=64)
    torch.manual_seed(seed)
    Dinov2Model(config).eval().save_pretrained(directory)
    BitImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                         image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(directory)
    return directory


_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
            "<|video_pad|>"]


def build_tiny_vlm(directory: str | Path, seed: int = 0) -> Path:
    """A random tiny Qwen2.5-VL saved to `directory` with a locally trained byte-level BPE tokenizer, a Qwen2-VL image
    processor and a chat template (no video processor: it needs torchvision)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2TokenizerFast
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    directory = Path(directory)
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    corpus = [" ".join(_WORDS), "<turn_1> yes </turn_1> <turn_2> no </turn_2> <final> no </final>", "0 1 2 3 4 5"]
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=_SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(corpus * 20, trainer)
    tokenizer = Qwen2TokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token=None)
    tokenizer.chat_template = _CHAT_TEMPLATE
    ids = {name: tokenizer.convert_tokens_to_ids(name) for name in _SPECIAL}
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, fullatt_block_indexes=[0],
                           window_size=56),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    Qwen2_5_VLForConditionalGeneration(config).eval().save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    Qwen2VLImageProcessorPil(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16, patch_size=14, merge_size=2,
                             temporal_patch_size=2).save_pretrained(directory)
    return directory
