"""Model specs, the model directory, the Hugging Face cache and the Hub's failures, all offline.

Every test runs with HF_HUB_OFFLINE=1 and huggingface_hub's own offline flag set, in temporary model and
cache directories; the tests of online failures replace the download functions with fakes.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import huggingface_hub
import pytest
from huggingface_hub import constants as hub_constants
from huggingface_hub.utils import (
    EntryNotFoundError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
)

from gpt2cli import registry
from gpt2cli.errors import Gpt2Error

DISTIL_REPO = "QuantFactory/distilgpt2-GGUF"
DISTIL_REVISION = "b41ee4e4e4949dba1b3bed4f89a87198b82f851b"


@pytest.fixture(autouse=True)
def offline_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub read HF_HUB_OFFLINE at import; set its flag too so nothing can reach the network.
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setenv("GPT2_HOME", str(tmp_path / "models"))
    return tmp_path


@pytest.fixture
def online(monkeypatch: pytest.MonkeyPatch) -> None:
    """Look online to registry.py; the download functions must then be fakes."""
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(registry, "hub_reachable", lambda: True)


def cache_file(repo: str, revision: str, filename: str, data: bytes = b"GGUF") -> Path:
    """A file as huggingface_hub's cache holds it: blob, snapshot symlink, and a ref for a branch revision."""
    repo_dir = registry.hf_cache_dir() / f"models--{repo.replace('/', '--')}"
    commit = revision if re.fullmatch(r"[0-9a-f]{40}", revision) else "c" * 40
    if commit != revision:
        (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
        (repo_dir / "refs" / revision).write_text(commit)
    blob = repo_dir / "blobs" / hashlib.sha256(filename.encode() + data).hexdigest()
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    path = repo_dir / "snapshots" / commit / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(blob)
    return path


def model_dir_file(name: str, qtype: str, data: bytes = b"GGUF") -> Path:
    path = registry.local_gguf_path(name, qtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def checkpoint_dir(path: Path, files: tuple[str, ...]) -> Path:
    path.mkdir(parents=True)
    for name in files:
        (path / name).write_bytes(b"{}")
    return path


# -- models.toml ---------------------------------------------------------------------------------------


def test_packaged_registry_lists_the_five_models():
    models = registry.load_registry()
    assert list(models) == ["distilgpt2", "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"]
    assert registry.DEFAULT_MODEL in models
    assert models["distilgpt2"].checkpoint == "distilbert/distilgpt2"
    assert models["gpt2-xl"].checkpoint == "openai-community/gpt2-xl"
    distil = models["distilgpt2"]
    assert (distil.gguf_repo, distil.gguf_revision) == (DISTIL_REPO, DISTIL_REVISION)
    assert len(distil.gguf_files) == 14
    assert distil.gguf_files["Q4_K_M"] == "distilgpt2.Q4_K_M.gguf"
    for entry in models.values():
        assert entry.description
        assert re.fullmatch(r"[0-9a-f]{40}", entry.gguf_revision)
        # The default type is downloadable for every model.
        assert registry.DEFAULT_TYPE in entry.gguf_files
        assert all(name.endswith(".gguf") for name in entry.gguf_files.values())


def test_registry_rejects_an_unknown_file_type(monkeypatch: pytest.MonkeyPatch):
    toml = '[models.x]\ndescription = "x"\ncheckpoint = "a/x"\n[models.x.gguf.files]\nQ9_K = "x.gguf"\n'
    monkeypatch.setattr(registry, "_read_models_toml", lambda: toml)
    with pytest.raises(ValueError, match="Q9_K"):
        registry.load_registry()


# -- directories -----------------------------------------------------------------------------------------


def test_model_dir_follows_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    assert registry.model_dir() == tmp_path / "models"
    monkeypatch.delenv("GPT2_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert registry.model_dir() == tmp_path / "xdg" / "gpt2"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert registry.model_dir() == tmp_path / "home" / ".cache" / "gpt2"
    assert (
        registry.local_gguf_path("gpt2", "q4_k_m")
        == tmp_path / "home" / ".cache" / "gpt2" / "gpt2.Q4_K_M.gguf"
    )


def test_hf_cache_dir_is_read_at_call_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    assert registry.hf_cache_dir() == tmp_path / "hf" / "hub"
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "elsewhere"))
    assert registry.hf_cache_dir() == tmp_path / "elsewhere" / "hub"


def test_offline_is_read_at_call_time(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    assert registry.hub_offline()
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert not registry.hub_offline()


# -- specs -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "parsed"),
    [
        ("distilgpt2", ("distilgpt2", None)),
        ("distilgpt2:q4_k_m", ("distilgpt2", "Q4_K_M")),
        ("GPT2-Medium:Q8_0", ("gpt2-medium", "Q8_0")),
    ],
)
def test_parse_model_spec(spec: str, parsed: tuple[str, str | None]):
    assert registry.parse_model_spec(spec) == parsed


@pytest.mark.parametrize("spec", ["", ":q4_0", "gpt2:"])
def test_parse_model_spec_rejects_malformed_specs(spec: str):
    with pytest.raises(Gpt2Error, match="bad model spec"):
        registry.parse_model_spec(spec)


def test_a_path_spec_is_used_as_is(tmp_path: Path):
    path = tmp_path / "mine.gguf"
    path.write_bytes(b"GGUF")
    assert registry.resolve_gguf(str(path)) == path


@pytest.mark.parametrize("spec", ["missing.gguf", "some/dir/model", "/nowhere/model.GGUF"])
def test_a_missing_path_is_an_error(spec: str):
    with pytest.raises(Gpt2Error, match=f"no such file: {re.escape(spec)}"):
        registry.resolve_gguf(spec)


# -- resolution ------------------------------------------------------------------------------------------


def test_the_model_dir_comes_before_the_cache():
    cache_file(DISTIL_REPO, DISTIL_REVISION, "distilgpt2.Q8_0.gguf")
    local = model_dir_file("distilgpt2", "Q8_0")
    assert registry.resolve_gguf("distilgpt2") == local
    assert registry.resolve_gguf("distilgpt2:q8_0") == local


def test_a_locally_quantized_type_need_not_be_published():
    local = model_dir_file("gpt2-large", "Q5_K_M")
    assert registry.resolve_gguf("gpt2-large:q5_k_m") == local


def test_offline_resolution_finds_the_hf_cache():
    cached = cache_file(DISTIL_REPO, DISTIL_REVISION, "distilgpt2.Q4_K_M.gguf", b"GGUF q4")
    path = registry.resolve_gguf("distilgpt2:q4_k_m")
    assert path == cached
    assert path.read_bytes() == b"GGUF q4"


def test_offline_and_not_cached_says_so():
    with pytest.raises(Gpt2Error) as error:
        registry.resolve_gguf("gpt2")
    message = str(error.value)
    assert "HF_HUB_OFFLINE" in message
    assert "--model path/to/file.gguf" in message
    assert "QuantFactory/gpt2-GGUF/gpt2.Q8_0.gguf" in message
    assert "\n" not in message


def test_an_unknown_name_lists_the_known_ones():
    with pytest.raises(Gpt2Error, match="unknown model 'gpt3'") as error:
        registry.resolve_gguf("gpt3:q8_0")
    for name in ["distilgpt2", "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"]:
        assert name in str(error.value)


def test_an_unknown_type_lists_the_available_ones():
    model_dir_file("distilgpt2", "F16")
    with pytest.raises(Gpt2Error, match="unknown type 'Q9_K' for distilgpt2") as error:
        registry.resolve_gguf("distilgpt2:q9_k")
    message = str(error.value)
    assert "available: Q2_K, Q3_K_S," in message
    assert "Q8_0, F16;" in message
    assert "gpt2 quantize distilgpt2 --type" in message


def test_an_unpublished_type_suggests_quantizing():
    with pytest.raises(Gpt2Error) as error:
        registry.resolve_gguf("gpt2-large:q5_k_m")
    message = str(error.value)
    assert "`gpt2 quantize gpt2-large --type Q5_K_M`" in message
    assert "available: Q2_K, Q3_K_S, Q3_K_M, Q3_K_L, Q4_K_S, Q8_0, F16" in message


def test_an_online_download_pins_the_revision(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, online: None):
    calls = []

    def fake_download(repo_id: str, filename: str, **kwargs) -> str:
        calls.append((repo_id, filename, kwargs))
        return str(tmp_path / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    assert registry.resolve_gguf("distilgpt2:Q6_K") == tmp_path / "distilgpt2.Q6_K.gguf"
    [(repo_id, filename, kwargs)] = calls
    assert (repo_id, filename) == (DISTIL_REPO, "distilgpt2.Q6_K.gguf")
    assert kwargs["revision"] == DISTIL_REVISION
    assert kwargs["local_files_only"] is False
    assert Path(kwargs["cache_dir"]) == registry.hf_cache_dir()


def http_error(cls: type[HfHubHTTPError], status: int) -> HfHubHTTPError:
    httpx2 = pytest.importorskip("httpx2", reason="huggingface_hub's HTTP errors are built on httpx2")
    response = httpx2.Response(status, request=httpx2.Request("GET", "https://hub.invalid/x"))
    return cls(f"{status} error\nmore detail", response=response)


def remote_entry_not_found() -> Exception:
    errors = pytest.importorskip("huggingface_hub.errors")
    if not hasattr(errors, "RemoteEntryNotFoundError"):
        return EntryNotFoundError("404 not found")
    return http_error(errors.RemoteEntryNotFoundError, 404)


def connect_error() -> Exception:
    httpx2 = pytest.importorskip("httpx2", reason="huggingface_hub talks HTTP through httpx2")
    return httpx2.ConnectError("connection refused")


@pytest.mark.parametrize(
    ("make_error", "expected"),
    [
        (lambda: LocalEntryNotFoundError("no connection, not cached"), "the Hub is unreachable"),
        (connect_error, "the Hub is unreachable"),
        (lambda: ConnectionResetError("reset"), "the Hub is unreachable"),
        (lambda: http_error(RepositoryNotFoundError, 404), "no such repository"),
        (remote_entry_not_found, "`gpt2 quantize distilgpt2 --type Q8_0`"),
        (lambda: http_error(HfHubHTTPError, 503), "503 error"),
        (lambda: OSError(28, "No space left on device"), "cannot save"),
    ],
)
def test_hub_failures_become_one_line_errors(make_error, expected: str, monkeypatch, online: None):
    error = make_error()

    def failing_download(*args, **kwargs):
        raise error

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", failing_download)
    with pytest.raises(Gpt2Error) as raised:
        registry.resolve_gguf("distilgpt2")
    assert expected in str(raised.value)
    assert "\n" not in str(raised.value)
    assert raised.value.__cause__ is error


# -- checkpoints -----------------------------------------------------------------------------------------


def test_a_checkpoint_directory_is_used_as_is(tmp_path: Path):
    directory = checkpoint_dir(tmp_path / "ckpt", registry.CHECKPOINT_FILES)
    assert registry.fetch_checkpoint(str(directory)) == directory


def test_a_pickle_only_checkpoint_is_refused(tmp_path: Path):
    directory = checkpoint_dir(tmp_path / "ckpt", ("config.json", "vocab.json", "merges.txt"))
    # Not a valid pickle: refusing must not depend on reading it.
    (directory / "pytorch_model.bin").write_bytes(b"\x80\x04not a pickle")
    with pytest.raises(Gpt2Error, match=r"pytorch_model\.bin\): pickle files are refused"):
        registry.fetch_checkpoint(str(directory))


def test_a_checkpoint_missing_tokenizer_files_is_an_error(tmp_path: Path):
    directory = checkpoint_dir(tmp_path / "ckpt", ("model.safetensors", "config.json"))
    with pytest.raises(Gpt2Error, match="lacks vocab.json, merges.txt"):
        registry.fetch_checkpoint(str(directory))


def test_a_registry_checkpoint_comes_from_the_hf_cache():
    for name in registry.CHECKPOINT_FILES:
        path = cache_file("distilbert/distilgpt2", "main", name)
    assert registry.fetch_checkpoint("distilgpt2") == path.parent


def test_a_registry_checkpoint_offline_and_not_cached_says_so():
    with pytest.raises(Gpt2Error, match="HF_HUB_OFFLINE"):
        registry.fetch_checkpoint("gpt2-medium")


def test_a_registry_checkpoint_fetches_safetensors_only(tmp_path: Path, monkeypatch, online: None):
    calls = []

    def fake_snapshot(repo_id: str, **kwargs) -> str:
        calls.append((repo_id, kwargs))
        # The repo held only pytorch_model.bin: the patterns let config and tokenizer files through.
        return str(checkpoint_dir(tmp_path / "snap", ("config.json", "vocab.json", "merges.txt")))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    with pytest.raises(Gpt2Error, match="has no model.safetensors"):
        registry.fetch_checkpoint("gpt2")
    [(repo_id, kwargs)] = calls
    assert repo_id == "openai-community/gpt2"
    assert sorted(kwargs["allow_patterns"]) == sorted(registry.CHECKPOINT_FILES)


def test_an_unknown_checkpoint_is_an_error():
    with pytest.raises(Gpt2Error, match="neither a checkpoint directory nor a known model"):
        registry.fetch_checkpoint("no-such-model")


# -- gpt2 models -----------------------------------------------------------------------------------------


def test_list_models_shows_what_is_on_disk():
    local = model_dir_file("distilgpt2", "Q4_K_M", b"x" * 10)
    cached = cache_file(
        "QuantFactory/gpt2-GGUF", "489af6ce270527ec6ddbc77b1b4025569daf6420", "gpt2.Q8_0.gguf", b"y" * 7
    )
    made = model_dir_file("gpt2-large", "Q5_K_M", b"z" * 3)
    rows = {(row.name, row.qtype): row for row in registry.list_models()}

    assert {name for name, _ in rows} == set(registry.load_registry())
    assert len([key for key in rows if key[0] == "distilgpt2"]) == 14
    assert rows["distilgpt2", "Q4_K_M"] == registry.ModelListing(
        "distilgpt2", "Q4_K_M", True, "model dir", local, 10
    )
    assert rows["gpt2", "Q8_0"] == registry.ModelListing("gpt2", "Q8_0", True, "HF cache", cached, 7)
    assert rows["gpt2-large", "Q5_K_M"] == registry.ModelListing(
        "gpt2-large", "Q5_K_M", False, "model dir", made, 3
    )
    assert rows["gpt2-xl", "Q8_0"] == registry.ModelListing("gpt2-xl", "Q8_0", True, None, None, None)
    large_types = [qtype for name, qtype in rows if name == "gpt2-large"]
    assert large_types == ["Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q5_K_M", "Q8_0", "F16"]


def test_a_registry_checkpoint_without_network_says_so(monkeypatch: pytest.MonkeyPatch, online: None):
    def failing_snapshot(*args, **kwargs):
        raise LocalEntryNotFoundError("no connection, not cached")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", failing_snapshot)
    with pytest.raises(Gpt2Error, match="unreachable .* pass a local Hugging Face directory"):
        registry.fetch_checkpoint("gpt2-xl")


def test_quantized_file_of_an_unregistered_model_is_found_by_name():
    path = registry.local_gguf_path("my-gpt2", "Q4_K_M")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"GGUF")
    assert registry.resolve_gguf("my-gpt2:q4_k_m") == path
    with pytest.raises(Gpt2Error, match="unknown model 'my-gpt2'"):
        registry.resolve_gguf("my-gpt2:q8_0")
