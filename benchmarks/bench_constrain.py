"""Cost of constrained decoding over the 201,088-token o200k_harmony vocabulary (issue 14: ≤ 1 ms per token).

    python benchmarks/bench_constrain.py [--steps 400] [--seed 0]

Each generation follows a whole-completion grammar (constrain.completion_grammar) from the start of its final answer:
a seeded random "model" (random logits, nudged towards closing quotes and brackets so texts end and restart) is
steered by it; a finished answer starts a new generation. The "reasoning" row writes analysis text instead (free
under the grammar, but masked all the same). Per step it times what `Constraint.apply` does,
in its two parts: llguidance's bit mask (`mask`) and -inf into the logits (`logits`), their sum (`total`, what a
sampler pays per token), and `consume`. Once: building llguidance's tokenizer, and a new generation's set-up
(grammar compile, matcher, first mask).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from ossrt import constrain
from ossrt.testing import synthetic
from ossrt.tokenizer import Tokenizer

FINAL = "<|channel|>final<|message|>"
REASONING = "<|channel|>analysis<|message|>"

ITEM = {
    "type": "object",
    "properties": {
        "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
        "quantity": {"type": "integer", "minimum": 1, "maximum": 999},
        "price": {"type": "number"},
        "options": {"type": "array", "items": {"type": "string", "enum": ["gift", "express", "insured"]}},
    },
    "required": ["sku", "quantity", "price", "options"],
    "additionalProperties": False,
}
ORDER = {
    "type": "object",
    "properties": {
        "id": {"type": "string", "maxLength": 16},
        "customer": {
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 24},
                "email": {"type": "string", "format": "email"},
                "address": {"$ref": "#/$defs/address"},
            },
            "required": ["name", "email", "address"],
            "additionalProperties": False,
        },
        "items": {"type": "array", "items": ITEM, "minItems": 1, "maxItems": 4},
        "status": {"type": "string", "enum": ["new", "paid", "shipped", "cancelled"]},
        "note": {"anyOf": [{"type": "string", "maxLength": 40}, {"type": "null"}]},
    },
    "required": ["id", "customer", "items", "status", "note"],
    "additionalProperties": False,
    "$defs": {"address": {
        "type": "object",
        "properties": {"street": {"type": "string", "maxLength": 30}, "city": {"type": "string", "maxLength": 20},
                       "country": {"type": "string", "enum": ["DE", "FR", "US", "JP"]}},
        "required": ["street", "city", "country"],
        "additionalProperties": False,
    }},
}
FORMATS = {  # name -> (the answer's format, the header the measured text follows)
    "json_object": (constrain.json_object_format, FINAL),
    "nested strict schema": (lambda: constrain.json_schema_format({"name": "order", "schema": ORDER, "strict": True}),
                             FINAL),
    "reasoning": (constrain.json_object_format, REASONING),
}


def structure_bias(tokenizer: Tokenizer) -> np.ndarray:
    bias = np.zeros(tokenizer.n_vocab, dtype=np.float32)
    for text in ('"', "}", "]", '"}', "},", '",', "}}", ",", "null"):
        bias[tokenizer.encode(text)] = 2.5
    return bias


def ms(seconds: list[float], q: float) -> float:
    return float(np.percentile(seconds, q)) * 1e3


def measure(name: str, tokenizer: Tokenizer, steps: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    bias = structure_bias(tokenizer)
    times: dict[str, list[float]] = {"mask": [], "logits": [], "total": [], "consume": [], "setup": []}
    constraint, texts = None, 0
    for _ in range(steps):
        if constraint is None or constraint.finished:
            make_format, header = FORMATS[name]
            t = time.perf_counter()
            constraint = constrain.Constraint(constrain.completion_grammar(answer=make_format()), tokenizer)
            constraint.bitmask()
            times["setup"].append(time.perf_counter() - t)
            for token in tokenizer.encode(header, allowed_special="all"):
                constraint.consume(token)
            texts += 1
        logits = rng.standard_normal(tokenizer.n_vocab).astype(np.float32) + bias
        t0 = time.perf_counter()
        bits = constraint.bitmask()
        t1 = time.perf_counter()
        constrain._mask_logits(logits, bits)  # the second half of Constraint.apply
        t2 = time.perf_counter()
        constraint.consume(int(np.argmax(logits)))
        t3 = time.perf_counter()
        times["mask"].append(t1 - t0)
        times["logits"].append(t2 - t1)
        times["total"].append(t2 - t0)
        times["consume"].append(t3 - t2)
    return {"times": times, "texts": texts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "o200k_base.tiktoken"
        path.write_bytes(synthetic.o200k_base())
        tokenizer = Tokenizer.from_tiktoken_file(path)
    t = time.perf_counter()
    constrain.engine_tokenizer(tokenizer)
    print(f"llguidance tokenizer build (once per Tokenizer, {tokenizer.n_vocab:,} tokens): "
          f"{(time.perf_counter() - t) * 1e3:.0f} ms")
    t = time.perf_counter()
    constrain._mask_logits(np.zeros(32, dtype=np.float32), np.zeros(1, dtype=np.uint32))
    print(f"Numba kernel load (once per process; compiled on the first run, then from Numba's cache): "
          f"{(time.perf_counter() - t) * 1e3:.0f} ms\n")
    columns = ("mask", "logits", "total", "consume")
    header = f"{'grammar':<22} {'steps':>5} {'texts':>5} " + " ".join(f"{c + ' med':>11} {'p99':>6}" for c in columns)
    header += f" {'setup med':>9}"
    print(header + "\n" + "-" * len(header))
    for name in FORMATS:
        result = measure(name, tokenizer, args.steps, args.seed)
        ts = result["times"]
        cells = " ".join(f"{ms(ts[c], 50):>11.3f} {ms(ts[c], 99):>6.3f}" for c in columns)
        print(f"{name:<22} {args.steps:>5} {result['texts']:>5} {cells} {ms(ts['setup'], 50):>9.3f}")
    print("\nms per token over a 201,088-token vocabulary; total = mask + logits (Constraint.apply, what a sampler "
          "pays); setup = grammar compile + matcher + first mask, once per generation")


if __name__ == "__main__":
    main()
