"""Load-test a running server: N concurrent clients send M generation requests; print latency percentiles.

    python -m minilm.serve.loadtest --url http://127.0.0.1:8000 --concurrency 8 --requests 200

Latency is measured by the client (send to last byte), so it includes queueing in the server. "errors" are
non-200 answers or failed connections; "lost" are requests that never got any answer. The exit status is 1 when
either is non-zero, so the command can gate CI.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

import httpx
import numpy as np


def percentile_ms(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q) * 1000) if values else None


async def one_request(client: httpx.AsyncClient, url: str, payload: dict, stream: bool) -> dict:
    """Send one request; return {"status", "latency_s", "ttft_s", "tokens", "error"}."""
    t0 = time.perf_counter()
    body = {**payload, "stream": stream}
    if not stream:
        r = await client.post(url, json=body)
        latency = time.perf_counter() - t0
        if r.status_code != 200:
            return {"status": r.status_code, "latency_s": latency, "error": r.text[:200]}
        data = r.json()
        ttft = data.get("time_to_first_token_s")
        return {"status": 200, "latency_s": latency, "ttft_s": ttft, "tokens": data["completion_tokens"]}
    ttft, done, error = None, None, None
    async with client.stream("POST", url, json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return {"status": r.status_code, "latency_s": time.perf_counter() - t0, "error": r.text[:200]}
        event = None
        async for line in r.aiter_lines():
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                if event == "token" and ttft is None:
                    ttft = time.perf_counter() - t0
                elif event == "done":
                    done = json.loads(line[5:])
                elif event == "error":
                    error = json.loads(line[5:]).get("error", "error event")
    latency = time.perf_counter() - t0
    if error or done is None:
        return {"status": 200, "latency_s": latency, "error": error or "stream ended without a done event"}
    return {"status": 200, "latency_s": latency, "ttft_s": ttft, "tokens": done["completion_tokens"]}


async def run_load(url: str, concurrency: int = 8, requests: int = 200, payload: dict | None = None,
                   stream: bool = False, timeout: float = 120.0, seed: int = 0) -> dict:
    """Send `requests` generations from `concurrency` concurrent clients; return counts, percentiles, tokens/s.

    Request i uses seed + i, so a run is repeatable. `url` is the server's base URL.
    """
    if concurrency < 1 or requests < 1:
        raise ValueError(f"concurrency and requests must be >= 1, got {concurrency} and {requests}")
    endpoint = url.rstrip("/") + "/v1/generate"
    payload = payload or {"prompt": "def ", "max_new_tokens": 32, "temperature": 0.8, "top_k": 50}
    results: list[dict] = []
    next_i = 0

    async def client_loop(client: httpx.AsyncClient) -> None:
        nonlocal next_i
        while next_i < requests:
            i = next_i
            next_i += 1  # no await between the check and the increment: safe on one event loop
            try:
                res = await one_request(client, endpoint, {**payload, "seed": seed + i}, stream)
            except httpx.HTTPError as e:
                res = {"status": None, "latency_s": None, "error": f"{type(e).__name__}: {e}"}
            results.append(res)

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
    wall = time.perf_counter() - t0

    good = lambda r: r["status"] == 200 and not r.get("error")
    ok = [r for r in results if good(r)]
    lat = [r["latency_s"] for r in ok]
    ttft = [r["ttft_s"] for r in ok if r.get("ttft_s") is not None]
    tokens = sum(r["tokens"] for r in ok)
    errors = [r for r in results if not good(r)]
    return {
        "url": url, "concurrency": concurrency, "requests": requests, "stream": stream,
        "ok": len(ok), "errors": len(errors), "lost": requests - len(results),
        "status_counts": {str(s): sum(r["status"] == s for r in results) for s in {r["status"] for r in results}},
        "error_samples": sorted({str(r.get("error")) for r in errors})[:5],
        "wall_s": wall, "requests_per_s": len(ok) / wall, "tokens": tokens, "tokens_per_s": tokens / wall,
        "p50_ms": percentile_ms(lat, 50), "p95_ms": percentile_ms(lat, 95), "p99_ms": percentile_ms(lat, 99),
        "ttft_p50_ms": percentile_ms(ttft, 50), "ttft_p95_ms": percentile_ms(ttft, 95),
    }


def format_report(r: dict, payload: dict) -> str:
    f = lambda x, d=1: "n/a" if x is None else f"{x:.{d}f}"
    head = (f"load test: {r['requests']} requests, {r['concurrency']} concurrent clients, {r['url']} "
            f"(stream={r['stream']}, max_new_tokens={payload.get('max_new_tokens')})")
    cols = ["ok", "errors", "lost", "wall s", "req/s", "tokens/s", "p50 ms", "p95 ms", "p99 ms", "ttft p50 ms",
            "ttft p95 ms"]
    vals = [str(r["ok"]), str(r["errors"]), str(r["lost"]), f(r["wall_s"], 2), f(r["requests_per_s"]),
            f(r["tokens_per_s"]), f(r["p50_ms"]), f(r["p95_ms"]), f(r["p99_ms"]), f(r["ttft_p50_ms"]),
            f(r["ttft_p95_ms"])]
    widths = [max(len(c), len(v)) for c, v in zip(cols, vals)]
    lines = [head, "  ".join(c.rjust(w) for c, w in zip(cols, widths)),
             "  ".join(v.rjust(w) for v, w in zip(vals, widths))]
    if r["errors"]:
        lines.append(f"status counts: {r['status_counts']}; first errors: {r['error_samples']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m minilm.serve.loadtest", description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:8000", help="base URL of a running `python -m minilm.serve`")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--prompt", default="def ")
    p.add_argument("--max_new_tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top_k", type=int, default=50)
    p.add_argument("--stream", action="store_true", help="use server-sent events (measures time to first token)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    p.add_argument("--json", action="store_true", help="also print the raw results as one JSON line")
    a = p.parse_args(argv)
    payload = {"prompt": a.prompt, "max_new_tokens": a.max_new_tokens, "temperature": a.temperature,
               "top_k": a.top_k}
    try:
        httpx.get(a.url.rstrip("/") + "/health", timeout=10).raise_for_status()
    except httpx.HTTPError as e:
        print(f"error: no server answering at {a.url}/health ({e}); start one with "
              "`python -m minilm.serve --out_dir RUN` first", file=sys.stderr)
        return 2
    try:
        r = asyncio.run(run_load(a.url, a.concurrency, a.requests, payload, a.stream, a.timeout))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_report(r, payload))
    if a.json:
        print(json.dumps(r))
    return 0 if r["errors"] == 0 and r["lost"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
