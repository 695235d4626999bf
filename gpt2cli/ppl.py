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
- `lm-eval`: lm-evaluation-harness's `wikitext` task (lm_eval/tasks/wikitext). The file is split into
  documents at its top-level ` = Title = ` headings as the EleutherAI/wikitext_document_level dataset does,
  each document goes through the WikiText detokenizer of the GPT-2 paper, and its tokens after
  `<|endoftext|>` are scored by `loglikelihood_rolling`: disjoint windows of `ctx` targets, the first after
  the prefix token, each later one after as many preceding tokens as fill the context. The task reports word
  perplexity, byte perplexity and bits per byte of the summed NLL over the words (runs of whitespace + 1)
  and UTF-8 bytes of each document before detokenization.

Besides per-token perplexity every protocol reports those three figures; for `hf` and `llama` they count
the NLL of the scored tokens over the UTF-8 bytes of those tokens and the whitespace-delimited words that
start in them. Every sum is additive over windows, so shards of the windows (`--shard K/N`) merge into the
numbers of one run.

Every window is one batched prefill of its tokens but the last (which is only a target), and `logits_from`
keeps the output head to the scored positions. NLLs are log-softmax with the max subtracted, summed in f64.
"""

from __future__ import annotations

import codecs
import math
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from gpt2cli.errors import Gpt2Error
from gpt2cli.kernels import ops
from gpt2cli.model import GPT2Model
from gpt2cli.texts import WHOLE_RUN, Shard, decode_utf8
from gpt2cli.tokenizer import Tokenizer

PROTOCOLS = ("hf", "llama", "lm-eval")
# llama-perplexity's default n_ctx; the hf default is the model's whole context, as in the recipe.
LLAMA_DEFAULT_CTX = 512
READ_BLOCK_BYTES = 1 << 20
# Rows of logits turned into probabilities at a time: bounds the f64 temporaries to ~25 MB for GPT-2's vocab.
SOFTMAX_ROWS = 64


@dataclass(frozen=True)
class PplSettings:
    protocol: str  # "hf", "llama" or "lm-eval"
    ctx: int  # tokens per window (hf, lm-eval) or chunk (llama)
    stride: int  # hf: tokens between window starts; llama, lm-eval: ctx

    @classmethod
    def resolve(
        cls, protocol: str, model_ctx: int, ctx: int | None = None, stride: int | None = None
    ) -> PplSettings:
        """Defaults and checks: hf ctx = the model's context, stride = ctx/2; llama ctx = 512 (llama's);
        lm-eval ctx = the model's context (lm-eval's `max_length`)."""
        if protocol not in PROTOCOLS:
            raise Gpt2Error(f"--protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
        if ctx is None:
            ctx = min(LLAMA_DEFAULT_CTX, model_ctx) if protocol == "llama" else model_ctx
        min_ctx = {"hf": 2, "llama": 3, "lm-eval": 1}[protocol]
        if not min_ctx <= ctx <= model_ctx:
            raise Gpt2Error(f"--ctx must be between {min_ctx} and the model's context {model_ctx}, got {ctx}")
        if protocol != "hf":
            if stride is not None and stride != ctx:
                raise Gpt2Error(f"--stride applies to --protocol hf only, not {protocol}")
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
        if self.protocol == "lm-eval":
            return (
                "lm-eval (lm-evaluation-harness's wikitext task: documents at ' = Title = ' headings, "
                f"detokenized, every token after <|endoftext|> scored in rolling windows of {self.ctx})"
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
class PplTotals:
    """Sums over windows that every reported figure derives from: shards of a run add up to the run."""

    windows: int = 0
    tokens: int = 0  # scored tokens
    evaluated_tokens: int = 0  # tokens run through the model (inputs of every window)
    weighted_nll: float = 0.0  # sum over windows of weight x mean NLL
    weights: int = 0
    nll: float = 0.0  # nats, summed over the scored tokens
    nll_squared: float = 0.0
    text_bytes: int = 0  # UTF-8 bytes of the text the scored tokens account for
    words: int = 0  # and its words
    seconds: float = 0.0

    def __add__(self, other: PplTotals) -> PplTotals:
        return PplTotals(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))


@dataclass(frozen=True)
class PerplexityResult:
    settings: PplSettings
    windows: int
    tokens: int  # scored tokens
    evaluated_tokens: int  # tokens run through the model (inputs of every window)
    mean_nll: float  # nats per token, weighted as the protocol does
    ppl: float
    ppl_uncertainty: float  # llama's: ppl * sqrt(var(nll) / (tokens - 1)); nan with fewer than 2 tokens
    bits_per_byte: float | None  # total NLL / ln 2 / UTF-8 bytes (see the module docstring for which)
    scored_bytes: int | None
    seconds: float  # model time (both models with a base), tokenization excluded
    compute: str  # what the model's batches computed with (GPT2Model.batch_compute)
    kld: KLDStats | None = None
    word_perplexity: float | None = None  # exp(total NLL / words)
    byte_perplexity: float | None = None  # exp(total NLL / bytes)
    words: int | None = None
    totals: PplTotals | None = None
    shard: Shard = WHOLE_RUN

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
            cut = len(pending) if final else tokenizer.stable_prefix_length(pending)
            ids.extend(tokenizer.encode(pending[:cut]))
            pending = pending[cut:]
            if final:
                break
    return np.asarray(ids[:max_tokens], dtype=np.int64)


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """-log softmax(logits)[target] per row: f32 [m, vocab], int [m] -> f64 [m]."""
    m = len(targets)
    log_prob, entropy, rank = np.empty(m), np.empty(m), np.empty(m, dtype=np.int64)
    ops.next_token_stats(logits, np.asarray(targets, dtype=np.int64), log_prob, entropy, rank)
    return -log_prob


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


@dataclass(frozen=True)
class Plan:
    """The windows a protocol evaluates, with the text each accounts for."""

    ids: np.ndarray  # int64 [n]: the token sequence the windows index
    windows: list[Window]
    text_bytes: list[int] | None  # per window, UTF-8 bytes of text it accounts for (None: not counted)
    words: list[int] | None  # per window, words


def token_plan(ids: np.ndarray, settings: PplSettings, tokenizer: Tokenizer | None = None) -> Plan:
    """hf or llama windows over token ids [n]; with `tokenizer`, each window accounts for the bytes of its
    scored tokens and the whitespace-delimited words that start in them."""
    ids = np.asarray(ids, dtype=np.int64)
    windows = plan_windows(len(ids), settings)
    if tokenizer is None:
        return Plan(ids, windows, None, None)
    vocab_bytes = np.array([len(tokenizer.token_bytes(t)) for t in range(tokenizer.n_vocab)])
    token_end = np.cumsum(vocab_bytes[ids])  # [n] byte offsets
    token_begin = token_end - vocab_bytes[ids]
    word_starts = _word_start_offsets(tokenizer.decode_bytes(ids.tolist()))
    begins = token_begin[[w.score_from for w in windows]]
    ends = token_end[[w.end - 1 for w in windows]]
    words = np.searchsorted(word_starts, ends) - np.searchsorted(word_starts, begins)
    return Plan(ids, windows, (ends - begins).tolist(), words.tolist())


def _word_start_offsets(data: bytes) -> np.ndarray:
    """Byte offsets (int64, ascending) where a whitespace-delimited word starts in UTF-8 `data`."""
    text = data.decode("utf-8", errors="surrogateescape")  # one character per invalid byte
    code_points = np.frombuffer(text.encode("utf-32-le", errors="surrogatepass"), dtype=np.uint32)
    char_bytes = 1 + (code_points >= 0x80) + (code_points >= 0x800) + (code_points >= 0x10000)
    char_bytes[(code_points >= 0xDC80) & (code_points <= 0xDCFF)] = 1  # an escaped invalid byte
    char_offsets = np.concatenate([[0], np.cumsum(char_bytes)])
    return char_offsets[[m.start() for m in re.finditer(r"\S+", text)]].astype(np.int64)


def read_text(path: str | Path, errors: str = "strict") -> str:
    """A whole UTF-8 file as Python's text mode reads it (as the dataset script did): CR, CRLF become LF."""
    with open(path, "rb") as f:
        text = decode_utf8(f.read(), str(path), errors)
    return text.replace("\r\n", "\n").replace("\r", "\n")


def wikitext_documents(text: str) -> list[str]:
    """The text split into documents before each top-level ` = Title = ` line, as the
    EleutherAI/wikitext_document_level dataset splits WikiText (a text without headings is one document)."""
    documents, lines = [], []
    for line in text.split("\n"):
        heading = line.replace("= = =", "===").replace("= =", "==").strip()
        if heading.startswith("= ") and heading.endswith(" ="):
            document = "\n".join(lines)
            if document.strip():
                documents.append(document)
            lines = []
        lines.append(line)
    documents.append("\n".join(lines))
    return documents


def wikitext_detokenize(text: str) -> str:
    """lm-eval's `wikitext_detokenizer` (the GPT-2 paper's): undo WikiText's spaces around punctuation."""
    text = text.replace("s '", "s'")
    text = re.sub(r"/' [0-9]/", r"/'[0-9]/", text)
    for tokenized, plain in ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", ".")):
        text = text.replace(tokenized, plain)
    for mark in ":;.!?,":
        text = text.replace(f" {mark} ", f"{mark} ")
    text = re.sub(r"\(\s*([^\)]*?)\s*\)", r"(\1)", text)
    text = re.sub(r"\[\s*([^\]]*?)\s*\]", r"[\1]", text)
    text = re.sub(r"{\s*([^}]*?)\s*}", r"{\1}", text)
    text = re.sub(r"\"\s*([^\"]*?)\s*\"", r'"\1"', text)
    text = re.sub(r"'\s*([^']*?)\s*'", r"'\1'", text)
    for spaced, joined in (("= = = =", "===="), ("= = =", "==="), ("= =", "=="), (" \u00b0 ", "\u00b0")):
        text = text.replace(spaced, joined)
    for spaced, joined in ((" \n", "\n"), ("\n ", "\n"), (" N ", " 1 "), (" 's", "'s")):
        text = text.replace(spaced, joined)
    return text


def lm_eval_plan(documents: list[str], tokenizer: Tokenizer, settings: PplSettings) -> Plan:
    """lm-eval's rolling windows over each detokenized document after <|endoftext|>; a document's words and
    bytes (before detokenization) count with its first window."""
    ctx = settings.ctx
    parts, windows, text_bytes, words = [], [], [], []
    offset = 0
    for document in documents:
        ids = tokenizer.encode(wikitext_detokenize(document))
        if not ids:
            continue
        sequence = [tokenizer.eos_id, *ids]  # targets are sequence[1:]
        first = len(windows)
        # get_rolling_token_windows(context_len=1) after make_disjoint_window: the first window predicts up
        # to ctx tokens from the prefix on; each later one the next up to ctx, from the ctx tokens before.
        predicted = min(ctx, len(ids))
        windows.append(Window(offset, offset + predicted + 1, offset + 1, predicted))
        while predicted < len(ids):
            count = min(len(ids) - predicted, ctx)
            end = predicted + count + 1
            windows.append(Window(offset + end - 1 - ctx, offset + end, offset + predicted + 1, count))
            predicted += count
        text_bytes += [len(document.encode("utf-8"))] + [0] * (len(windows) - first - 1)
        words += [len(re.split(r"\s+", document))] + [0] * (len(windows) - first - 1)
        parts.append(sequence)
        offset += len(sequence)
    if not windows:
        raise Gpt2Error("the text has 0 tokens: nothing to score")
    return Plan(np.concatenate(parts).astype(np.int64), windows, text_bytes, words)


def perplexity(
    model: GPT2Model,
    ids: np.ndarray,
    settings: PplSettings,
    *,
    tokenizer: Tokenizer | None = None,
    base: GPT2Model | None = None,
    progress: ProgressCallback | None = None,
    shard: Shard = WHOLE_RUN,
) -> PerplexityResult:
    """Perplexity of `model` on token ids `ids` (int [n]) under hf or llama `settings`.

    With `tokenizer`, also bits per byte, byte and word perplexity. With `base`, both models run on the same
    windows and the result carries `kld`, the model's divergence from `base`. `progress` is called after
    every window; `shard` evaluates only that part of the windows.
    """
    return evaluate_plan(model, token_plan(ids, settings, tokenizer), settings, base, progress, shard)


def evaluate_plan(
    model: GPT2Model,
    plan: Plan,
    settings: PplSettings,
    base: GPT2Model | None = None,
    progress: ProgressCallback | None = None,
    shard: Shard = WHOLE_RUN,
) -> PerplexityResult:
    """Run the windows of `plan` (those of `shard`) and report; see `perplexity`."""
    if base is not None and base.config.n_vocab != model.config.n_vocab:
        raise Gpt2Error(
            f"vocabularies differ: {model.config.n_vocab} tokens vs the base's {base.config.n_vocab}"
        )
    if base is not None and shard.count > 1:
        raise Gpt2Error("--kl-divergence cannot be sharded: its percentiles need every position at once")
    ids = plan.ids
    selected = shard.range(len(plan.windows))
    cache = model.new_cache(settings.ctx)
    base_cache = base.new_cache(settings.ctx) if base is not None else None
    nll_parts, base_nll_parts, kld_parts, same_top_parts = [], [], [], []
    weighted_base_nll = 0.0
    totals = PplTotals()
    for done, i in enumerate(selected, 1):
        w = plan.windows[i]
        t0 = time.perf_counter()
        targets = ids[w.score_from : w.end]
        logits = _window_logits(model, cache, ids, w)
        nll = token_nll(logits, targets)
        if base is not None:
            nll_parts.append(nll)
            base_logits = _window_logits(base, base_cache, ids, w)
            base_nll = token_nll(base_logits, targets)
            weighted_base_nll += w.weight * float(base_nll.mean())
            base_nll_parts.append(base_nll)
            kld_parts.append(_kl_rows(logits, base_logits))
            same_top_parts.append(logits.argmax(axis=1) == base_logits.argmax(axis=1))
        totals += PplTotals(
            windows=1,
            tokens=len(nll),
            evaluated_tokens=w.end - 1 - w.begin,
            weighted_nll=w.weight * float(nll.mean()),
            weights=w.weight,
            nll=float(nll.sum()),
            nll_squared=float(np.dot(nll, nll)),
            text_bytes=plan.text_bytes[i] if plan.text_bytes is not None else 0,
            words=plan.words[i] if plan.words is not None else 0,
            seconds=time.perf_counter() - t0,
        )
        if progress is not None:
            running = _exp(totals.weighted_nll / totals.weights) if totals.weights else math.nan
            progress(done, len(selected), running)

    kld = None
    if base is not None:
        nll = np.concatenate(nll_parts)
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
            ppl=_exp(totals.weighted_nll / totals.weights),
            ppl_base=_exp(weighted_base_nll / totals.weights),
        )
    return finish(
        settings,
        totals,
        model.batch_compute(),
        counted=plan.text_bytes is not None,
        kld=kld,
        shard=shard,
    )


def finish(
    settings: PplSettings,
    totals: PplTotals,
    compute: str,
    *,
    counted: bool,
    kld: KLDStats | None = None,
    shard: Shard = WHOLE_RUN,
) -> PerplexityResult:
    """The reported figures of `totals`; `counted` if bytes and words were counted (a tokenizer was given)."""
    t = totals
    mean_nll = t.weighted_nll / t.weights if t.weights else math.nan
    ppl = _exp(mean_nll)
    uncertainty = math.nan
    if t.tokens >= 2:
        mean = t.nll / t.tokens
        uncertainty = math.sqrt(max(t.nll_squared / t.tokens - mean * mean, 0.0) / (t.tokens - 1))

    def per(count: int) -> float:
        return t.nll / count if count else math.nan

    return PerplexityResult(
        settings=settings,
        windows=t.windows,
        tokens=t.tokens,
        evaluated_tokens=t.evaluated_tokens,
        mean_nll=mean_nll,
        ppl=ppl,
        ppl_uncertainty=ppl * uncertainty,
        bits_per_byte=per(t.text_bytes) / math.log(2) if counted else None,
        scored_bytes=t.text_bytes if counted else None,
        seconds=t.seconds,
        compute=compute,
        kld=kld,
        word_perplexity=_exp(per(t.words)) if counted else None,
        byte_perplexity=_exp(per(t.text_bytes)) if counted else None,
        words=t.words if counted else None,
        totals=totals,
        shard=shard,
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
    """The result as one JSON-ready object (NaN and infinity become null); `totals` lets shards merge."""
    s = result.settings
    out = {
        "protocol": s.protocol,
        "ctx": s.ctx,
        "stride": s.stride,
        "shard": str(result.shard),
        "windows": result.windows,
        "tokens": result.tokens,
        "evaluated_tokens": result.evaluated_tokens,
        "ppl": _finite(result.ppl),
        "ppl_uncertainty": _finite(result.ppl_uncertainty),
        "mean_nll": _finite(result.mean_nll),
        "word_perplexity": _finite(result.word_perplexity),
        "byte_perplexity": _finite(result.byte_perplexity),
        "bits_per_byte": _finite(result.bits_per_byte),
        "words": result.words,
        "scored_bytes": result.scored_bytes,
        "seconds": _finite(result.seconds),
        "tokens_per_second": _finite(result.tokens_per_second),
        "compute": result.compute,
    }
    if result.totals is not None:
        out["totals"] = asdict(result.totals)
    if result.kld is not None:
        out["kl_divergence"] = {k: _finite(v) for k, v in vars(result.kld).items()}
    return out


# What shard reports of one run share; they differ only in their shard and totals. Files are compared by
# name, since each machine of a cluster may keep the model and the text in its own directory.
RUN_KEYS = ("model", "file", "protocol", "ctx", "stride")
PATH_KEYS = ("model", "file")


def merge_reports(reports: list[dict], names: list[str]) -> tuple[dict, PerplexityResult]:
    """One run's (description, result) from the JSON reports of its shards 1/N .. N/N, given in any order."""
    for name, report in zip(names, reports, strict=True):
        if not (isinstance(report, dict) and isinstance(report.get("totals"), dict) and "shard" in report):
            raise Gpt2Error(f"{name}: not a `gpt2 ppl --json` report")
    order = sorted(range(len(reports)), key=lambda i: Shard.parse(reports[i]["shard"]))
    names, reports = [names[i] for i in order], [reports[i] for i in order]
    run = {key: reports[0].get(key) for key in RUN_KEYS}  # shard 1's
    for name, report in zip(names, reports, strict=True):
        differing = [key for key in RUN_KEYS if _run_value(report, key) != _run_value(reports[0], key)]
        if differing:
            raise Gpt2Error(f"{name}: {', '.join(differing)} differ from {names[0]}'s: not shards of one run")
    shards = [Shard.parse(r["shard"]) for r in reports]
    count = shards[0].count
    if shards != [Shard(k, count) for k in range(1, count + 1)]:
        got = ", ".join(str(s) for s in shards)
        raise Gpt2Error(f"--merge needs each of the shards 1/{count} .. {count}/{count} once, got {got}")
    totals = PplTotals()
    for report in reports:
        totals += PplTotals(**report["totals"])
    settings = PplSettings(run["protocol"], run["ctx"], run["stride"])
    return run, finish(
        settings, totals, reports[0].get("compute", "unknown"), counted=reports[0].get("words") is not None
    )


def _run_value(report: dict, key: str):
    value = report.get(key)
    return Path(value).name if key in PATH_KEYS and isinstance(value, str) else value


def format_report(result: PerplexityResult) -> list[str]:
    """The human-readable report, one line per figure."""
    s = result.settings
    lines = [f"protocol      {s.describe()}"]
    if result.shard.count > 1:
        lines.append(
            f"shard         {result.shard} of the windows (gpt2 ppl --merge combines the --json reports)"
        )
    if s.protocol == "hf" and result.windows == 1 and result.evaluated_tokens + 1 < s.ctx:
        lines.append(
            f"note          the text has {result.evaluated_tokens + 1} tokens, fewer than --ctx: one window"
        )
    lines += [
        f"perplexity    {result.ppl:.4f} +/- {result.ppl_uncertainty:.4f}",
        f"mean NLL      {result.mean_nll:.4f} nats/token",
    ]
    if result.bits_per_byte is not None:
        lines += [
            f"word ppl      {result.word_perplexity:.4f} (total NLL / {result.words:,} words)",
            f"byte ppl      {result.byte_perplexity:.4f} (total NLL / {result.scored_bytes:,} UTF-8 bytes)",
            f"bits per byte {result.bits_per_byte:.4f}",
        ]
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
