"""A random Hugging Face GPT-2 checkpoint of a real model's shape, to measure `gpt2 quantize` (by hand).

    python benchmarks/make_random_checkpoint.py --shape gpt2-xl --out /tmp/gpt2-xl-random [--dtype F16]
    /usr/bin/time -v gpt2 quantize /tmp/gpt2-xl-random --type Q4_K_M -o /tmp/xl.Q4_K_M.gguf

Writes config.json, model.safetensors (Conv1D weights stored (in, out), as HF does), vocab.json and
merges.txt (the real vocabulary, from the tests' source), never in the repository. The state dict is built
in memory: ~3 GB for gpt2-xl in F16.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from synthetic import gpt2_vocab  # noqa: E402

SHAPES = {  # n_layer, n_embd, n_head
    "distilgpt2": (6, 768, 12),
    "gpt2": (12, 768, 12),
    "gpt2-medium": (24, 1024, 16),
    "gpt2-large": (36, 1280, 20),
    "gpt2-xl": (48, 1600, 25),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=SHAPES, default="gpt2-xl")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dtype", choices=("F32", "F16"), default="F16")
    args = parser.parse_args()
    n_layer, e, n_head = SHAPES[args.shape]
    n_vocab, n_ctx = 50257, 1024
    dtype = np.float16 if args.dtype == "F16" else np.float32
    rng = np.random.default_rng(0)

    def normal(*shape: int, scale: float = 0.02) -> np.ndarray:  # [shape] in the checkpoint's dtype
        return (scale * rng.standard_normal(shape, dtype=np.float32)).astype(dtype)

    sd = {"wte.weight": normal(n_vocab, e), "wpe.weight": normal(n_ctx, e)}
    for i in range(n_layer):
        p = f"h.{i}."
        sd |= {
            p + "ln_1.weight": 1 + normal(e),
            p + "ln_1.bias": normal(e),
            p + "attn.c_attn.weight": normal(e, 3 * e),
            p + "attn.c_attn.bias": normal(3 * e),
            p + "attn.c_proj.weight": normal(e, e),
            p + "attn.c_proj.bias": normal(e),
            p + "ln_2.weight": 1 + normal(e),
            p + "ln_2.bias": normal(e),
            p + "mlp.c_fc.weight": normal(e, 4 * e),
            p + "mlp.c_fc.bias": normal(4 * e),
            p + "mlp.c_proj.weight": normal(4 * e, e),
            p + "mlp.c_proj.bias": normal(e),
        }
    sd |= {"ln_f.weight": 1 + normal(e), "ln_f.bias": normal(e)}
    args.out.mkdir(parents=True, exist_ok=True)
    save_file(sd, args.out / "model.safetensors")
    config = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "n_layer": n_layer,
        "n_head": n_head,
        "n_embd": e,
        "n_positions": n_ctx,
        "n_ctx": n_ctx,
        "vocab_size": n_vocab,
        "layer_norm_epsilon": 1e-5,
    }
    (args.out / "config.json").write_text(json.dumps(config))
    tokens, merges = gpt2_vocab()
    (args.out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    (args.out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    print(f"wrote {args.out} ({args.shape}, {args.dtype})")


if __name__ == "__main__":
    main()
