"""OpenAI's completions API on top of the engine: the request's fields, the log-probability payload, the errors.

The route itself lives in minilm.serve.app (it shares the queue, the limits and the metrics); this module holds the
parts that are plain functions of their inputs:

    CompletionRequest      the body of POST /v1/completions, OpenAI's fields and defaults
    TokenText(tokenizer)   each token id's text (as OpenAI shows it) and its bytes, for `tokens` and `text_offset`
    logprobs_payload(...)  {"tokens", "token_logprobs", "top_logprobs", "text_offset"} for one choice
    openai_error(...)      {"error": {"message", "type", "param", "code"}}, the shape OpenAI's clients read

Log-probabilities are the model's raw ones (log_softmax of its logits, before temperature, top-p or a penalty),
computed from the logits of the forward passes that produce the tokens: the prompt's from its prefill, each
sampled token's from the step that sampled it.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

MAX_LOGPROBS = 5  # OpenAI's limit for the legacy completions API


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = Field(False, strict=True)


class CompletionRequest(BaseModel):
    """The body of POST /v1/completions: OpenAI's fields and defaults (no suffix, best_of or penalties)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="echoed back; this server has one model")
    # A string, several strings, token ids, or several lists of token ids (a batch: one choice per prompt and n).
    prompt: str | list[str] | list[int] | list[list[int]] = Field(description="text or token ids to continue")
    max_tokens: int = Field(16, ge=0, strict=True, description="0 with echo scores the prompt")
    temperature: float = Field(1.0, ge=0.0, le=2.0, strict=True, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0.0, le=1.0, strict=True, allow_inf_nan=False)
    stop: str | list[str] | None = Field(None, max_length=4)
    seed: int | None = Field(None, ge=0, le=2**63 - 1, strict=True,
                             description="choice j of each prompt samples with seed + j")
    stream: bool = Field(False, strict=True)
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=16, strict=True, description="choices per prompt")
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, strict=True,
                                 description="log-probabilities of the chosen token and the top alternatives")
    echo: bool = Field(False, strict=True, description="return the prompt (and its logprobs) before the completion")
    user: str | None = None


def byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: the printable character a byte-level BPE uses for each byte."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


class TokenText:
    """Each id's bytes (what it adds to the decoded text; nothing for special tokens, as decode() skips them)
    and its display string: the text when the bytes are whole UTF-8, else "bytes:\\xe2\\x80" as OpenAI writes it."""

    def __init__(self, tokenizer):
        vocab = tokenizer.get_vocab_size(with_added_tokens=True)
        special = {i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
        byte_level = type(tokenizer.decoder).__name__ == "ByteLevel"
        table = byte_decoder()
        self.bytes: list[bytes] = []
        self.strings: list[str] = []
        for i in range(vocab):
            piece = tokenizer.id_to_token(i) or ""
            if i in special:
                b, s = b"", piece
            else:
                b = bytes(table[c] for c in piece) if byte_level and all(c in table for c in piece) \
                    else tokenizer.decode([i]).encode("utf-8")
                try:
                    s = b.decode("utf-8")
                except UnicodeDecodeError:
                    s = "bytes:" + "".join(f"\\x{x:02x}" for x in b)
            self.bytes.append(b)
            self.strings.append(s)

    def offsets(self, ids: list[int], start: int = 0) -> list[int]:
        """Character offset of each token in the decoded text, counting from `start`.

        A character is counted where its first byte is: a token that begins mid-character gets the offset of
        the next whole one, and the split character belongs to the token holding its first byte.
        """
        out, chars = [], start
        for i in ids:
            out.append(chars)
            chars += sum(1 for x in self.bytes[i] if x & 0xC0 != 0x80)  # bytes that start a UTF-8 character
        return out


def logprobs_payload(text: TokenText, ids: list[int], logprobs: list[float | None],
                     tops: list[list[tuple[int, float]] | None], start: int = 0) -> dict:
    """OpenAI's `logprobs` object for tokens `ids` whose text starts at character `start` of the choice's text.

    tops[i] holds the top alternatives (id, logprob); the chosen token is added when it is not among them, so a
    dict has up to logprobs + 1 entries, as OpenAI documents. None (a prompt's first token) stays None.
    """
    top_logprobs = []
    for tok, lp, top in zip(ids, logprobs, tops):
        if top is None:
            top_logprobs.append(None)
            continue
        d = {text.strings[t]: v for t, v in top}
        d.setdefault(text.strings[tok], lp)
        top_logprobs.append(d)
    return {"tokens": [text.strings[t] for t in ids], "token_logprobs": list(logprobs),
            "top_logprobs": top_logprobs, "text_offset": text.offsets(ids, start)}


def merge_logprobs(parts: list[dict]) -> dict | None:
    """Concatenate logprobs payloads (the prompt's and the completion's)."""
    if not parts:
        return None
    return {k: [v for p in parts for v in p[k]] for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}


def openai_error(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    """The body OpenAI's API (and so its clients) use for a failure."""
    kind = ("invalid_request_error" if status < 500 else
            "server_overloaded" if status == 503 else "timeout" if status == 504 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
