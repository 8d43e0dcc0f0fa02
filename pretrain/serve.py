"""`ebt serve`: an HTTP front end for an export (standard library server, loopback by default).

    GET  /health         -> {"status": "ok", "model": {...}, "thinking": {...}}
    POST /v1/generate    {"prompt": str, "max_tokens": int, "steps": int,
                          optional "samples", "temperature", "top_k", "top_p", "seed",
                          "step_size", "early_stop_tol"}
                         -> {"text": str, "tokens": [int], "prompt_tokens": int, "elapsed_s": float}

Every bad request (invalid JSON, a missing or mistyped field, a value out of range) gets a 4xx
with {"error": "<one line naming the field>"}; the server never dies on a request. Requests are
served one at a time (the model is not re-entrant), so the server is a reference, not a
high-throughput deployment.
"""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, Tuple

from .export import Export
from .generate import EBTInference

MAX_BODY = 1 << 20
LIMITS = {"max_tokens": (0, 4096), "steps": (0, 64), "samples": (1, 64), "top_k": (0, 1 << 20), "seed": (0, 2**63 - 1)}


class BadRequest(ValueError):
    pass


def _field(body: Dict[str, Any], name: str, kind: type, default: Any = None, required: bool = False):
    if name not in body or body[name] is None:
        if required:
            raise BadRequest(f"missing field {name!r}")
        return default
    value = body[name]
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        raise BadRequest(f"field {name!r} must be {kind.__name__}, got {type(value).__name__}")
    if name in LIMITS and not LIMITS[name][0] <= value <= LIMITS[name][1]:
        raise BadRequest(f"field {name!r}={value} is outside [{LIMITS[name][0]}, {LIMITS[name][1]}]")
    return value


def parse_generate_request(body: Any, default_steps: int) -> Tuple[str, int, Dict[str, Any]]:
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    known = {"prompt", "max_tokens", "steps", "samples", "temperature", "top_k", "top_p", "seed", "step_size",
             "early_stop_tol"}
    unknown = sorted(set(body) - known)
    if unknown:
        raise BadRequest(f"unknown field {unknown[0]!r}")
    prompt = _field(body, "prompt", str, required=True)
    if not prompt:
        raise BadRequest("field 'prompt' must not be empty")
    max_tokens = _field(body, "max_tokens", int, 32)
    kwargs = dict(
        steps=_field(body, "steps", int, default_steps),
        num_samples=_field(body, "samples", int, 1),
        temperature=_field(body, "temperature", float, 0.0),
        top_k=_field(body, "top_k", int, 0),
        top_p=_field(body, "top_p", float, 1.0),
        seed=_field(body, "seed", int, 0),
        step_size=_field(body, "step_size", float, None),
        early_stop_tol=_field(body, "early_stop_tol", float, None),
    )
    if kwargs["temperature"] < 0 or not 0 < kwargs["top_p"] <= 1:
        raise BadRequest("need temperature >= 0 and 0 < top_p <= 1")
    if kwargs["step_size"] is not None and kwargs["step_size"] <= 0:
        raise BadRequest("field 'step_size' must be > 0")
    return prompt, max_tokens, kwargs


class Server:
    """Owns the model, the tokenizer and the lock that serialises generation."""

    def __init__(self, export: Export) -> None:
        self.export = export
        self.engine = EBTInference(export.model, export.thinking)
        self.tokenizer = export.tokenizer()
        self.lock = threading.Lock()

    def health(self) -> Dict[str, Any]:
        cfg = self.export.config
        return {
            "status": "ok",
            "model": {"arch": cfg.arch, "dim": cfg.dim, "layers": cfg.num_layers, "vocab": cfg.vocab_size,
                      "ebt_type": cfg.ebt_type, "max_seq_len": cfg.max_seq_len},
            "thinking": vars(self.export.thinking),
        }

    def generate(self, body: Any) -> Dict[str, Any]:
        prompt, max_tokens, kwargs = parse_generate_request(body, self.export.thinking.steps)
        ids = self.tokenizer.encode(prompt)
        if not ids:
            raise BadRequest("the prompt encodes to no tokens")
        start = time.perf_counter()
        with self.lock:
            tokens = self.engine.generate(ids, max_tokens, **kwargs)
        return {"text": self.tokenizer.decode(tokens), "tokens": tokens, "prompt_tokens": len(ids),
                "elapsed_s": round(time.perf_counter() - start, 4)}


def make_handler(server: Server):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _send(self, code: int, payload: Dict[str, Any]) -> None:
            data = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 - http.server naming
            if self.path == "/health":
                self._send(200, server.health())
            else:
                self._send(404, {"error": f"no route GET {self.path}"})

        def do_POST(self) -> None:  # noqa: N802
            if self.path != "/v1/generate":
                self._send(404, {"error": f"no route POST {self.path}"})
                return
            try:
                length = int(self.headers.get("Content-Length") or 0)
                if length > MAX_BODY:
                    self._send(413, {"error": f"body of {length} bytes exceeds {MAX_BODY}"})
                    return
                try:
                    body = json.loads(self.rfile.read(length) or b"null")
                except (json.JSONDecodeError, UnicodeDecodeError) as err:
                    raise BadRequest(f"invalid JSON ({err.msg if hasattr(err, 'msg') else err})") from None
                self._send(200, server.generate(body))
            except BadRequest as err:
                self._send(400, {"error": str(err)})
            except ValueError as err:  # e.g. a prompt longer than the engine accepts
                self._send(422, {"error": str(err).splitlines()[0]})
            except Exception as err:  # noqa: BLE001 - a request must never take the server down
                self._send(500, {"error": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"})

        def log_message(self, fmt: str, *args) -> None:
            print(f"serve: {self.address_string()} {fmt % args}", flush=True)

    return Handler


def serve(export: Export, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    """A started-on-demand server (call `.serve_forever()`); port 0 picks a free one."""
    return ThreadingHTTPServer((host, port), make_handler(Server(export)))
