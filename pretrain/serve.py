"""`ebt serve`: an OpenAI-compatible HTTP front end for an export (stdlib server, loopback by default).

    GET  /health          -> {"status": "ok", "model": {...}, "thinking": {...}, "limits": {...}}
    GET  /v1/models       -> {"object": "list", "data": [{"id": <model id>, "object": "model", ...}]}
    POST /v1/completions  OpenAI completions: prompt, max_tokens, temperature, top_p, stop, n, best_of
                          (= best-of-G candidates per position chosen by final energy, i.e. self-
                          verification), stream (server-sent events), seed; EBT extras: thinking_steps,
                          step_size, early_stop_tol, top_k. Unknown fields are ignored, as OpenAI
                          servers do; a wrong type or value gets a 400 naming the field.

Fairness: one scheduler thread owns the model and advances every active choice of every active
request by one token in turn (round robin), so a short request never waits behind a long one.
Limits (`Limits`) answer 4xx naming the limit: body size (413), prompt length (400), max_tokens,
n/best_of (400), concurrency (429); a request past its time limit ends with finish_reason
"time_limit" (its tokens so far are returned).
"""
from __future__ import annotations

import json
import math
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, Iterator, List, Optional

from .export import Export
from .generate import EBTInference


@dataclass
class Limits:
    max_body_bytes: int = 1 << 20
    max_tokens: int = 1024
    max_n: int = 8
    max_best_of: int = 16
    max_thinking_steps: int = 64
    max_concurrent: int = 32
    """requests being generated at once; one more gets 429"""
    request_timeout_s: float = 120.0
    max_stop: int = 4


class BadRequest(ValueError):
    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def _number(body: Dict[str, Any], name: str, kind: type, default: Any, lo: float, hi: float,
            lo_open: bool = False) -> Any:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise BadRequest(f"field {name!r} must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise BadRequest(f"field {name!r} must be finite, got {value!r}")
    if value < lo or value > hi or (lo_open and value == lo):
        raise BadRequest(f"field {name!r}={value!r} is outside {'(' if lo_open else '['}{lo}, {hi}]")
    return kind(value)


@dataclass
class Request:
    prompt_ids: List[int]
    max_tokens: int
    n: int
    stream: bool
    stop: List[str]
    gen_kwargs: Dict[str, Any]


def parse_completion(body: Any, tokenizer, limits: Limits, max_seq_len: int, default_steps: int) -> Request:
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise BadRequest("field 'prompt' must be a non-empty string")
    ids = tokenizer.encode(prompt)
    if not ids:
        raise BadRequest("field 'prompt' encodes to no tokens")
    max_tokens = _number(body, "max_tokens", int, 16, 0, limits.max_tokens)
    if len(ids) + max_tokens > max_seq_len:
        raise BadRequest(f"prompt of {len(ids)} tokens + max_tokens={max_tokens} exceeds the model context "
                         f"limit max_seq_len={max_seq_len}")
    n = _number(body, "n", int, 1, 1, limits.max_n)
    best_of = _number(body, "best_of", int, 1, 1, limits.max_best_of)
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > limits.max_stop:
        raise BadRequest(f"field 'stop' must be a non-empty string or a list of at most {limits.max_stop} of them")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("field 'stream' must be a boolean")
    kwargs = dict(
        temperature=_number(body, "temperature", float, 0.0, 0.0, 2.0),
        top_p=_number(body, "top_p", float, 1.0, 0.0, 1.0, lo_open=True),
        top_k=_number(body, "top_k", int, 0, 0, 1 << 20),
        seed=_number(body, "seed", int, 0, 0, 2**63 - 1),
        steps=_number(body, "thinking_steps", int, default_steps, 0, limits.max_thinking_steps),
        num_samples=best_of,
        step_size=_number(body, "step_size", float, None, 0.0, 1e6, lo_open=True),
        early_stop_tol=_number(body, "early_stop_tol", float, None, 0.0, 1e6),
    )
    return Request(ids, max_tokens, n, stream, stop, kwargs)


@dataclass
class Choice:
    tokens: Iterator[int]
    ids: List[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0
    """characters of `text` already streamed"""
    finish: Optional[str] = None


class Job:
    """One request in the scheduler: its choices, its deadline and the queue its handler reads."""

    def __init__(self, req: Request, choices: List[Choice], deadline: float) -> None:
        self.req, self.choices, self.deadline = req, choices, deadline
        self.events: "queue.Queue[Optional[int]]" = queue.Queue()  # index of a changed choice; None = done
        self.cancelled = False


class Scheduler:
    """The one thread that runs the model: one token of one choice at a time, round robin."""

    def __init__(self, engine: EBTInference, tokenizer) -> None:
        self.engine, self.tokenizer = engine, tokenizer
        self.jobs: List[Job] = []
        self.cond = threading.Condition()
        threading.Thread(target=self._loop, name="ebt-scheduler", daemon=True).start()

    def submit(self, job: Job) -> None:
        with self.cond:
            self.jobs.append(job)
            self.cond.notify()

    def _loop(self) -> None:
        while True:
            with self.cond:
                while not self.jobs:
                    self.cond.wait()
                jobs = list(self.jobs)
            for job in jobs:
                self._advance(job)
                if job.cancelled or all(c.finish for c in job.choices):
                    with self.cond:
                        self.jobs.remove(job)
                    job.events.put(None)

    def _advance(self, job: Job) -> None:
        for i, choice in enumerate(job.choices):
            if choice.finish or job.cancelled:
                continue
            if time.monotonic() > job.deadline:
                choice.finish = "time_limit"
                job.events.put(i)
                continue
            try:
                token = next(choice.tokens)
            except StopIteration:
                choice.finish = "length"
            except Exception as err:  # noqa: BLE001 - one bad request must not stop the scheduler
                choice.finish = f"error: {type(err).__name__}: {err}"
            else:
                choice.ids.append(token)
                choice.text = self.tokenizer.decode(choice.ids)
                hits = [choice.text.find(s) for s in job.req.stop if s in choice.text]
                if hits:
                    choice.text, choice.finish = choice.text[:min(hits)], "stop"
                elif len(choice.ids) >= job.req.max_tokens:
                    choice.finish = "length"
            job.events.put(i)
            return  # one token per job per round


class Server:
    """Owns the export, the scheduler and the limits."""

    def __init__(self, export: Export, limits: Optional[Limits] = None) -> None:
        self.export, self.limits = export, limits or Limits()
        self.engine = EBTInference(export.model, export.thinking)
        self.tokenizer = export.tokenizer()
        self.scheduler = Scheduler(self.engine, self.tokenizer)
        self.model_id = f"ebt-{export.config.arch}-d{export.config.dim}-l{export.config.num_layers}"
        self.slots = threading.BoundedSemaphore(self.limits.max_concurrent)

    def health(self) -> Dict[str, Any]:
        cfg = self.export.config
        return {
            "status": "ok",
            "model": {"id": self.model_id, "arch": cfg.arch, "dim": cfg.dim, "layers": cfg.num_layers,
                      "vocab": cfg.vocab_size, "ebt_type": cfg.ebt_type, "max_seq_len": cfg.max_seq_len},
            "thinking": vars(self.export.thinking),
            "limits": vars(self.limits),
        }

    def models(self) -> Dict[str, Any]:
        return {"object": "list", "data": [{"id": self.model_id, "object": "model", "created": 0, "owned_by": "ebt"}]}

    def start(self, body: Any) -> Job:
        req = parse_completion(body, self.tokenizer, self.limits, self.export.config.max_seq_len,
                               self.export.thinking.steps)
        if not self.slots.acquire(blocking=False):
            raise BadRequest(f"concurrency limit of {self.limits.max_concurrent} requests reached; retry later", 429)
        kw = dict(req.gen_kwargs)
        seed = kw.pop("seed")
        # Choices differ by seed (index i uses seed + i), so n > 1 with temperature > 0 gives n samples.
        choices = [Choice(self.engine.generate_iter(req.prompt_ids, req.max_tokens, seed=seed + i, **kw))
                   for i in range(req.n)]
        if req.max_tokens == 0:
            for c in choices:
                c.finish = "length"
        job = Job(req, choices, time.monotonic() + self.limits.request_timeout_s)
        self.scheduler.submit(job)
        return job

    def release(self) -> None:
        self.slots.release()


def _usage(job: Job) -> Dict[str, int]:
    completion = sum(len(c.ids) for c in job.choices)
    prompt = len(job.req.prompt_ids)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _finish(choice: Choice) -> Optional[str]:
    return None if choice.finish is None else "stop" if choice.finish == "stop" else "length"


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

        def _error(self, code: int, message: str) -> None:
            kind = "invalid_request_error" if code < 500 else "server_error"
            self._send(code, {"error": {"message": message, "type": kind, "code": code}})

        def do_GET(self) -> None:  # noqa: N802 - http.server naming
            if self.path == "/health":
                self._send(200, server.health())
            elif self.path == "/v1/models":
                self._send(200, server.models())
            else:
                self._error(404, f"no route GET {self.path}")

        def _body(self) -> Any:
            raw = self.headers.get("Content-Length")
            if raw is None:
                raise BadRequest("header 'Content-Length' is required", 411)
            if not raw.strip().isdigit():
                self.close_connection = True  # the body length is unknown: the connection cannot be reused
                raise BadRequest(f"header 'Content-Length' must be a non-negative integer, got {raw!r}")
            length = int(raw)
            if length > server.limits.max_body_bytes:
                self.close_connection = True
                raise BadRequest(f"body of {length} bytes exceeds the limit max_body_bytes="
                                 f"{server.limits.max_body_bytes}", 413)
            try:
                return json.loads(self.rfile.read(length) or b"null")
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise BadRequest(f"invalid JSON ({getattr(err, 'msg', err)})") from None

        def do_POST(self) -> None:  # noqa: N802
            if self.path != "/v1/completions":
                self._error(404, f"no route POST {self.path}")
                return
            try:
                job = server.start(self._body())
            except BadRequest as err:
                self._error(err.status, str(err))
                return
            try:
                if job.req.stream:
                    self._stream(job)
                else:
                    self._complete(job)
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True
            finally:
                job.cancelled = True  # a disconnected client frees its slot at the next round
                server.release()

        def _envelope(self, job_id: str, choices: List[Dict[str, Any]]) -> Dict[str, Any]:
            return {"id": job_id, "object": "text_completion", "created": int(time.time()),
                    "model": server.model_id, "choices": choices}

        def _complete(self, job: Job) -> None:
            while job.events.get() is not None:
                pass
            errors = [c.finish for c in job.choices if c.finish and c.finish.startswith("error")]
            if errors:
                self._error(500, errors[0])
                return
            out = self._envelope(f"cmpl-{uuid.uuid4().hex}", [
                {"index": i, "text": c.text, "logprobs": None, "finish_reason": _finish(c)}
                for i, c in enumerate(job.choices)])
            out["usage"] = _usage(job)
            self._send(200, out)

        def _stream(self, job: Job) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            job_id = f"cmpl-{uuid.uuid4().hex}"
            hold = max((len(s) for s in job.req.stop), default=1) - 1  # never stream part of a stop string
            while True:
                index = job.events.get()
                if index is None:
                    break
                c = job.choices[index]
                upto = len(c.text) if c.finish else max(c.sent, len(c.text) - hold)
                delta, c.sent = c.text[c.sent:upto], upto
                if delta or c.finish:
                    event = self._envelope(job_id, [{"index": index, "text": delta, "logprobs": None,
                                                     "finish_reason": _finish(c)}])
                    self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
                    self.wfile.flush()
            for c in job.choices:  # an engine failure is reported, not passed off as a finished text
                if c.finish and c.finish.startswith("error"):
                    self.wfile.write(f"data: {json.dumps({'error': {'message': c.finish, 'code': 500}})}\n\n".encode())
            final = self._envelope(job_id, [])
            final["usage"] = _usage(job)
            self.wfile.write(f"data: {json.dumps(final)}\n\ndata: [DONE]\n\n".encode())
            self.wfile.flush()

        def log_message(self, fmt: str, *args) -> None:
            print(f"serve: {self.address_string()} {fmt % args}", flush=True)

    return Handler


def serve(export: Export, host: str = "127.0.0.1", port: int = 8000, limits: Optional[Limits] = None,
          quiet: bool = False) -> ThreadingHTTPServer:
    """A started-on-demand server (call `.serve_forever()`); port 0 picks a free one."""
    handler = make_handler(Server(export, limits))
    if quiet:
        handler.log_message = lambda *_: None
    httpd = ThreadingHTTPServer((host, port), handler)
    httpd.daemon_threads = True
    return httpd
