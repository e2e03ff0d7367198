"""Model resolution: .gguf paths, checkpoint directories converted once into the cache, hub names — offline only."""

import os
import shutil
import sys

import pytest

from ossrt import resolve
from ossrt.errors import ModelFileError, ModelNotFoundError
from ossrt.resolve import resolve_model


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("OSSRT_CACHE", str(tmp_path / "ossrt-cache"))
    return tmp_path / "ossrt-cache"


@pytest.fixture
def conversions(monkeypatch):
    """Counts the converter's runs."""
    from ossrt import convert as convert_module

    calls = []
    real = convert_module.convert

    def counting(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(convert_module, "convert", counting)
    return calls


def test_gguf_paths_pass_through(tiny_gguf, tmp_path):
    assert resolve_model(tiny_gguf()) == tiny_gguf()
    with pytest.raises(ModelFileError, match="missing.gguf: no such file"):
        resolve_model(tmp_path / "missing.gguf")


def test_checkpoint_directory_converted_once_and_rebuilt_when_it_changes(tiny_checkpoint, tmp_path, cache,
                                                                         conversions):
    src = tmp_path / "my-finetune"
    shutil.copytree(tiny_checkpoint(), src)
    first = resolve_model(src, progress=False)
    assert first.parent == cache / "models" and first.name.startswith("my-finetune-") and first.is_file()
    assert resolve_model(src, progress=False) == first and len(conversions) == 1
    config = src / "config.json"
    os.utime(config, ns=(config.stat().st_atime_ns, config.stat().st_mtime_ns + 10**9))
    second = resolve_model(src, progress=False)
    assert second != first and second.is_file() and not first.exists() and len(conversions) == 2


def make_hub_cache(root, repo, checkpoint):
    """The layout huggingface_hub keeps: models--owner--name/{refs/main, snapshots/<commit>/...}."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    base = root / ("models--" + repo.replace("/", "--"))
    shutil.copytree(checkpoint, base / "snapshots" / commit)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(commit)
    return root


@pytest.mark.parametrize("name", ["gpt-oss:20b", "gpt-oss-20b", "openai/gpt-oss-20b", None])
def test_hub_name_from_the_local_hub_cache_offline(name, tiny_checkpoint, tmp_path, cache, monkeypatch):
    pytest.importorskip("huggingface_hub")
    hub = make_hub_cache(tmp_path / "hub", "openai/gpt-oss-20b", tiny_checkpoint())
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = resolve_model(name, progress=False)
    assert out.parent == cache / "models" and out.name.startswith("openai_gpt-oss-20b-") and out.is_file()


def test_aliases():
    assert resolve.ALIASES["gpt-oss:120b"] == resolve.ALIASES["gpt-oss-120b"] == "openai/gpt-oss-120b"
    assert resolve.ALIASES["gpt-oss:20b"] == resolve.DEFAULT_MODEL == "openai/gpt-oss-20b"


def test_offline_and_not_cached(tmp_path, cache, monkeypatch):
    pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="not in the local Hugging Face cache .*HF_HUB_OFFLINE"):
        resolve_model("gpt-oss-120b", progress=False)


def test_missing_hub_extra(cache, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(ModelNotFoundError, match=r"pip install 'ossrt\[hub\]'"):
        resolve_model("gpt-oss-20b", progress=False)


def test_unknown_names_list_the_accepted_forms(tmp_path):
    with pytest.raises(ModelNotFoundError, match="expected a .gguf file, a Hugging Face checkpoint directory"):
        resolve_model("not a model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="without config.json"):
        resolve_model(tmp_path / "empty")


def test_cli_error_for_an_unknown_model(cache):
    from click.testing import CliRunner

    from ossrt.cli import main

    r = CliRunner().invoke(main, ["generate", "not a model", "-p", "hi"])
    assert r.exit_code == 2 and r.output.startswith("error: ") and "hub name" in r.output
