"""A corrupt model file whose weights turn into NaN: every path that runs the model reports ModelOutputError (the
model, not the caller, is at fault), at prefill and mid-answer; the CLI prints one error line and exits 2."""

import shutil

import numpy as np
import pytest
from click.testing import CliRunner

import ossrt
from ossrt.cli import main
from ossrt.errors import ModelOutputError
from ossrt.format.modelfile import ModelFile

ANSWER = "<|channel|>final<|message|>Hello there!<|return|>"
ASK = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def corrupt(scripted_gguf, tmp_path_factory, o200k_tokenizer):
    """(path, id): the scripted ANSWER model with NaN in the embedding row of "Hello", so its logits are finite
    until the model reads "Hello", which it says in the middle of its answer."""
    hello = o200k_tokenizer.encode("Hello")[0]
    path = tmp_path_factory.mktemp("corrupt") / "corrupt.gguf"
    shutil.copy(scripted_gguf(ANSWER), path)
    with ModelFile.open(path) as mf:
        embd = mf.tensors["token_embd.weight"]
        address = embd.data.__array_interface__["data"][0]
        offset = address - np.frombuffer(mf._buf, np.uint8).__array_interface__["data"][0]  # as scripted_gguf does
        row_bytes = embd.data.strides[0]
    row = np.memmap(path, mode="r+", dtype=np.float32, offset=offset + hello * row_bytes, shape=(row_bytes // 4,))
    row[:] = np.nan
    row.flush()
    del row
    return path, hello


def test_generate_and_logits(corrupt):
    path, hello = corrupt
    with ossrt.load(path, context_length=64) as m:
        with pytest.raises(ModelOutputError, match=r"^the model produced non-finite values \(NaN or infinity\) at "
                                                   r"position 2; the model file may be corrupt$"):
            generation = m.generate([1, 2, hello], max_tokens=4)
            list(generation)  # fails at prefill
        assert generation.stats.generated_tokens == 0
        with pytest.raises(ModelOutputError, match="at position 1;"):
            m.logits([5, hello])
        assert np.isfinite(m.logits([5, 6])).all()  # the other tokens still work


def test_chat_fails_mid_answer_and_the_session_recovers(corrupt, o200k_tokenizer):
    path, hello = corrupt
    with ossrt.load(path, context_length=512) as m:
        stream = m.chat(ASK, stream=True)
        seen = []
        with pytest.raises(ModelOutputError, match="non-finite values"):
            for event in stream:
                seen.append(event)
        assert "".join(getattr(e, "text", "") for e in seen) == "Hello"  # what came before the NaN
        with pytest.raises(ModelOutputError):
            m.chat(ASK)
        assert m.chat(ASK, max_tokens=3).finish_reason == "length"  # the session is free and works up to "Hello"


def test_cli_prints_one_error_line(corrupt):
    r = CliRunner().invoke(main, ["generate", str(corrupt[0]), "-p", "Hi", "-c", "512"])
    assert r.exit_code == 2, r.output
    assert r.stderr.startswith("error: the model produced non-finite values") and len(r.stderr.splitlines()) == 1
