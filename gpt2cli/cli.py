"""The `gpt2` command line: parse, call, render. Every user-facing failure is one line and exit code 2."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated

import typer

from gpt2cli.errors import Gpt2Error
from gpt2cli.registry import DEFAULT_MODEL

# Click's UsageError and ClickException, whichever click typer uses (recent typers vendor their own).
UsageError = typer.BadParameter.__base__
ClickException = UsageError.__base__

# The kernels' OpenMP threads spin for a while after each parallel loop, by default long enough to take the
# core from numpy's BLAS threads during a prefill (1.0k vs 1.3-1.8k tokens/s for 512 tokens here), while
# decoding, whose parallel loops come back to back, needs some spinning to wake fast. OpenBLAS's threads
# spin 2^28 cycles (~0.1 s) before sleeping, from the moment numpy is imported: ~40 ms of CPU time at
# every start, taken from the imports that follow on a busy machine; after 2^20 cycles they sleep, and a
# prefill's products (milliseconds each) hardly notice waking them. libgomp reads its variable when the
# first parallel loop runs, OpenBLAS when numpy is imported; the command sets them (see main), the library
# leaves them alone.
THREAD_ENVIRONMENT = {"GOMP_SPINCOUNT": "30000", "OPENBLAS_THREAD_TIMEOUT": "20"}

app = typer.Typer(
    name="gpt2",
    help="Generate text, quantize and measure perplexity with the GPT-2 family on the CPU.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
)

ModelOption = Annotated[
    str,
    typer.Option(
        "--model", "-m", help="A registry name with an optional type (distilgpt2:q4_k_m) or a .gguf path."
    ),
]


def say(message: str) -> None:
    """A status line on stderr, so stdout carries only the text or JSON."""
    print(message, file=sys.stderr, flush=True)


def load_model(spec: str, verbose: bool = False, exact: bool = False):
    from gpt2cli.registry import resolve_gguf

    t0 = time.perf_counter()
    path = resolve_gguf(spec)  # first: a download that cannot work fails before the slow imports below
    from numba.core import entrypoints

    from gpt2cli.gguf_file import ModelFile
    from gpt2cli.model import GPT2Model

    # Before its first call Numba runs every installed package's `numba_extensions` hook, reading the
    # metadata of every distribution (65 ms of a start among 180 installed); the kernels use none, and the
    # process is ours.
    entrypoints._already_initialized = True

    mf = ModelFile(path)
    model = GPT2Model(mf.weights, mf.config, exact=exact)
    if verbose:
        types = ", ".join(sorted(q.name for q in mf.qtypes))
        say(
            f"model: {path} ({types}; {mf.config.n_layer} layers, {mf.config.n_embd} wide) "
            f"loaded in {time.perf_counter() - t0:.2f} s"
        )
    return mf, model


def file_type_name(mf) -> str:
    """llama-quantize's name of the file's type (Q4_K_M), else its block types (Q4_K, Q6_K)."""
    from gguf import LlamaFileType

    try:
        return LlamaFileType(mf.metadata["general.file_type"]).name.removeprefix("MOSTLY_")
    except (KeyError, ValueError, TypeError):
        return ", ".join(sorted(q.name for q in mf.qtypes))


@contextmanager
def on_first_compile(callback: Callable[[], None]) -> Iterator[None]:
    """Calls `callback` when the body first compiles a kernel, which Numba's cache spares all but a first run
    (or one after an upgrade): that run spends seconds compiling, and should say so."""
    from numba.core import event

    from gpt2cli.kernels import OnFirstCompile

    with event.install_listener("numba:compile", OnFirstCompile(callback)):
        yield


def compile_notice(mf) -> str:
    return f"compiling kernels for {file_type_name(mf)} (first run only)"


class Spinner:
    """A transient spinner with a message on stderr, when stderr is a terminal."""

    def __init__(self, message: str) -> None:
        self.message = message
        self.status = None

    def start(self) -> None:
        if self.status is None and sys.stderr.isatty():
            from rich.console import Console

            self.status = Console(stderr=True).status(self.message)
            self.status.start()

    def stop(self) -> None:
        if self.status is not None:
            self.status.stop()


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="The text to continue ('' starts from <|endoftext|>).")],
    model: ModelOption = DEFAULT_MODEL,
    max_new_tokens: Annotated[
        int | None, typer.Option(help="Tokens to generate (wins over --max-length).")
    ] = None,
    max_length: Annotated[int | None, typer.Option(help="Prompt plus generated tokens, as in HF.")] = None,
    temperature: Annotated[float, typer.Option(help="0 means greedy.")] = 1.0,
    top_k: Annotated[int, typer.Option(help="Keep the k most likely tokens (0: off).")] = 50,
    top_p: Annotated[float, typer.Option(help="Keep the smallest set with this much probability.")] = 1.0,
    repetition_penalty: Annotated[float, typer.Option(help="HF's CTRL-style penalty (1.0: off).")] = 1.0,
    seed: Annotated[int | None, typer.Option(help="Makes the output identical from run to run.")] = None,
    num_return_sequences: Annotated[int, typer.Option("--num-return-sequences", "-n")] = 1,
    truncate_prompt: Annotated[
        bool, typer.Option(help="Keep the tail of a prompt longer than the context instead of failing.")
    ] = False,
    exact: Annotated[
        bool, typer.Option(help="Decode with f32 activations (as transformers), not ggml's faster int8 ones.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per sequence.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Speeds on stderr.")] = False,
) -> None:
    """Continue PROMPT, streaming the text as it is generated."""
    from gpt2cli.generate import GenerationSettings, prompt_ids
    from gpt2cli.generate import generate as run_generate
    from gpt2cli.sampling import SamplingConfig

    if max_new_tokens is None and max_length is None:
        max_new_tokens = 50
    settings = GenerationSettings(
        max_new_tokens=max_new_tokens,
        max_length=max_length,
        num_return_sequences=num_return_sequences,
        seed=seed,
        truncate_prompt=truncate_prompt,
        sampling=SamplingConfig(
            temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty
        ),
    )
    settings.validate()
    mf, gpt2 = load_model(model, verbose, exact)
    tokenizer = mf.tokenizer
    ids = prompt_ids(tokenizer, prompt, settings, mf.config.n_ctx)
    shown_prompt = tokenizer.decode(ids)

    def on_prefill(seconds: float) -> None:
        if verbose:
            say(f"prompt: {len(ids)} tokens in {seconds:.3f} s ({len(ids) / seconds:.1f} tokens/s)")

    def on_text(index: int, piece: str) -> None:
        # Sequences decode together: the first streams, the others print whole when their batch is done.
        nonlocal started
        spinner.stop()  # before stdout: the spinner's live display would capture it
        if not as_json and index == 0:
            if not started:
                started = True
                sys.stdout.write(shown_prompt)
            sys.stdout.write(piece)
            sys.stdout.flush()

    started = False
    spinner = Spinner(compile_notice(mf))
    tokens, t0 = 0, time.perf_counter()
    try:
        with on_first_compile(spinner.start):
            for gen in run_generate(gpt2, tokenizer, ids, settings, on_text, on_prefill):
                spinner.stop()
                if as_json:
                    print(
                        json.dumps(
                            {
                                "index": gen.index,
                                "prompt": shown_prompt,
                                "text": gen.text,
                                "generated_text": shown_prompt + gen.text,
                                "prompt_tokens": len(gen.prompt_ids),
                                "generated_tokens": len(gen.token_ids),
                                "token_ids": gen.token_ids,
                                "finish_reason": gen.finish_reason,
                            },
                            ensure_ascii=False,
                        )
                    )
                elif gen.index > 0:
                    sys.stdout.write("\n\n" + shown_prompt + gen.text)
                elif not started:
                    sys.stdout.write(shown_prompt)
                tokens += len(gen.token_ids)
                if verbose and gen.seconds > 0:
                    say(
                        f"sequence {gen.index}: {len(gen.token_ids)} tokens in {gen.seconds:.3f} s "
                        f"({len(gen.token_ids) / gen.seconds:.1f} tokens/s), stopped by {gen.finish_reason}"
                    )
    except KeyboardInterrupt:
        sys.stdout.write("\n")
        sys.stdout.flush()
        say("interrupted")
        raise typer.Exit(130) from None
    finally:
        spinner.stop()
    if verbose and settings.num_return_sequences > 1:
        n, seconds = settings.num_return_sequences, time.perf_counter() - t0
        say(f"all {n} sequences: {tokens} tokens in {seconds:.3f} s ({tokens / seconds:.1f} tok/s)")
    if not as_json:
        sys.stdout.write("\n")
        sys.stdout.flush()


@app.command()
def models() -> None:
    """List the registry's models and which of their files are already on disk."""
    from rich.console import Console
    from rich.table import Table

    from gpt2cli.registry import list_models

    table = Table("model", "type", "published", "on disk", "size", "path")
    for row in list_models():
        size = f"{row.size / 1e6:.1f} MB" if row.size is not None else ""
        table.add_row(
            row.name, row.qtype, "yes" if row.published else "", row.source or "", size, str(row.path or "")
        )
    Console().print(table)


@app.command()
def ppl(
    files: Annotated[
        list[str],
        typer.Argument(
            metavar="FILE",
            help="A UTF-8 text file (CRLF is read as LF); with --merge, the shards' --json reports.",
            show_default=False,
        ),
    ],
    model: ModelOption = DEFAULT_MODEL,
    ctx: Annotated[
        int | None,
        typer.Option(
            help="Tokens per window (default: the model's context for hf and lm-eval, 512 for llama)."
        ),
    ] = None,
    stride: Annotated[
        int | None, typer.Option(help="hf only: tokens between window starts (default: ctx/2).")
    ] = None,
    protocol: Annotated[
        str,
        typer.Option(
            help="hf: transformers' sliding windows; llama: llama-perplexity's chunks; "
            "lm-eval: lm-evaluation-harness's wikitext task."
        ),
    ] = "hf",
    max_tokens: Annotated[
        int | None, typer.Option(help="hf, llama: use only the first N tokens of the file.")
    ] = None,
    kl_divergence: Annotated[
        str | None,
        typer.Option(
            metavar="BASE", help="Also compare with BASE (registry name or .gguf) on the same windows."
        ),
    ] = None,
    errors: Annotated[
        str, typer.Option(help="Invalid UTF-8: strict (fail, naming the byte) or replace (U+FFFD).")
    ] = "strict",
    shard: Annotated[
        str | None, typer.Option(metavar="K/N", help="Evaluate only part K of N of the windows.")
    ] = None,
    merge: Annotated[
        bool, typer.Option("--merge", help="Combine the --json reports of shards 1/N .. N/N into one run's.")
    ] = False,
    exact: Annotated[
        bool, typer.Option(help="f32 activations (as transformers), not ggml's faster int8 ones.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object on stdout.")] = False,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Load and tokenize times on stderr.")
    ] = False,
) -> None:
    """Perplexity of the model on FILE, with its uncertainty, word and byte perplexity and speed."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from gpt2cli.ppl import (
        PplSettings,
        evaluate_plan,
        format_report,
        lm_eval_plan,
        merge_reports,
        read_text,
        result_dict,
        token_plan,
        tokenize_file,
        wikitext_documents,
    )
    from gpt2cli.texts import Shard

    if merge:
        reports = []
        for name in files:
            try:
                with open(name, encoding="utf-8") as f:
                    reports.append(json.load(f))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise Gpt2Error(f"{name}: not a `gpt2 ppl --json` report") from None
        run, result = merge_reports(reports, files)
        if as_json:
            report = {"model": run["model"], "base": None, "file": run["file"], **result_dict(result)}
            print(json.dumps(report, allow_nan=False))
        else:
            print(f"model         {run['model']} (merged from {len(files)} shards)")
            print("\n".join(format_report(result)))
        return
    if len(files) != 1:
        raise Gpt2Error("give one text file (several only with --merge)")
    file = files[0]
    shard_part = Shard.parse(shard)
    if protocol == "lm-eval" and max_tokens is not None:
        raise Gpt2Error(
            "--max-tokens applies to --protocol hf and llama; --shard evaluates part of lm-eval's"
        )
    mf, gpt2 = load_model(model, verbose, exact)
    base = load_model(kl_divergence, verbose, exact)[1] if kl_divergence else None
    model_ctx = min(gpt2.config.n_ctx, base.config.n_ctx) if base else gpt2.config.n_ctx
    settings = PplSettings.resolve(protocol, model_ctx, ctx, stride)
    t0 = time.perf_counter()
    if protocol == "lm-eval":
        plan = lm_eval_plan(wikitext_documents(read_text(file, errors)), mf.tokenizer, settings)
    else:
        ids = tokenize_file(file, mf.tokenizer, errors=errors, max_tokens=max_tokens)
        plan = token_plan(ids, settings, mf.tokenizer)
    if verbose:
        say(f"{file}: {len(plan.ids):,} tokens in {time.perf_counter() - t0:.2f} s")
    console = Console(stderr=True)
    columns = (
        TextColumn("ppl {task.fields[ppl]:.3f}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, disable=not console.is_terminal, transient=True) as bar:
        task = bar.add_task("windows", total=None, ppl=float("nan"))
        # A line above the bar, not a spinner: one live display at a time.
        with on_first_compile(lambda: bar.console.print(compile_notice(mf)) if bar.live.is_started else None):
            result = evaluate_plan(
                gpt2,
                plan,
                settings,
                base,
                progress=lambda done, total, running: bar.update(
                    task, completed=done, total=total, ppl=running
                ),
                shard=shard_part,
            )
    if as_json:
        report = {"model": str(mf.path), "base": kl_divergence, "file": file, **result_dict(result)}
        print(json.dumps(report, allow_nan=False))
    else:
        print(f"model         {mf.path}" + (f" (KL divergence from {kl_divergence})" if base else ""))
        print("\n".join(format_report(result)))


@app.command()
def quantize(
    source: Annotated[
        str,
        typer.Argument(
            help="A registry name (its safetensors checkpoint is downloaded), a Hugging Face directory, "
            "or an F32/F16/BF16 .gguf."
        ),
    ],
    bits: Annotated[
        int | None, typer.Option(help="2, 3, 4, 5, 6 or 8: Q2_K, Q3_K_M, Q4_K_M, Q5_K_M, Q6_K or Q8_0.")
    ] = None,
    qtype: Annotated[
        str | None,
        typer.Option("--type", "-t", help="A llama.cpp file type: F16, BF16, Q4_0 ... Q6_K (default Q8_0)."),
    ] = None,
    output: Annotated[
        str | None, typer.Option("--output", "-o", help="Default: <model dir>/<name>.<TYPE>.gguf.")
    ] = None,
    pure: Annotated[
        bool, typer.Option(help="Every 2-D weight in the type's own block type: no mix.")
    ] = False,
    eval_file: Annotated[
        str | None,
        typer.Option(
            "--eval", metavar="TEXT_FILE", help="Then report KL divergence from the original on it."
        ),
    ] = None,
    eval_tokens: Annotated[int, typer.Option(help="Tokens of the --eval text to use.")] = 8192,
) -> None:
    """Write SOURCE as a llama.cpp-compatible GGUF, with llama-quantize's per-tensor type mix."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from gpt2cli.quant_types import file_type, file_type_for_bits
    from gpt2cli.quantize import (
        compare_with_original,
        default_output_path,
        kld_lines,
        load_source,
        quantize_checkpoint,
        report_table,
        summary_lines,
    )
    from gpt2cli.registry import DEFAULT_TYPE

    if bits is not None and qtype is not None:
        raise Gpt2Error("give --bits or --type, not both")
    ft = file_type_for_bits(bits) if bits is not None else file_type(DEFAULT_TYPE if qtype is None else qtype)
    checkpoint = load_source(source)
    path = output or default_output_path(checkpoint, ft)
    err_console = Console(stderr=True)
    columns = (TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err_console, disable=not err_console.is_terminal, transient=True) as bar:
        task = bar.add_task(f"{checkpoint.name} -> {ft.name}", total=len(checkpoint.shapes))
        report = quantize_checkpoint(
            checkpoint, ft, path, pure=pure, on_tensor=lambda t: bar.update(task, advance=1)
        )
    Console().print(report_table(report))
    print("\n".join(summary_lines(report)))
    if eval_file is not None:
        with Progress(
            *columns, console=err_console, disable=not err_console.is_terminal, transient=True
        ) as bar:
            task = bar.add_task("KL divergence", total=None)
            kld = compare_with_original(
                checkpoint,
                report.path,
                eval_file,
                max_tokens=eval_tokens,
                progress=lambda done, total, _: bar.update(task, completed=done, total=total),
            )
        print(f"eval          {eval_file}: {kld.tokens:,} tokens scored (llama-perplexity's chunks)")
        print("\n".join(kld_lines(kld)))


TextsArgument = Annotated[
    str, typer.Argument(help="A UTF-8 file with one text per line ('-' reads stdin).", show_default=False)
]
JsonlOption = Annotated[bool, typer.Option("--jsonl", help='Each line is a JSON object with a "text" field.')]
ShardOption = Annotated[
    str | None, typer.Option(metavar="K/N", help="Only part K of N of the texts (contiguous, in order).")
]
TruncateOption = Annotated[
    bool, typer.Option(help="Keep the first tokens of a text longer than the context instead of failing.")
]
ErrorsOption = Annotated[
    str, typer.Option(help="Invalid UTF-8: strict (fail, naming the line) or replace (U+FFFD).")
]


def read_shard(file: str, jsonl: bool, errors: str, shard: str | None) -> tuple[list[str], int]:
    """The texts of this shard and the index of its first text."""
    from gpt2cli.texts import Shard, read_texts

    shard_part = Shard.parse(shard)  # a bad spec fails before reading
    texts = read_texts(file, jsonl=jsonl, errors=errors)
    part = shard_part.range(len(texts))
    return texts[part.start : part.stop], part.start


@app.command()
def score(
    file: TextsArgument,
    model: ModelOption = DEFAULT_MODEL,
    tokens: Annotated[bool, typer.Option("--tokens", help="One row per token.")] = False,
    words: Annotated[bool, typer.Option("--words", help="One row per whitespace-delimited word.")] = False,
    bos: Annotated[
        bool, typer.Option(help="Score each text after <|endoftext|>, so its first token is scored too.")
    ] = True,
    jsonl: JsonlOption = False,
    truncate: TruncateOption = False,
    shard: ShardOption = None,
    errors: ErrorsOption = "strict",
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines instead of TSV.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Load time and speed on stderr.")] = False,
) -> None:
    """Log-probability, surprisal and perplexity of each text of FILE (or of its tokens or words), as TSV."""
    from gpt2cli.score import score_texts, text_row, token_rows, word_rows
    from gpt2cli.texts import write_rows

    if tokens and words:
        raise Gpt2Error("give --tokens or --words, not both")
    texts, first_index = read_shard(file, jsonl, errors, shard)
    mf, gpt2 = load_model(model, verbose)
    t0 = time.perf_counter()
    scores = score_texts(gpt2, mf.tokenizer, texts, first_index=first_index, bos=bos, truncate=truncate)
    if tokens:
        rows = (row for s in scores for row in token_rows(s, mf.tokenizer))
    elif words:
        rows = (row for s in scores for row in word_rows(s, mf.tokenizer))
    else:
        rows = (text_row(s) for s in scores)
    write_rows(rows, sys.stdout, as_json)
    if verbose:
        say(f"{len(texts):,} texts in {time.perf_counter() - t0:.2f} s")


@app.command()
def embed(
    file: TextsArgument,
    model: ModelOption = DEFAULT_MODEL,
    layer: Annotated[
        int | None,
        typer.Option(
            help="transformers' hidden_states index: 0 the embeddings, i block i's output, "
            "the last (default) after the final LayerNorm."
        ),
    ] = None,
    pool: Annotated[str, typer.Option(help="mean or last token per text, or none (every token).")] = "mean",
    output: Annotated[
        str | None,
        typer.Option("--output", "-o", help="A .npy (float32 [texts, width]); a .npz with --pool none."),
    ] = None,
    jsonl: JsonlOption = False,
    truncate: TruncateOption = False,
    shard: ShardOption = None,
    errors: ErrorsOption = "strict",
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Load time and speed on stderr.")] = False,
) -> None:
    """Hidden states of each text of FILE, pooled, to a .npy / .npz or as JSON lines on stdout."""
    from gpt2cli.embed import check_output_path, embed_texts, embedding_rows, save_embeddings
    from gpt2cli.texts import write_rows

    if output is not None:
        check_output_path(output, pool)
    texts, first_index = read_shard(file, jsonl, errors, shard)
    mf, gpt2 = load_model(model, verbose)
    t0 = time.perf_counter()
    embeddings = embed_texts(
        gpt2, mf.tokenizer, texts, layer=layer, pool=pool, first_index=first_index, truncate=truncate
    )
    if output is None:
        write_rows(embedding_rows(embeddings, first_index), sys.stdout, as_json=True)
    else:
        count = save_embeddings(output, embeddings, pool, gpt2.config.n_embd, first_index)
        say(f"{output}: {count:,} texts")
    if verbose:
        say(f"{len(texts):,} texts in {time.perf_counter() - t0:.2f} s")


@app.command()
def serve(
    model: ModelOption = DEFAULT_MODEL,
    host: Annotated[
        str,
        typer.Option(help="Address to listen on; anything but loopback exposes the model to the network."),
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port (0: any free one, printed at start).")] = 8080,
    api_key: Annotated[
        str | None,
        typer.Option(envvar="GPT2_API_KEY", help="Require 'Authorization: Bearer KEY' on all but /health."),
    ] = None,
    max_batch: Annotated[int, typer.Option(help="Sequences decoded together at most.")] = 16,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Uvicorn's log and every request.")
    ] = False,
) -> None:
    """Serve the model with OpenAI's completions API (needs the serve extra: pip install 'gpt2[serve]')."""
    try:
        from gpt2cli.serve import run_server
    except ImportError as e:
        raise Gpt2Error(f"gpt2 serve needs {e.name}: pip install 'gpt2[serve]'") from None

    if not 1 <= max_batch <= 256:
        raise Gpt2Error(f"--max-batch must be between 1 and 256, got {max_batch}")
    if not 0 <= port <= 65535:
        raise Gpt2Error(f"--port must be between 0 and 65535, got {port}")
    mf, gpt2 = load_model(model, verbose)
    model_id = mf.path.name if model.endswith(".gguf") else model
    run_server(gpt2, mf.tokenizer, model_id, host, port, api_key, max_batch, say, verbose)


def main(argv: list[str] | None = None) -> None:
    """Entry point: click's own errors and Gpt2Error become one line on stderr and exit code 2."""
    # Here, not at import: a library must leave the environment alone, a program may choose its own.
    for name, value in THREAD_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    import numpy as np  # after the environment: OpenBLAS reads it when numpy loads

    command = typer.main.get_command(app)
    if sys.stdout is None or sys.stdout.closed:  # started with stdout closed (`gpt2 ... >&-`)
        sys.exit(_fail("standard output is closed", 2))
    try:
        with np.errstate(all="ignore"):  # non-finite results are checked where they matter, not warned about
            code = command.main(args=argv, prog_name="gpt2", standalone_mode=False)
        sys.stdout.flush()  # here, where a closed pipe is caught, not at exit
    except BrokenPipeError:
        code = quiet_broken_pipe()
    except SystemExit:
        # Click turns a broken pipe inside a command into a silent exit(1), swapping in this wrapper.
        if type(sys.stdout).__name__ != "PacifyFlushWrapper":
            raise
        code = quiet_broken_pipe()
    except UsageError as e:
        code = _fail(e.format_message(), 2)
    except ClickException as e:
        code = _fail(e.format_message(), e.exit_code)
    except Gpt2Error as e:
        code = _fail(str(e), 2)
    except (KeyboardInterrupt, typer.Abort):
        code = 130
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        code = _fail(f"{where}{e.strerror or e}", 2)
    sys.exit(code if isinstance(code, int) else 0)


def quiet_broken_pipe() -> int:
    """The reader went away (`gpt2 generate ... | head -1`): stop without a message, as Unix tools do, with
    the status a process killed by SIGPIPE reports; stdout goes to /dev/null so the final flush is quiet."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 128 + 13  # SIGPIPE


def _fail(message: str, code: int) -> int:
    say("gpt2: error: " + " ".join(str(message).split()))
    return code


if __name__ == "__main__":
    main()
