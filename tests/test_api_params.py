"""Every public parameter of `ossrt.load`, `Model.generate` / `logits` / `chat` and `ChatSession.chat` is checked
before any work: a wrong type or value raises ParameterError naming it (never a TypeError, an OverflowError, or a
value silently read as another, like True as 1 or 1.5 as 1). NumPy integers count as integers."""

from pathlib import Path

import numpy as np
import pytest

import ossrt
from ossrt.errors import ParameterError

PROMPT = [3, 14, 15, 92]
ASK = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def model(tiny_gguf):
    with ossrt.load(tiny_gguf(), context_length=64, threads=1) as m:
        yield m


GENERATE = [  # (arguments over the valid ones, what the message starts with)
    (dict(token_ids=None), "token_ids must be a sequence of integer token ids, got NoneType"),
    (dict(token_ids=5), "token_ids must be a sequence of integer token ids, got int"),
    (dict(token_ids="hello"), "token_ids must be a sequence of integer token ids, got str"),
    (dict(token_ids=[1, 2.0]), "token_ids[1] must be an integer token id, got 2.0"),
    (dict(token_ids=[1, True]), "token_ids[1] must be an integer token id, got True"),
    (dict(token_ids=["a"]), "token_ids[0] must be an integer token id, got 'a'"),
    (dict(token_ids=[]), "token_ids must not be empty"),
    (dict(token_ids=[1, 2**70]), f"token_ids: token id {2**70} is outside the vocabulary of 201088"),
    (dict(token_ids=np.array([5, -1])), "token_ids: token id -1 is outside the vocabulary"),
    (dict(token_ids=np.array([1.0])), "token_ids must be a 1-D sequence of integer token ids, got an array of "
                                      "float64"),
    (dict(token_ids=np.array([True])), "token_ids must be a 1-D sequence of integer token ids, got an array of bool"),
    (dict(token_ids=np.array([[1, 2]])), "token_ids must be a 1-D sequence"),
    (dict(max_tokens=True), "max_tokens must be an integer >= 0 or None, got True"),
    (dict(max_tokens=1.5), "max_tokens must be an integer"),
    (dict(max_tokens="3"), "max_tokens must be an integer"),
    (dict(max_tokens=-1), "max_tokens must be an integer"),
    (dict(temperature=10**400), "temperature must be a finite number >= 0"),
    (dict(temperature=float("nan")), "temperature must be a finite number"),
    (dict(temperature="1"), "temperature must be a finite number"),
    (dict(temperature=True), "temperature must be a finite number"),
    (dict(top_p=None), "top_p must be a number in (0, 1]"),
    (dict(top_p=10**400), "top_p must be a number in (0, 1]"),
    (dict(top_k=2.0), "top_k must be an integer >= 0"),
    (dict(top_k=True), "top_k must be an integer >= 0"),
    (dict(min_p="0"), "min_p must be a number in [0, 1]"),
    (dict(seed=1.5), "seed must be an integer >= 0 or None, got 1.5"),
    (dict(seed=-1), "seed must be an integer >= 0"),
    (dict(seed="7"), "seed must be an integer >= 0"),
    (dict(seed=True), "seed must be an integer >= 0"),
    (dict(seed=[1, 2]), "seed must be an integer >= 0"),
    (dict(stop_tokens=5), "stop_tokens must be a sequence of integer token ids, got int"),
    (dict(stop_tokens="<|return|>"), "stop_tokens must be a sequence of integer token ids, got str"),
    (dict(stop_tokens=["a"]), "stop_tokens[0] must be an integer token id, got 'a'"),
    (dict(stop_tokens=[1.5]), "stop_tokens[0] must be an integer token id, got 1.5"),
    (dict(stop_tokens=[True]), "stop_tokens[0] must be an integer token id, got True"),
    (dict(stop_tokens=[7, 201088]), "stop_tokens: token id 201088 is outside the vocabulary of 201088"),
]


@pytest.mark.parametrize("kwargs, message", GENERATE)
def test_generate_parameters(model, kwargs, message):
    kwargs = {"token_ids": PROMPT, "max_tokens": 2, **kwargs}
    with pytest.raises(ParameterError) as e:
        model.generate(kwargs.pop("token_ids"), **kwargs)
    assert str(e.value).startswith(message)


def test_logits_checks_the_ids_too(model):
    with pytest.raises(ParameterError, match=r"^token_ids\[0\] must be an integer token id, got 1.0"):
        model.logits([1.0])


def test_numpy_numbers_are_accepted(model):
    as_python = list(model.generate(PROMPT, max_tokens=3, temperature=0.5, top_k=50, seed=9, stop_tokens=[4]))
    as_numpy = list(model.generate(np.array(PROMPT, dtype=np.int32), max_tokens=np.int64(3),
                                   temperature=np.float32(0.5), top_k=np.uint16(50), seed=np.uint64(9),
                                   stop_tokens=np.array([4], dtype=np.uint32)))
    assert as_numpy == as_python and len(as_python) == 3
    assert list(model.generate([np.int64(t) for t in PROMPT], max_tokens=3, temperature=0.5, top_k=50, seed=9,
                               stop_tokens=(4,))) == as_python


CHAT = [
    (dict(messages="Hi"), "messages must be a list of message objects, got str"),
    (dict(messages=None), "messages must be a list of message objects, got NoneType"),
    (dict(messages={"role": "user", "content": "Hi"}), "messages must be a list of message objects, got dict"),
    (dict(tools={"type": "function"}), "tools must be a list of tool objects or None, got dict"),
    (dict(reasoning_effort=None), "reasoning_effort must be one of low, medium, high, got None"),
    (dict(reasoning_effort="extreme"), "reasoning_effort must be one of low, medium, high, got 'extreme'"),
    (dict(stream="yes"), "stream must be True or False, got 'yes'"),
    (dict(stream=1), "stream must be True or False, got 1"),
    (dict(current_date=20250101), "current_date must be a 'YYYY-MM-DD' string, a date or None, got 20250101"),
    (dict(max_tokens=True), "max_tokens must be an integer >= 0 or None, got True"),
    (dict(max_tokens=-1), "max_tokens must be an integer >= 0 or None, got -1"),
    (dict(max_tokens=2.0), "max_tokens must be an integer >= 0 or None, got 2.0"),
    (dict(seed="1"), "seed must be an integer >= 0 or None, got '1'"),
    (dict(temperature=10**400), "temperature must be a finite number >= 0"),
    (dict(top_p=2), "top_p must be a number in (0, 1]"),
    (dict(top_k=-1), "top_k must be an integer >= 0"),
]


@pytest.mark.parametrize("kwargs, message", CHAT)
@pytest.mark.parametrize("via", ["model", "session"])
def test_chat_parameters(model, via, kwargs, message):
    kwargs = {"messages": ASK, **kwargs}
    chat = model.chat if via == "model" else model.new_session().chat
    with pytest.raises(ParameterError) as e:
        chat(kwargs.pop("messages"), **kwargs)
    assert str(e.value).startswith(message)


LOAD = [
    (dict(path=5), "path must be a str or a path-like object naming a model, got 5"),
    (dict(path=b"tiny.gguf"), "path must be a str or a path-like object naming a model, got b'tiny.gguf'"),
    (dict(path=["tiny.gguf"]), "path must be a str or a path-like object"),
    (dict(path=None), "path must be a str or a path-like object"),
    (dict(context_length="8192"), "context_length must be an integer >= 1 or None, got '8192'"),
    (dict(context_length=2.5), "context_length must be an integer >= 1 or None, got 2.5"),
    (dict(context_length=True), "context_length must be an integer >= 1 or None, got True"),
    (dict(context_length=0), "context_length must be an integer >= 1 or None, got 0"),
    (dict(context_length=10**7), "context_length must be between 1 and 4096 (the model's training context)"),
    (dict(threads="2"), "threads must be an integer between 1 and"),
    (dict(threads=1.0), "threads must be an integer between 1 and"),
    (dict(threads=True), "threads must be an integer between 1 and"),
    (dict(threads=0), "threads must be an integer between 1 and"),
    (dict(threads=10**6), "threads must be an integer between 1 and"),
    (dict(kv_type=None), "kv_type must be one of f16, q8_0, f32, got None"),
    (dict(kv_type=["f16"]), "kv_type must be one of f16, q8_0, f32, got ['f16']"),
    (dict(kv_type="q4_0"), "kv_type must be one of f16, q8_0, f32, got 'q4_0'"),
    (dict(device="gpu"), "device must be one of auto, cpu, cuda, got 'gpu'"),
    (dict(device=None), "device must be one of auto, cpu, cuda, got None"),
]


@pytest.mark.parametrize("kwargs, message", LOAD)
def test_load_parameters(tiny_gguf, kwargs, message):
    kwargs = {"path": tiny_gguf(), **kwargs}
    with pytest.raises(ParameterError) as e:
        ossrt.load(kwargs.pop("path"), **kwargs)
    assert str(e.value).startswith(message)


def test_auto_device_is_the_cpu_without_a_gpu(tiny_gguf):
    with ossrt.load(tiny_gguf(), context_length=32) as m, ossrt.load(tiny_gguf(), device="cpu") as cpu:
        assert m.device == cpu.device == "cpu" and m.threads == cpu.threads >= 1


def test_load_takes_paths_and_numpy_integers(tiny_gguf):
    with ossrt.load(Path(tiny_gguf()), context_length=np.int64(32), threads=np.int32(1)) as m:
        assert (m.context_length, m.threads) == (32, 1) and type(m.context_length) is int
