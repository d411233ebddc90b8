"""minilm: a small, readable GPT you can train, evaluate and serve (see README.md)."""
