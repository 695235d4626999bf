"""llama.cpp through llama-cpp-python, the optional oracle: loaded with its plain CPU path, quietly."""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Iterator
from pathlib import Path

import pytest


def import_llama_cpp():
    """The llama_cpp module, or a skip with a one-line reason."""
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (optional oracle)")


@contextlib.contextmanager
def llama_model(path: Path, **kwargs) -> Iterator:
    """A `llama_cpp.Llama` on `path` without the CPU backend's extra buffer types.

    Those repack weights for AMX/AVX-512 and crash a default pip build of llama-cpp-python on quantized files
    on machines with AMX (llama-quantize's own files included); the plain CPU path is the reference anyway.
    """
    llama_cpp = import_llama_cpp()
    defaults = llama_cpp.llama_cpp.llama_model_default_params

    def plain_cpu_params():
        params = defaults()
        params.use_extra_bufts = False
        return params

    quiet = llama_cpp.llama_log_callback(lambda level, text, user_data: None)
    llama_cpp.llama_log_set(quiet, ctypes.c_void_p())
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(llama_cpp.llama_cpp, "llama_model_default_params", plain_cpu_params)
        llm = llama_cpp.Llama(model_path=str(path), verbose=False, **kwargs)
    try:
        yield llm
    finally:
        llm.close()
        llama_cpp.llama_log_set(ctypes.cast(None, llama_cpp.llama_log_callback), ctypes.c_void_p())
