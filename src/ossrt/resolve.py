"""Finding the model file for a name: a `.gguf` path, a local Hugging Face checkpoint directory, or a hub name.

Checkpoints are converted once into the user's cache folder (`$OSSRT_CACHE`, else the platform's cache dir) and
reused; a changed checkpoint (file names, sizes, modification times) gets a fresh conversion. Hub names are
downloaded with `huggingface_hub` (the `hub` extra), which shows progress and resumes, and then converted.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
from pathlib import Path

from .errors import ModelFileError, ModelNotFoundError

DEFAULT_MODEL = "openai/gpt-oss-20b"
ALIASES = {"gpt-oss-20b": "openai/gpt-oss-20b", "gpt-oss:20b": "openai/gpt-oss-20b",
           "gpt-oss-120b": "openai/gpt-oss-120b", "gpt-oss:120b": "openai/gpt-oss-120b"}
# What the converter reads; not the `original/` or `metal/` copies of the weights.
HUB_FILES = ["config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.json",
             "tokenizer_config.json", "special_tokens_map.json", "generation_config.json", "chat_template.jinja"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
FORMS = ("a .gguf file, a Hugging Face checkpoint directory, or a hub name such as openai/gpt-oss-20b "
         "(aliases gpt-oss-20b, gpt-oss:20b, gpt-oss-120b, gpt-oss:120b)")


def cache_dir() -> Path:
    if os.environ.get("OSSRT_CACHE"):
        return Path(os.environ["OSSRT_CACHE"])
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "ossrt"
    if sys.platform == "win32":
        return Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local")) / "ossrt" / "Cache"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ossrt"


def resolve_model(spec: str | os.PathLike | None = None, *, cache: Path | None = None, progress: bool | None = None,
                  outtype: str = "q8_0") -> Path:
    """The GGUF file for `spec` (default: gpt-oss-20b), converting or downloading it first if needed."""
    spec = DEFAULT_MODEL if spec is None else spec
    path = Path(spec)
    if path.suffix == ".gguf" or path.is_file():
        if not path.exists():
            raise ModelFileError(f"{path}: no such file")
        return path
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path}: a directory without config.json is not a checkpoint; expected {FORMS}")
        return _converted(path, cache or cache_dir(), progress, outtype)
    name = str(spec)
    repo = ALIASES.get(name.lower(), name)
    if not _REPO_ID.match(repo):
        raise ModelNotFoundError(f"{name!r} is not a file, a directory or a hub name; expected {FORMS}")
    return _converted(_download(repo, progress), cache or cache_dir(), progress, outtype)


def _fingerprint(src: Path) -> str:
    """Cheap identity of a checkpoint: names, sizes and modification times of the files the converter reads."""
    h = hashlib.sha256(str(src.resolve()).encode())
    for f in sorted(p for p in src.iterdir() if p.suffix in (".json", ".safetensors", ".jinja")):
        st = f.stat()
        h.update(f"{f.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:12]


def _converted(src: Path, cache: Path, progress: bool | None, outtype: str) -> Path:
    from .convert import convert

    name = src.resolve().name
    if re.fullmatch(r"[0-9a-f]{40}", name):  # a hub snapshot (models--owner--name/snapshots/<commit>)
        name = src.resolve().parent.parent.name.removeprefix("models--").replace("--", "_")
    out = cache / "models" / f"{name}-{_fingerprint(src)}-{outtype}.gguf"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    if progress is not False:
        print(f"converting {src} to {out} (once)", file=sys.stderr)
    convert(src, out, outtype=outtype, progress=progress)
    for stale in out.parent.glob(f"{name}-*-{outtype}.gguf"):
        if stale != out:
            stale.unlink(missing_ok=True)
    return out


def _download(repo: str, progress: bool | None) -> Path:
    try:
        import huggingface_hub
        from huggingface_hub import errors
    except ImportError:
        raise ModelNotFoundError(f"downloading {repo} needs huggingface_hub: install the hub extra "
                                 "(pip install 'ossrt[hub]'), or pass a .gguf file or checkpoint directory") from None
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    try:
        # The cache location and offline switch are read here, not when huggingface_hub was imported.
        return Path(huggingface_hub.snapshot_download(repo, allow_patterns=HUB_FILES, local_files_only=offline,
                                                      cache_dir=os.environ.get("HF_HUB_CACHE")))
    except errors.LocalEntryNotFoundError:
        raise ModelNotFoundError(f"{repo} is not in the local Hugging Face cache and the hub cannot be reached"
                                 f"{' (HF_HUB_OFFLINE is set)' if offline else ''}: download it once while online, "
                                 "or pass a .gguf file or checkpoint directory") from None
    except (errors.RepositoryNotFoundError, errors.GatedRepoError) as e:
        raise ModelNotFoundError(f"{repo}: no such model on the Hugging Face hub, or it needs a login "
                                 f"({type(e).__name__})") from None
    except (errors.HfHubHTTPError, OSError) as e:
        raise ModelNotFoundError(f"downloading {repo} failed: {e}") from None
