"""Decoding: what a step computes from the logits (sampling), how it runs (step: the runtime; stepper: one
batch's cache), the token loop, beam search and the text streamer. `lmforge.generator.Generator` is text in,
text out over these."""

from lmforge.decoding.loop import generate, greedy, stream_tokens
from lmforge.decoding.sampling import (
    GenerationConfig,
    apply_repetition_penalty,
    ban_repeated_ngrams,
    filter_logits,
    next_token,
)
from lmforge.decoding.search import beam_search
from lmforge.decoding.speculative import (
    SPECULATIVE_CHOICES,
    SpeculativeOptions,
    speculative_generate,
    speculative_tokens,
)
from lmforge.decoding.step import (
    AUTO_COMPILE_STEPS,
    AUTO_TRACE_STEPS,
    CACHE_BUCKET,
    COMPILE_CHOICES,
    DecodeOptions,
    DecodeRuntime,
    cache_bucket,
    compiler_missing,
    describe_decode_step,
    static_step_unsupported,
)
from lmforge.decoding.stepper import Stepper
from lmforge.decoding.stream import TextStreamer

__all__ = [
    "AUTO_COMPILE_STEPS", "AUTO_TRACE_STEPS", "CACHE_BUCKET", "COMPILE_CHOICES", "DecodeOptions", "DecodeRuntime",
    "GenerationConfig", "SPECULATIVE_CHOICES", "SpeculativeOptions", "Stepper", "TextStreamer",
    "apply_repetition_penalty", "ban_repeated_ngrams",
    "beam_search", "cache_bucket", "compiler_missing", "describe_decode_step", "filter_logits", "generate",
    "greedy", "next_token", "speculative_generate", "speculative_tokens", "static_step_unsupported",
    "stream_tokens",
]
