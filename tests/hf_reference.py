"""transformers' GPT-2 (the `reference` extra) built from a synthetic GGUF's tensors, for oracle tests."""

from __future__ import annotations

import numpy as np
import pytest

from gpt2cli.gguf_file import GPT2Config

# GGUF names -> GPT2Model's; GGUF stores linear weights [out, in], HF's Conv1D [in, out].
LAYER_NAMES = {
    "attn_norm": "ln_1",
    "ffn_norm": "ln_2",
    "attn_qkv": "attn.c_attn",
    "attn_output": "attn.c_proj",
    "ffn_up": "mlp.c_fc",
    "ffn_down": "mlp.c_proj",
}


def transformers_gpt2(params: dict[str, np.ndarray], config: GPT2Config, lm_head: bool = True):
    """A GPT2LMHeadModel (or GPT2Model) in eval mode with `params`' weights in f32; skips the test without
    torch and transformers."""
    torch = pytest.importorskip("torch", reason="torch is not installed (the reference extra)")
    transformers = pytest.importorskip(
        "transformers", reason="transformers is not installed (reference extra)"
    )
    hf_config = transformers.GPT2Config(
        vocab_size=config.n_vocab,
        n_positions=config.n_ctx,
        n_embd=config.n_embd,
        n_layer=config.n_layer,
        n_head=config.n_head,
        n_inner=config.n_ff,
        layer_norm_epsilon=config.layer_norm_eps,
        activation_function="gelu_new",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    model_class = transformers.GPT2LMHeadModel if lm_head else transformers.GPT2Model
    hf = model_class(hf_config).eval()
    prefix = "transformer." if lm_head else ""
    state = {
        prefix + "wte.weight": params["token_embd.weight"],
        prefix + "wpe.weight": params["position_embd.weight"],
        prefix + "ln_f.weight": params["output_norm.weight"],
        prefix + "ln_f.bias": params["output_norm.bias"],
    }
    for i in range(config.n_layer):
        for ours, theirs in LAYER_NAMES.items():
            w = params[f"blk.{i}.{ours}.weight"]
            state[f"{prefix}h.{i}.{theirs}.weight"] = w if w.ndim == 1 else w.T
            state[f"{prefix}h.{i}.{theirs}.bias"] = params[f"blk.{i}.{ours}.bias"]
    hf.load_state_dict({k: torch.tensor(v, dtype=torch.float32) for k, v in state.items()}, strict=False)
    if lm_head:
        hf.tie_weights()
    return hf
