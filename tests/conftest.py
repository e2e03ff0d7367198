import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("OSSRT_SHARED", REPO.parent / "shared"))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The project's shared facts and data (`../shared` beside the repository)."""
    if not (SHARED / "data" / "o200k_base.tiktoken").is_file():
        pytest.fail(f"shared data not found at {SHARED}; set OSSRT_SHARED")
    return SHARED


@pytest.fixture(scope="session")
def o200k_path(shared_dir: Path) -> Path:
    return shared_dir / "data" / "o200k_base.tiktoken"


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, o200k_path: Path):
    """Factory: `tiny_checkpoint(layout="mxfp4", seed=0, **hf_config_overrides) -> Path` of a synthetic gpt-oss
    HF checkpoint directory (ossrt.synthetic, tiny config), cached for the session by its arguments."""
    from ossrt import synthetic

    cache: dict = {}

    def make(layout: str = "mxfp4", seed: int = 0, **overrides) -> Path:
        key = (layout, seed, tuple(sorted(overrides.items())))
        if key not in cache:
            out = tmp_path_factory.mktemp(f"ckpt-{layout}")
            cfg = synthetic.hf_config("tiny", **overrides)
            cache[key] = synthetic.write_checkpoint(out, cfg, layout=layout, seed=seed, vocab_path=o200k_path)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory, tiny_checkpoint):
    """Factory: `tiny_gguf(outtype="q8_0", layout="mxfp4", seed=0, **hf_config_overrides) -> Path` of a tiny
    synthetic gpt-oss model converted by `ossrt convert`, cached for the session by its arguments. Defaults:
    4 layers (sliding, full, sliding, full), hidden 64, 8 experts top-4, 4 query / 2 KV heads of 16, window 8,
    the full o200k_harmony vocabulary."""
    from ossrt.convert import convert

    cache: dict = {}

    def make(outtype: str = "q8_0", layout: str = "mxfp4", seed: int = 0, **overrides) -> Path:
        key = (outtype, layout, seed, tuple(sorted(overrides.items())))
        if key not in cache:
            src = tiny_checkpoint(layout, seed, **overrides)
            out = tmp_path_factory.mktemp("gguf") / f"tiny-{outtype}.gguf"
            cache[key] = convert(src, out, outtype=outtype, progress=False)
        return cache[key]

    return make


# --- tokenizer / Harmony (issue 4) ---------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def o200k_tokenizer(o200k_path: Path):
    """ossrt's o200k_harmony Tokenizer built from the shared o200k_base.tiktoken."""
    from ossrt.tokenizer import Tokenizer

    return Tokenizer.from_tiktoken_file(o200k_path)


@pytest.fixture(scope="session")
def harmony_encoding(o200k_path: Path):
    """openai-harmony's HarmonyGptOss encoding, offline: with TIKTOKEN_ENCODINGS_BASE set, its loader reads
    `$TIKTOKEN_ENCODINGS_BASE/o200k_base.tiktoken` (hash-checked) instead of downloading; the variable is read only
    while the encoding loads."""
    openai_harmony = pytest.importorskip("openai_harmony")
    old = os.environ.get("TIKTOKEN_ENCODINGS_BASE")
    os.environ["TIKTOKEN_ENCODINGS_BASE"] = str(o200k_path.parent)
    try:
        return openai_harmony.load_harmony_encoding(openai_harmony.HarmonyEncodingName.HARMONY_GPT_OSS)
    finally:
        if old is None:
            del os.environ["TIKTOKEN_ENCODINGS_BASE"]
        else:
            os.environ["TIKTOKEN_ENCODINGS_BASE"] = old
