"""The inference API: FastAPI routes around minilm.sample, with a concurrency limit, a bounded queue and metrics.

    app = create_app("out/tiny")            # loads ckpt.pt + tokenizer once
    uvicorn.run(app, host="127.0.0.1", port=8000)

Routes: POST /v1/generate (JSON, or server-sent events with "stream": true), POST /v1/completions (OpenAI's
completions API: string, batched or token-id prompts, n, logprobs, echo, stream, usage; errors in OpenAI's
{"error": {"message", "type", "param", "code"}} shape, see minilm.serve.completions), GET /v1/models, GET /health,
GET /v1/model, GET /metrics (Prometheus text format) and GET / (the playground page).

Generation is CPU-bound torch code, so it never runs on the event loop: one engine thread decodes the running
requests together, one forward pass per step for all of them (continuous batching, minilm.serve.batch), and hands
each request's text to the loop through an asyncio.Queue. At most `max_concurrency` requests run in the batch;
requests beyond that wait, up to `max_queue` of them, and join the batch as soon as a row frees up. Past that the
server answers 503 with Retry-After rather than letting latency grow without bound. A client that disconnects
(streaming or not) sets its job's cancel flag, and its row leaves the batch at the next step; so does a request
that runs past the server's time limit (request_timeout, queue included), which is answered 504.
"""

from __future__ import annotations

import asyncio
import json
import math
import secrets
import socket
import threading
import time
from contextlib import aclosing, asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from minilm.inference import check_sampling_args
from minilm.quantize import WEIGHTS, BF16Linear, Int8Linear
from minilm.sample import encode_prompt, eos_of, load_run, pick_device
from minilm.serve.batch import Engine, Sequence
from minilm.serve.completions import CompletionRequest, TokenText, logprobs_payload, merge_logprobs, openai_error

PLAYGROUND = Path(__file__).with_name("playground.html")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
KNOWN_PATHS = ("/", "/health", "/metrics", "/v1/generate", "/v1/completions", "/v1/model", "/v1/models")
OPENAI_PATHS = ("/v1/completions", "/v1/models")


class GenerateRequest(BaseModel):
    """The body of POST /v1/generate. Unknown fields are rejected so a typo ("temprature") is not silently ignored."""

    model_config = ConfigDict(extra="forbid")

    # strict: JSON true is not 1 and "5" is not 5; a client sending those has a bug worth hearing about.
    prompt: str = Field(strict=True, description="text to continue; must not be empty")
    max_new_tokens: int = Field(64, ge=1, strict=True, description="most tokens to generate (the server has a cap)")
    temperature: float = Field(0.8, ge=0.0, le=5.0, strict=True, allow_inf_nan=False, description="0 = greedy")
    top_k: int | None = Field(50, ge=0, strict=True, description="keep the k most likely tokens; 0 or null = off")
    top_p: float | None = Field(None, gt=0.0, le=1.0, strict=True, allow_inf_nan=False,
                                description="nucleus probability mass; null = off")
    # Lower bounds keep logits finite: a penalty of 1e-300 divides them into inf and sampling fails.
    repetition_penalty: float = Field(1.0, ge=0.01, le=10.0, strict=True, allow_inf_nan=False, description="1 = off")
    stop: list[str] | None = Field(None, max_length=8, description="stop strings (not included in the text)")
    seed: int | None = Field(None, ge=0, le=2**63 - 1, strict=True, description="same seed + params = same text")
    stream: bool = Field(False, strict=True, description="send tokens as server-sent events as they are generated")


class Overloaded(Exception):
    """The batch is full and so is the queue."""


class TimedOut(Exception):
    """The request ran past the server's time limit."""


class RequestError(Exception):
    """A request the server answers with an error: status, a sentence saying what was wrong and what to do."""

    def __init__(self, status: int, message: str, headers: dict | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.headers, self.code = status, message, headers, code


def logical_num_params(model) -> int:
    """The model's weights counted as the fp32 model counts them, whatever format they are stored in.

    Quantized layers (minilm.quantize) hold their weights as buffers, so num_params() alone misses them; a head
    tied to the embedding is counted once, as GPT.num_params does.
    """
    n = model.num_params()
    tied = getattr(model.config, "tie_embeddings", False)
    for name, mod in model.named_modules():
        if isinstance(mod, (Int8Linear, BF16Linear)):  # W8A8Linear is an Int8Linear
            if not (tied and name == "lm_head"):
                n += mod.weight.numel()
            n += mod.bias.numel() if mod.bias is not None else 0
    return n


def format_validation_errors(errors, fields=None) -> tuple[int, str]:
    """(status, one readable sentence) from pydantic/FastAPI validation errors."""
    if any(e.get("type") == "json_invalid" for e in errors):
        e = next(e for e in errors if e.get("type") == "json_invalid")
        why = (e.get("ctx") or {}).get("error", "invalid JSON")
        return 400, f"the request body is not valid JSON ({why}); send an object like {{\"prompt\": \"def \"}}"
    if any(isinstance(e.get("input"), bytes) for e in errors):  # FastAPI only parses JSON content types
        return 415, "the body must be a JSON object sent with the header Content-Type: application/json"
    parts = []
    for e in errors:
        where = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
        msg = e.get("msg", "invalid value")
        if e.get("type") == "extra_forbidden":
            msg = f"unknown field; valid fields are {', '.join(fields or GenerateRequest.model_fields)}"
        got = json.dumps(e.get("input"), default=repr)[:80]
        shown = "" if e.get("type") in ("missing", "extra_forbidden") else f" (got {got})"
        parts.append(f"{where}: {msg}{shown}")
    return 422, "; ".join(parts)


def error_response(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def error_for(path: str, status: int, message: str, headers: dict | None = None,
              code: str | None = None) -> JSONResponse:
    """This server's {"error": "..."} for its own routes; OpenAI's shape, and 400 for bad input, on OpenAI's."""
    if not path.startswith(OPENAI_PATHS):
        return error_response(status, message, headers)
    status = 400 if status == 422 else status
    head = message.split(":", 1)[0].split("[", 1)[0].split(".", 1)[0]
    param = head if ":" in message and head.isidentifier() else None  # messages start "field: ..."
    return JSONResponse(openai_error(status, message, param, code), status_code=status, headers=headers)


@dataclass
class Histogram:
    buckets: tuple[float, ...] = LATENCY_BUCKETS
    counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    total: float = 0.0
    n: int = 0

    def observe(self, value: float) -> None:
        i = next((i for i, b in enumerate(self.buckets) if value <= b), len(self.buckets))
        self.counts[i] += 1
        self.total += value
        self.n += 1


@dataclass
class Stats:
    """Everything /metrics reports. Worker threads and the event loop both write, hence the lock."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    http: dict = field(default_factory=dict)  # (path, status code) -> count
    generations: dict = field(default_factory=dict)  # (stream, outcome) -> count
    errors: dict = field(default_factory=dict)  # kind -> count
    prompt_tokens: int = 0
    tokens: int = 0
    latency: Histogram = field(default_factory=Histogram)
    ttft: Histogram = field(default_factory=Histogram)
    inflight: int = 0
    queued: int = 0

    def count(self, table: dict, key) -> None:
        with self.lock:
            table[key] = table.get(key, 0) + 1


def render_metrics(s: Stats, engine: Engine | None = None) -> str:
    """Prometheus text exposition format 0.0.4."""
    out = []

    def family(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
        out.append(f"# HELP {name} {help_}")
        out.append(f"# TYPE {name} {kind}")
        out.extend(f"{name}{labels} {value:g}" if isinstance(value, float) else f"{name}{labels} {value}"
                   for labels, value in samples)

    def hist(name: str, help_: str, h: Histogram) -> None:
        cum, samples = 0, []
        for b, c in zip(h.buckets, h.counts):
            cum += c
            samples.append((f'_bucket{{le="{b:g}"}}', cum))
        samples.append(('_bucket{le="+Inf"}', h.n))
        out.append(f"# HELP {name} {help_}")
        out.append(f"# TYPE {name} histogram")
        out.extend(f"{name}{suffix} {v}" for suffix, v in samples)
        out.append(f"{name}_sum {h.total:.6f}")
        out.append(f"{name}_count {h.n}")

    with s.lock:
        family("minilm_http_requests_total", "counter", "HTTP requests by path and status code.",
               [(f'{{path="{p}",code="{c}"}}', n) for (p, c), n in sorted(s.http.items())])
        family("minilm_errors_total", "counter",
               "Failed requests: bad_request (4xx), overloaded (503), internal (5xx), generation (failed mid-stream), "
               "timeout (504: over the time limit), disconnected (499: the client left before the answer).",
               [(f'{{kind="{k}"}}', s.errors.get(k, 0)) for k in ("bad_request", "overloaded", "internal",
                                                                    "generation", "timeout", "disconnected")])
        family("minilm_generations_total", "counter", "Finished generations by mode and outcome.",
               [(f'{{stream="{st}",outcome="{o}"}}', n) for (st, o), n in sorted(s.generations.items())])
        family("minilm_prompt_tokens_total", "counter", "Prompt tokens of accepted generations.",
               [("", s.prompt_tokens)])
        family("minilm_generated_tokens_total", "counter",
               "Tokens sampled (one forward pass each; a final end-of-text token included).",
               [("", s.tokens)])
        family("minilm_inflight_generations", "gauge", "Generations running in the batch now.",
               [("", s.inflight)])
        family("minilm_queued_requests", "gauge", "Requests waiting for a row in the batch now.", [("", s.queued)])
        if engine is not None:
            family("minilm_batch_steps_total", "counter", "Batched decode steps (one forward pass each).",
                   [("", engine.decode_steps)])
            family("minilm_batch_rows_total", "counter",
                   "Rows decoded in those steps; rows / steps is the mean batch size.", [("", engine.decode_rows)])
            family("minilm_prefills_total", "counter", "Prompts prefilled (and full rows refilled), one at a time.",
                   [("", engine.prefills)])
        hist("minilm_request_latency_seconds", "Generation requests: arrival to last token (queue included).",
             s.latency)
        hist("minilm_time_to_first_token_seconds", "Generation requests: arrival to first text piece.", s.ttft)
    return "\n".join(out) + "\n"


@dataclass(eq=False)
class Job:
    """One generation (one choice): the engine thread fills `events` (a Job is its Sequence's sink) with
    (job, kind, value); the jobs of one request share the queue, and the handler drains it."""

    params: dict
    prompt_tokens: int
    stream: bool
    arrived: float
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancel: threading.Event = field(default_factory=threading.Event)
    started: float | None = None
    first: float | None = None
    finished: float | None = None
    completion_tokens: int = 0
    finish_reason: str | None = None
    deadline: float = math.inf  # perf_counter time past which the server gives up on it
    disconnected: bool = False  # the client went away before the answer
    on_done: object = None  # called with (job, outcome) in the engine thread when the generation is over
    index: int = 0  # the choice's place in its request
    ids: list[int] = field(default_factory=list)  # the prompt
    prompt_logprobs: list | None = None  # from on_prompt (echo)
    prompt_tops: list | None = None
    pieces: list[str] = field(default_factory=list)  # what the handler collected
    records: list[tuple] = field(default_factory=list)  # (token, logprob, top alternatives) per sampled token

    def put(self, kind: str, value=None) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (self, kind, value))
        except RuntimeError:  # the loop closed (server shutting down): nobody is listening any more
            self.cancel.set()

    # ---- the sink the engine calls, in its thread
    def on_start(self) -> None:
        self.started = time.perf_counter()

    def on_piece(self, piece: str) -> None:
        self.first = self.first or time.perf_counter()
        self.put("piece", piece)

    def on_token(self, token: int, logprob: float, top: list) -> None:
        self.put("token", (token, logprob, top))

    def on_prompt(self, logprobs: list | None, tops: list | None) -> None:
        self.prompt_logprobs, self.prompt_tops = logprobs, tops
        self.put("prompt")

    def on_end(self, outcome: str, error: str | None, seq) -> None:
        self.finished = time.perf_counter()
        self.completion_tokens, self.finish_reason = seq.generated, seq.finish_reason
        if outcome == "error":
            self.put("error", error)
        if self.on_done is not None:
            self.on_done(self, outcome)
        self.put("end")

    def timings(self) -> dict:
        gen_time = (self.finished or time.perf_counter()) - (self.started or self.arrived)
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "queue_time_s": round((self.started or self.arrived) - self.arrived, 6),
            "time_to_first_token_s": round(self.first - self.arrived, 6) if self.first else None,
            "total_time_s": round((self.finished or time.perf_counter()) - self.arrived, 6),
            "tokens_per_s": round(self.completion_tokens / gen_time, 3) if gen_time > 0 else None,
        }


def record_outcome(job: Job, outcome: str, stats: Stats) -> None:
    """Count a finished generation in /metrics."""
    with stats.lock:
        stats.tokens += job.completion_tokens
        key = ("true" if job.stream else "false", outcome)
        stats.generations[key] = stats.generations.get(key, 0) + 1
        if outcome == "error":
            stats.errors["generation"] = stats.errors.get("generation", 0) + 1
        if outcome == "ok":
            stats.latency.observe(job.finished - job.arrived)
            if job.first is not None:
                stats.ttft.observe(job.first - job.arrived)


def last_val_loss(out_dir: Path, step: int | None) -> float | None:
    """The val loss of the run's last evaluation at or before `step`, from metrics.jsonl (None if absent)."""
    path = out_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    loss = None
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a crash; the others still count
        if "val_loss" in rec and (step is None or rec.get("step", 0) <= step):
            loss = rec["val_loss"]
    return loss


def valid_unicode(text: str) -> bool:
    """False for strings holding lone surrogates (JSON allows "\\ud800"; UTF-8 and the tokenizer do not)."""
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def finite_or_none(x) -> float | None:
    """JSON has no inf or NaN."""
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else None


def sse(event: str, data: dict) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass(frozen=True)
class Settings:
    """The server's limits (create_app's keyword arguments of the same names)."""

    max_concurrency: int = 8
    max_queue: int = 32
    max_new_tokens_cap: int = 512
    max_prompt_chars: int = 20_000
    max_body_bytes: int = 1_000_000
    threads: int = 1
    weights: str = "fp32"
    request_timeout: float = 300.0

    def __post_init__(self):
        if self.max_concurrency < 1 or self.max_queue < 0 or self.max_new_tokens_cap < 1 or self.threads < 1:
            raise ValueError(f"need max_concurrency >= 1, max_queue >= 0, max_new_tokens_cap >= 1, threads >= 1; "
                             f"got {self.max_concurrency}, {self.max_queue}, {self.max_new_tokens_cap}, "
                             f"{self.threads}")
        t = self.request_timeout
        if not (isinstance(t, (int, float)) and math.isfinite(t) and t > 0):
            raise ValueError(f"request_timeout={t!r} must be a number of seconds > 0")
        if self.weights not in WEIGHTS:
            raise ValueError(f"weights={self.weights!r}: choose one of {', '.join(WEIGHTS)}")


@dataclass(eq=False)
class AppState:
    """What the routes share (app.state.serving): the loaded run, the engine thread, the limits and the counters."""

    model: object
    tokenizer: object
    ckpt: dict
    eos_id: int
    engine: Engine
    settings: Settings
    info: dict  # GET /v1/model
    model_name: str
    stats: Stats = field(default_factory=Stats)
    running: set = field(default_factory=set)  # the jobs in the batch now
    slots: asyncio.Semaphore | None = None  # one per row of the batch
    created: int = field(default_factory=lambda: int(time.time()))
    page: str = ""
    token_text: TokenText | None = None

    def __post_init__(self):
        self.slots = asyncio.Semaphore(self.settings.max_concurrency)
        self.token_text = TokenText(self.tokenizer)

    @property
    def block_size(self) -> int:
        return self.model.config.block_size

    @property
    def model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "minilm"}


def run_info(out_dir, device, model, ckpt, eos_id: int, settings: Settings) -> dict:
    """The body of GET /v1/model: the run, its step and losses, its size and the server's limits."""
    block_size = model.config.block_size
    return {
        "run": str(out_dir),
        "device": str(device),
        "step": ckpt.get("step"),
        "val_loss": finite_or_none(last_val_loss(Path(out_dir), ckpt.get("step"))),
        "best_val_loss": finite_or_none(ckpt.get("best_val_loss")),  # inf when the run never evaluated
        "num_params": logical_num_params(model),
        "weights": settings.weights,
        "config": ckpt["config"].get("model", {}),
        "train_config": ckpt["config"].get("train", {}),
        "vocab_size": model.config.vocab_size,
        "block_size": block_size,
        "eot_id": eos_id,
        "limits": {"max_new_tokens": settings.max_new_tokens_cap, "max_prompt_tokens": block_size,
                   "max_prompt_chars": settings.max_prompt_chars, "max_concurrency": settings.max_concurrency,
                   "max_queue": settings.max_queue, "request_timeout_s": settings.request_timeout},
    }


# ---- admission: rows in the batch, the queue, the time limit

def retry_after(state: AppState) -> str:
    # A rough wait: one average request per queued request per worker, at least a second.
    s = state.stats
    mean = s.latency.total / s.latency.n if s.latency.n else 1.0
    return str(max(1, min(60, math.ceil(mean * (s.queued + 1) / state.settings.max_concurrency))))


def timeout_message(state: AppState, where: str) -> str:
    return (f"the request ran past this server's time limit of {state.settings.request_timeout:g} s ({where}) and "
            "was stopped; ask for fewer tokens, or retry when the server is less busy (the limit is "
            "--request_timeout)")


async def start_job(state: AppState, params: dict, ids: list[int], stream: bool, arrived: float,
                    queue: asyncio.Queue, index: int = 0) -> Job:
    """Wait for a row in the batch (stats.queued already counts this job) and submit the job to the engine."""
    stats, deadline = state.stats, arrived + state.settings.request_timeout
    try:
        await asyncio.wait_for(state.slots.acquire(), max(0.0, deadline - time.perf_counter()))
    except TimeoutError:
        raise TimedOut from None
    finally:
        with stats.lock:
            stats.queued -= 1
    job = Job(params, len(ids), stream, arrived, asyncio.get_running_loop(), events=queue, deadline=deadline,
              index=index, ids=ids)
    with stats.lock:
        stats.inflight += 1
        stats.prompt_tokens += len(ids)
        state.running.add(job)
    loop = job.loop

    def release(job: Job, outcome: str) -> None:  # runs in the engine thread once the job is over
        record_outcome(job, outcome, stats)
        with stats.lock:
            stats.inflight -= 1
            state.running.discard(job)
        try:
            loop.call_soon_threadsafe(state.slots.release)
        except RuntimeError:
            pass  # loop closed: shutting down

    job.on_done = release
    try:
        state.engine.submit(Sequence(ids, params, job))
    except RuntimeError:  # the engine stopped: the server is shutting down
        release(job, "cancelled")
        raise Overloaded from None
    return job


async def queue_jobs(state: AppState, specs: list[tuple[list[int], dict]], stream: bool,
                     arrived: float) -> list[Job]:
    """Submit one job per (prompt ids, params), all or none: RequestError 503 when they do not fit, 504 when
    the time limit passes while they wait."""
    stats, limits = state.stats, state.settings
    with stats.lock:
        overloaded = stats.inflight + stats.queued + len(specs) > limits.max_concurrency + limits.max_queue
        if not overloaded:
            stats.queued += len(specs)
    if overloaded:
        raise RequestError(503, f"server busy: {limits.max_concurrency} generations running and {limits.max_queue} "
                                "queued; retry after the number of seconds in Retry-After",
                           headers={"Retry-After": retry_after(state)}, code="overloaded")
    queue: asyncio.Queue = asyncio.Queue()
    results = await asyncio.gather(*(start_job(state, params, ids, stream, arrived, queue, i)
                                     for i, (ids, params) in enumerate(specs)), return_exceptions=True)
    jobs = [r for r in results if isinstance(r, Job)]
    failed = [r for r in results if not isinstance(r, Job)]
    if failed:
        for job in jobs:
            job.cancel.set()
        if isinstance(failed[0], TimedOut):
            raise RequestError(504, timeout_message(state, "waiting in the queue"), code="timeout")
        if isinstance(failed[0], Overloaded):
            raise RequestError(503, "the server is shutting down; retry in a moment",
                               headers={"Retry-After": "1"}, code="overloaded")
        raise failed[0]
    return jobs


# ---- reading the engine's events: drained into the jobs, or streamed

async def events(jobs: list[Job], request: Request | None = None):
    """(job, kind, value) from the engine, each job's "end" included, until all ended; raises TimedOut past
    the deadline.

    Sets the jobs' cancel flags if our consumer goes away (a stream's client disconnecting), when the
    deadline passes, and, given the request, as soon as its client disconnects: a non-streaming handler only
    awaits the engine, so without a watcher nothing would notice.
    """
    watcher = asyncio.create_task(until_disconnect(request, jobs)) if request is not None else None
    queue, open_jobs = jobs[0].events, len(jobs)
    deadline = min(job.deadline for job in jobs)
    try:
        while open_jobs:
            try:
                job, kind, value = await asyncio.wait_for(queue.get(), max(0.0, deadline - time.perf_counter()))
            except TimeoutError:
                raise TimedOut from None
            open_jobs -= kind == "end"
            yield job, kind, value
    finally:
        if watcher is not None:
            watcher.cancel()
        for job in jobs:
            job.cancel.set()  # no-op when finished; takes the row out of the batch otherwise


async def until_disconnect(request: Request, jobs: list[Job]) -> None:
    # The body has been read, so the next ASGI message is http.disconnect: the client closed the connection.
    while (await request.receive())["type"] != "http.disconnect":
        pass
    for job in jobs:
        job.disconnected = True
        job.cancel.set()


async def collect(state: AppState, jobs: list[Job], request: Request) -> None:
    """Drain non-streaming jobs into job.pieces and job.records; RequestError 500 (failed), 504 (too slow) or
    499 (the client left)."""
    try:
        async with aclosing(events(jobs, request)) as stream:
            async for job, kind, value in stream:
                if kind == "error":
                    raise RequestError(500, value)
                if kind == "piece":
                    job.pieces.append(value)
                elif kind == "token":
                    job.records.append(value)
    except TimedOut:
        raise RequestError(504, timeout_message(state, "while generating"), code="timeout") from None
    if any(job.disconnected for job in jobs):
        raise RequestError(499, "the client closed the connection before the answer was ready")


def event_stream(state: AppState, jobs: list[Job], frame, failure, tail) -> StreamingResponse:
    """A server-sent-events response over the jobs: frame(job, kind, value) per engine event (None sends nothing),
    then tail() (the frames after the last event); or, once, failure(status, message) when a generation fails
    (500) or runs past the time limit (504), and nothing after it."""

    async def body():
        try:
            async with aclosing(events(jobs)) as stream:
                async for job, kind, value in stream:
                    if kind == "error":
                        yield failure(500, value)
                        return
                    if (out := frame(job, kind, value)) is not None:
                        yield out
        except TimedOut:
            yield failure(504, timeout_message(state, "while generating"))
            return
        for out in tail():
            yield out

    return StreamingResponse(body(), media_type="text/event-stream", headers=SSE_HEADERS)


# ---- request checks (RequestError 422)

def check_params(state: AppState, params: dict, stop: list[str] | None, field: dict | None = None) -> None:
    """The model's and the server's limits on sampling parameters and stop strings (RequestError 422).

    `field` renames parameters in the messages for routes that call them differently (OpenAI's max_tokens).
    """
    name = lambda n: (field or {}).get(n, n)
    cap = state.settings.max_new_tokens_cap
    if not all(valid_unicode(t) for t in stop or []):
        raise RequestError(422, "stop: contains a lone UTF-16 surrogate (e.g. \\ud800), which is not text; "
                                "send valid Unicode")
    try:  # the model's own rules for sampling parameters, checked before the request takes a row
        check_sampling_args(params["max_new_tokens"], params["temperature"], params["top_k"], params["top_p"],
                            params["repetition_penalty"], state.model.config.vocab_size, state.eos_id)
    except ValueError as e:
        raise RequestError(422, str(e).replace("max_new_tokens", name("max_new_tokens"))) from None
    if params["max_new_tokens"] > cap:
        raise RequestError(422, f"{name('max_new_tokens')}: {params['max_new_tokens']} is above this "
                                f"server's cap of {cap}; ask for fewer (the cap is --max_new_tokens_cap)")
    if stop is not None and any(not s or len(s) > 64 for s in stop):
        raise RequestError(422, "stop: each stop string must be 1 to 64 characters long")


def encode_text(state: AppState, prompt: str, allow_empty: bool = False, where: str = "prompt") -> list[int]:
    """A text prompt's token ids, checked against the limits (RequestError 422)."""
    limit, block_size = state.settings.max_prompt_chars, state.block_size
    if not prompt and not allow_empty:
        raise RequestError(422, f"{where}: is empty; send some text for the model to continue (e.g. \"def \")")
    if not valid_unicode(prompt):
        raise RequestError(422, f"{where}: contains a lone UTF-16 surrogate (e.g. \\ud800), which is not text; "
                                "send valid Unicode")
    if len(prompt) > limit:
        raise RequestError(422, f"{where}: {len(prompt)} characters is over this server's limit of {limit}; "
                                "shorten it")
    n_prompt = len(state.tokenizer.encode(prompt).ids)  # before encode_prompt cuts it to block_size
    if n_prompt > block_size:
        raise RequestError(422, f"{where}: {n_prompt} tokens is longer than the model's context of "
                                f"{block_size} tokens (block_size); shorten it")
    return encode_prompt(state.tokenizer, prompt, state.model, state.eos_id)


def check_ids(state: AppState, ids: list[int], where: str = "prompt") -> list[int]:
    vocab_size, block_size = state.model.config.vocab_size, state.block_size
    if not ids:
        raise RequestError(422, f"{where}: is an empty list of token ids; send at least one")
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise RequestError(422, f"{where}: token id {bad} is outside the vocabulary [0, {vocab_size})")
    if len(ids) > block_size:
        raise RequestError(422, f"{where}: {len(ids)} tokens is longer than the model's context of "
                                f"{block_size} tokens (block_size); shorten it")
    return list(ids)


def completion_prompts(state: AppState, prompt) -> list[tuple[list[int], str]]:
    """(token ids, text) of each prompt of a completions request: a string, strings, ids or lists of ids."""
    decode = state.tokenizer.decode
    if isinstance(prompt, str):
        return [(encode_text(state, prompt, allow_empty=True), prompt)]
    if not prompt:
        raise RequestError(422, "prompt: is an empty list; send a string, a list of strings, a list of token "
                                "ids or a list of such lists")
    if isinstance(prompt[0], int):
        ids = check_ids(state, prompt)
        return [(ids, decode(ids))]
    if isinstance(prompt[0], str):
        return [(encode_text(state, p, allow_empty=True, where=f"prompt[{i}]"), p) for i, p in enumerate(prompt)]
    checked = [check_ids(state, p, where=f"prompt[{i}]") for i, p in enumerate(prompt)]
    return [(ids, decode(ids)) for ids in checked]


# ---- OpenAI completions: logprobs and stream chunks

def choice_logprobs(state: AppState, req: CompletionRequest, job: Job, records: list, start: int,
                    prompt: bool) -> dict | None:
    """A choice's logprobs object: the prompt's tokens (echo) and/or the sampled ones from `start` characters."""
    if req.logprobs is None:
        return None
    parts = [logprobs_payload(state.token_text, job.ids, job.prompt_logprobs, job.prompt_tops)] if prompt else []
    parts.append(logprobs_payload(state.token_text, [r[0] for r in records], [r[1] for r in records],
                                  [r[2] for r in records], start))
    return merge_logprobs(parts)


def completion_usage(prompts: list[tuple[list[int], str]], jobs: list[Job]) -> dict:
    prompt_tokens = sum(len(ids) for ids, _ in prompts)
    completion_tokens = sum(job.completion_tokens for job in jobs)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_chunks(state: AppState, req: CompletionRequest, jobs: list[Job], texts: list[str], head: dict):
    """The frame function of a completions stream, as OpenAI streams: a chunk per text piece of each choice, with
    the logprobs of the tokens it completes, and a last one per choice with its finish_reason."""
    pending = {job: [] for job in jobs}  # token records not sent yet
    offset = {job: 0 for job in jobs}  # characters of the choice's text sent so far

    def chunk(job: Job, text: str, reason: str | None = None, prompt: bool = False) -> str:
        records, pending[job] = pending[job], []
        lp = choice_logprobs(state, req, job, [] if prompt else records, offset[job], prompt)
        offset[job] += len(text)
        body = {**head, "choices": [{"text": text, "index": job.index, "logprobs": lp, "finish_reason": reason}]}
        return f"data: {json.dumps(body)}\n\n"

    def frame(job: Job, kind: str, value) -> str | None:
        if kind == "prompt" and req.echo:
            return chunk(job, texts[job.index], prompt=True)
        if kind == "token":
            pending[job].append(value)
        elif kind == "piece":
            return chunk(job, value)
        elif kind == "end":
            return chunk(job, "", job.finish_reason)
        return None

    return frame


# ---- routes: each reads app.state.serving

def serving(request: Request) -> AppState:
    return request.app.state.serving


async def playground(request: Request):
    return HTMLResponse(serving(request).page)


async def health(request: Request):
    state = serving(request)
    return {"status": "ok", "step": state.ckpt.get("step"), "inflight": state.stats.inflight,
            "queued": state.stats.queued}


async def model_info(request: Request):
    return serving(request).info


async def metrics(request: Request):
    state = serving(request)
    return PlainTextResponse(render_metrics(state.stats, state.engine), media_type="text/plain; version=0.0.4")


async def models(request: Request):
    return {"object": "list", "data": [serving(request).model_card]}


async def one_model(name: str, request: Request):
    state = serving(request)
    if name != state.model_name:
        raise RequestError(404, f"model: no model {name!r} here; this server has {state.model_name!r}",
                           code="model_not_found")
    return state.model_card


async def generate(req: GenerateRequest, request: Request):
    state, arrived = serving(request), time.perf_counter()
    params = dict(max_new_tokens=req.max_new_tokens, temperature=req.temperature, top_k=req.top_k or None,
                  top_p=req.top_p, repetition_penalty=req.repetition_penalty, seed=req.seed, stop=req.stop)
    ids = encode_text(state, req.prompt)
    check_params(state, params, req.stop)
    (job,) = await queue_jobs(state, [(ids, params)], req.stream, arrived)
    if req.stream:
        return event_stream(state, [job],
                            frame=lambda job, kind, value: sse("token", {"text": value}) if kind == "piece" else None,
                            failure=lambda status, message: sse("error", {"error": message}),
                            tail=lambda: [sse("done", {**job.timings(), "seed": req.seed})])
    await collect(state, [job], request)
    return {"text": "".join(job.pieces), **job.timings(), "seed": req.seed}


async def completions(req: CompletionRequest, request: Request):
    """OpenAI's completions API: batched prompts, n, logprobs, echo, stream; errors in OpenAI's shape."""
    state, arrived = serving(request), time.perf_counter()
    prompts = completion_prompts(state, req.prompt)
    stop = [req.stop] if isinstance(req.stop, str) else req.stop
    base = dict(max_new_tokens=req.max_tokens, temperature=req.temperature, top_k=None, top_p=req.top_p,
                repetition_penalty=1.0, stop=stop, logprobs=req.logprobs, echo=req.echo)
    check_params(state, base, stop, {"max_new_tokens": "max_tokens"})
    room = state.settings.max_concurrency + state.settings.max_queue
    if len(prompts) * req.n > room:
        raise RequestError(422, f"prompt: {len(prompts)} prompts x n={req.n} choices is more than this server "
                                f"takes at once ({room}); send fewer per request")
    specs = [(ids, {**base, "seed": None if req.seed is None else req.seed + j})
             for ids, _ in prompts for j in range(req.n)]
    jobs = await queue_jobs(state, specs, req.stream, arrived)
    texts = [text for _, text in prompts for _ in range(req.n)]  # job.index -> its prompt's text
    head = {"id": f"cmpl-{secrets.token_hex(12)}", "object": "text_completion", "created": int(time.time()),
            "model": req.model or state.model_name}
    if req.stream:
        def tail():
            if req.stream_options is not None and req.stream_options.include_usage:
                yield f"data: {json.dumps({**head, 'choices': [], 'usage': completion_usage(prompts, jobs)})}\n\n"
            yield "data: [DONE]\n\n"

        failure = lambda status, message: \
            f"data: {json.dumps(openai_error(status, message, code='timeout' if status == 504 else None))}\n\n"
        return event_stream(state, jobs, completion_chunks(state, req, jobs, texts, head), failure, tail)
    await collect(state, jobs, request)
    choices = []
    for job in jobs:
        echo = texts[job.index] if req.echo else ""
        choices.append({"text": echo + "".join(job.pieces), "index": job.index,
                        "logprobs": choice_logprobs(state, req, job, job.records, len(echo), req.echo),
                        "finish_reason": job.finish_reason})
    return {**head, "choices": choices, "usage": completion_usage(prompts, jobs)}


# ---- errors in each route's shape

async def http_error(request: Request, exc: HTTPException):  # 404, 405, 413: the route's error shape
    return error_for(request.url.path, exc.status_code, str(exc.detail), headers=exc.headers)


async def request_error(request: Request, exc: RequestError):
    return error_for(request.url.path, exc.status, exc.message, exc.headers, exc.code)


async def bad_request(request: Request, exc: RequestValidationError):
    fields = CompletionRequest.model_fields if request.url.path == "/v1/completions" else None
    status, message = format_validation_errors(exc.errors(), fields)
    return error_for(request.url.path, status, message)


@asynccontextmanager
async def lifespan(app: FastAPI):
    yield
    state = app.state.serving
    with state.stats.lock:
        jobs = list(state.running)
    for job in jobs:  # their rows leave the batch instead of finishing long generations
        job.cancel.set()
    state.engine.stop()


def create_app(out_dir: str | Path, device: str = "cpu", *, best: bool = False, data_dir: str | None = None,
               max_concurrency: int = 8, max_queue: int = 32, max_new_tokens_cap: int = 512,
               max_prompt_chars: int = 20_000, max_body_bytes: int = 1_000_000, threads: int = 1,
               weights: str = "fp32", request_timeout: float = 300.0) -> FastAPI:
    """Load a run once and return the FastAPI app that serves it.

    Up to max_concurrency generations decode together in one batch; up to max_queue more wait; beyond that
    requests get 503. Prompts longer than the model's block_size tokens are rejected (422), as are
    max_new_tokens above max_new_tokens_cap. threads is torch's intra-op thread count in the engine thread (1
    leaves a core to the event loop and the tokenizer). weights is fp32, bf16, int8 or w8a8 (minilm.quantize).
    request_timeout (seconds, waiting in the queue included) stops a generation that runs longer: 504.
    """
    settings = Settings(max_concurrency, max_queue, max_new_tokens_cap, max_prompt_chars, max_body_bytes, threads,
                        weights, request_timeout)
    device = pick_device(device)
    model, tokenizer, ckpt = load_run(out_dir, device, data_dir, best, weights)
    eos_id = eos_of(tokenizer, ckpt)
    engine = Engine(model, tokenizer, eos_id, max_batch=max_concurrency, threads=threads).start()
    state = AppState(model, tokenizer, ckpt, eos_id, engine, settings,
                     info=run_info(out_dir, device, model, ckpt, eos_id, settings),
                     model_name=Path(out_dir).name or "minilm", page=PLAYGROUND.read_text(encoding="utf-8"))

    app = FastAPI(title="minilm inference API", version="0.1.0", lifespan=lifespan)
    app.state.serving, app.state.stats, app.state.engine = state, state.stats, engine
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestError, request_error)
    app.add_exception_handler(RequestValidationError, bad_request)
    app.add_api_route("/", playground, methods=["GET"], response_class=HTMLResponse)
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/v1/model", model_info, methods=["GET"])
    app.add_api_route("/metrics", metrics, methods=["GET"])
    app.add_api_route("/v1/generate", generate, methods=["POST"])
    app.add_api_route("/v1/models", models, methods=["GET"])
    app.add_api_route("/v1/models/{name}", one_model, methods=["GET"])
    app.add_api_route("/v1/completions", completions, methods=["POST"])
    app.add_middleware(RequestCounter, stats=state.stats, max_body_bytes=max_body_bytes)
    return app


class RequestCounter:
    """Plain ASGI middleware: counts responses by path and status code, and refuses over-large bodies.

    (Plain ASGI rather than @app.middleware("http"), which wraps streaming responses in a way that delays
    noticing a client's disconnect.)
    """

    def __init__(self, app, stats: Stats, max_body_bytes: int):
        self.app, self.stats, self.max_body_bytes = app, stats, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        stats, app, max_body_bytes = self.stats, self.app, self.max_body_bytes
        path = scope["path"] if scope["path"] in KNOWN_PATHS else "other"
        status = 500

        async def send_and_note(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        received = 0

        async def receive_limited():
            # Counts bytes as they arrive, so a chunked upload without Content-Length is capped too.
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > max_body_bytes:
                raise HTTPException(413, f"request body is over the limit of {max_body_bytes} bytes")
            return message

        try:
            length = int(dict(scope["headers"]).get(b"content-length", b"0") or 0)
            if length > max_body_bytes:
                await error_for(scope["path"], 413, f"request body of {length} bytes is over the limit of "
                                                     f"{max_body_bytes} bytes")(scope, receive, send_and_note)
            else:
                await app(scope, receive_limited, send_and_note)
        finally:
            stats.count(stats.http, (path, status))
            if status >= 400:
                kind = {503: "overloaded", 504: "timeout", 499: "disconnected"}.get(
                    status, "bad_request" if status < 500 else "internal")
                stats.count(stats.errors, kind)


@contextmanager
def serve_in_thread(app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
    """Run a real uvicorn server on a background thread; yields its base URL, e.g. "http://127.0.0.1:40123".

    port=0 takes a free port from the OS (the socket is bound here, so there is no race). Handy in tests and in
    notebooks, whose own event loop is busy on the main thread.
    """
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            sock.close()
            raise RuntimeError(f"uvicorn did not start on {host}:{port}")
        time.sleep(0.01)
    try:
        yield f"http://{host if ':' not in host else f'[{host}]'}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()
