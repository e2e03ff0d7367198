"""Prompt lookup (`draft_tokens`): how often drafts match realistic text, what a pass checking them costs, and
decode speed with and without drafts, side by side in one process.

    python benchmarks/bench_lookup.py MODEL.gguf [--threads 2] [--draft 3] [--rounds 3] [--answer-tokens 300]

A synthetic model's random weights write random text, on which nothing would be drafted. So decode is measured
teacher-forced: the sampler returns the next token of a real answer whatever the logits say. Generation does the
same work (each pass, the drafts, the cache), and which drafts are kept follows the real text, as it would for a
model that wrote it. Drafts on and off alternate, on the same loaded model. Scenarios, from this repository's
files:
- edit: the prompt holds a Python module and asks for a change; the answer is the module with one name renamed
  (what coding tools ask of a model: most of the answer is in the prompt);
- summarize: the prompt holds the README's performance section; the answer is the README's first paragraphs (prose
  that shares words, not passages);
- chat: a short question; the answer is the same prose (nothing to copy but its own repetitions).
Acceptance (drafted tokens kept) is also given without the model, for each draft length, by PromptLookup alone.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

import ossrt
from ossrt.engine.generate import Generation
from ossrt.engine.lookup import PromptLookup

ROOT = Path(__file__).resolve().parent.parent


def scenarios(tok, answer_tokens: int) -> dict[str, tuple[list[int], list[int]]]:
    """name -> (prompt ids, answer ids)."""
    module = (ROOT / "src/ossrt/engine/lookup.py").read_text()
    readme = (ROOT / "README.md").read_text()
    prose = readme[:6000]
    perf = readme[readme.find("## Performance"):][:6000] if "## Performance" in readme else readme[-6000:]
    edit_prompt = f"Rename `tokens` to `history` in this module and show the whole file:\n\n{module}\n"
    return {
        "edit": (tok.encode(edit_prompt), tok.encode(module.replace("tokens", "history"))[:answer_tokens]),
        "summarize": (tok.encode(f"Summarize this for a user:\n\n{perf}\n"), tok.encode(prose)[:answer_tokens]),
        "chat": (tok.encode("What is ossrt, and how do I run it?"), tok.encode(prose)[:answer_tokens]),
    }


def offline_acceptance(prompt: list[int], answer: list[int], draft: int) -> tuple[float, float]:
    """(share of drafted tokens kept, answer tokens per pass) when the answer is written after the prompt."""
    lookup = PromptLookup(prompt)
    drafted = kept = passes = 0
    i = 0
    while i < len(answer):
        lookup.append(answer[i])
        guess = lookup.draft(draft)
        passes += 1
        n = 0
        while n < len(guess) and i + 1 + n < len(answer) and guess[n] == answer[i + 1 + n]:
            lookup.append(answer[i + 1 + n])
            n += 1
        drafted, kept = drafted + len(guess), kept + n
        i += 1 + n
    return (kept / drafted if drafted else 0.0), len(answer) / passes


class Forced:
    """A sampler that writes `answer`, token by token, whatever the logits."""

    def __init__(self, answer: list[int]):
        self.answer, self.i = answer, 0

    def __call__(self, logits: np.ndarray) -> int:
        self.i += 1
        return self.answer[self.i - 1]


def decode_run(model, prompt: list[int], answer: list[int], draft: int):
    model.engine.draft_tokens = draft
    generation = Generation(model.engine, model.engine.new_cache(len(prompt) + len(answer) + 8), np.array(prompt),
                            Forced(answer), max_tokens=len(answer), stop_tokens=frozenset())
    assert list(generation) == answer
    return generation.stats


def pass_costs(model, rounds: int) -> dict[int, float]:
    """Median seconds of a pass of T tokens (all logits) after a 128-token prompt, T = 1 .. few_tokens."""
    transformer = model.engine.transformer
    rng = np.random.default_rng(0)
    cache = transformer.new_cache(512)
    transformer.forward(rng.integers(1000, 199000, 128), cache)
    times: dict[int, list[float]] = {T: [] for T in range(1, model.engine.few_tokens + 1)}
    for _ in range(rounds):
        for T in times:
            t0 = time.perf_counter()
            for _ in range(4):
                transformer.forward(rng.integers(1000, 199000, T), cache, all_logits=True)
                cache.length -= T
            times[T].append((time.perf_counter() - t0) / 4)
    return {T: float(np.median(v)) for T, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--draft", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--answer-tokens", type=int, default=300)
    args = ap.parse_args()
    model = ossrt.load(args.model, threads=args.threads, context_length=8192)
    if model.model_file.prefetch_thread is not None:
        model.model_file.prefetch_thread.join()
    print(f"{args.model}: {model.engine.transformer.threads} threads, few_tokens {model.engine.few_tokens}")
    cases = scenarios(model.tokenizer, args.answer_tokens)

    print("\nacceptance by PromptLookup alone (kept / drafted, answer tokens per pass):")
    print("| scenario | prompt | answer | " + " | ".join(f"draft {d}" for d in range(1, 4)) + " |")
    print("|---|---|---|" + "---|" * 3)
    for name, (prompt, answer) in cases.items():
        cells = [f"{a:.0%}, {p:.2f}" for a, p in (offline_acceptance(prompt, answer, d) for d in range(1, 4))]
        print(f"| {name} | {len(prompt)} | {len(answer)} | " + " | ".join(cells) + " |")

    costs = pass_costs(model, args.rounds)
    print("\npass of T tokens (all logits), median: " +
          ", ".join(f"T={T} {c * 1000:.0f} ms ({c / costs[1]:.2f}x)" for T, c in costs.items()))

    print(f"\nteacher-forced decode, drafts off and {args.draft} alternating, {args.rounds} rounds (tokens/s):")
    print("| scenario | off (median) | on (median) | on/off | acceptance | tokens/pass | runs off | runs on |")
    print("|---|---|---|---|---|---|---|---|")
    for name, (prompt, answer) in cases.items():
        rates: dict[int, list[float]] = {0: [], args.draft: []}
        stats = None
        for r in range(args.rounds):
            for draft in ((0, args.draft) if r % 2 == 0 else (args.draft, 0)):
                s = decode_run(model, prompt, answer, draft)
                rates[draft].append(s.decode_tokens_per_second)
                if draft:
                    stats = s
        off, on = np.median(rates[0]), np.median(rates[args.draft])
        passes = stats.decode_steps - stats.accepted_tokens
        print(f"| {name} | {off:.2f} | {on:.2f} | {on / off:.2f}x | {stats.acceptance:.0%} | "
              f"{stats.decode_steps / passes:.2f} | {' '.join(f'{x:.2f}' for x in rates[0])} | "
              f"{' '.join(f'{x:.2f}' for x in rates[args.draft])} |")


if __name__ == "__main__":
    main()
