"""minilm.serve against a real uvicorn server on a free loopback port, driven by a real HTTP client (httpx)."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from minilm.checkpoint import CheckpointError
from minilm.sample import eos_of, generate_text, load_run
from minilm.serve import create_app, serve_in_thread


@pytest.fixture(scope="module")
def run_dir(tiny_run):
    return tiny_run


@pytest.fixture(scope="module")
def url(run_dir):
    app = create_app(run_dir, max_concurrency=2, max_queue=8, max_new_tokens_cap=256)
    with serve_in_thread(app) as base:
        yield base


@pytest.fixture(scope="module")
def reference(run_dir):
    """minilm.sample.generate_text on its own copy of the run, in a 1-thread worker like the server's workers
    (so both sides do the same float arithmetic)."""
    model, tok, ckpt = load_run(run_dir, "cpu")
    eos = eos_of(tok, ckpt)
    pool = ThreadPoolExecutor(1, initializer=torch.set_num_threads, initargs=(1,))

    def ref(prompt: str, **params) -> dict:
        return pool.submit(generate_text, model, tok, prompt, eos_id=eos, **params).result()

    def count(prompt: str, **params) -> int:
        ids = torch.tensor([tok.encode(prompt).ids])
        params = {**params, "top_k": params.get("top_k") or None}
        return pool.submit(model.generate, ids, eos_id=eos, **params).result().size(1) - ids.size(1)

    ref.count = count
    yield ref
    pool.shutdown()


def sse_events(lines) -> list[tuple[str, dict]]:
    """Parse server-sent events ("event: x" / "data: {...}" / blank line) into (event, data) pairs."""
    out, event = [], None
    for line in lines:
        if line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            out.append((event, json.loads(line[5:])))
    return out


def metric(text: str, name: str, labels: str = "") -> float:
    """One sample's value from Prometheus text; 0 when the labelled series has not appeared yet."""
    m = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def wait_for(fn, what: str, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def test_health_and_model_info(url, run_dir):
    h = httpx.get(f"{url}/health")
    assert h.status_code == 200 and h.json()["status"] == "ok"
    info = httpx.get(f"{url}/v1/model").json()
    model, _, ckpt = load_run(run_dir, "cpu")
    assert info["num_params"] == model.num_params()
    assert info["step"] == ckpt["step"] and info["best_val_loss"] == pytest.approx(ckpt["best_val_loss"])
    assert info["config"] == ckpt["config"]["model"]
    evals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert info["val_loss"] == pytest.approx([e["val_loss"] for e in evals if "val_loss" in e][-1])
    assert info["block_size"] == model.config.block_size and info["limits"]["max_new_tokens"] == 256


PARAMS = [
    dict(max_new_tokens=40, temperature=0.0, top_k=None),  # greedy
    dict(max_new_tokens=48, temperature=0.9, top_k=50, seed=7),
    dict(max_new_tokens=48, temperature=1.0, top_k=None, top_p=0.8, repetition_penalty=1.3, seed=11),
    dict(max_new_tokens=60, temperature=0.8, top_k=40, seed=3, stop=["\n"]),
]


@pytest.mark.parametrize("params", PARAMS, ids=["greedy", "top_k", "top_p+penalty", "stop"])
def test_generation_matches_minilm_sample(url, reference, params):
    prompt = "def read(self, path):\n    "
    r = httpx.post(f"{url}/v1/generate", json={"prompt": prompt, **params}, timeout=60)
    assert r.status_code == 200, r.text
    got = r.json()
    want = reference(prompt, **params)
    assert got["text"] == want["text"]
    assert got["prompt_tokens"] == want["prompt_tokens"]
    # The server counts sampled tokens (generate_text re-encodes the text, which BPE may merge differently):
    # without a stop string that is exactly what model.generate adds for the same seed.
    assert 1 <= got["completion_tokens"] <= params["max_new_tokens"]
    if not params.get("stop"):
        assert got["completion_tokens"] == reference.count(prompt, **params)
    if params.get("stop"):
        assert "\n" not in got["text"]
    assert got["time_to_first_token_s"] is None or 0 <= got["time_to_first_token_s"] <= got["total_time_s"]
    if got["completion_tokens"]:
        assert got["tokens_per_s"] > 0


@pytest.mark.parametrize("params", PARAMS[1:], ids=["top_k", "top_p+penalty", "stop"])
def test_stream_yields_same_text_as_non_stream(url, params):
    body = {"prompt": "import ", **params}
    plain = httpx.post(f"{url}/v1/generate", json=body, timeout=60).json()
    with httpx.stream("POST", f"{url}/v1/generate", json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r.iter_lines())
    tokens = [d["text"] for e, d in events if e == "token"]
    assert [e for e, _ in events][-1] == "done"
    assert "".join(tokens) == plain["text"]
    if not params.get("stop"):
        assert len(tokens) > 1  # streamed piece by piece, not in one lump
    done = events[-1][1]
    assert done["completion_tokens"] == plain["completion_tokens"]
    assert done["time_to_first_token_s"] <= done["total_time_s"]


BAD = [
    ("malformed JSON", b'{"prompt": "def ",', 400, "not valid JSON"),
    ("body not an object", b"[1, 2]", 422, "body"),
    ("missing prompt", {}, 422, "prompt"),
    ("empty prompt", {"prompt": ""}, 422, "prompt: is empty"),
    ("prompt over block_size", {"prompt": "x = 1\n" * 400}, 422, "longer than the model's context"),
    ("prompt over char limit", {"prompt": "a" * 20_001}, 422, "characters"),
    ("prompt not a string", {"prompt": 12}, 422, "prompt"),
    ("max_new_tokens above cap", {"prompt": "a", "max_new_tokens": 100_000}, 422, "cap of 256"),
    ("max_new_tokens zero", {"prompt": "a", "max_new_tokens": 0}, 422, "max_new_tokens"),
    ("max_new_tokens as string", {"prompt": "a", "max_new_tokens": "5"}, 422, "max_new_tokens"),
    ("max_new_tokens as bool", {"prompt": "a", "max_new_tokens": True}, 422, "max_new_tokens"),
    ("negative temperature", {"prompt": "a", "temperature": -0.5}, 422, "temperature"),
    ("NaN temperature", b'{"prompt": "a", "temperature": NaN}', 422, "temperature"),
    ("huge temperature", {"prompt": "a", "temperature": 1e9}, 422, "temperature"),
    ("negative top_k", {"prompt": "a", "top_k": -1}, 422, "top_k"),
    ("top_p zero", {"prompt": "a", "top_p": 0}, 422, "top_p"),
    ("top_p above one", {"prompt": "a", "top_p": 1.5}, 422, "top_p"),
    ("repetition_penalty zero", {"prompt": "a", "repetition_penalty": 0}, 422, "repetition_penalty"),
    ("repetition_penalty tiny", {"prompt": "a", "repetition_penalty": 1e-300}, 422, "repetition_penalty"),
    ("temperature tiny", {"prompt": "a", "temperature": 1e-300}, 422, "use 0 for greedy"),
    ("lone surrogate in prompt", b'{"prompt": "a\\ud800"}', 422, "surrogate"),
    ("lone surrogate in stop", b'{"prompt": "a", "stop": ["\\udfff"]}', 422, "surrogate"),
    ("negative seed", {"prompt": "a", "seed": -1}, 422, "seed"),
    ("empty stop string", {"prompt": "a", "stop": [""]}, 422, "stop"),
    ("too many stop strings", {"prompt": "a", "stop": ["x"] * 9}, 422, "stop"),
    ("stream not a bool", {"prompt": "a", "stream": "yes"}, 422, "stream"),
    ("misspelled field", {"prompt": "a", "temprature": 0.5}, 422, "temprature: unknown field"),
    ("body too large", {"prompt": "a" * 1_100_000}, 413, "over the limit"),
]


@pytest.mark.parametrize("body,status,fragment", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_gets_4xx_with_reason(url, body, status, fragment):
    if isinstance(body, bytes):
        r = httpx.post(f"{url}/v1/generate", content=body, headers={"content-type": "application/json"})
    else:
        r = httpx.post(f"{url}/v1/generate", json=body)
    assert r.status_code == status, r.text
    assert fragment in r.json()["error"]


def test_chunked_body_over_the_limit_gets_413(url):
    def chunks():  # no Content-Length: the server has to count as the bytes arrive
        yield b'{"prompt": "'
        for _ in range(11):
            yield b"a" * 100_000
        yield b'"}'

    r = httpx.post(f"{url}/v1/generate", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "over the limit" in r.json()["error"]


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
def test_body_that_is_not_declared_json(url, content_type):
    headers = {"content-type": content_type} if content_type else {}
    r = httpx.post(f"{url}/v1/generate", content=b'{"prompt": "def ", "max_new_tokens": 3}', headers=headers)
    assert r.status_code == 415 and "Content-Type: application/json" in r.json()["error"]


def test_server_survives_bad_input(url):
    httpx.post(f"{url}/v1/generate", content=b"\xff\xfe garbage", headers={"content-type": "application/json"})
    assert httpx.get(f"{url}/v1/generate").status_code == 405
    assert httpx.get(f"{url}/nope").json()["error"] == "Not Found"
    r = httpx.post(f"{url}/v1/generate", json={"prompt": "def ", "max_new_tokens": 4, "seed": 1})
    assert r.status_code == 200 and r.json()["completion_tokens"] <= 4
    assert httpx.get(f"{url}/health").json()["status"] == "ok"


def test_playground_page_is_self_contained(url):
    r = httpx.get(f"{url}/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert 'id="prompt"' in r.text and "/v1/generate" in r.text
    assert not re.search(r"(src|href)=[\"']https?://", r.text)  # no CDN: works offline


def test_metrics_count_what_happened(run_dir):
    app = create_app(run_dir, max_concurrency=2, max_queue=4, max_new_tokens_cap=64)
    with serve_in_thread(app) as base:
        sent = [httpx.post(f"{base}/v1/generate", json={"prompt": "def ", "max_new_tokens": 12, "seed": s})
                for s in range(3)]
        with httpx.stream("POST", f"{base}/v1/generate",
                          json={"prompt": "def ", "max_new_tokens": 12, "seed": 9, "stream": True}) as r:
            streamed = sse_events(r.iter_lines())[-1][1]
        bad = [httpx.post(f"{base}/v1/generate", json={"prompt": ""}),
               httpx.post(f"{base}/v1/generate", json={"prompt": "a", "max_new_tokens": 65})]
        text = httpx.get(f"{base}/metrics").text

    assert [r.status_code for r in sent] == [200] * 3 and [r.status_code for r in bad] == [422, 422]
    assert metric(text, "minilm_http_requests_total", '{path="/v1/generate",code="200"}') == 4
    assert metric(text, "minilm_http_requests_total", '{path="/v1/generate",code="422"}') == 2
    assert metric(text, "minilm_errors_total", '{kind="bad_request"}') == 2
    assert metric(text, "minilm_errors_total", '{kind="overloaded"}') == 0
    assert metric(text, "minilm_generations_total", '{stream="false",outcome="ok"}') == 3
    assert metric(text, "minilm_generations_total", '{stream="true",outcome="ok"}') == 1
    tokens = sum(r.json()["completion_tokens"] for r in sent) + streamed["completion_tokens"]
    assert metric(text, "minilm_generated_tokens_total") == tokens > 0
    assert metric(text, "minilm_prompt_tokens_total") == sum(r.json()["prompt_tokens"] for r in sent) + \
        streamed["prompt_tokens"]
    assert metric(text, "minilm_request_latency_seconds_count") == 4
    assert metric(text, "minilm_request_latency_seconds_bucket", '{le="+Inf"}') == 4
    total = sum(r.json()["total_time_s"] for r in sent) + streamed["total_time_s"]
    assert metric(text, "minilm_request_latency_seconds_sum") == pytest.approx(total, abs=0.05)
    assert metric(text, "minilm_inflight_generations") == 0 and metric(text, "minilm_queued_requests") == 0
    buckets = [float(v) for v in re.findall(r'^minilm_request_latency_seconds_bucket\{le="[^"]+"\} (\S+)$', text,
                                             re.M)]
    assert buckets == sorted(buckets)  # cumulative

    parser = pytest.importorskip("prometheus_client.parser")  # the reference parser, when installed
    families = {f.name: f for f in parser.text_string_to_metric_families(text)}
    assert families["minilm_request_latency_seconds"].type == "histogram"
    assert families["minilm_generated_tokens"].type == "counter"


def pick_long_seed(reference, n: int) -> int:
    """A seed whose sample runs the full n tokens (no end-of-text), so a request with it stays busy for a while."""
    for seed in range(8):
        if reference("def ", max_new_tokens=n, temperature=1.0, top_k=None, seed=seed)["completion_tokens"] >= 0.9 * n:
            return seed
    raise AssertionError(f"no seed in 0..7 gives a {n}-token sample without end-of-text; the fixture model changed?")


def test_queue_bound_gives_503_and_disconnect_stops_generation(run_dir, reference):
    n = 600
    seed = pick_long_seed(reference, n)
    long = {"prompt": "def ", "max_new_tokens": n, "temperature": 1.0, "top_k": None, "seed": seed}
    app = create_app(run_dir, max_concurrency=1, max_queue=1, max_new_tokens_cap=n)
    with serve_in_thread(app) as base, httpx.Client(base_url=base, timeout=60) as c:
        queued_result = {}
        with httpx.stream("POST", f"{base}/v1/generate", json={**long, "stream": True}, timeout=60) as a:
            lines = a.iter_lines()
            assert next(line for line in lines if line.startswith("event: token"))  # A holds the only worker

            def second():  # B waits in the queue's only place
                queued_result["r"] = httpx.post(f"{base}/v1/generate",
                                                json={"prompt": "x", "max_new_tokens": 5, "seed": 0}, timeout=60)

            b = threading.Thread(target=second)
            b.start()
            wait_for(lambda: c.get("/health").json()["queued"] == 1, "B to be queued")
            assert c.get("/health").json()["inflight"] == 1
            third = c.post("/v1/generate", json={"prompt": "y", "max_new_tokens": 5})
            assert third.status_code == 503
            assert "busy" in third.json()["error"]
            assert int(third.headers["Retry-After"]) >= 1
        # Leaving the with-block closed A's connection mid-stream: its generation must stop early.
        b.join(timeout=60)
        assert queued_result["r"].status_code == 200
        text = wait_for(lambda: (t := c.get("/metrics").text) and
                        metric(t, "minilm_generations_total", '{stream="true",outcome="cancelled"}') == 1 and t,
                        "the cancelled stream to be counted")
        a_tokens = metric(text, "minilm_generated_tokens_total") - queued_result["r"].json()["completion_tokens"]
        assert 1 <= a_tokens < n / 2  # stopped well before its 600 tokens
        assert metric(text, "minilm_errors_total", '{kind="overloaded"}') == 1
        assert metric(text, "minilm_http_requests_total", '{path="/v1/generate",code="503"}') == 1
        wait_for(lambda: c.get("/health").json()["inflight"] == 0, "the worker to be free")
        r = c.post("/v1/generate", json={"prompt": "z", "max_new_tokens": 3, "seed": 1})
        assert r.status_code == 200  # the slot was released


def test_create_app_rejects_bad_limits_and_missing_runs(run_dir, tmp_path):
    with pytest.raises(ValueError, match="max_concurrency"):
        create_app(run_dir, max_concurrency=0)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        create_app(tmp_path / "nowhere")


def test_concurrent_requests_decode_together_and_each_matches_minilm_sample(run_dir, reference):
    n = 600
    seed = pick_long_seed(reference, n)
    long = {"prompt": "def ", "max_new_tokens": n, "temperature": 1.0, "top_k": None, "seed": seed}
    short = [dict(prompt="import ", max_new_tokens=24, temperature=0.9, top_k=50, seed=s) for s in range(3)]
    short.append(dict(prompt="class ", max_new_tokens=20, temperature=0.0, top_k=None))
    short.append(dict(prompt="x = ", max_new_tokens=30, temperature=1.0, top_k=None, top_p=0.7,
                      repetition_penalty=1.2, seed=9, stop=["\n"]))
    app = create_app(run_dir, max_concurrency=4, max_queue=8, max_new_tokens_cap=n)
    with serve_in_thread(app) as base:
        with httpx.stream("POST", f"{base}/v1/generate", json={**long, "stream": True}, timeout=60) as a:
            assert next(line for line in a.iter_lines() if line.startswith("event: token"))  # A is decoding
            with ThreadPoolExecutor(len(short)) as pool:  # these join A's batch (one waits for a free row)
                got = list(pool.map(lambda b: httpx.post(f"{base}/v1/generate", json=b, timeout=60), short))
        text = httpx.get(f"{base}/metrics").text
    for body, r in zip(short, got):
        assert r.status_code == 200, r.text
        params = {k: v for k, v in body.items() if k != "prompt"}
        assert r.json()["text"] == reference(body["prompt"], **params)["text"], body
    steps = metric(text, "minilm_batch_steps_total")
    assert metric(text, "minilm_batch_rows_total") > steps > 0  # some steps decoded several requests at once
    assert metric(text, "minilm_prefills_total") >= 1 + len(short)


def test_openai_completions_route(url, reference):
    body = {"model": "tiny", "prompt": "def read(self, path):\n    ", "max_tokens": 24, "temperature": 0.9,
            "top_p": 0.9, "seed": 5}
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "text_completion" and out["id"].startswith("cmpl-") and out["model"] == "tiny"
    (choice,) = out["choices"]
    want = reference(body["prompt"], max_new_tokens=24, temperature=0.9, top_k=None, top_p=0.9, seed=5)
    assert choice["text"] == want["text"] and choice["index"] == 0 and choice["logprobs"] is None
    usage = out["usage"]
    assert usage["prompt_tokens"] == want["prompt_tokens"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert choice["finish_reason"] == ("length" if usage["completion_tokens"] == 24 else "stop")

    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=60) as s:
        data = [line[6:] for line in s.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == choice["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == choice["finish_reason"]
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])

    stopped = httpx.post(f"{url}/v1/completions", json={**body, "stop": "\n", "max_tokens": 60}).json()
    assert "\n" not in stopped["choices"][0]["text"]
    for bad, fragment in [({"max_tokens": 10_000}, "max_tokens: 10000 is above"),
                          ({"logprobs": 6}, "logprobs"), ({"prompt": []}, "empty list"),
                          ({"temprature": 1}, "valid fields are model, prompt, max_tokens")]:
        r = httpx.post(f"{url}/v1/completions", json={**body, **bad})  # OpenAI's status and shape
        assert r.status_code == 400 and fragment in r.json()["error"]["message"], (bad, r.text)


@pytest.mark.parametrize("weights", ["bf16", "int8", "w8a8"])
def test_model_info_counts_the_weights_whatever_their_format(run_dir, weights):
    fp32 = load_run(run_dir, "cpu")[0].num_params()
    app = create_app(run_dir, weights=weights, max_concurrency=1)
    with serve_in_thread(app) as base:
        info = httpx.get(f"{base}/v1/model").json()
    assert info["weights"] == weights and info["num_params"] == fp32


def raw_post(base: str, body: dict) -> socket.socket:
    """Send a POST /v1/generate over a bare socket and return the socket (the response unread)."""
    host, port = base.removeprefix("http://").rsplit(":", 1)
    sock = socket.create_connection((host, int(port)))
    data = json.dumps(body).encode()
    sock.sendall(b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
    return sock


def test_non_streaming_client_that_disconnects_frees_its_row(run_dir, reference):
    n = 600
    seed = pick_long_seed(reference, n)
    app = create_app(run_dir, max_concurrency=1, max_queue=1, max_new_tokens_cap=n)
    engine = app.state.engine
    with serve_in_thread(app) as base, httpx.Client(base_url=base, timeout=60) as c:
        sock = raw_post(base, {"prompt": "def ", "max_new_tokens": n, "temperature": 1.0, "top_k": None,
                               "seed": seed})
        wait_for(lambda: engine.decode_steps > 0, "the request to be decoding")
        sock.close()  # the client gives up before the answer
        text = wait_for(lambda: (t := c.get("/metrics").text) and
                        metric(t, "minilm_generations_total", '{stream="false",outcome="cancelled"}') == 1 and t,
                        "the abandoned request to be cancelled")
        assert not engine.running and c.get("/health").json()["inflight"] == 0  # its row is free
        assert 1 <= metric(text, "minilm_generated_tokens_total") < n / 2  # stopped well before its 600 tokens
        r = c.post("/v1/generate", json={"prompt": "z", "max_new_tokens": 3, "seed": 1})
        assert r.status_code == 200  # and the slot was released
        wait_for(lambda: metric(c.get("/metrics").text, "minilm_errors_total", '{kind="disconnected"}') == 1,
                 "the disconnect to be counted")


def test_request_time_limit_gives_504_and_frees_the_rows(run_dir, reference):
    n = 600
    seed = pick_long_seed(reference, n)
    long = {"prompt": "def ", "max_new_tokens": n, "temperature": 1.0, "top_k": None, "seed": seed}
    t0 = time.perf_counter()
    reference(**long)
    alone = time.perf_counter() - t0
    limit = alone / 4  # well below what the request needs
    app = create_app(run_dir, max_concurrency=1, max_queue=2, max_new_tokens_cap=n, request_timeout=limit)
    with serve_in_thread(app) as base, httpx.Client(base_url=base, timeout=60) as c:
        with ThreadPoolExecutor(2) as pool:  # the second waits in the queue and runs out of time there or later
            got = list(pool.map(lambda _: c.post("/v1/generate", json=long), range(2)))
        with c.stream("POST", "/v1/generate", json={**long, "stream": True}) as s:
            events = sse_events(s.iter_lines())
        completion = c.post("/v1/completions", json={"prompt": "def ", "max_tokens": n, "seed": seed})
        wait_for(lambda: c.get("/health").json()["inflight"] == 0, "the rows to be free")
        text = c.get("/metrics").text
        ok = c.post("/v1/generate", json={"prompt": "z", "max_new_tokens": 3, "seed": 1})
    for r in [*got, completion]:
        assert r.status_code == 504, r.text
        assert f"time limit of {limit:g} s" in r.text and "--request_timeout" in r.text
    assert events[-1][0] == "error" and "time limit" in events[-1][1]["error"]
    assert metric(text, "minilm_errors_total", '{kind="timeout"}') == 3
    assert metric(text, "minilm_generated_tokens_total") < 4 * n / 2
    assert ok.status_code == 200
    with pytest.raises(ValueError, match="request_timeout"):
        create_app(run_dir, request_timeout=0)
