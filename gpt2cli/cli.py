"""The `gpt2` command line: parse, call, render. Every user-facing failure is one line and exit code 2."""

from __future__ import annotations

import json
import sys
import time
from typing import Annotated

import typer

from gpt2cli.errors import Gpt2Error
from gpt2cli.registry import DEFAULT_MODEL

# Click's UsageError and ClickException, whichever click typer uses (recent typers vendor their own).
UsageError = typer.BadParameter.__base__
ClickException = UsageError.__base__

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
    from gpt2cli.gguf_file import ModelFile
    from gpt2cli.model import GPT2Model
    from gpt2cli.registry import resolve_gguf

    t0 = time.perf_counter()
    path = resolve_gguf(spec)
    mf = ModelFile(path)
    model = GPT2Model(mf.weights, mf.config, exact=exact)
    if verbose:
        types = ", ".join(sorted(q.name for q in mf.qtypes))
        say(
            f"model: {path} ({types}; {mf.config.n_layer} layers, {mf.config.n_embd} wide) "
            f"loaded in {time.perf_counter() - t0:.2f} s"
        )
    return mf, model


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
        if not as_json:
            if not started[index]:
                started[index] = True
                sys.stdout.write(("\n\n" if index else "") + shown_prompt)
            sys.stdout.write(piece)
            sys.stdout.flush()

    started = [False] * settings.num_return_sequences
    try:
        results = run_generate(gpt2, tokenizer, ids, settings, on_text, on_prefill)
    except KeyboardInterrupt:
        sys.stdout.write("\n")
        sys.stdout.flush()
        say("interrupted")
        raise typer.Exit(130) from None
    for gen in results:
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
        elif not started[gen.index]:
            sys.stdout.write(("\n\n" if gen.index else "") + shown_prompt)
        if verbose and gen.seconds > 0:
            say(
                f"sequence {gen.index}: {len(gen.token_ids)} tokens in {gen.seconds:.3f} s "
                f"({len(gen.token_ids) / gen.seconds:.1f} tokens/s), stopped by {gen.finish_reason}"
            )
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
    file: Annotated[str, typer.Argument(help="A UTF-8 text file (CRLF is read as LF).")],
    model: ModelOption = DEFAULT_MODEL,
    ctx: Annotated[
        int | None,
        typer.Option(help="Tokens per window (default: the model's context for hf, 512 for llama)."),
    ] = None,
    stride: Annotated[
        int | None, typer.Option(help="hf only: tokens between window starts (default: ctx/2).")
    ] = None,
    protocol: Annotated[
        str, typer.Option(help="hf: transformers' sliding windows; llama: llama-perplexity's chunks.")
    ] = "hf",
    max_tokens: Annotated[int | None, typer.Option(help="Use only the first N tokens of the file.")] = None,
    kl_divergence: Annotated[
        str | None,
        typer.Option(
            metavar="BASE", help="Also compare with BASE (registry name or .gguf) on the same windows."
        ),
    ] = None,
    errors: Annotated[
        str, typer.Option(help="Invalid UTF-8: strict (fail, naming the byte) or replace (U+FFFD).")
    ] = "strict",
    exact: Annotated[
        bool, typer.Option(help="f32 activations (as transformers), not ggml's faster int8 ones.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object on stdout.")] = False,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Load and tokenize times on stderr.")
    ] = False,
) -> None:
    """Perplexity of the model on FILE, with its uncertainty, bits per byte and speed."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from gpt2cli.ppl import PplSettings, format_report, perplexity, result_dict, tokenize_file

    mf, gpt2 = load_model(model, verbose, exact)
    base = load_model(kl_divergence, verbose, exact)[1] if kl_divergence else None
    model_ctx = min(gpt2.config.n_ctx, base.config.n_ctx) if base else gpt2.config.n_ctx
    settings = PplSettings.resolve(protocol, model_ctx, ctx, stride)
    t0 = time.perf_counter()
    ids = tokenize_file(file, mf.tokenizer, errors=errors, max_tokens=max_tokens)
    if verbose:
        say(f"{file}: {len(ids):,} tokens in {time.perf_counter() - t0:.2f} s")
    console = Console(stderr=True)
    columns = (
        TextColumn("ppl {task.fields[ppl]:.3f}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, disable=not console.is_terminal, transient=True) as bar:
        task = bar.add_task("windows", total=None, ppl=float("nan"))
        result = perplexity(
            gpt2,
            ids,
            settings,
            tokenizer=mf.tokenizer,
            base=base,
            progress=lambda done, total, running: bar.update(task, completed=done, total=total, ppl=running),
        )
    if as_json:
        print(json.dumps({"model": str(mf.path), "base": kl_divergence, "file": file, **result_dict(result)}))
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
    ft = file_type_for_bits(bits) if bits is not None else file_type(qtype or DEFAULT_TYPE)
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


def main(argv: list[str] | None = None) -> None:
    """Entry point: click's own errors and Gpt2Error become one line on stderr and exit code 2."""
    command = typer.main.get_command(app)
    try:
        code = command.main(args=argv, prog_name="gpt2", standalone_mode=False)
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


def _fail(message: str, code: int) -> int:
    say("gpt2: error: " + " ".join(str(message).split()))
    return code


if __name__ == "__main__":
    main()
