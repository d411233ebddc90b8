"""Mixed precision, activation checkpointing, gradient accumulation and DDP built from scratch on minilm's GPT.

    from efficient_training.amp import LossScaler
    from efficient_training.checkpointing import checkpoint, apply_checkpointing
    from efficient_training.accumulation import accumulate_gradients
    from efficient_training.ddp import DDP, ZeroOptimizer, setup, shard

Each module is proven equal to PyTorch's own in tests/test_efficient_*.py; `python -m efficient_training.bench`
measures what each one buys on the current device.
"""
