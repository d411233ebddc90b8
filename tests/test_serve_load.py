"""Load test on loopback: `python -m minilm.serve` in its own process, 8 concurrent clients, 200 requests."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from minilm.serve import loadtest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server_url(tiny_run):
    """The real CLI: `python -m minilm.serve --out_dir RUN --port P` as a subprocess."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "minilm.serve", "--out_dir", str(tiny_run), "--port", str(port),
                             "--log_level", "warning"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"server did not come up: {proc.communicate()[0][-2000:]}")
        time.sleep(0.1)
    yield url, proc
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)


def test_cli_refuses_a_missing_run(tmp_path, capsys):
    from minilm.serve.__main__ import main

    assert main(["--out_dir", str(tmp_path / "nope")]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_200_requests_from_8_clients_no_errors_none_lost(server_url, capsys):
    url, proc = server_url
    before = httpx.get(f"{url}/metrics").text
    code = loadtest.main(["--url", url, "--concurrency", "8", "--requests", "200", "--max_new_tokens", "8",
                          "--json"])
    out = capsys.readouterr().out
    print(out)  # the table, visible with pytest -s
    result = json.loads(out.strip().splitlines()[-1])
    assert code == 0
    assert result["ok"] == 200 and result["errors"] == 0 and result["lost"] == 0
    assert result["status_counts"] == {"200": 200}
    assert 0 < result["p50_ms"] <= result["p95_ms"] <= result["p99_ms"]
    assert result["tokens"] > 0 and result["tokens_per_s"] > 0
    assert "p99 ms" in out and "tokens/s" in out

    # The server's own books agree: every request was served exactly once, none failed.
    after = httpx.get(f"{url}/metrics").text

    def count(text: str, series: str) -> float:
        m = re.search(rf"^{re.escape(series)} (\S+)$", text, re.M)
        return float(m.group(1)) if m else 0.0

    ok = 'minilm_generations_total{stream="false",outcome="ok"}'
    assert count(after, ok) - count(before, ok) == 200
    assert count(after, "minilm_generated_tokens_total") - count(before, "minilm_generated_tokens_total") == \
        result["tokens"]
    for kind in ("bad_request", "overloaded", "internal", "generation"):
        assert count(after, f'minilm_errors_total{{kind="{kind}"}}') == 0
    assert proc.poll() is None  # still serving


def test_baseline_run_reports_the_batching_gain(server_url, capsys):
    url, _ = server_url
    count = lambda text, name: float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))
    before = httpx.get(f"{url}/metrics").text
    code = loadtest.main(["--url", url, "--concurrency", "8", "--requests", "32", "--max_new_tokens", "8",
                          "--baseline", "--baseline_requests", "4", "--json"])
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    assert code == 0 and result["errors"] == 0 and result["lost"] == 0
    assert result["baseline_tokens_per_s"] > 0
    assert result["scaling"] == result["tokens_per_s"] / result["baseline_tokens_per_s"]
    assert "with 8 clients vs" in out and "with 1 client" in out
    after = httpx.get(f"{url}/metrics").text
    steps = count(after, "minilm_batch_steps_total") - count(before, "minilm_batch_steps_total")
    rows = count(after, "minilm_batch_rows_total") - count(before, "minilm_batch_rows_total")
    assert rows > steps > 0  # the 8 clients' requests shared decode steps


def test_comparison_with_in_process_sampling(server_url, tiny_run):
    url, _ = server_url
    payload = {"prompt": "def ", "max_new_tokens": 8, "temperature": 0.8, "top_k": 50}
    c = loadtest.compare_with_in_process(url, str(tiny_run), payload, n=3)
    assert c["same_text"] == 3  # the server and minilm.sample agree request by request
    assert c["tokens"] > 0 and c["server_s"] > 0 and c["in_process_s"] > 0
    table = loadtest.format_comparison(c, payload)
    assert "in-process generate_text" in table and "HTTP server" in table


def test_streaming_load_and_clean_shutdown(server_url):
    url, proc = server_url
    import asyncio

    result = asyncio.run(loadtest.run_load(url, concurrency=4, requests=24, stream=True,
                                           payload={"prompt": "class ", "max_new_tokens": 8}))
    assert result["ok"] == 24 and result["errors"] == 0 and result["lost"] == 0
    assert result["ttft_p50_ms"] is not None and result["ttft_p50_ms"] <= result["p50_ms"]
    proc.send_signal(signal.SIGINT)  # Ctrl-C: uvicorn shuts down gracefully
    assert proc.wait(timeout=30) == 0


def test_loadtest_cli_explains_a_missing_server(capsys):
    code = loadtest.main(["--url", f"http://127.0.0.1:{free_port()}", "--requests", "1"])
    assert code == 2 and "no server answering" in capsys.readouterr().err
