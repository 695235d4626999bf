"""`gpt2 ppl`: perplexity of a text file under a published protocol, and KL divergence to a base model.

Protocols (design doc section 5):

- `hf`: transformers' "Perplexity of fixed-length models" recipe. Windows of `ctx` tokens start every `stride`
  tokens; a window scores the tokens after the previous window's end, except its own first token, which is
  never a target because the labels are shifted by one. The recipe averages each window's mean NLL weighted
  by `trg_len - 1` (it subtracts the label shift from every window, even one whose first token was not a
  target anyway); we do the same so the number equals transformers' for any stride. With `stride == ctx`
  this is exact; with overlapping windows it differs from the plain per-token mean by one token's weight per
  window. A final window of one token (possible with `stride == ctx`) has nothing to score and is skipped
  (the recipe would average an empty loss to NaN there).
- `llama`: llama-perplexity's default. Non-overlapping chunks of `ctx` tokens, the KV cache cleared per chunk,
  logits of positions ctx/2 .. ctx-2 scoring the next token (ctx - ctx/2 - 1 tokens per chunk); trailing
  tokens that do not fill a chunk are dropped. No BOS is added (GPT-2's vocab does not ask for one).

Every window is one batched prefill of its tokens but the last (which is only a target), and `logits_from`
keeps the output head to the scored positions. NLLs are log-softmax with the max subtracted, summed in f64.
"""

from __future__ import annotations

import codecs
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import regex

from gpt2cli.errors import Gpt2Error
from gpt2cli.model import GPT2Model
from gpt2cli.tokenizer import Tokenizer

PROTOCOLS = ("hf", "llama")
# llama-perplexity's default n_ctx; the hf default is the model's whole context, as in the recipe.
LLAMA_DEFAULT_CTX = 512
READ_BLOCK_BYTES = 1 << 20
# Rows of logits turned into probabilities at a time: bounds the f64 temporaries to ~25 MB for GPT-2's vocab.
SOFTMAX_ROWS = 64
# A non-space followed by a space: no pre-tokenizer piece spans it, and none looks across it (the only
# lookahead, `\s+(?!\S)`, ends inside whitespace), so text cut there tokenizes exactly as the whole text.
SAFE_CUT = regex.compile(r"(?r)\S\s")


@dataclass(frozen=True)
class PplSettings:
    protocol: str  # "hf" or "llama"
    ctx: int  # tokens per window (hf) or chunk (llama)
    stride: int  # hf: tokens between window starts; llama: ctx (chunks do not overlap)

    @classmethod
    def resolve(
        cls, protocol: str, model_ctx: int, ctx: int | None = None, stride: int | None = None
    ) -> PplSettings:
        """Defaults and checks: hf ctx = the model's context, stride = ctx/2; llama ctx = 512 (llama's)."""
        if protocol not in PROTOCOLS:
            raise Gpt2Error(f"--protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
        if ctx is None:
            ctx = model_ctx if protocol == "hf" else min(LLAMA_DEFAULT_CTX, model_ctx)
        min_ctx = 2 if protocol == "hf" else 3
        if not min_ctx <= ctx <= model_ctx:
            raise Gpt2Error(f"--ctx must be between {min_ctx} and the model's context {model_ctx}, got {ctx}")
        if protocol == "llama":
            if stride is not None and stride != ctx:
                raise Gpt2Error("--stride applies to --protocol hf only: llama chunks never overlap")
            return cls(protocol, ctx, ctx)
        if stride is None:
            stride = max(1, ctx // 2)
        if not 1 <= stride <= ctx:
            raise Gpt2Error(f"--stride must be between 1 and --ctx ({ctx}), got {stride}")
        return cls(protocol, ctx, stride)

    def describe(self) -> str:
        if self.protocol == "hf":
            return (
                f"hf (transformers' fixed-length recipe: windows of {self.ctx} tokens every {self.stride}, "
                "each token scored once)"
            )
        return (
            f"llama (llama-perplexity: chunks of {self.ctx} tokens, KV cache cleared per chunk, "
            f"last {self.ctx - self.ctx // 2 - 1} tokens of each scored)"
        )


@dataclass(frozen=True)
class Window:
    begin: int  # first input token
    end: int  # one past the last token; the last token is only a target
    score_from: int  # first target; targets are ids[score_from:end], each predicted from the token before
    weight: int  # how much the window's mean NLL counts: hf's `trg_len - 1`, llama's number of targets


def plan_windows(n_tokens: int, settings: PplSettings) -> list[Window]:
    """The windows a protocol evaluates on `n_tokens` tokens; Gpt2Error if there is nothing to score."""
    if n_tokens < 2:
        raise Gpt2Error(f"the text has {n_tokens} token{'s' * (n_tokens != 1)}: perplexity needs at least 2")
    ctx, stride = settings.ctx, settings.stride
    if settings.protocol == "llama":
        if n_tokens < ctx:
            raise Gpt2Error(
                f"--protocol llama needs at least one full chunk of --ctx {ctx} tokens, "
                f"the text has {n_tokens}: lower --ctx or use --protocol hf"
            )
        first = ctx // 2
        return [
            Window(begin, begin + ctx, begin + first + 1, ctx - first - 1)
            for begin in range(0, n_tokens - ctx + 1, ctx)
        ]
    windows, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + ctx, n_tokens)
        score_from = max(prev_end, begin + 1)
        if score_from < end:
            windows.append(Window(begin, end, score_from, end - prev_end - 1))
        prev_end = end
        if end == n_tokens:
            break
    return windows


@dataclass(frozen=True)
class KLDStats:
    """How a model's next-token distributions differ from a base model's on the same scored positions.

    Matches llama-perplexity's `--kl-divergence` report, computed exactly (llama stores the base log-probs
    as 16-bit values and skips base probabilities below e^-16).
    """

    tokens: int  # scored positions
    mean_kld: float  # mean over positions of KL(base || model) = sum_v p_base (log p_base - log p), nats
    mean_kld_uncertainty: float  # standard error of the mean
    kld_99: float  # 99th percentile of the per-position KLD (linear interpolation, as llama)
    max_kld: float
    same_top: float  # fraction of positions where both models' most likely token is the same
    mean_delta_p: float  # mean of p(correct token) - p_base(correct token)
    rms_delta_p: float
    ppl: float  # the model's perplexity on these windows (the protocol's weighting)
    ppl_base: float


@dataclass(frozen=True)
class PerplexityResult:
    settings: PplSettings
    windows: int
    tokens: int  # scored tokens
    evaluated_tokens: int  # tokens run through the model (inputs of every window)
    mean_nll: float  # nats per token, weighted as the protocol does
    ppl: float
    ppl_uncertainty: float  # llama's: ppl * sqrt(var(nll) / (tokens - 1)); nan with fewer than 2 tokens
    bits_per_byte: float | None  # sum of NLL / ln 2 / UTF-8 bytes of the scored tokens
    scored_bytes: int | None
    seconds: float  # model time (both models with a base), tokenization excluded
    compute: str  # what the model's batches computed with (GPT2Model.batch_compute)
    kld: KLDStats | None = None

    @property
    def tokens_per_second(self) -> float:
        return self.evaluated_tokens / self.seconds if self.seconds > 0 else math.inf


ProgressCallback = Callable[[int, int, float], None]  # (windows done, windows in all, running perplexity)


def tokenize_file(
    path: str | Path, tokenizer: Tokenizer, *, errors: str = "strict", max_tokens: int | None = None
) -> np.ndarray:
    """Token ids (int64 [n]) of a UTF-8 text file, CRLF read as LF, everything else (empty lines, a missing
    final newline) kept as is.

    The file is read and tokenized a block at a time, cut where tokenization cannot change, so a large file
    is never held twice and `max_tokens` stops reading early. `errors="strict"` fails on invalid UTF-8 naming
    the byte offset; "replace" reads each bad sequence as U+FFFD.
    """
    if errors not in ("strict", "replace"):
        raise Gpt2Error(f"--errors must be strict or replace, got {errors!r}")
    if max_tokens is not None and max_tokens < 2:
        raise Gpt2Error(f"--max-tokens must be at least 2, got {max_tokens}")
    decoder = codecs.getincrementaldecoder("utf-8")(errors=errors)
    ids: list[int] = []
    pending = ""  # decoded, CRLF already LF, not yet tokenized
    held = ""  # a CR that may be the first half of a CRLF split across blocks
    read = 0
    with open(path, "rb") as f:
        while max_tokens is None or len(ids) < max_tokens:
            block = f.read(READ_BLOCK_BYTES)
            final = not block
            buffered = len(decoder.getstate()[0])
            try:
                text = held + decoder.decode(block, final)
            except UnicodeDecodeError as e:
                offset = read - buffered + e.start
                raise Gpt2Error(
                    f"{path}: invalid UTF-8 at byte {offset} (0x{e.object[e.start]:02x}); "
                    "--errors replace reads it as U+FFFD"
                ) from None
            read += len(block)
            held = "\r" if text.endswith("\r") and not final else ""
            # Each decoded character goes through the CRLF replacement exactly once.
            pending += text[: len(text) - len(held)].replace("\r\n", "\n")
            cut = len(pending) if final else _last_safe_cut(pending)
            ids.extend(tokenizer.encode(pending[:cut]))
            pending = pending[cut:]
            if final:
                break
    return np.asarray(ids[:max_tokens], dtype=np.int64)


def _last_safe_cut(text: str) -> int:
    m = SAFE_CUT.search(text)
    return 0 if m is None else m.start() + 1


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """-log softmax(logits)[target] per row: f32 [m, vocab], int [m] -> f64 [m]."""
    nll = np.empty(len(targets), dtype=np.float64)
    for r0 in range(0, len(targets), SOFTMAX_ROWS):
        rows = logits[r0 : r0 + SOFTMAX_ROWS]
        shifted = rows - rows.max(axis=1, keepdims=True)
        log_sum = np.log(np.exp(shifted).sum(axis=1, dtype=np.float64))
        nll[r0 : r0 + len(rows)] = log_sum - shifted[np.arange(len(rows)), targets[r0 : r0 + SOFTMAX_ROWS]]
    return nll


def _log_softmax(rows: np.ndarray) -> np.ndarray:  # f32 [m, vocab] -> f64 [m, vocab]
    shifted = rows.astype(np.float64)
    shifted -= shifted.max(axis=1, keepdims=True)
    shifted -= np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return shifted


def _kl_rows(logits: np.ndarray, base_logits: np.ndarray) -> np.ndarray:
    """KL(base || model) per row: f32 [m, vocab] twice -> f64 [m]."""
    kld = np.empty(len(logits), dtype=np.float64)
    for r0 in range(0, len(logits), SOFTMAX_ROWS):
        log_p = _log_softmax(logits[r0 : r0 + SOFTMAX_ROWS])
        log_p_base = _log_softmax(base_logits[r0 : r0 + SOFTMAX_ROWS])
        kld[r0 : r0 + len(log_p)] = (np.exp(log_p_base) * (log_p_base - log_p)).sum(axis=1)
    return kld


def _window_logits(model: GPT2Model, cache, ids: np.ndarray, w: Window) -> np.ndarray:
    """Logits [end - score_from, vocab] of the positions that predict the window's targets."""
    cache.reset()
    return model.forward(ids[w.begin : w.end - 1], cache, logits_from=w.score_from - 1 - w.begin)


def _exp(nll: float) -> float:  # perplexity of a mean NLL; a hopeless model gives inf, not OverflowError
    return math.exp(nll) if nll < 709.0 else math.inf


def _mean_and_uncertainty(values: np.ndarray) -> tuple[float, float]:
    """Mean and its standard error as llama-perplexity computes them: sqrt((E[x^2] - E[x]^2) / (n - 1))."""
    mean = float(values.mean())
    if len(values) < 2:
        return mean, math.nan
    var = max(float(np.mean(values * values)) - mean * mean, 0.0)
    return mean, math.sqrt(var / (len(values) - 1))


def perplexity(
    model: GPT2Model,
    ids: np.ndarray,
    settings: PplSettings,
    *,
    tokenizer: Tokenizer | None = None,
    base: GPT2Model | None = None,
    progress: ProgressCallback | None = None,
) -> PerplexityResult:
    """Perplexity of `model` on token ids `ids` (int [n]) under `settings`.

    With `tokenizer`, also bits per byte. With `base`, both models run on the same windows and the result
    carries `kld`, the model's divergence from `base`. `progress` is called after every window.
    """
    if base is not None and base.config.n_vocab != model.config.n_vocab:
        raise Gpt2Error(
            f"vocabularies differ: {model.config.n_vocab} tokens vs the base's {base.config.n_vocab}"
        )
    ids = np.asarray(ids, dtype=np.int64)
    windows = plan_windows(len(ids), settings)
    cache = model.new_cache(settings.ctx)
    base_cache = base.new_cache(settings.ctx) if base is not None else None
    nll_parts, base_nll_parts, kld_parts, same_top_parts = [], [], [], []
    weighted_nll = weighted_base_nll = 0.0
    weights = 0
    seconds = 0.0
    for i, w in enumerate(windows):
        t0 = time.perf_counter()
        targets = ids[w.score_from : w.end]
        logits = _window_logits(model, cache, ids, w)
        nll = token_nll(logits, targets)
        weighted_nll += w.weight * float(nll.mean())
        weights += w.weight
        nll_parts.append(nll)
        if base is not None:
            base_logits = _window_logits(base, base_cache, ids, w)
            base_nll = token_nll(base_logits, targets)
            weighted_base_nll += w.weight * float(base_nll.mean())
            base_nll_parts.append(base_nll)
            kld_parts.append(_kl_rows(logits, base_logits))
            same_top_parts.append(logits.argmax(axis=1) == base_logits.argmax(axis=1))
        seconds += time.perf_counter() - t0
        if progress is not None:
            progress(i + 1, len(windows), _exp(weighted_nll / weights) if weights else math.nan)

    nll = np.concatenate(nll_parts)
    mean_nll = weighted_nll / weights
    ppl = _exp(mean_nll)
    _, nll_uncertainty = _mean_and_uncertainty(nll)
    bits_per_byte = scored_bytes = None
    if tokenizer is not None:
        byte_lengths = np.array([len(tokenizer.token_bytes(t)) for t in range(tokenizer.n_vocab)])
        scored = np.concatenate([ids[w.score_from : w.end] for w in windows])
        scored_bytes = int(byte_lengths[scored].sum())
        bits_per_byte = float(nll.sum()) / math.log(2) / scored_bytes if scored_bytes else math.nan
    kld = None
    if base is not None:
        base_nll = np.concatenate(base_nll_parts)
        kld_values = np.concatenate(kld_parts)
        delta_p = np.exp(-nll) - np.exp(-base_nll)
        mean_kld, mean_kld_uncertainty = _mean_and_uncertainty(kld_values)
        kld = KLDStats(
            tokens=len(nll),
            mean_kld=mean_kld,
            mean_kld_uncertainty=mean_kld_uncertainty,
            kld_99=float(np.percentile(kld_values, 99)),
            max_kld=float(kld_values.max()),
            same_top=float(np.concatenate(same_top_parts).mean()),
            mean_delta_p=float(delta_p.mean()),
            rms_delta_p=float(np.sqrt(np.mean(delta_p * delta_p))),
            ppl=ppl,
            ppl_base=_exp(weighted_base_nll / weights),
        )
    return PerplexityResult(
        settings=settings,
        windows=len(windows),
        tokens=len(nll),
        evaluated_tokens=sum(w.end - 1 - w.begin for w in windows),
        mean_nll=mean_nll,
        ppl=ppl,
        ppl_uncertainty=ppl * nll_uncertainty,
        bits_per_byte=bits_per_byte,
        scored_bytes=scored_bytes,
        seconds=seconds,
        compute=model.batch_compute(max((w.end - 1 - w.begin for w in windows), default=0)),
        kld=kld,
    )


def compare_models(
    model: GPT2Model,
    base: GPT2Model,
    ids: np.ndarray,
    ctx: int,
    stride: int | None = None,
    protocol: str = "llama",
    progress: ProgressCallback | None = None,
) -> KLDStats:
    """KL divergence of `model` from `base` (e.g. a quantized model from its f32/f16 original).

    Both run on the same windows of token ids `ids` (int [n]); `ctx`, `stride` and `protocol` mean what
    `gpt2 ppl`'s options do (stride only for "hf"; default ctx/2). llama-perplexity's `--kl-divergence`
    uses the llama protocol, hence the default. Raises Gpt2Error for bad settings or too few tokens.
    """
    model_ctx = min(model.config.n_ctx, base.config.n_ctx)
    settings = PplSettings.resolve(protocol, model_ctx, ctx, stride)
    result = perplexity(model, ids, settings, base=base, progress=progress)
    assert result.kld is not None
    return result.kld


def _finite(x: float | None) -> float | None:
    return x if x is None or math.isfinite(x) else None


def result_dict(result: PerplexityResult) -> dict:
    """The result as one JSON-ready object (NaN and infinity become null)."""
    s = result.settings
    out = {
        "protocol": s.protocol,
        "ctx": s.ctx,
        "stride": s.stride,
        "windows": result.windows,
        "tokens": result.tokens,
        "evaluated_tokens": result.evaluated_tokens,
        "ppl": _finite(result.ppl),
        "ppl_uncertainty": _finite(result.ppl_uncertainty),
        "mean_nll": result.mean_nll,
        "bits_per_byte": _finite(result.bits_per_byte),
        "scored_bytes": result.scored_bytes,
        "seconds": result.seconds,
        "tokens_per_second": _finite(result.tokens_per_second),
        "compute": result.compute,
    }
    if result.kld is not None:
        out["kl_divergence"] = {k: _finite(v) for k, v in vars(result.kld).items()}
    return out


def format_report(result: PerplexityResult) -> list[str]:
    """The human-readable report, one line per figure."""
    s = result.settings
    lines = [f"protocol      {s.describe()}"]
    if s.protocol == "hf" and result.windows == 1 and result.evaluated_tokens + 1 < s.ctx:
        lines.append(
            f"note          the text has {result.evaluated_tokens + 1} tokens, fewer than --ctx: one window"
        )
    lines += [
        f"perplexity    {result.ppl:.4f} +/- {result.ppl_uncertainty:.4f}",
        f"mean NLL      {result.mean_nll:.4f} nats/token",
    ]
    if result.bits_per_byte is not None:
        lines.append(
            f"bits per byte {result.bits_per_byte:.4f} "
            f"(NLL of the scored tokens / their {result.scored_bytes:,} UTF-8 bytes)"
        )
    lines.append(
        f"tokens        {result.tokens:,} scored in {result.windows:,} windows; "
        f"{result.evaluated_tokens:,} evaluated in {result.seconds:.1f} s "
        f"({result.tokens_per_second:,.0f} tokens/s)"
    )
    lines.append(f"compute       {result.compute}")
    k = result.kld
    if k is not None:
        lines += [
            f"base ppl      {k.ppl_base:.4f} (ppl ratio {k.ppl / k.ppl_base:.4f})",
            f"mean KLD      {k.mean_kld:.6f} +/- {k.mean_kld_uncertainty:.6f}",
            f"99% KLD       {k.kld_99:.6f} (max {k.max_kld:.6f})",
            f"same top p    {100 * k.same_top:.3f}%",
            f"mean delta-p  {100 * k.mean_delta_p:+.3f}% (RMS {100 * k.rms_delta_p:.3f}%)",
        ]
    return lines
