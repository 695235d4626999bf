"""Model names, where their files are, and how they are fetched from the Hugging Face Hub.

A model spec is a path to a .gguf file, or `NAME[:TYPE]` with NAME from models.toml and TYPE a llama-quantize
file type, case-insensitive (`distilgpt2:q4_k_m`). A name is looked for in the tool's model directory first
(`gpt2 quantize` writes `<name>.<TYPE>.gguf` there), then in the model's published GGUF repo through
huggingface_hub, which keeps its own cache and honours HF_HUB_OFFLINE=1.
"""

from __future__ import annotations

import importlib
import os
import socket
import sys
import threading
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from gpt2cli.errors import Gpt2Error

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

DEFAULT_MODEL = "distilgpt2"
# Q8_0 keeps a small model's quality (+0.04% perplexity on Llama-3-8B); lower bits cost GPT-2 much more.
DEFAULT_TYPE = "Q8_0"

# The llama-quantize file types `gpt2 quantize` writes, smallest first (llama-quantize's names).
QUANT_TYPES = (
    "Q2_K",
    "Q3_K_S",
    "Q3_K_M",
    "Q3_K_L",
    "Q4_0",
    "Q4_1",
    "Q4_K_S",
    "Q4_K_M",
    "Q5_0",
    "Q5_1",
    "Q5_K_S",
    "Q5_K_M",
    "Q6_K",
    "Q8_0",
    "F16",
)

# What `gpt2 quantize` reads from an original checkpoint. Never a .bin/.pt: those are pickles.
CHECKPOINT_FILES = ("model.safetensors", "config.json", "vocab.json", "merges.txt")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

LOCAL_FILE_HINT = "pass a local file with --model path/to/file.gguf"
LOCAL_CHECKPOINT_HINT = "pass a local Hugging Face directory holding model.safetensors"
# How long to wait for a connection to the Hub before calling it unreachable.
CONNECT_TIMEOUT_SECONDS = 1.5
_TRUE_VALUES = {"1", "ON", "YES", "TRUE"}  # as huggingface_hub reads its boolean variables


@dataclass(frozen=True)
class ModelEntry:
    name: str
    description: str
    checkpoint: str  # Hub repo of the original safetensors weights
    gguf_repo: str | None = None  # Hub repo of published GGUF files, if any
    gguf_revision: str | None = None  # commit of gguf_repo the file names were checked at
    gguf_files: dict[str, str] = field(default_factory=dict)  # file type -> file name in gguf_repo


@dataclass(frozen=True)
class ModelListing:
    """One (model, type) row of `gpt2 models`."""

    name: str
    qtype: str
    published: bool  # downloadable from the model's GGUF repo
    source: str | None  # "model dir", "HF cache", or None when not on disk
    path: Path | None
    size: int | None  # bytes on disk


def _read_models_toml() -> str:
    packaged = resources.files("gpt2cli") / "models.toml"
    if packaged.is_file():
        return packaged.read_text(encoding="utf-8")
    # A source checkout or an editable install: the wheel's copy is made at build time.
    return (Path(__file__).resolve().parent.parent / "models.toml").read_text(encoding="utf-8")


def load_registry() -> dict[str, ModelEntry]:
    """The models of models.toml by name, in file order."""
    registry = {}
    for name, model in tomllib.loads(_read_models_toml())["models"].items():
        gguf = model.get("gguf", {})
        files = gguf.get("files", {})
        unknown = sorted(set(files) - set(QUANT_TYPES))
        if unknown:
            raise ValueError(f"models.toml: {name} lists unknown file types {unknown}")
        registry[name] = ModelEntry(
            name=name,
            description=model["description"],
            checkpoint=model["checkpoint"],
            gguf_repo=gguf.get("repo"),
            gguf_revision=gguf.get("revision"),
            gguf_files=dict(files),
        )
    return registry


def model_dir() -> Path:
    """The tool's own model directory: $GPT2_HOME, else $XDG_CACHE_HOME/gpt2, else ~/.cache/gpt2."""
    if home := os.environ.get("GPT2_HOME"):
        return Path(home).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "gpt2"


def local_gguf_path(name: str, qtype: str) -> Path:
    """Where `gpt2 quantize NAME --type TYPE` writes its file."""
    return model_dir() / f"{name}.{qtype.upper()}.gguf"


def hf_cache_dir() -> Path:
    """huggingface_hub's cache folder, read from the environment now: the library reads it once, at import."""
    hf_home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface"
    )
    cache = (
        os.environ.get("HF_HUB_CACHE")
        or os.environ.get("HUGGINGFACE_HUB_CACHE")
        or os.path.join(hf_home, "hub")
    )
    return Path(cache).expanduser()


def hub_offline() -> bool:
    """HF_HUB_OFFLINE as set now, or as huggingface_hub read it at import."""
    from huggingface_hub import constants as hub_constants

    return hub_constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in _TRUE_VALUES


def parse_model_spec(spec: str) -> tuple[str, str | None]:
    """`NAME` or `NAME:TYPE` -> (name, TYPE upper-cased, or None for the default type)."""
    name, sep, qtype = spec.strip().partition(":")
    if not name or (sep and not qtype):
        raise Gpt2Error(
            f"bad model spec {spec!r}: use NAME, NAME:TYPE (e.g. distilgpt2:q4_k_m) or a .gguf path"
        )
    return name.lower(), qtype.upper() if sep else None


def is_path_spec(spec: str) -> bool:
    """A spec naming a file rather than a model: it ends in .gguf or holds a directory separator."""
    return spec.lower().endswith(".gguf") or "/" in spec or os.sep in spec


def resolve_gguf(spec: str) -> Path:
    """The GGUF file a spec names: a path as is, else the model directory, else the Hub (or its cache)."""
    if is_path_spec(spec):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise Gpt2Error(f"no such file: {spec}")
        return path
    name, qtype = parse_model_spec(spec)
    qtype = qtype or DEFAULT_TYPE
    local = local_gguf_path(name, qtype)
    if local.is_file():  # what `gpt2 quantize` made, for a registry model or any other checkpoint
        return local
    registry = load_registry()
    entry = registry.get(name)
    if entry is None:
        raise Gpt2Error(f"unknown model {name!r}; known models: {', '.join(registry)} (or {LOCAL_FILE_HINT})")
    filename = entry.gguf_files.get(qtype)
    if filename is None:
        raise Gpt2Error(_missing_type_message(entry, qtype))
    what = f"{name}:{qtype} ({entry.gguf_repo}/{filename})"
    import huggingface_hub

    cached = huggingface_hub.try_to_load_from_cache(
        entry.gguf_repo, filename, cache_dir=hf_cache_dir(), revision=entry.gguf_revision
    )
    if isinstance(cached, str):  # None and a "known missing" sentinel are not files
        return Path(cached)
    offline = hub_offline()
    try:
        path = huggingface_hub.hf_hub_download(
            entry.gguf_repo,
            filename,
            revision=entry.gguf_revision,
            cache_dir=hf_cache_dir(),
            local_files_only=offline or not hub_reachable(),
        )
    except _hub_errors() as error:
        missing_hint = f"; make it with `gpt2 quantize {name} --type {qtype}`"
        raise Gpt2Error(_hub_error_message(error, what, offline, LOCAL_FILE_HINT, missing_hint)) from error
    return Path(path)


def fetch_checkpoint(name_or_dir: str) -> Path:
    """A directory holding the original safetensors checkpoint: a local Hugging Face directory as is, or the
    registry model's files from the Hub (CHECKPOINT_FILES only, so no pickle is ever fetched)."""
    directory = Path(name_or_dir).expanduser()
    if directory.is_dir():
        return _checked_checkpoint_dir(directory, name_or_dir)
    registry = load_registry()
    entry = registry.get(name_or_dir.lower())
    if entry is None:
        raise Gpt2Error(
            f"{name_or_dir!r} is neither a checkpoint directory nor a known model ({', '.join(registry)})"
        )
    what = f"{entry.name} ({entry.checkpoint})"
    offline = hub_offline()
    import huggingface_hub

    try:
        snapshot = huggingface_hub.snapshot_download(
            entry.checkpoint,
            allow_patterns=list(CHECKPOINT_FILES),
            cache_dir=hf_cache_dir(),
            local_files_only=offline or not hub_reachable(),
        )
    except _hub_errors() as error:
        raise Gpt2Error(_hub_error_message(error, what, offline, LOCAL_CHECKPOINT_HINT)) from error
    return _checked_checkpoint_dir(Path(snapshot), entry.checkpoint)


def list_models() -> list[ModelListing]:
    """Every registry model and type that is published or on disk, model by model, smallest type first."""
    import huggingface_hub

    rows = []
    cache_dir = hf_cache_dir()
    for entry in load_registry().values():
        for qtype in _available_types(entry):
            source, path = None, local_gguf_path(entry.name, qtype)
            if path.is_file():
                source = "model dir"
            elif qtype in entry.gguf_files:
                cached = huggingface_hub.try_to_load_from_cache(
                    entry.gguf_repo,
                    entry.gguf_files[qtype],
                    cache_dir=cache_dir,
                    revision=entry.gguf_revision,
                )
                # A str is a cached file; None and a "known missing" sentinel are not.
                if isinstance(cached, str):
                    source, path = "HF cache", Path(cached)
            rows.append(
                ModelListing(
                    name=entry.name,
                    qtype=qtype,
                    published=qtype in entry.gguf_files,
                    source=source,
                    path=path if source else None,
                    size=path.stat().st_size if source else None,
                )
            )
    return rows


def _local_types(name: str) -> list[str]:
    directory = model_dir()
    if not directory.is_dir():
        return []
    types = (path.name[len(name) + 1 : -len(".gguf")] for path in directory.glob(f"{name}.*.gguf"))
    return [qtype for qtype in types if qtype and "." not in qtype]


def _available_types(entry: ModelEntry) -> list[str]:
    types = set(entry.gguf_files) | set(_local_types(entry.name))
    return sorted(types, key=lambda t: (QUANT_TYPES.index(t) if t in QUANT_TYPES else len(QUANT_TYPES), t))


def _missing_type_message(entry: ModelEntry, qtype: str) -> str:
    available = ", ".join(_available_types(entry)) or "none"
    if qtype in QUANT_TYPES:
        return (
            f"{entry.name} has no {qtype} file here or published (available: {available}); "
            f"make it with `gpt2 quantize {entry.name} --type {qtype}`"
        )
    return (
        f"unknown type {qtype!r} for {entry.name}; available: {available}; "
        f"`gpt2 quantize {entry.name} --type T` makes any of {', '.join(QUANT_TYPES)}"
    )


def hub_reachable() -> bool:
    """Whether a connection to the Hub (or to the proxy in between) opens within CONNECT_TIMEOUT_SECONDS.

    Without a network huggingface_hub retries five times over 25 s, logging each retry; asked first, this
    lets a download that cannot work fail at once, or fall back to the cache.
    """
    from urllib.parse import urlsplit
    from urllib.request import getproxies, proxy_bypass

    from huggingface_hub import constants as hub_constants

    endpoint = urlsplit(hub_constants.ENDPOINT)
    proxy = None if proxy_bypass(endpoint.hostname or "") else getproxies().get(endpoint.scheme)
    if proxy and "://" not in proxy:
        proxy = "http://" + proxy
    target = urlsplit(proxy) if proxy else endpoint
    address = (target.hostname or "", target.port or (443 if target.scheme == "https" else 80))
    connected: list[bool] = []

    def connect() -> None:  # in a thread: a socket's timeout does not bound the name look-up
        try:
            socket.create_connection(address, timeout=CONNECT_TIMEOUT_SECONDS).close()
            connected.append(True)
        except OSError:
            connected.append(False)

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(CONNECT_TIMEOUT_SECONDS)
    return connected == [True]


def _network_errors() -> tuple[type[BaseException], ...]:
    """The exceptions a dropped connection raises in whichever HTTP client huggingface_hub uses."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, name in (
        ("httpx2", "TransportError"),
        ("httpx", "TransportError"),
        ("requests", "ConnectionError"),
    ):
        try:
            errors.append(getattr(importlib.import_module(module), name))
        except ImportError:
            continue
    return tuple(errors)


def _hub_errors() -> tuple[type[BaseException], ...]:
    from huggingface_hub.utils import EntryNotFoundError

    # OSError covers LocalEntryNotFoundError and HfHubHTTPError too, and a full disk.
    return (OSError, EntryNotFoundError, *_network_errors())


def _hub_error_message(
    error: Exception, what: str, offline: bool, local_hint: str, missing_hint: str = ""
) -> str:
    """One line for a failed Hub download. Order matters: the classes overlap (see huggingface_hub.errors)."""
    from huggingface_hub.utils import (
        EntryNotFoundError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(error, (LocalEntryNotFoundError, OfflineModeIsEnabled)) and offline:
        return f"{what} is not on disk and HF_HUB_OFFLINE is set: unset it to download, or {local_hint}"
    if isinstance(error, (LocalEntryNotFoundError, OfflineModeIsEnabled, *_network_errors())):
        return (
            f"cannot download {what}: the Hub is unreachable (no network?) and it is not cached; "
            f"{local_hint} (HF_HUB_OFFLINE=1 uses the cache only)"
        )
    if isinstance(error, RepositoryNotFoundError):
        return f"cannot download {what}: the Hub has no such repository (or it is gated or private)"
    if isinstance(error, RevisionNotFoundError):
        return f"cannot download {what}: the pinned revision is not on the Hub"
    if isinstance(error, EntryNotFoundError):
        return f"cannot download {what}: the file is not in the repository{missing_hint}"
    if isinstance(error, HfHubHTTPError):
        return f"cannot download {what}: {_first_line(error)}"
    return f"cannot save {what}: {_first_line(error)}"


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _checked_checkpoint_dir(directory: Path, label: str) -> Path:
    if not (directory / "model.safetensors").is_file():
        pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise Gpt2Error(
                f"{label} holds only a pickle checkpoint ({', '.join(pickles)}): pickle files are refused "
                "and nothing is unpickled; save the model as model.safetensors"
            )
        raise Gpt2Error(f"{label} has no model.safetensors (pickle checkpoints are refused)")
    missing = [name for name in CHECKPOINT_FILES if not (directory / name).is_file()]
    if missing:
        raise Gpt2Error(f"{label} lacks {', '.join(missing)}")
    return directory
