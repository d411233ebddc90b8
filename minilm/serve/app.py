"""The inference API: FastAPI routes around minilm.sample, with a concurrency limit, a bounded queue and metrics.

    app = create_app("out/tiny")            # loads ckpt.pt + tokenizer once
    uvicorn.run(app, host="127.0.0.1", port=8000)

Routes: POST /v1/generate (JSON, or server-sent events with "stream": true), POST /v1/completions (OpenAI's
completions API: one choice, no logprobs; errors keep this server's {"error": "..."} shape), GET /health,
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
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from minilm.model import check_sampling_args
from minilm.quantize import WEIGHTS, BF16Linear, Int8Linear
from minilm.sample import encode_prompt, eos_of, load_run, pick_device
from minilm.serve.batch import Engine, Sequence

PLAYGROUND = Path(__file__).with_name("playground.html")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
KNOWN_PATHS = ("/", "/health", "/metrics", "/v1/generate", "/v1/completions", "/v1/model")


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


class CompletionRequest(BaseModel):
    """The body of POST /v1/completions, OpenAI's fields and defaults (a subset: one choice, no logprobs)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="echoed back; this server has one model")
    prompt: str | list[str] = Field(description="text to continue (or a list holding one string)")
    max_tokens: int = Field(16, ge=1, strict=True)
    temperature: float = Field(1.0, ge=0.0, le=2.0, strict=True, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0.0, le=1.0, strict=True, allow_inf_nan=False)
    stop: str | list[str] | None = Field(None, max_length=4)
    seed: int | None = Field(None, ge=0, le=2**63 - 1, strict=True)
    stream: bool = Field(False, strict=True)
    n: int = Field(1, ge=1, le=1, strict=True, description="only 1 choice per request")
    user: str | None = None


class Overloaded(Exception):
    """The batch is full and so is the queue."""


class TimedOut(Exception):
    """The request ran past the server's time limit."""


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
    """One generation: the engine thread fills `events` (a Job is its Sequence's sink); the handler drains it."""

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

    def put(self, kind: str, value=None) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the loop closed (server shutting down): nobody is listening any more
            self.cancel.set()

    # ---- the sink the engine calls, in its thread
    def on_start(self) -> None:
        self.started = time.perf_counter()

    def on_piece(self, piece: str) -> None:
        self.first = self.first or time.perf_counter()
        self.put("piece", piece)

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
    if max_concurrency < 1 or max_queue < 0 or max_new_tokens_cap < 1 or threads < 1:
        raise ValueError(f"need max_concurrency >= 1, max_queue >= 0, max_new_tokens_cap >= 1, threads >= 1; "
                         f"got {max_concurrency}, {max_queue}, {max_new_tokens_cap}, {threads}")
    if not (isinstance(request_timeout, (int, float)) and math.isfinite(request_timeout) and request_timeout > 0):
        raise ValueError(f"request_timeout={request_timeout!r} must be a number of seconds > 0")
    if weights not in WEIGHTS:
        raise ValueError(f"weights={weights!r}: choose one of {', '.join(WEIGHTS)}")
    device = pick_device(device)
    model, tokenizer, ckpt = load_run(out_dir, device, data_dir, best, weights)
    eos_id = eos_of(tokenizer, ckpt)
    block_size = model.config.block_size
    stats = Stats()
    engine = Engine(model, tokenizer, eos_id, max_batch=max_concurrency, threads=threads).start()
    slots = asyncio.Semaphore(max_concurrency)
    running: set[Job] = set()
    page = PLAYGROUND.read_text(encoding="utf-8")
    info = {
        "run": str(out_dir),
        "device": str(device),
        "step": ckpt.get("step"),
        "val_loss": finite_or_none(last_val_loss(Path(out_dir), ckpt.get("step"))),
        "best_val_loss": finite_or_none(ckpt.get("best_val_loss")),  # inf when the run never evaluated
        "num_params": logical_num_params(model),
        "weights": weights,
        "config": ckpt["config"].get("model", {}),
        "train_config": ckpt["config"].get("train", {}),
        "vocab_size": model.config.vocab_size,
        "block_size": block_size,
        "eot_id": eos_id,
        "limits": {"max_new_tokens": max_new_tokens_cap, "max_prompt_tokens": block_size,
                   "max_prompt_chars": max_prompt_chars, "max_concurrency": max_concurrency,
                   "max_queue": max_queue, "request_timeout_s": request_timeout},
    }

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        with stats.lock:
            jobs = list(running)
        for job in jobs:  # their rows leave the batch instead of finishing long generations
            job.cancel.set()
        engine.stop()

    app = FastAPI(title="minilm inference API", version="0.1.0", lifespan=lifespan)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):  # 404, 405, 413: same {"error": ...} shape
        return error_response(exc.status_code, str(exc.detail), headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError):
        fields = CompletionRequest.model_fields if request.url.path == "/v1/completions" else None
        status, message = format_validation_errors(exc.errors(), fields)
        return error_response(status, message)

    @app.get("/", response_class=HTMLResponse)
    async def playground():
        return HTMLResponse(page)

    @app.get("/health")
    async def health():
        return {"status": "ok", "step": ckpt.get("step"), "inflight": stats.inflight, "queued": stats.queued}

    @app.get("/v1/model")
    async def model_info():
        return info

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(render_metrics(stats, engine), media_type="text/plain; version=0.0.4")

    def retry_after() -> str:
        # A rough wait: one average request per queued request per worker, at least a second.
        mean = stats.latency.total / stats.latency.n if stats.latency.n else 1.0
        return str(max(1, min(60, math.ceil(mean * (stats.queued + 1) / max_concurrency))))

    async def start(params: dict, ids: list[int], stream: bool, arrived: float) -> Job:
        """Wait for a row in the batch (or raise Overloaded) and submit the job to the engine."""
        with stats.lock:
            if stats.inflight + stats.queued >= max_concurrency + max_queue:
                raise Overloaded
            stats.queued += 1
        try:
            await asyncio.wait_for(slots.acquire(), max(0.0, arrived + request_timeout - time.perf_counter()))
        except TimeoutError:
            raise TimedOut from None
        finally:
            with stats.lock:
                stats.queued -= 1
        job = Job(params, len(ids), stream, arrived, asyncio.get_running_loop(), deadline=arrived + request_timeout)
        with stats.lock:
            stats.inflight += 1
            stats.prompt_tokens += len(ids)
            running.add(job)
        loop = job.loop

        def release(job: Job, outcome: str) -> None:  # runs in the engine thread once the job is over
            record_outcome(job, outcome, stats)
            with stats.lock:
                stats.inflight -= 1
                running.discard(job)
            try:
                loop.call_soon_threadsafe(slots.release)
            except RuntimeError:
                pass  # loop closed: shutting down

        job.on_done = release
        try:
            engine.submit(Sequence(ids, params, job))
        except RuntimeError:  # the engine stopped: the server is shutting down
            release(job, "cancelled")
            raise Overloaded from None
        return job

    async def events(job: Job, request: Request | None = None):
        """(kind, value) from the engine until "end"; raises TimedOut past the job's deadline.

        Sets the cancel flag if our consumer goes away (a stream's client disconnecting), when the deadline
        passes, and, given the request, as soon as its client disconnects: a non-streaming handler only awaits
        the engine, so without a watcher nothing would notice.
        """
        watcher = asyncio.create_task(until_disconnect(request, job)) if request is not None else None
        try:
            while True:
                try:
                    kind, value = await asyncio.wait_for(job.events.get(), max(0.0, job.deadline - time.perf_counter()))
                except TimeoutError:
                    raise TimedOut from None
                if kind == "end":
                    return
                yield kind, value
        finally:
            if watcher is not None:
                watcher.cancel()
            job.cancel.set()  # no-op when finished; takes the row out of the batch otherwise

    async def until_disconnect(request: Request, job: Job) -> None:
        # The body has been read, so the next ASGI message is http.disconnect: the client closed the connection.
        while (await request.receive())["type"] != "http.disconnect":
            pass
        job.disconnected = True
        job.cancel.set()

    def timeout_message(where: str) -> str:
        return (f"the request ran past this server's time limit of {request_timeout:g} s ({where}) and was stopped; "
                "ask for fewer tokens, or retry when the server is less busy (the limit is --request_timeout)")

    async def collect(job: Job, request: Request) -> list[str] | JSONResponse:
        """A non-streaming job's text pieces, or the error answer (500 failed, 504 too slow, 499 client gone)."""
        pieces = []
        try:
            async for kind, value in events(job, request):
                if kind == "error":
                    return error_response(500, value)
                pieces.append(value)
        except TimedOut:
            return error_response(504, timeout_message("while generating"))
        if job.disconnected:
            return error_response(499, "the client closed the connection before the answer was ready")
        return pieces

    async def admit(prompt: str, stop: list[str] | None, params: dict, stream: bool, arrived: float,
                    field: dict | None = None) -> Job | JSONResponse:
        """Check a request against the model's and the server's limits, then queue it: a Job or an error answer.

        `field` renames parameters in the messages for routes that call them differently (OpenAI's max_tokens).
        """
        name = lambda n: (field or {}).get(n, n)
        if not prompt:
            return error_response(422, "prompt: is empty; send some text for the model to continue (e.g. \"def \")")
        if not all(valid_unicode(t) for t in [prompt, *(stop or [])]):
            return error_response(422, "prompt/stop: contains a lone UTF-16 surrogate (e.g. \\ud800), which is not "
                                       "text; send valid Unicode")
        try:  # the model's own rules for sampling parameters, checked before the request takes a row
            check_sampling_args(params["max_new_tokens"], params["temperature"], params["top_k"], params["top_p"],
                                params["repetition_penalty"], model.config.vocab_size, eos_id)
        except ValueError as e:
            return error_response(422, str(e).replace("max_new_tokens", name("max_new_tokens")))
        if len(prompt) > max_prompt_chars:
            return error_response(422, f"prompt: {len(prompt)} characters is over this server's limit of "
                                       f"{max_prompt_chars}; shorten it")
        n_prompt = len(tokenizer.encode(prompt).ids)  # before encode_prompt cuts it to block_size
        if n_prompt > block_size:
            return error_response(422, f"prompt: {n_prompt} tokens is longer than the model's context of "
                                       f"{block_size} tokens (block_size); shorten it")
        if params["max_new_tokens"] > max_new_tokens_cap:
            return error_response(422, f"{name('max_new_tokens')}: {params['max_new_tokens']} is above this "
                                       f"server's cap of {max_new_tokens_cap}; ask for fewer (the cap is "
                                       "--max_new_tokens_cap)")
        if stop is not None and any(not s or len(s) > 64 for s in stop):
            return error_response(422, "stop: each stop string must be 1 to 64 characters long")
        try:
            return await start({**params, "stop": stop}, encode_prompt(tokenizer, prompt, model, eos_id), stream,
                               arrived)
        except Overloaded:
            return error_response(503, f"server busy: {max_concurrency} generations running and {max_queue} "
                                       "queued; retry after the number of seconds in Retry-After",
                                  headers={"Retry-After": retry_after()})
        except TimedOut:
            return error_response(504, timeout_message("waiting in the queue"))

    @app.post("/v1/generate")
    async def generate(req: GenerateRequest, request: Request):
        params = dict(max_new_tokens=req.max_new_tokens, temperature=req.temperature, top_k=req.top_k or None,
                      top_p=req.top_p, repetition_penalty=req.repetition_penalty, seed=req.seed)
        job = await admit(req.prompt, req.stop, params, req.stream, time.perf_counter())
        if isinstance(job, JSONResponse):
            return job

        if req.stream:
            async def body():
                try:
                    async for kind, value in events(job):
                        if kind == "error":
                            yield sse("error", {"error": value})
                            return
                        yield sse("token", {"text": value})
                except TimedOut:
                    yield sse("error", {"error": timeout_message("while generating")})
                    return
                yield sse("done", {**job.timings(), "seed": req.seed})

            return StreamingResponse(body(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        pieces = await collect(job, request)
        if isinstance(pieces, JSONResponse):
            return pieces
        return {"text": "".join(pieces), **job.timings(), "seed": req.seed}

    model_name = Path(out_dir).name or "minilm"

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        """OpenAI's legacy completions API (one choice, no logprobs), so OpenAI clients can talk to the model."""
        prompt = req.prompt if isinstance(req.prompt, str) else (req.prompt[0] if len(req.prompt) == 1 else None)
        if prompt is None:
            return error_response(422, "prompt: send one string (a list of several prompts is not supported)")
        stop = [req.stop] if isinstance(req.stop, str) else req.stop
        params = dict(max_new_tokens=req.max_tokens, temperature=req.temperature, top_k=None, top_p=req.top_p,
                      repetition_penalty=1.0, seed=req.seed)
        job = await admit(prompt, stop, params, req.stream, time.perf_counter(), {"max_new_tokens": "max_tokens"})
        if isinstance(job, JSONResponse):
            return job
        head = {"id": f"cmpl-{secrets.token_hex(12)}", "object": "text_completion", "created": int(time.time()),
                "model": req.model or model_name}
        choice = lambda text, reason: {"text": text, "index": 0, "logprobs": None, "finish_reason": reason}

        if req.stream:
            async def body():
                try:
                    async for kind, value in events(job):
                        if kind == "error":
                            yield f"data: {json.dumps({'error': {'message': value, 'type': 'server_error'}})}\n\n"
                            return
                        yield f"data: {json.dumps({**head, 'choices': [choice(value, None)]})}\n\n"
                except TimedOut:
                    message = timeout_message("while generating")
                    yield f"data: {json.dumps({'error': {'message': message, 'type': 'timeout'}})}\n\n"
                    return
                yield f"data: {json.dumps({**head, 'choices': [choice('', job.finish_reason)]})}\n\n"
                yield "data: [DONE]\n\n"

            return StreamingResponse(body(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        pieces = await collect(job, request)
        if isinstance(pieces, JSONResponse):
            return pieces
        usage = {"prompt_tokens": job.prompt_tokens, "completion_tokens": job.completion_tokens,
                 "total_tokens": job.prompt_tokens + job.completion_tokens}
        return {**head, "choices": [choice("".join(pieces), job.finish_reason)], "usage": usage}

    app.add_middleware(RequestCounter, stats=stats, max_body_bytes=max_body_bytes)
    app.state.stats = stats
    app.state.engine = engine
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
                await error_response(413, f"request body of {length} bytes is over the limit of "
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
