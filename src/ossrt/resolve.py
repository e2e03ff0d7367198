"""Finding the model file for a name: a `.gguf` path, a local Hugging Face checkpoint directory, or a hub name.

Checkpoints are converted once into the user's cache folder (`$OSSRT_CACHE`, else the platform's cache dir) and
reused; a changed checkpoint (file names, sizes, modification times) gets a fresh conversion. Hub names are
downloaded with `huggingface_hub` (the `hub` extra), which shows progress and resumes, and then converted.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import sys
from pathlib import Path

from .defaults import DEFAULT_MODEL
from .errors import ConvertError, ModelFileError, ModelNotFoundError, OssrtError, ParameterError

ALIASES = {"gpt-oss-20b": "openai/gpt-oss-20b", "gpt-oss:20b": "openai/gpt-oss-20b",
           "gpt-oss-120b": "openai/gpt-oss-120b", "gpt-oss:120b": "openai/gpt-oss-120b"}
# What the converter reads; not the `original/` or `metal/` copies of the weights.
HUB_FILES = ["config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.json",
             "tokenizer_config.json", "special_tokens_map.json", "generation_config.json", "chat_template.jinja"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_NAME_BYTES = 100  # of a checkpoint's name in its cached conversion's file name
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
    if not isinstance(spec, (str, os.PathLike)):
        raise ParameterError(f"model must be a path or a model name (str or os.PathLike), got "
                             f"{type(spec).__name__} {spec!r:.60}")
    if not str(spec).strip():
        raise ModelNotFoundError(f"the model name is empty; expected {FORMS}")
    path = Path(spec)
    kind = _kind(path, ModelFileError if path.suffix == ".gguf" else ModelNotFoundError)
    if path.suffix == ".gguf" or kind == "file":
        if kind is None:
            raise ModelFileError(f"{path}: no such file")
        if kind == "dir":
            raise ModelFileError(f"{path}: is a directory, not a GGUF file")
        return path
    if kind == "dir":
        if _kind(path / "config.json", ModelNotFoundError) != "file":
            raise ModelNotFoundError(f"{path}: a directory without config.json is not a checkpoint; expected {FORMS}")
        return _converted(path, cache or cache_dir(), progress, outtype)
    name = str(spec)
    repo = ALIASES.get(name.lower(), name)
    if not _REPO_ID.match(repo):
        raise ModelNotFoundError(f"{name!r} is not a file, a directory or a hub name; expected {FORMS}")
    return _converted(_download(repo, progress), cache or cache_dir(), progress, outtype)


def _kind(path: Path, error: type[OssrtError]) -> str | None:
    """"file", "dir", "other" or None when nothing is there. When the system refuses the path itself (a name
    longer than the file system allows, no permission, a symlink loop) `error` says so, naming it."""
    try:
        mode = path.stat().st_mode
    except (FileNotFoundError, NotADirectoryError, ValueError):  # ValueError: a NUL character in the name
        return None
    except OSError as e:
        raise error(f"{path}: {e.strerror or e}") from None
    return "file" if stat.S_ISREG(mode) else "dir" if stat.S_ISDIR(mode) else "other"


def _fingerprint(src: Path) -> str:
    """Cheap identity of a checkpoint: names, sizes and modification times of the files the converter reads."""
    h = hashlib.sha256(str(src.resolve()).encode())
    for f in sorted(p for p in src.iterdir() if p.suffix in (".json", ".safetensors", ".jinja")):
        st = f.stat()
        h.update(f"{f.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:12]


def _converted(src: Path, cache: Path, progress: bool | None, outtype: str) -> Path:
    from .format.convert import convert

    name = src.resolve().name
    if re.fullmatch(r"[0-9a-f]{40}", name):  # a hub snapshot (models--owner--name/snapshots/<commit>)
        name = src.resolve().parent.parent.name.removeprefix("models--").replace("--", "_")
    # The fingerprint already tells checkpoints apart: the readable part is cut so the file name fits any system.
    while len(os.fsencode(name)) > _NAME_BYTES:
        name = name[:-1]
    try:
        fingerprint = _fingerprint(src)
    except OSError as e:
        raise ConvertError(f"{src}: cannot read the checkpoint: {e.strerror or e}") from None
    out = cache / "models" / f"{name}-{fingerprint}-{outtype}.gguf"
    try:
        if out.is_file():
            return out
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConvertError(f"{out.parent}: cannot use the model cache: {e.strerror or e} (set OSSRT_CACHE to a "
                           "writable folder)") from None
    if progress is not False:
        print(f"converting {src} to {out} (once)", file=sys.stderr)
    convert(src, out, outtype=outtype, progress=progress)
    earlier = re.compile(re.escape(name) + r"-[0-9a-f]{12}-" + re.escape(outtype) + r"\.gguf")
    for stale in out.parent.iterdir():
        if stale != out and earlier.fullmatch(stale.name):
            try:
                stale.unlink(missing_ok=True)
            except OSError:  # an old conversion that cannot be removed only takes space
                pass
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
    except errors.HFValidationError as e:
        raise ModelNotFoundError(f"{repo!r} is not a file, a directory or a valid hub name: {e}") from None
    except (errors.RepositoryNotFoundError, errors.GatedRepoError) as e:
        raise ModelNotFoundError(f"{repo}: no such model on the Hugging Face hub, or it needs a login "
                                 f"({type(e).__name__})") from None
    except (errors.HfHubHTTPError, OSError) as e:
        raise ModelNotFoundError(f"downloading {repo} failed: {e}") from None
