"""Prompt lookup: the drafts, passes of a few tokens bit for bit as passes of one, and generation that checks drafts
giving exactly the ids of one token a pass (greedy, seeded, constrained chat, at the end of the context)."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

import ossrt
from ossrt.cli import main
from ossrt.engine import kernels
from ossrt.engine.cpu import CpuOps
from ossrt.engine.generate import Generation
from ossrt.engine.kv_cache import KVCache
from ossrt.engine.lookup import DraftLength, PromptLookup
from ossrt.engine.model import Transformer
from ossrt.engine.sampling import Sampler
from ossrt.errors import ParameterError
from ossrt.format.modelfile import ModelFile
from test_expert_cache import CONTEXT, max_memory_for


def test_draft_follows_the_latest_earlier_occurrence_of_the_longest_suffix():
    lookup = PromptLookup([1, 2, 3, 9, 2, 3, 7, 8, 1, 2, 3], ngram_min=2, ngram_max=3)
    assert lookup.draft(2) == [9, 2]  # (1, 2, 3) before (2, 3), which last came before 7
    lookup = PromptLookup([5, 2, 3, 9, 4, 2, 3, 7, 8, 2, 3], ngram_min=2, ngram_max=3)
    assert lookup.draft(3) == [7, 8, 2]  # (8, 2, 3) never occurred; (2, 3) last at 5-6, followed by 7, 8, 2
    lookup.append(7)
    assert lookup.draft(3) == [8, 2, 3]  # (2, 3, 7) occurred at 5-7
    assert PromptLookup([1, 2, 3, 4], ngram_min=2).draft(3) == []  # no pair repeats
    assert PromptLookup([4, 4, 4], ngram_min=2).draft(3) == [4]  # only what is known: (4, 4) -> the last 4
    assert PromptLookup([], ngram_min=1).draft(3) == [] and PromptLookup([3], ngram_min=1).draft(3) == []
    with pytest.raises(ValueError, match="n-gram sizes"):
        PromptLookup(ngram_min=3, ngram_max=2)


# (file type, HF config overrides, KV type, 8-bit activations): the tiny model's default and a wider one whose rows
# take both whole steps and single blocks of the 8-bit row dots, with every KV storage type.
CASES = {
    "q8_0-f32": ("q8_0", {}, "f32", False),
    "q8_0-int8-f16": ("q8_0", dict(hidden_size=160, intermediate_size=96, head_dim=32), "f16", True),
    "q8_0-int8-q8_0": ("q8_0", dict(hidden_size=160, intermediate_size=96, head_dim=32), "q8_0", True),
    "bf16-f32": ("bf16", dict(hidden_size=96, intermediate_size=64, num_local_experts=5, num_experts_per_tok=2), "f32",
                 False),
    "f32-int8": ("f32", {}, "f32", True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_pass_of_a_few_tokens_gives_each_the_logits_of_a_pass_of_it_alone(tiny_gguf, case):
    """Bit for bit, at every position of a run that goes round the sliding layers' rings (steps of at most 4)."""
    outtype, overrides, kv_type, int8_activations = CASES[case]
    mf = ModelFile.open(tiny_gguf(outtype, **overrides))
    try:
        model = Transformer(mf, CpuOps(int8_activations=int8_activations))
        assert model.few_tokens == kernels.FEW_TOKENS == 4
        tokens = np.random.default_rng(3).integers(0, 201088, 30)
        one, few = (KVCache(mf.config, 48, kv_type, chunk=4) for _ in range(2))
        model.forward(tokens[:6], one)
        model.forward(tokens[:6], few)
        alone = np.concatenate([model.forward([t], one) for t in tokens[6:]])
        together, start = [], 6
        for n in (2, 4, 1, 3, 4, 2, 4, 3, 1):
            together.append(model.forward(tokens[start:start + n], few, all_logits=True))
            start += n
        assert start == len(tokens)
        assert np.concatenate(together).tobytes() == alone.tobytes()
    finally:
        mf.close()


def test_draft_length_drafts_what_pays():
    length = DraftLength(3)
    assert length.choose(3) == 1  # no record: p = 2/3, a token beyond the first costing half a pass
    assert length.choose(0) == 0
    for _ in range(20):
        length.record(0, 0, 0.100)
        length.record(3, 3, 0.160)  # cheap extra tokens, all kept
    assert length.choose(3) == 3 and length.choose(2) == 2
    length = DraftLength(3)
    for _ in range(10):
        for drafted in range(4):
            length.record(drafted, 0, 0.100 + 0.09 * drafted)  # each costs almost a pass, and none is kept
    refused = [length.choose(3) for _ in range(16)]
    assert refused.count(0) == 14 and refused[7] == refused[15] == 1  # a probe of one token every 8th
    length = DraftLength(2)
    for _ in range(10):
        length.record(0, 0, 0.100)
        length.record(1, 1, 0.150)
        length.record(2, 1, 0.250)  # the second drafted token is never kept, and costs a whole pass
    assert length.choose(2) == 1


@pytest.fixture
def every_draft(monkeypatch):
    """Drafts checked in full whatever they cost: the ids must not depend on how many are."""
    monkeypatch.setattr(DraftLength, "choose", lambda self, available: min(self.most, available))


@pytest.fixture(scope="module")
def models(tiny_gguf):
    """The same file loaded without drafts and with them."""
    path = tiny_gguf(hidden_size=160, intermediate_size=96, head_dim=32)
    with ossrt.load(path, context_length=160, threads=2) as plain, \
            ossrt.load(path, context_length=160, threads=2, draft_tokens=3) as drafting:
        yield plain, drafting


def repetitive_prompt(seed: int) -> list[int]:
    """A phrase of 7 ids said three times over."""
    phrase = [int(t) for t in np.random.default_rng(seed).integers(1000, 199000, 7)]
    return phrase * 3 + phrase[:3]


class Recording:
    """A sampler over the phrase's ids only (the tiny random model never repeats itself over the whole vocabulary,
    so nothing would be drafted): `inner` picks among them, each call's logits are recorded."""

    def __init__(self, ids: list[int], inner):
        self.ids, self.inner, self.seen = np.unique(ids), inner, []

    def __call__(self, logits: np.ndarray) -> int:
        self.seen.append(logits.tobytes())
        masked = np.full_like(logits, -np.inf)
        masked[self.ids] = logits[self.ids]
        return self.inner(masked)


def run(model, prompt: list[int], inner, **kw) -> tuple[list[int], Recording, Generation]:
    sample = Recording(prompt, inner)
    generation = Generation(model.engine, model.engine.new_cache(), np.array(prompt), sample,
                            stop_tokens=frozenset(kw.pop("stop_tokens", ())), **kw)
    return list(generation), sample, generation


@pytest.mark.parametrize("sampler", [lambda: Sampler(temperature=0), lambda: Sampler(temperature=1.0, seed=5),
                                     lambda: Sampler(temperature=0.7, top_k=3, seed=9)])
def test_generation_with_drafts_samples_the_same_logits(models, sampler, every_draft):
    """The sampler meets the same logits, bit for bit, in the same order: the same ids, greedy or seeded; drafts
    both kept and refused."""
    plain, drafting = models
    for seed in range(3):
        prompt = repetitive_prompt(seed)
        want, want_seen, _ = run(plain, prompt, sampler(), max_tokens=60)
        got, seen, generation = run(drafting, prompt, sampler(), max_tokens=60)
        assert got == want and seen.seen == want_seen.seen
        s = generation.stats
        assert s.generated_tokens == 60 and s.decode_steps == 59
        assert 0 < s.accepted_tokens < s.drafted_tokens
        assert s.acceptance == s.accepted_tokens / s.drafted_tokens


def test_generate_with_drafts_gives_the_same_ids(models):
    plain, drafting = models
    prompt = repetitive_prompt(3)
    for sampling in (dict(temperature=0), dict(seed=4)):
        assert list(drafting.generate(prompt, max_tokens=30, stop_tokens=(), **sampling)) == \
            list(plain.generate(prompt, max_tokens=30, stop_tokens=(), **sampling))


def test_drafts_stop_at_the_context_length_and_on_stop_tokens(models, every_draft):
    plain, drafting = models
    prompt = repetitive_prompt(4) * 5  # 120 of the 160 positions
    want, _, _ = run(plain, prompt, Sampler(temperature=0), max_tokens=None)
    got, _, generation = run(drafting, prompt, Sampler(temperature=0), max_tokens=None)
    assert got == want and len(want) == 160 - len(prompt) + 1
    assert generation.stats.stop_reason == "context_length" and generation.stats.accepted_tokens > 0
    stop = want[len(want) // 2]
    got, _, generation = run(drafting, prompt, Sampler(temperature=0), max_tokens=None, stop_tokens=[stop])
    assert got == want[:want.index(stop)] and generation.stats.stop_token == stop


def test_a_closed_generation_leaves_the_cache_at_the_tokens_it_ran(models, every_draft):
    """Drafted positions past the accepted ones are not counted in the cache: it goes on as one that never saw a
    draft, bit for bit."""
    prompt = repetitive_prompt(5)
    after = []
    for model in models:
        cache = model.engine.new_cache()
        generation = Generation(model.engine, cache, np.array(prompt), Recording(prompt, Sampler(temperature=0)),
                                max_tokens=30, stop_tokens=frozenset())
        ids = [next(generation) for _ in range(20)]
        generation.close()
        assert cache.length == len(prompt) + 19  # every yielded token but the last has run
        after.append((ids, model.engine.forward(np.array(ids[-1:]), cache).tobytes(), generation.stats))
    (ids, logits, _), (drafted_ids, drafted_logits, stats) = after
    assert drafted_ids == ids and drafted_logits == logits and stats.accepted_tokens > 0


def test_drafts_through_the_expert_cache_give_the_same_ids(tiny_gguf, every_draft):
    """With `max_memory` at one layer's experts, a pass's tokens share the pools' slots: the same ids and logits."""
    path = tiny_gguf(hidden_size=160, intermediate_size=96, head_dim=32)
    prompt = repetitive_prompt(6)
    runs = []
    for draft_tokens in (0, 3):
        with ossrt.load(path, context_length=CONTEXT, threads=2, max_memory=max_memory_for(path, 8),
                        draft_tokens=draft_tokens) as cached:
            ids, sample, generation = run(cached, prompt, Sampler(temperature=0), max_tokens=40)
            runs.append((ids, sample.seen, generation.stats.accepted_tokens))
    assert runs[0][:2] == runs[1][:2] and runs[1][2] > 0


def test_constrained_chat_with_drafts_answers_the_same(models):
    """The grammar's state moves with each sampled token in order: a JSON answer with drafts is the same answer."""
    plain, drafting = models
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "n": {"type": "integer"}},
              "required": ["name", "n"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "thing", "schema": schema}}
    messages = [{"role": "user", "content": "name name name, a thing thing thing; a thing, a name"}]
    answers = [m.chat(messages, response_format=fmt, temperature=0.8, seed=3, max_tokens=80, reasoning_effort="low")
               for m in (plain, drafting)]
    assert answers[0].content == answers[1].content and answers[0].reasoning == answers[1].reasoning
    assert answers[0].usage == answers[1].usage
    if answers[0].finish_reason == "stop":
        json.loads(answers[0].content)


def test_draft_tokens_is_checked(tiny_gguf):
    with pytest.raises(ParameterError, match="draft_tokens must be an integer >= 0, got -1"):
        ossrt.load(tiny_gguf(), draft_tokens=-1)
    with pytest.raises(ParameterError, match="draft_tokens must be an integer >= 0, got 1.5"):
        ossrt.load(tiny_gguf(), draft_tokens=1.5)
    result = CliRunner().invoke(main, ["generate", str(tiny_gguf()), "-p", "hi", "--draft", "-2"])
    assert result.exit_code == 2 and "--draft" in result.output


def test_cli_generate_with_drafts_prints_the_same_text(tiny_gguf):
    path = str(tiny_gguf())
    args = ["generate", path, "-p", "one two three one two three one two", "--raw", "--temp", "0", "-n", "24"]
    plain = CliRunner().invoke(main, args)
    drafted = CliRunner().invoke(main, args + ["--draft", "3"])
    assert plain.exit_code == 0 and drafted.exit_code == 0, drafted.output
    assert plain.output == drafted.output and plain.output.strip()
