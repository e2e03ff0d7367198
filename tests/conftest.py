import os
from pathlib import Path

import numpy as np
import pytest

# The CUDA backend's kernels run under numba's CUDA simulator, with NumPy standing in for CuPy: set before anything
# imports numba.cuda. A GPU machine that wants its device for the tests sets NUMBA_ENABLE_CUDASIM=0.
os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")


@pytest.fixture(scope="session")
def o200k_path(tmp_path_factory) -> Path:
    """OpenAI's o200k_base.tiktoken as a plain file (from the copy the package ships, sha256-checked), for the
    readers that take a path: tiktoken, openai-harmony."""
    from ossrt.testing import synthetic

    path = tmp_path_factory.mktemp("vocab") / "o200k_base.tiktoken"
    path.write_bytes(synthetic.o200k_base())
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Factory: `tiny_checkpoint(layout="mxfp4", seed=0, **hf_config_overrides) -> Path` of a synthetic gpt-oss
    HF checkpoint directory (ossrt.testing.synthetic, tiny config), cached for the session by its arguments."""
    from ossrt.testing import synthetic

    cache: dict = {}

    def make(layout: str = "mxfp4", seed: int = 0, **overrides) -> Path:
        key = (layout, seed, tuple(sorted(overrides.items())))
        if key not in cache:
            out = tmp_path_factory.mktemp(f"ckpt-{layout}")
            cfg = synthetic.hf_config("tiny", **overrides)
            cache[key] = synthetic.write_checkpoint(out, cfg, layout=layout, seed=seed)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory, tiny_checkpoint):
    """Factory: `tiny_gguf(outtype="q8_0", layout="mxfp4", seed=0, **hf_config_overrides) -> Path` of a tiny
    synthetic gpt-oss model converted by `ossrt convert`, cached for the session by its arguments. Defaults:
    4 layers (sliding, full, sliding, full), hidden 64, 8 experts top-4, 4 query / 2 KV heads of 16, window 8,
    the full o200k_harmony vocabulary."""
    from ossrt.format.convert import convert

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
    """ossrt's o200k_harmony Tokenizer built from o200k_base.tiktoken."""
    from ossrt.tokenizer import Tokenizer

    return Tokenizer.from_tiktoken_file(o200k_path)


@pytest.fixture(scope="session")
def harmony_encoding(o200k_path: Path):
    """openai-harmony's HarmonyGptOss encoding, offline: with TIKTOKEN_ENCODINGS_BASE set, its loader reads
    `$TIKTOKEN_ENCODINGS_BASE/o200k_base.tiktoken` (hash-checked) instead of downloading; the variable is read only
    while the encoding loads."""
    import openai_harmony  # a test dependency: if missing, the Harmony tests fail rather than skip

    old = os.environ.get("TIKTOKEN_ENCODINGS_BASE")
    os.environ["TIKTOKEN_ENCODINGS_BASE"] = str(o200k_path.parent)
    try:
        return openai_harmony.load_harmony_encoding(openai_harmony.HarmonyEncodingName.HARMONY_GPT_OSS)
    finally:
        if old is None:
            del os.environ["TIKTOKEN_ENCODINGS_BASE"]
        else:
            os.environ["TIKTOKEN_ENCODINGS_BASE"] = old


# --- scripted models (chat API, REPL, server) ------------------------------------------------------------------------
@pytest.fixture(scope="session")
def scripted_gguf(tmp_path_factory, tiny_gguf):
    """Factory: `scripted_gguf(text, loop=False, **hf_config_overrides) -> Path`, a tiny gpt-oss file (real format,
    real forward pass) whose output after a prompt ending in `<|start|>assistant` is `text` (Harmony specials
    allowed), token by token. The overrides go to `tiny_gguf` (e.g. max_position_embeddings=16384 for a context
    past the tiny config's 4096).

    Attention and expert outputs are zeroed, so each position's logits depend only on its own token: the scripted
    tokens get distinct unit embeddings, and the unembedding row of each token's successor points along it (logit
    80 against 0, so even sampling at temperature 1 follows the script). A token must therefore always have the
    same successor. With `loop=True` the last token is followed by the first again, so output never ends."""
    from ossrt.format.modelfile import ModelFile
    from ossrt.tokenizer import Tokenizer

    cache: dict = {}

    def make(text: str, loop: bool = False, **overrides) -> Path:
        key = (text, loop, tuple(sorted(overrides.items())))
        if key in cache:
            return cache[key]
        src = tiny_gguf("f32", **overrides)
        out = tmp_path_factory.mktemp("scripted") / "scripted.gguf"
        out.write_bytes(src.read_bytes())
        with ModelFile.open(out) as mf:
            tok = Tokenizer.from_model_file(mf)
            cfg = mf.config
            base = np.frombuffer(mf._buf, np.uint8).__array_interface__["data"][0]
            spans = {name: (t.data.__array_interface__["data"][0] - base, t.data.nbytes)
                     for name, t in mf.tensors.items()}
        ids = tok.encode("assistant") + tok.encode(text, allowed_special="all")
        assert len(tok.encode("assistant")) == 1
        pairs = dict()
        for a, b in zip(ids, ids[1:] + (ids[1:2] if loop else [])):
            if pairs.setdefault(a, b) != b:
                raise ValueError(f"token {a} ({tok.decode([a])!r}) needs two successors in {text!r}")
        order = list(dict.fromkeys(ids))
        if len(order) > cfg.n_embd:
            raise ValueError(f"{len(order)} distinct tokens do not fit {cfg.n_embd} dimensions")

        maps = []

        def tensor(name: str) -> np.ndarray:
            offset, nbytes = spans[name]
            maps.append(np.memmap(out, mode="r+", dtype=np.uint8, offset=offset, shape=(nbytes,)))
            return maps[-1]

        embd = tensor("token_embd.weight").view(np.float32).reshape(cfg.n_vocab, cfg.n_embd)
        unembd = tensor("output.weight").view(np.float32).reshape(cfg.n_vocab, cfg.n_embd)
        embd[:] = 0
        unembd[:] = 0
        for i, t in enumerate(order):
            embd[t, i] = 1.0
        for a, b in pairs.items():
            unembd[b, order.index(a)] = 10.0
        for layer in range(cfg.n_layer):
            for name in ("attn_output.weight", "attn_output.bias", "ffn_down_exps.weight", "ffn_down_exps.bias"):
                tensor(f"blk.{layer}.{name}")[:] = 0
        for m in maps:
            m.flush()
        cache[key] = out
        return out

    return make
