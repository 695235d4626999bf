"""An independent GPT-2 in plain numpy (f64, no cache), as simple as picoGPT, for checking logits."""

from __future__ import annotations

import numpy as np


def gelu(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def softmax(x):
    exp_x = np.exp(x - np.max(x, axis=-1, keepdims=True))
    return exp_x / np.sum(exp_x, axis=-1, keepdims=True)


def layer_norm(x, g, b, eps):
    mean = np.mean(x, axis=-1, keepdims=True)
    variance = np.var(x, axis=-1, keepdims=True)
    return g * (x - mean) / np.sqrt(variance + eps) + b


def linear(x, w, b=None):  # [m, in], w [out, in] as GGUF stores it -> [m, out]
    y = x @ w.T
    return y if b is None else y + b


def attention(q, k, v, mask):  # [n_q, d], [n_k, d], [n_k, d], [n_q, n_k] -> [n_q, d]
    return softmax(q @ k.T / np.sqrt(q.shape[-1]) + mask) @ v


def mha(x, w_qkv, b_qkv, w_out, b_out, n_head):  # [n, e] -> [n, e]
    qkv = linear(x, w_qkv, b_qkv)
    heads = [np.split(part, n_head, axis=-1) for part in np.split(qkv, 3, axis=-1)]
    mask = (1 - np.tri(x.shape[0])) * -1e10
    out = [attention(q, k, v, mask) for q, k, v in zip(*heads, strict=True)]
    return linear(np.hstack(out), w_out, b_out)


def hidden_states(params: dict[str, np.ndarray], ids: list[int], n_head: int, eps: float = 1e-5) -> list:
    """transformers' hidden_states, [n, e] each: the embeddings, each block's output, and the last block's
    after the final LayerNorm in its place; from tensors named as in GGUF."""
    p = params
    x = p["token_embd.weight"][ids] + p["position_embd.weight"][: len(ids)]
    states = [x]
    n_layer = 1 + max(int(k.split(".")[1]) for k in p if k.startswith("blk."))
    for i in range(n_layer):
        b = f"blk.{i}."
        h = layer_norm(x, p[b + "attn_norm.weight"], p[b + "attn_norm.bias"], eps)
        x = x + mha(
            h,
            p[b + "attn_qkv.weight"],
            p[b + "attn_qkv.bias"],
            p[b + "attn_output.weight"],
            p[b + "attn_output.bias"],
            n_head,
        )
        h = layer_norm(x, p[b + "ffn_norm.weight"], p[b + "ffn_norm.bias"], eps)
        h = gelu(linear(h, p[b + "ffn_up.weight"], p[b + "ffn_up.bias"]))
        x = x + linear(h, p[b + "ffn_down.weight"], p[b + "ffn_down.bias"])
        states.append(x)
    states[-1] = layer_norm(x, p["output_norm.weight"], p["output_norm.bias"], eps)
    return states


def gpt2_logits(params: dict[str, np.ndarray], ids: list[int], n_head: int, eps: float = 1e-5) -> np.ndarray:
    """Logits [n, vocab] for every position of `ids`, from tensors named as in GGUF."""
    final = hidden_states(params, ids, n_head, eps)[-1]
    return linear(final, params.get("output.weight", params["token_embd.weight"]))
