"""The expert cache (`ossrt.load(..., max_memory=...)`): the same numbers as the memory-mapped experts from pools
smaller than the model, what it read, its eviction policies, and its option in the API and CLI."""

import errno
import mmap
import os

import numpy as np
import pytest
from click.testing import CliRunner

import ossrt
from ossrt import info
from ossrt.cli import main
from ossrt.engine.expert_cache import WORKING_MEMORY, LeastFrequentlyUsed, LeastRecentlyUsed, parse_size
from ossrt.engine.kv_cache import cache_bytes
from ossrt.errors import ModelFileError, ParameterError
from ossrt.format.modelfile import ModelFile

CONTEXT = 256


def max_memory_for(path, slots: int) -> int:
    """A max_memory that leaves the experts `slots` slots (one expert of one layer each)."""
    with ossrt.load(path, context_length=CONTEXT, prefetch=False) as m:
        mf = m.model_file
        mapped = sum(t.nbytes for name, t in mf.tensors.items()
                     if not name.endswith("_exps.weight") and name != "token_embd.weight")
        slot = 3 * mf.tensors["blk.0.ffn_gate_exps.weight"].nbytes // mf.config.n_expert
        return mapped + cache_bytes(mf.config, CONTEXT, "f16") + WORKING_MEMORY + slots * slot


def run(model, prompt: list[int], n: int) -> tuple[np.ndarray, list[int]]:
    """Logits of every prompt position, then `n` greedy tokens decoded one at a time."""
    tr = model.engine.transformer
    cache = tr.new_cache(CONTEXT)
    logits = tr.forward(prompt, cache, all_logits=True)
    tokens = [int(np.argmax(logits[-1]))]
    for _ in range(n - 1):
        tokens.append(int(np.argmax(tr.forward(tokens[-1:], cache)[-1])))
    return logits, tokens


@pytest.mark.parametrize("slots", [8, 13])  # one layer's experts (each layer evicts the last), and a few more
def test_experts_through_a_small_cache_give_the_mapped_numbers(tiny_gguf, slots):
    path = tiny_gguf()
    prompt = [int(t) for t in np.random.default_rng(0).integers(1000, 199000, 40)]
    with ossrt.load(path, context_length=CONTEXT, threads=2) as mapped:
        want_logits, want_tokens = run(mapped, prompt, 24)
    with ossrt.load(path, context_length=CONTEXT, threads=2, max_memory=max_memory_for(path, slots)) as cached:
        experts = cached.engine.transformer.ops.experts
        assert experts.n_slots == slots
        got_logits, got_tokens = run(cached, prompt, 24)
        stats = experts.stats
    # The same kernels on the same bytes; only the order experts are summed in may differ.
    np.testing.assert_allclose(got_logits, want_logits, rtol=1e-5, atol=1e-5 * np.abs(want_logits).max())
    assert got_tokens == want_tokens
    # Every forward pass looked up each layer's experts once: the prompt all 8, each decode step its 4.
    assert stats.hits + stats.misses == 4 * (8 + 4 * 23)
    # One layer's room: each layer's experts push out the last layer's, so nothing is found again; with more room
    # some are.
    assert stats.misses > slots and (stats.hits == 0 if slots == 8 else stats.hits > 0)
    assert stats.bytes_read == stats.misses * experts.slot_bytes
    assert sum(stats.per_layer_misses) == stats.misses


def test_a_cache_as_large_as_the_experts_reads_each_once(tiny_gguf):
    path = tiny_gguf()
    with ossrt.load(path, context_length=CONTEXT, max_memory="4G") as m:
        experts = m.engine.transformer.ops.experts
        assert experts.n_slots == 4 * 8
        run(m, list(range(1000, 1040)), 8)
        run(m, list(range(2000, 2040)), 8)
        assert experts.stats.misses == experts.cached <= 32 and experts.stats.hits > experts.stats.misses


def test_lru_evicts_the_oldest_use_and_never_an_expert_in_use():
    lru = LeastRecentlyUsed()
    for key in [(0, 1), (0, 2), (0, 3), (0, 1)]:
        lru.touch(key)
    assert lru.victim(keep=set()) == (0, 2)
    assert lru.victim(keep={(0, 2)}) == (0, 3)
    lru.forget((0, 2))
    assert lru.victim(keep=set()) == (0, 3)


def test_lfu_evicts_the_least_used_with_aging():
    lfu = LeastFrequentlyUsed(half_life=1000)
    for key in [(1, 0)] * 3 + [(1, 1)] * 2 + [(1, 2)]:
        lfu.touch(key)
    assert lfu.victim(keep=set()) == (1, 2)
    assert lfu.victim(keep={(1, 2)}) == (1, 1)
    lfu.touch((1, 2))  # (1, 1) and (1, 2) now tie at 2: the least recently used goes
    assert lfu.victim(keep=set()) == (1, 1)
    young = LeastFrequentlyUsed(half_life=4)
    for key in [(0, 0)] * 3 + [(0, 1)] * 5:  # counts halve every 4 uses: the old favourite fades
        young.touch(key)
    assert young.counts[(0, 0)] < young.counts[(0, 1)] and young.victim(keep=set()) == (0, 0)


@pytest.mark.parametrize("text, size", [("16G", 16 << 30), ("512M", 512 << 20), ("1.5G", 3 << 29),
                                        ("16GiB", 16 << 30), ("16gb", 16 << 30), (" 2T ", 2 << 40),
                                        ("1000", 1000), (4096, 4096)])
def test_sizes(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("value", ["lots", "G", "-1G", "0", True, 1.5, None])
def test_bad_sizes_are_refused_naming_the_value(tiny_gguf, value):
    with pytest.raises(ParameterError, match=r"^max_memory must be"):
        ossrt.load(tiny_gguf(), max_memory=value) if value is not None else parse_size(value)


def test_too_small_a_budget_says_what_is_needed(tiny_gguf):
    path = tiny_gguf()
    enough = max_memory_for(path, 8)
    with pytest.raises(ParameterError, match=r"max_memory .* GiB is too small for tiny-q8_0.gguf: its weights other "
                                             r"than experts take .* at least (\d+\.\d\d) GiB is needed") as e:
        ossrt.load(path, context_length=CONTEXT, max_memory=enough - 1)
    assert float(e.value.args[0].rsplit("at least ", 1)[1].split()[0]) == round(enough / 2**30, 2)
    with pytest.raises(ParameterError, match="cannot be used with max_memory"):
        ossrt.load(path, max_memory="4G", mlock=True)


def test_prefetch_leaves_the_experts_alone(tiny_gguf, monkeypatch):
    """With max_memory the background prefetch skips the expert tensors (they come through the cache): their
    ranges are left out but for the pages they share with neighbours."""
    skips = []
    start = ModelFile.start_prefetch
    monkeypatch.setattr(ModelFile, "start_prefetch", lambda self, skip=None: skips.append(skip) or start(self, skip))
    with ossrt.load(tiny_gguf(), context_length=CONTEXT, max_memory="4G") as m:
        mf = m.model_file
        (skip,) = skips
        assert skip("blk.3.ffn_down_exps.weight") and not skip("blk.3.ffn_down_exps.bias")
        experts = [(s, e) for s, e, name in mf._extents if skip(name)]
        prefetched = mf._ranges_in_use_order(skip)
        overlap = sum(max(0, min(b, e) - max(a, s)) for a, b in experts for s, e in prefetched)
        assert len(experts) == 12 and overlap < 2 * len(experts) * mmap.PAGESIZE
        assert sum(e - s for s, e in experts) > 4 * overlap
    ossrt.load(tiny_gguf(), context_length=CONTEXT).close()
    assert skips[1:] == [None]  # without max_memory, all of it as before


def test_cli_bad_max_memory_exits_2_with_the_reason(tiny_gguf):
    r = CliRunner().invoke(main, ["generate", str(tiny_gguf()), "-p", "hi", "--max-memory", "lots"])
    assert r.exit_code == 2 and "max_memory must be a number of bytes or a size such as '16G', got 'lots'" in r.output


def test_decode_steps_have_the_next_layers_guessed_experts_read_ahead(tiny_gguf, monkeypatch):
    """After each layer of a decode step, the next layer's router on this layer's input guesses its experts, and
    the kernel is asked to read those not in RAM (posix_fadvise WILLNEED on their bytes); prompts do not guess."""
    path = tiny_gguf()
    advised = []
    real = os.posix_fadvise
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, offset, n, advice: advised.append((offset, n, advice))
                        or real(fd, offset, n, advice))
    with ossrt.load(path, context_length=CONTEXT, max_memory=max_memory_for(path, 8)) as m:
        run(m, list(range(1000, 1040)), 6)  # the prompt, then 5 decode steps
        experts = m.engine.transformer.ops.experts
        stats = experts.stats
        later_layers = [experts.offsets[layer][kind] for layer in range(1, 4) for kind in ("gate", "up", "down")]
    # One layer's room: every guess for the next layer is a miss, 4 a layer, 3 layers after the first, 5 steps.
    assert stats.predicted == 4 * 3 * 5 and len(advised) == 3 * stats.predicted
    assert all(advice == os.POSIX_FADV_WILLNEED and n == experts.expert_bytes["gate"] for _, n, advice in advised)
    assert all(any(0 <= offset - start < 8 * n for start in later_layers) for offset, n, _ in advised)
    assert 0 < stats.predicted_used <= stats.predicted


def test_a_failed_read_names_the_file_and_leaves_no_half_read_expert(tiny_gguf, monkeypatch):
    path = tiny_gguf()
    prompt = list(range(1000, 1020))
    with ossrt.load(path, context_length=CONTEXT) as mapped:
        want = mapped.logits(prompt)
    with ossrt.load(path, context_length=CONTEXT, max_memory=max_memory_for(path, 8)) as cached:
        real = os.preadv

        def failing(fd, buffers, offset):
            raise OSError(errno.EIO, os.strerror(errno.EIO))

        monkeypatch.setattr(os, "preadv", failing)
        with pytest.raises(ModelFileError, match=r"tiny-q8_0.gguf: cannot read experts of layer 0: Input/output "):
            cached.logits(prompt)
        assert cached.engine.transformer.ops.experts.cached == 0
        monkeypatch.setattr(os, "preadv", real)
        np.testing.assert_allclose(cached.logits(prompt), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_server_health_reports_the_cache(tiny_gguf):
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("uvicorn")
    from server_support import live_server

    path = tiny_gguf()
    budget = max_memory_for(path, 8)
    with ossrt.load(path, context_length=CONTEXT, max_memory=budget) as m, live_server(m, model_id="tiny") as live:
        run(m, list(range(1000, 1010)), 2)
        health = httpx.get(live.url + "/health", timeout=10).json()
        stats = m.expert_cache.stats
        assert health["max_memory"] == budget
        assert health["expert_cache"] == {"slots": 8, "cached": 8, "hits": stats.hits, "misses": stats.misses,
                                          "hit_rate": round(stats.hit_rate, 4), "bytes_read": stats.bytes_read}
        assert stats.misses > 8
    with ossrt.load(path, context_length=CONTEXT) as m, live_server(m, model_id="tiny") as live:
        health = httpx.get(live.url + "/health", timeout=10).json()
        assert "max_memory" not in health and "expert_cache" not in health and m.expert_cache is None


def test_info_gives_the_smallest_max_memory(tiny_gguf):
    """`ossrt info` prints the smallest max_memory for its context: load takes that (to the 0.01 GiB printed) and
    refuses less."""
    path = tiny_gguf()
    line = next(line for line in info.report(path, CONTEXT).splitlines() if "smallest --max-memory" in line)
    smallest = float(line.split()[2])
    assert line.split()[3] == "GiB"
    ossrt.load(path, context_length=CONTEXT, max_memory=f"{smallest + 0.01}G", prefetch=False).close()
    with pytest.raises(ParameterError, match="is too small"):
        ossrt.load(path, context_length=CONTEXT, max_memory=f"{smallest - 0.01}G")
