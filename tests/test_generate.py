"""`ossrt.load` and the Model API: logits, streaming generation, stop reasons, stats, errors."""

import threading

import numba
import numpy as np
import pytest

import ossrt
from ossrt.engine import kernels
from ossrt.engine import reference
from ossrt.errors import ContextLengthError, ModelFileError, ParameterError


@pytest.fixture(scope="module")
def model(tiny_gguf):
    with ossrt.load(tiny_gguf(), context_length=64, threads=2, kv_type="f32", int8_activations=False) as m:
        yield m


def prompt(n: int, seed: int = 0) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(0, 199998, n)]


def test_logits_match_reference(model):
    tokens = prompt(20)
    got = model.logits(tokens)
    expect = reference.forward(model.config, reference.load_weights(model.model_file), tokens)
    np.testing.assert_allclose(got, expect, rtol=1e-4, atol=1e-4 * np.abs(expect).max())
    np.testing.assert_array_equal(model.logits(tokens), got)  # no state kept between calls


def test_greedy_generation_is_the_argmax_of_fresh_logits(model):
    tokens = prompt(10, seed=1)
    generation = model.generate(tokens, max_tokens=12, temperature=0, stop_tokens=())
    out = list(generation)
    seq = list(tokens)
    for _ in range(12):
        seq.append(int(np.argmax(model.logits(seq)[-1])))
    assert out == seq[10:]
    s = generation.stats
    assert (s.prompt_tokens, s.generated_tokens, s.decode_steps, s.stop_reason) == (10, 12, 11, "length")
    assert s.prefill_tokens_per_second > 0 and s.decode_tokens_per_second > 0


def test_seeded_sampling_is_reproducible(model):
    tokens = prompt(8, seed=2)
    a = list(model.generate(tokens, max_tokens=10, seed=7, stop_tokens=()))
    b = list(model.generate(tokens, max_tokens=10, seed=7, stop_tokens=()))
    c = list(model.generate(tokens, max_tokens=10, seed=8, stop_tokens=()))
    assert a == b and a != c


def test_stops_on_a_stop_token_without_yielding_it(model):
    tokens = prompt(8, seed=3)
    greedy = list(model.generate(tokens, max_tokens=6, temperature=0, stop_tokens=()))
    stop = greedy[3]
    first = greedy.index(stop)
    generation = model.generate(tokens, max_tokens=6, temperature=0, stop_tokens=[stop])
    assert list(generation) == greedy[:first]
    assert generation.stats.stop_reason == "stop" and generation.stats.stop_token == stop


def test_default_stop_tokens_are_the_harmony_end_tokens(model):
    assert model.tokenizer.stop_tokens_for_assistant == {200002, 200012, 199999}


def test_generation_stops_at_the_context_length(model):
    with ossrt.load(model.model_file.path, context_length=20) as small:
        generation = small.generate(prompt(15), max_tokens=None, temperature=0, stop_tokens=())
        assert len(list(generation)) == 6  # positions 15..19 are filled by the first five; the sixth at 19
        assert generation.stats.stop_reason == "context_length"
        with pytest.raises(ContextLengthError, match="21 prompt tokens do not fit the context length 20"):
            small.generate(prompt(21), max_tokens=1)


def test_closing_the_iterator_stops_generation(model):
    gen = model.generate(prompt(5), max_tokens=50, stop_tokens=())
    next(gen)
    next(gen)
    gen.close()
    assert gen.stats.generated_tokens == 2


def test_two_threads_get_the_answers_they_would_get_alone(model):
    tokens = prompt(9, seed=4)
    alone = [list(model.generate(tokens, max_tokens=8, seed=s, stop_tokens=())) for s in (1, 2)]
    results = {}

    def run(seed):
        results[seed] = list(model.generate(tokens, max_tokens=8, seed=seed, stop_tokens=()))

    threads = [threading.Thread(target=run, args=(s,)) for s in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [results[1], results[2]] == alone


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=-1), "temperature"),
    (dict(top_p=0), "top_p"),
    (dict(top_k=-2), "top_k"),
    (dict(min_p=2), "min_p"),
    (dict(max_tokens=-1), "max_tokens"),
])
def test_bad_parameters_fail_before_any_work(model, kwargs, match):
    kwargs = {"max_tokens": 4, **kwargs}
    with pytest.raises(ParameterError, match=match):
        model.generate(prompt(3), **kwargs)


def test_bad_token_ids(model):
    with pytest.raises(ParameterError, match="201088"):
        model.logits([0, 201088])
    with pytest.raises(ParameterError, match="must not be empty"):
        model.generate([], max_tokens=1)


@pytest.mark.parametrize("outtype", ["q8_0", "bf16"])
def test_converted_outtypes_run(tiny_gguf, outtype):
    with ossrt.load(tiny_gguf(outtype)) as m:
        assert len(list(m.generate(prompt(4), max_tokens=3, temperature=0, stop_tokens=()))) == 3


def test_load_errors(tiny_gguf, tmp_path):
    with pytest.raises(ModelFileError, match="nope.gguf"):
        ossrt.load(tmp_path / "nope.gguf")
    data = tiny_gguf().read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) - 1000])
    with pytest.raises(ModelFileError, match="cut.gguf"):
        ossrt.load(cut)
    with pytest.raises(ParameterError, match="context_length"):
        ossrt.load(tiny_gguf(), context_length=0)
    with pytest.raises(ParameterError, match="context_length"):
        ossrt.load(tiny_gguf(), context_length=10**7)
    with pytest.raises(ParameterError, match="threads"):
        ossrt.load(tiny_gguf(), threads=0)


def test_kv_type_is_checked(tiny_gguf):
    with pytest.raises(ParameterError, match="kv_type"):
        ossrt.load(tiny_gguf(), kv_type="q4_0")
    with pytest.raises(ParameterError, match="multiple of 32"):
        ossrt.load(tiny_gguf(), kv_type="q8_0")  # head dim 16


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="one core: every thread count is 1")
def test_threads_apply_in_every_thread_that_runs_the_model(tiny_gguf, monkeypatch):
    # Numba's thread count is per thread; a new thread starts with all cores.
    seen = []
    linear = kernels.linear

    def spy(*args, **kwargs):
        seen.append((threading.current_thread().name, numba.get_num_threads()))
        return linear(*args, **kwargs)

    with ossrt.load(tiny_gguf(), context_length=256, threads=1) as m:
        monkeypatch.setattr(kernels, "linear", spy)

        def work():
            list(m.generate(prompt(5), max_tokens=2, stop_tokens=()))
            m.chat([{"role": "user", "content": "Hi"}], max_tokens=2)

        t = threading.Thread(target=work, name="user-thread")
        t.start()
        t.join()
    assert len(seen) > 20 and set(seen) == {("user-thread", 1)}
