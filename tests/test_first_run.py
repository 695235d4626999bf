"""What a user meets on a first run: no network, a read-only install, a cold kernel cache, and start-up work
that only a file's own block types should cost. Each runs in a fresh interpreter where it depends on what
the process has imported or set."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numba
import numpy as np

from gpt2cli import kernels
from gpt2cli.cli import on_first_compile

ROOT = Path(__file__).resolve().parent.parent


def run_python(
    code: str, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    """`python -c CODE` away from the checkout, which would otherwise come first on the path."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=timeout, cwd="/"
    )


def test_an_unreachable_hub_fails_at_once_in_one_line(tmp_path: Path) -> None:
    # A closed local port stands for no network: huggingface_hub alone would retry for 25 s, logging each try.
    env = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf"), "GPT2_HOME": str(tmp_path)}
    for name in ("HF_HUB_OFFLINE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        env[name] = ""
    done = run_python("from gpt2cli.cli import main; main(['generate', 'Hello'])", env, timeout=20)
    assert done.returncode == 2
    [line] = done.stderr.splitlines()
    assert line.startswith("gpt2: error: cannot download distilgpt2:Q8_0")
    assert "the Hub is unreachable" in line


def test_importing_leaves_the_environment_alone() -> None:
    modules = "gpt2cli, gpt2cli.cli, gpt2cli.model, gpt2cli.ppl, gpt2cli.quantize, gpt2cli.kernels.ops"
    families = "; ".join(f"import gpt2cli.kernels.{name}" for name in sorted(set(kernels.FAMILY_OF.values())))
    done = run_python(
        f"import os; before = dict(os.environ); import {modules}; {families}; "
        "assert dict(os.environ) == before, set(os.environ.items()) ^ set(before.items())"
    )
    assert done.returncode == 0, done.stderr


def test_a_file_imports_only_its_own_kernel_families() -> None:
    done = run_python(
        "import sys; from gguf import GGMLQuantizationType as Q; from gpt2cli import kernels; "
        "assert not any(f'gpt2cli.kernels.{m}' in sys.modules for m in ('legacy', 'kquants', 'floats')); "
        "assert Q.Q8_0 in kernels.KERNELS and Q.IQ2_XS not in kernels.KERNELS; "
        "kernels.kernels_for(Q.Q8_0); "
        "assert 'gpt2cli.kernels.legacy' in sys.modules and 'gpt2cli.kernels.kquants' not in sys.modules; "
        # numba's tables are filled without scipy's BLAS, which stays importable
        "assert 'scipy.linalg.cython_blas' not in sys.modules; "
        "import importlib.util; "
        "assert importlib.util.find_spec('scipy') is None or __import__('scipy.linalg.cython_blas')"
    )
    assert done.returncode == 0, done.stderr


def test_every_family_registers_the_types_it_is_listed_for() -> None:
    for qtype in kernels.FAMILY_OF:
        assert kernels.KERNELS[qtype].qtype == qtype
    assert set(kernels.KERNELS._registered) == set(kernels.FAMILY_OF)


def test_a_read_only_install_without_a_home_compiles_for_the_run(tmp_path: Path) -> None:
    package = tmp_path / "site" / "gpt2cli" / "kernels"  # as a wheel installs it: the link made a folder
    shutil.copytree(ROOT / "gpt2cli", package.parent, ignore=shutil.ignore_patterns("__pycache__"))
    # A file where __pycache__ and the user cache folders would go: no folder can be made there, even by root.
    (package / "__pycache__").write_text("")
    not_a_dir = tmp_path / "not-a-dir"
    not_a_dir.write_text("")
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    for path in [package, *package.iterdir()]:
        path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    env = {
        "PYTHONPATH": f"{tmp_path / 'site'}{os.pathsep}{ROOT}",
        "HOME": str(not_a_dir),
        "XDG_CACHE_HOME": str(not_a_dir),
        "NUMBA_CACHE_DIR": "",
        "TMPDIR": str(scratch),
    }
    code = (
        "import numpy as np; from gpt2cli.kernels import ops; "
        f"assert ops.__file__.startswith({str(package)!r}); "
        "x = np.ones((2, 8), np.float32); ops.layer_norm(x, x[0], x[0], 1e-5, x); print('ran')"
    )
    done = run_python(code, env)
    package.chmod(0o755)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ran"
    [note] = done.stderr.splitlines()
    assert note.startswith("gpt2: note: no writable Numba cache folder")
    assert list(scratch.iterdir()) == []  # the run's cache went with it


def test_the_first_compile_is_announced_once_and_a_cache_hit_not_at_all() -> None:
    @numba.njit
    def twice(x):
        return 2 * x

    @numba.njit
    def thrice(x):
        return 3 * x

    calls = []
    with on_first_compile(lambda: calls.append("compiling")):
        twice(1)
        thrice(1.0)
        twice(2)
    assert calls == ["compiling"]
    with on_first_compile(lambda: calls.append("again")):
        twice(3)
        np.testing.assert_equal(thrice(2.0), 6.0)
    assert calls == ["compiling"]


def test_a_warm_start_loads_cached_kernels_without_numba_tables_or_scipy() -> None:
    # decode_attention's code holds numba.np.arrayobj's np.empty, whose environment names that module
    code = (
        "import sys, numpy as np; from gpt2cli.kernels import ops; x = np.ones((2, 8), np.float32); "
        "ops.layer_norm(x, x[0], x[0], 1e-5, x); "
        "q = np.ones((1, 2, 8), np.float32); kv = np.ones((1, 1, 2, 4, 8), np.float32); "
        "ops.decode_attention(q, kv, kv, np.array([3]), 0, np.empty_like(q)); "
        "print(*(name in sys.modules for name in ('numba.np.arraymath', 'numba.np.arrayobj', "
        "'scipy.linalg.cython_blas')))"
    )
    assert run_python(code).returncode == 0  # compiles into the cache if it is cold
    done = run_python(code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "False", "False"]


def test_another_top_level_kernels_package_is_importable_beside_ours(tmp_path: Path) -> None:
    # Hugging Face's `kernels` (which transformers probes for) owns that name; ours ships as gpt2cli.kernels.
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("THEIRS = True\n")
    code = "import kernels, gpt2cli.kernels as ours; assert kernels.THEIRS and ours.KERNELS; print('ok')"
    done = run_python(code, {"PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
