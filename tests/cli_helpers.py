"""Running the `gpt2` entry point in-process, as a user would, with its exit code and both streams."""

from __future__ import annotations

import sys

from typer.testing import CliRunner

from gpt2cli.cli import main


def run_cli(
    args: list[str], env: dict[str, str] | None = None, input: str | None = None
) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `gpt2 ARGS`, with `input` on stdin."""
    runner = CliRunner()
    with runner.isolation(input=input, env=env) as (out, err, _):
        try:
            main(args)
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        sys.stdout.flush()  # print() leaves text in the wrapper's buffer
        sys.stderr.flush()
        return code, out.getvalue().decode(), err.getvalue().decode()
