"""Load-test a running server: N concurrent clients send M generation requests; print latency percentiles.

    python -m minilm.serve.loadtest --url http://127.0.0.1:8000 --concurrency 8 --requests 200
    python -m minilm.serve.loadtest --concurrency 8 --requests 200 --baseline   # also 1 client: the batching gain

Latency is measured by the client (send to last byte), so it includes queueing in the server. Time to first
token is measured by the client with --stream, and is the server's own figure otherwise. "errors" are
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
from tqdm import tqdm


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
                   stream: bool = False, timeout: float = 120.0, seed: int = 0, progress: bool = False) -> dict:
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
            bar.update(1)

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    bar = tqdm(total=requests, desc="requests", unit="req", disable=not progress, leave=False)
    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    bar.close()

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


def compare_with_in_process(url: str, out_dir: str, payload: dict, n: int = 20) -> dict:
    """What HTTP costs: the same n requests (seeds 0..n-1) one at a time through the server and in-process.

    The in-process side calls minilm.sample.generate_text in a 1-thread worker thread, as the server does.
    """
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from minilm.sample import eos_of, generate_text, load_run

    endpoint = url.rstrip("/") + "/v1/generate"
    with httpx.Client(timeout=120) as client:
        client.post(endpoint, json={**payload, "seed": 0}).raise_for_status()  # warm-up
        t0 = time.perf_counter()
        served = [client.post(endpoint, json={**payload, "seed": i}).json() for i in range(n)]
        t_server = time.perf_counter() - t0
    model, tok, ckpt = load_run(out_dir, "cpu")
    eos = eos_of(tok, ckpt)
    params = {k: v for k, v in payload.items() if k != "prompt"}
    params["top_k"] = params.get("top_k") or None
    with ThreadPoolExecutor(1, initializer=torch.set_num_threads, initargs=(1,)) as pool:
        run = lambda seed: generate_text(model, tok, payload["prompt"], eos_id=eos, seed=seed, **params)
        pool.submit(run, 0).result()  # warm-up
        t0 = time.perf_counter()
        local = [pool.submit(run, i).result() for i in range(n)]
        t_local = time.perf_counter() - t0
    tokens = sum(r["completion_tokens"] for r in served)  # sampled tokens; the same seeds sample the same ones
    return {"n": n, "tokens": tokens, "in_process_s": t_local, "server_s": t_server,
            "same_text": sum(a["text"] == b["text"] for a, b in zip(served, local))}


def format_comparison(c: dict, payload: dict) -> str:
    rows = [("in-process generate_text", c["in_process_s"]), ("HTTP server, 1 client", c["server_s"])]
    lines = [f"single client, {c['n']} requests of max_new_tokens={payload.get('max_new_tokens')} "
             f"(seeds 0..{c['n'] - 1}; identical texts: {c['same_text']}/{c['n']})",
             f"{'path':<26}{'ms/request':>12}{'tokens/s':>10}{'time ratio':>12}"]
    for name, t in rows:
        lines.append(f"{name:<26}{t / c['n'] * 1000:>12.1f}{c['tokens'] / t:>10.1f}{t / c['in_process_s']:>12.2f}")
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
    p.add_argument("--baseline", action="store_true",
                   help="first run --baseline_requests with one client, and report the aggregate tokens/s ratio")
    p.add_argument("--baseline_requests", type=int, default=0, help="requests of the 1-client run (0: requests/8)")
    p.add_argument("--compare_out_dir", default=None,
                   help="the served run dir: also time 20 sequential requests against in-process minilm.sample")
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
        base = None
        if a.baseline:
            base = asyncio.run(run_load(a.url, 1, a.baseline_requests or max(4, a.requests // 8), payload, a.stream,
                                        a.timeout, progress=True))
            print(format_report(base, payload))
            print()
        r = asyncio.run(run_load(a.url, a.concurrency, a.requests, payload, a.stream, a.timeout, progress=True))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_report(r, payload))
    if base is not None:
        r["baseline_tokens_per_s"] = base["tokens_per_s"]
        r["scaling"] = r["tokens_per_s"] / base["tokens_per_s"] if base["tokens_per_s"] else None
        r["errors"] += base["errors"]
        r["lost"] += base["lost"]
        print(f"\naggregate tokens/s: {r['tokens_per_s']:.1f} with {a.concurrency} clients vs "
              f"{base['tokens_per_s']:.1f} with 1 client = {r['scaling'] or 0:.2f}x")
    if a.compare_out_dir:
        print()
        print(format_comparison(compare_with_in_process(a.url, a.compare_out_dir, payload), payload))
    if a.json:
        print(json.dumps(r))
    return 0 if r["errors"] == 0 and r["lost"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
