"""Write full-size distilgpt2- or gpt2-shaped GGUFs with random weights, one per block type (run by hand).

Speed does not depend on the weights' values. The F32 file is ours (tests/synthetic.py); the quantized files
come from llama.cpp's own quantizer through llama-cpp-python when it is installed, so that both runtimes are
timed on files llama.cpp wrote, and from `gpt2 quantize` otherwise.

    python benchmarks/make_random_gguf.py --shape distilgpt2 --out /tmp/gpt2-bench
"""

from __future__ import annotations

import argparse
import ctypes
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from synthetic import build_gguf  # noqa: E402

from gpt2cli.gguf_file import GPT2Config  # noqa: E402

SHAPES = {
    "distilgpt2": GPT2Config(n_layer=6),
    "gpt2": GPT2Config(n_layer=12),
}
FTYPES = ["F16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_1", "Q5_0", "Q4_K_M", "Q4_1", "Q4_0", "Q3_K_M", "Q2_K"]


def quantize_with_llama_cpp(src: Path, dst: Path, ftype: str) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.nthread = 2
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama_model_quantize failed for {ftype}")


def quantize_with_gpt2(src: Path, dst: Path, ftype: str) -> None:
    subprocess.run(["gpt2", "quantize", str(src), "--type", ftype, "-o", str(dst)], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="distilgpt2")
    parser.add_argument("--out", type=Path, default=Path("/tmp/gpt2-bench"))
    parser.add_argument("--types", nargs="*", default=FTYPES)
    args = parser.parse_args()
    try:
        import llama_cpp  # noqa: F401

        quantize, by = quantize_with_llama_cpp, "llama.cpp"
    except ImportError:
        quantize, by = quantize_with_gpt2, "gpt2 quantize"
    args.out.mkdir(parents=True, exist_ok=True)
    f32 = args.out / f"{args.shape}.F32.gguf"
    if not f32.exists():
        t0 = time.perf_counter()
        build_gguf(f32, config=SHAPES[args.shape], seed=1)
        print(f"{f32}: written in {time.perf_counter() - t0:.1f} s")
    for ftype in args.types:
        dst = args.out / f"{args.shape}.{ftype}.gguf"
        if not dst.exists():
            t0 = time.perf_counter()
            quantize(f32, dst, ftype)
            print(f"{dst}: {by} in {time.perf_counter() - t0:.1f} s, {dst.stat().st_size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
