"""Run the inference server.

    python -m minilm.serve --out_dir out/tiny                  # http://127.0.0.1:8000/ (loopback only)
    python -m minilm.serve --out_dir out/tiny --port 8080 --max_concurrency 8 --max_queue 32 --weights int8
"""

from __future__ import annotations

import argparse
import sys

from minilm.quantize import WEIGHTS


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m minilm.serve", description="Serve a minilm run over HTTP")
    p.add_argument("--out_dir", required=True, help="run directory holding ckpt.pt (or a checkpoint file)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind; 0.0.0.0 exposes the server to the network")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default="cpu", help="cpu | cuda | mps | auto")
    p.add_argument("--best", action="store_true", help="serve ckpt_best.pt instead of the last checkpoint")
    p.add_argument("--data_dir", default=None, help="override the data dir (tokenizer) the run was trained on")
    p.add_argument("--max_concurrency", type=int, default=8, help="generations decoding together in one batch")
    p.add_argument("--max_queue", type=int, default=32, help="requests that may wait for a worker before 503")
    p.add_argument("--max_new_tokens_cap", type=int, default=512, help="largest max_new_tokens a request may ask")
    p.add_argument("--request_timeout", type=float, default=300.0,
                   help="seconds a request may take, queue included, before it is stopped with 504")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads of the batching thread")
    p.add_argument("--weights", default="fp32", choices=WEIGHTS, help="weight format (bf16/int8/w8a8: faster decoding)")
    p.add_argument("--log_level", default="info")
    a = p.parse_args(argv)
    if not 0 <= a.port <= 65535:
        p.error(f"--port {a.port} is not a TCP port (0-65535)")

    import uvicorn

    from minilm.checkpoint import CheckpointError
    from minilm.data import DataError
    from minilm.serve.app import create_app

    try:
        app = create_app(a.out_dir, a.device, best=a.best, data_dir=a.data_dir, max_concurrency=a.max_concurrency,
                         max_queue=a.max_queue, max_new_tokens_cap=a.max_new_tokens_cap,
                         threads=a.threads, weights=a.weights, request_timeout=a.request_timeout)
    except (CheckpointError, DataError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: binding {a.host} makes the API reachable from other machines; it has no authentication",
              file=sys.stderr)
    print(f"serving {a.out_dir} at http://{a.host}:{a.port}/ (playground), POST /v1/generate, GET /metrics",
          flush=True)
    uvicorn.run(app, host=a.host, port=a.port, log_level=a.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
