"""The OpenAI chat-completions request the service accepts, checked before any model runs.

One user turn: text plus exactly one image as a base64 data URL. ``model`` names the
routed ensemble (the run id, as ``/v1/models`` lists it; omitted, ``auto`` or ``router``
mean the same) or pins an expert by name and skips the router. ``stream: true`` answers
as server-sent events in OpenAI's chunk format. Everything else is refused with a 4xx
and an OpenAI-style error body naming the problem.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import time
import uuid
from dataclasses import dataclass

from mllmcl.serving.config import LimitSettings

DATA_URL = re.compile(r"^data:(image/[A-Za-z0-9.+-]+)?(;[^,]*)?,", re.IGNORECASE)
AUTO_MODELS = ("", "auto", "router")  # model values that mean "let the router choose"


class RequestError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str = "invalid_request"):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = "not_found_error" if self.status == 404 else "invalid_request_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class ChatRequest:
    text: str
    image: bytes  # the encoded image file
    model: str | None  # a pinned expert, or None (the router chooses)
    max_tokens: int | None
    image_size: tuple[int, int] = (0, 0)  # (width, height)
    min_tokens: int = 0  # vLLM's extension: no end of sequence before this many new tokens
    stream: bool = False  # answer as server-sent events (chat.completion.chunk)
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the token counts


def max_body_bytes(limits: LimitSettings) -> int:
    """Largest request body worth reading: the image as base64 plus the text and some JSON."""
    return limits.max_image_bytes * 4 // 3 + 4 * limits.max_text_chars + 64 * 1024


def _looks_like_location(name: str) -> bool:
    return bool(re.search(r"[/\\:~]", name)) or name.startswith(".")


def check_model(model, experts, ensemble: str | None = None) -> str | None:
    """The pinned expert, or None for the routed ensemble (``ensemble``: its model id, the run id)."""
    if model is None:
        return None
    if not isinstance(model, str):
        raise RequestError(400, f"'model' must be a string naming an expert, got {type(model).__name__}", "model")
    if model.strip().lower() in AUTO_MODELS or (ensemble is not None and model == ensemble):
        return None
    choices = ([ensemble] if ensemble else []) + list(experts)
    if _looks_like_location(model):
        raise RequestError(400, f"model {model!r} looks like a path or URI: experts load only from this run's "
                                f"registered adapters; name one of {choices}", "model", "model_not_allowed")
    if model not in experts:
        ens = f"{ensemble!r} (the routed ensemble) or " if ensemble else ""
        raise RequestError(404, f"unknown expert {model!r}: this run serves {ens}the experts {list(experts)}",
                           "model", "model_not_found")
    return model


def _decode_image(url, limits: LimitSettings) -> tuple[bytes, tuple[int, int]]:
    if not isinstance(url, str):
        raise RequestError(400, "image_url.url must be a string (a base64 data URL)", "messages")
    m = DATA_URL.match(url)
    if not m:
        raise RequestError(400, "image_url must be a base64 data URL such as 'data:image/png;base64,...'; remote "
                                "URLs are not fetched", "messages", "invalid_image_url")
    if not (m.group(2) or "").lower().endswith("base64"):
        raise RequestError(400, "image data URL must be base64-encoded (';base64,')", "messages", "invalid_image_url")
    payload = url[m.end():]
    if len(payload) * 3 // 4 > limits.max_image_bytes + 3:
        raise RequestError(413, f"image is about {len(payload) * 3 // 4} bytes; the limit is {limits.max_image_bytes}",
                           "messages", "image_too_large")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise RequestError(400, f"image is not valid base64 ({e})", "messages", "invalid_image") from None
    if len(data) > limits.max_image_bytes:
        raise RequestError(413, f"image is {len(data)} bytes; the limit is {limits.max_image_bytes}", "messages",
                           "image_too_large")
    return data, check_image(data, limits)


def check_image(data: bytes, limits: LimitSettings) -> tuple[int, int]:
    """The bytes decode as an image within the pixel limit (read the header before the
    pixels); returns its (width, height)."""
    import io
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
                if w * h > limits.max_image_pixels:
                    raise RequestError(413, f"image is {w}x{h} = {w * h} pixels; the limit is {limits.max_image_pixels}",
                                       "messages", "image_too_large")
                im.load()
                return w, h
    except RequestError:
        raise
    except Image.UnidentifiedImageError:
        raise RequestError(400, "image cannot be decoded: not an image format PIL can read", "messages",
                           "invalid_image") from None
    except Exception as e:  # PIL raises many types for broken files
        raise RequestError(400, f"image cannot be decoded ({type(e).__name__}: {e})", "messages",
                           "invalid_image") from None


def _user_content(messages) -> list:
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "'messages' must be a non-empty list", "messages")
    if len(messages) != 1 or not isinstance(messages[0], dict) or messages[0].get("role") != "user":
        roles = [m.get("role") if isinstance(m, dict) else type(m).__name__ for m in messages]
        raise RequestError(400, f"expected exactly one message with role 'user' (single-turn VQA), got roles {roles}",
                           "messages")
    content = messages[0].get("content")
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise RequestError(400, "message content must be a string or a list of parts", "messages")
    return content


def parse_chat_request(body: bytes, limits: LimitSettings, experts, ensemble: str | None = None) -> ChatRequest:
    if len(body) > max_body_bytes(limits):
        raise RequestError(413, f"request body is {len(body)} bytes; the limit is {max_body_bytes(limits)}", None,
                           "request_too_large")
    try:
        data = json.loads(body)
    except UnicodeDecodeError:
        raise RequestError(400, "request body is not UTF-8 JSON", None, "invalid_json") from None
    except json.JSONDecodeError as e:
        raise RequestError(400, f"request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}", None,
                           "invalid_json") from None
    if not isinstance(data, dict):
        raise RequestError(400, f"request body must be a JSON object, got {type(data).__name__}", None, "invalid_json")
    stream = data.get("stream") or False
    if not isinstance(stream, bool):
        raise RequestError(400, f"stream={stream!r}: expected true or false", "stream")
    options = data.get("stream_options") or {}
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise RequestError(400, "stream_options: expected {\"include_usage\": true|false}", "stream_options")
    if options and not stream:
        raise RequestError(400, "stream_options is only allowed with stream: true", "stream_options")
    if data.get("n", 1) != 1:
        raise RequestError(400, "only n=1 is supported (decoding is greedy)", "n")
    model = check_model(data.get("model"), experts, ensemble)
    texts, images = [], []
    for part in _user_content(data.get("messages")):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            url = part.get("image_url")
            images.append(url.get("url") if isinstance(url, dict) else url)
        else:
            raise RequestError(400, f"unsupported content part {part!r:.80}: expected type 'text' or 'image_url'",
                               "messages")
    if not images:
        raise RequestError(400, "the message has no image: add one part {'type': 'image_url', 'image_url': "
                                "{'url': 'data:image/png;base64,...'}}", "messages", "missing_image")
    if len(images) > 1:
        raise RequestError(400, f"exactly one image per request is supported, got {len(images)}", "messages")
    text = "\n".join(t for t in texts if t.strip()).strip()
    if not text:
        raise RequestError(400, "the message has no text", "messages")
    if len(text) > limits.max_text_chars:
        raise RequestError(413, f"text is {len(text)} characters; the limit is {limits.max_text_chars}", "messages",
                           "text_too_long")
    max_tokens = data.get("max_completion_tokens", data.get("max_tokens"))
    if max_tokens is not None and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool)
                                   or not 1 <= max_tokens <= limits.max_tokens):
        raise RequestError(400, f"max_tokens={max_tokens!r}: expected an integer from 1 to {limits.max_tokens}",
                           "max_tokens")
    min_tokens = data.get("min_tokens", 0)
    if not isinstance(data.get("ignore_eos", False), bool):
        raise RequestError(400, f"ignore_eos={data['ignore_eos']!r}: expected true or false", "ignore_eos")
    if data.get("ignore_eos"):  # vLLM's other spelling: run to max_tokens
        if max_tokens is None:
            raise RequestError(400, "ignore_eos needs max_tokens (the answer would run to the service's limit)",
                               "ignore_eos")
        min_tokens = max_tokens
    if not isinstance(min_tokens, int) or isinstance(min_tokens, bool) or min_tokens < 0 \
            or min_tokens > (max_tokens or limits.max_tokens):
        raise RequestError(400, f"min_tokens={min_tokens!r}: expected an integer from 0 to max_tokens "
                                f"({max_tokens or limits.max_tokens})", "min_tokens")
    image, size = _decode_image(images[0], limits)
    return ChatRequest(text=text, image=image, model=model, max_tokens=max_tokens, image_size=size,
                       min_tokens=min_tokens, stream=stream, include_usage=bool(options.get("include_usage")))


def _usage(completion: dict) -> dict:
    return {"prompt_tokens": completion["prompt_tokens"], "completion_tokens": completion["completion_tokens"],
            "total_tokens": completion["prompt_tokens"] + completion["completion_tokens"]}


def completion_response(expert: str, completion: dict, extra: dict) -> dict:
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
        "model": expert,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": completion["text"]},
                     "finish_reason": completion["finish_reason"]}],
        "usage": _usage(completion),
        "mllmcl": {"expert": expert, **extra},
    }


def completion_chunks(expert: str, completion: dict, extra: dict, include_usage: bool = False) -> list[str]:
    """The answer as OpenAI ``chat.completion.chunk`` server-sent events: the role, the whole
    answer in one chunk (decoding is batched: the answer exists before the first byte is
    sent), the finish reason, the usage if asked for, then ``[DONE]``."""
    head = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion.chunk", "created": int(time.time()),
            "model": expert}

    def chunk(delta: dict, finish: str | None, **more) -> dict:
        return {**head, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **more}

    events = [chunk({"role": "assistant", "content": ""}, None, mllmcl={"expert": expert, **extra})]
    if completion["text"]:
        events.append(chunk({"content": completion["text"]}, None))
    events.append(chunk({}, completion["finish_reason"]))
    if include_usage:
        events.append({**head, "choices": [], "usage": _usage(completion)})
    return [f"data: {json.dumps(e)}\n\n" for e in events] + ["data: [DONE]\n\n"]


def chat_request(text: str, image: bytes, model: str | None = None, mime: str = "image/png", **extra) -> dict:
    """A request body for this service (clients, tests, benchmarks)."""
    url = f"data:{mime};base64,{base64.b64encode(image).decode()}"
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": text},
                                                      {"type": "image_url", "image_url": {"url": url}}]}], **extra}
    if model is not None:
        body["model"] = model
    return body
