"""One inference engine: the KV cache, sampling, batched decoding and the compiled step, used by GPT.generate,
minilm.sample, minilm.evaluate, minilm.bench and minilm.serve."""

from minilm.inference.compiled import CompilerMissing, check_compiler
from minilm.inference.engine import Decoder, generate, generate_stream
from minilm.inference.sampling import check_sampling_args, sample_next, sample_token

__all__ = ["CompilerMissing", "Decoder", "check_compiler", "check_sampling_args", "generate", "generate_stream",
           "sample_next", "sample_token"]
