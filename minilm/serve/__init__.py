"""Serve a trained run over HTTP: `python -m minilm.serve --out_dir out/tiny`, then open http://127.0.0.1:8000/.

create_app(out_dir) builds the FastAPI app; loadtest measures it (`python -m minilm.serve.loadtest --url ...`).
"""

from minilm.serve.app import GenerateRequest, create_app, serve_in_thread

__all__ = ["GenerateRequest", "create_app", "serve_in_thread"]
