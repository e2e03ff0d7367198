"""Dev-time cross-check: ossrt's logits against Hugging Face transformers' gpt-oss on a tiny synthetic model.

Needs torch and transformers beside ossrt (never a dependency of the package or CI), e.g.
    python -m venv /tmp/hfvenv && /tmp/hfvenv/bin/pip install torch==2.13.0 transformers -e .
    /tmp/hfvenv/bin/python tools/compare_transformers.py [--tokens 48] [--seed 5]

A tiny checkpoint in the plain bf16 layout is written, converted with `--outtype f32` (lossless from bf16), run by
ossrt (fast path and float64 reference) and by transformers in float32 with eager attention.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM

import ossrt
from ossrt.engine import reference
from ossrt.testing import synthetic
from ossrt.format.convert import convert


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=48, help="prompt length (the tiny window is 8)")
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--vocab", type=Path, default=None, help="a .tiktoken file [default: the shipped o200k_base]")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        src = synthetic.write_checkpoint(Path(tmp) / "hf", synthetic.hf_config("tiny"), layout="bf16",
                                         seed=args.seed, vocab_path=args.vocab)
        gguf = convert(src, Path(tmp) / "tiny-f32.gguf", outtype="f32", progress=False)
        tokens = np.random.default_rng(args.seed).integers(0, 199998, args.tokens)
        with ossrt.load(gguf) as model:
            results = {"ossrt": model.logits(tokens),
                       "reference": reference.forward(model.config, reference.load_weights(model.model_file), tokens)}
        hf = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, attn_implementation="eager").eval()
        with torch.no_grad():
            expect = hf(torch.tensor(tokens)[None]).logits[0].numpy()
    print(f"{args.tokens} tokens, max |logit| {np.abs(expect).max():.3f}")
    for name, got in results.items():
        print(f"{name:>9} vs transformers: max abs error {np.abs(got - expect).max():.2e}, "
              f"argmax agrees at {(got.argmax(1) == expect.argmax(1)).mean():.0%} of positions")


if __name__ == "__main__":
    main()
