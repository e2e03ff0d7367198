"""Model resolution: .gguf paths, checkpoint directories converted once into the cache, hub names — offline only."""

import os
import shutil
import sys

import pytest

from ossrt import resolve
from ossrt.errors import ConvertError, ModelFileError, ModelNotFoundError, ParameterError
from ossrt.resolve import resolve_model


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("OSSRT_CACHE", str(tmp_path / "ossrt-cache"))
    return tmp_path / "ossrt-cache"


@pytest.fixture
def conversions(monkeypatch):
    """Counts the converter's runs."""
    from ossrt.format import convert as convert_module

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
    hub = make_hub_cache(tmp_path / "hub", "openai/gpt-oss-20b", tiny_checkpoint())
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = resolve_model(name, progress=False)
    assert out.parent == cache / "models" and out.name.startswith("openai_gpt-oss-20b-") and out.is_file()


def test_aliases():
    assert resolve.ALIASES["gpt-oss:120b"] == resolve.ALIASES["gpt-oss-120b"] == "openai/gpt-oss-120b"
    assert resolve.ALIASES["gpt-oss:20b"] == resolve.DEFAULT_MODEL == "openai/gpt-oss-20b"


def test_offline_and_not_cached(tmp_path, cache, monkeypatch):
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


# --- unusable names ------------------------------------------------------------------------------------------------
def test_path_too_long_is_named(tmp_path):
    long_gguf = tmp_path / ("m" * 300 + ".gguf")
    with pytest.raises(ModelFileError, match=f"^{long_gguf}: File name too long$"):
        resolve_model(long_gguf)
    long_dir = tmp_path / ("c" * 300)
    with pytest.raises(ModelNotFoundError, match=f"^{long_dir}: File name too long$"):
        resolve_model(str(long_dir))


def test_gguf_name_of_a_directory(tmp_path):
    (tmp_path / "m.gguf").mkdir()
    with pytest.raises(ModelFileError, match="m.gguf: is a directory, not a GGUF file"):
        resolve_model(tmp_path / "m.gguf")


@pytest.mark.parametrize("spec", [5, b"model.gguf", ["model.gguf"]])
def test_model_argument_type(spec):
    with pytest.raises(ParameterError, match=f"model must be a path or a model name .*, got {type(spec).__name__}"):
        resolve_model(spec)


def test_empty_name():
    with pytest.raises(ModelNotFoundError, match="the model name is empty; expected a .gguf file"):
        resolve_model("")


@pytest.mark.parametrize("name", ["openai/gpt--oss", "openai/" + "g" * 120, "openai/-gpt"])
def test_names_the_hub_refuses(name, tmp_path, cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match=f"^'{name}' is not a file, a directory or a valid hub name: "):
        resolve_model(name, progress=False)


@pytest.fixture
def fake_convert(monkeypatch):
    """A converter that only writes a marker: these tests are about cache names, not conversion."""
    from ossrt.format import convert as convert_module

    def fake(src, out, **kwargs):
        out.write_bytes(b"converted")
        return out

    monkeypatch.setattr(convert_module, "convert", fake)


def test_cached_name_fits_for_a_long_checkpoint_name(tmp_path, cache, fake_convert):
    src = tmp_path / ("n" * 250)
    src.mkdir()
    (src / "config.json").write_text("{}")
    out = resolve_model(src, progress=False)
    assert out.read_bytes() == b"converted" and out.parent == cache / "models"
    assert out.name.startswith("n" * 100 + "-") and out.name.endswith("-q8_0.gguf") and len(out.name) == 100 + 23


def test_stale_removal_spares_other_models(tmp_path, cache, fake_convert):
    """A checkpoint named like a glob pattern replaces only its own earlier conversion."""
    models = cache / "models"
    models.mkdir(parents=True)
    other = models / "ab-0123456789ab-q8_0.gguf"
    own_earlier = models / "a*-0123456789ab-q8_0.gguf"
    other.write_bytes(b"x")
    own_earlier.write_bytes(b"x")
    src = tmp_path / "a*"
    src.mkdir()
    (src / "config.json").write_text("{}")
    out = resolve_model(src, progress=False)
    assert sorted(models.iterdir()) == sorted([other, out])


def test_unusable_cache(tiny_checkpoint, tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("OSSRT_CACHE", str(tmp_path / "file"))
    with pytest.raises(ConvertError, match="file/models: cannot use the model cache: Not a directory .*OSSRT_CACHE"):
        resolve_model(tiny_checkpoint(), progress=False)
