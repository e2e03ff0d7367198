"""The report behind `ossrt info FILE`: architecture, sizes, tensor types, parameters, and the RAM (or, on a CUDA
device, VRAM) it needs."""

from __future__ import annotations

import os
from collections import Counter

from .engine import cuda
from .engine.expert_cache import WORKING_MEMORY, memory_plan
from .engine.kv_cache import CHUNK, cache_bytes
from .errors import ParameterError
from .format.modelfile import ModelFile


def _gb(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _params(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


def report(path: str | os.PathLike, context: int | None = None, device: str = "cpu") -> str:
    """A plain-text report of the model file at `path`; RAM figures (or, with `device="cuda"`, VRAM figures) for
    `context` tokens (default: the model's training context)."""
    if device not in ("cpu", "cuda"):
        raise ParameterError(f"device must be 'cpu' or 'cuda', got {device!r:.80}")
    with ModelFile.open(path) as m:
        c = m.config
        ctx = c.n_ctx_train if context is None else context
        if not isinstance(ctx, int) or isinstance(ctx, bool) or not 1 <= ctx <= c.n_ctx_train:
            raise ParameterError(f"context must be between 1 and {c.n_ctx_train} (the model's training context), "
                                 f"got {ctx!r}")
        types = Counter(t.type.name for t in m.tensors.values())
        experts = {s.name for s in c.tensor_specs() if s.kind == "experts"}
        expert_bytes = sum(m.tensors[n].data.nbytes for n in experts)
        embd = m.tensors["token_embd.weight"]
        # The weights besides experts and embeddings, the KV cache, one layer's experts: what --max-memory must hold.
        other, _, one_layer = memory_plan(m, ctx, "f16")
        # Per token: every dense tensor, one embedding row, and the selected experts' share of the expert data.
        touched = other + embd.data.nbytes // embd.shape[0] + expert_bytes * c.n_expert_used // c.n_expert
        kv = {kv_type: cache_bytes(c, ctx, kv_type) for kv_type in ("f16", "f32", "q8_0")}  # f16: the default
        sliding = sum(1 for i in range(c.n_layer) if c.is_sliding(i))
        lines = [
            f"file               {m.path}",
            f"name               {m.get('general.name', '?')}",
            f"architecture       {m.get('general.architecture')}",
            f"layers             {c.n_layer} ({sliding} sliding window {c.sliding_window}, {c.n_layer - sliding} full)",
            f"experts            {c.n_expert}, {c.n_expert_used} per token, feed-forward {c.n_ff_exp}",
            f"embedding          {c.n_embd}",
            f"heads              {c.n_head} query, {c.n_head_kv} key/value, head dim {c.head_dim}",
            f"vocabulary         {c.n_vocab}",
            f"context length     {c.n_ctx_train} (YaRN x{c.rope_scaling_factor:g} from {c.rope_orig_ctx})",
            f"tensor types       {', '.join(f'{n} {k}' for k, n in sorted(types.items(), key=lambda kv: -kv[1]))}",
            f"file size          {_gb(m.file_size)} ({m.file_size} bytes)",
            f"parameters         {_params(c.n_params)} total, {_params(c.n_params_active)} active per token",
        ]
        kv_line = f"  KV cache (f16)              {_gb(kv['f16'])}  (f32: {_gb(kv['f32'])}, q8_0: {_gb(kv['q8_0'])})"
        if device == "cpu":
            lines += [
                f"RAM at context {ctx}:",
                f"  weights touched per token   {_gb(touched)}",
                f"  whole file (memory-mapped)  {_gb(m.file_size)}",
                kv_line,
                f"  file + KV cache             {_gb(m.file_size + kv['f16'])}",
                f"  smallest --max-memory       {_gb(other + kv['f16'] + one_layer + WORKING_MEMORY)}  (weights "
                f"but experts, KV cache, 1 GiB working memory, one layer's experts)",
            ]
        else:
            weights = sum(t.data.nbytes for t in m.tensors.values())
            work = cuda.workspace_bytes(c, CHUNK)
            lines += [
                f"VRAM at context {ctx} (CUDA):",
                f"  weights as stored           {_gb(weights)}",
                kv_line,
                f"  workspace (estimate)        {_gb(work)}",
                f"  total                       {_gb(weights + kv['f16'] + work)}",
            ]
    return "\n".join(lines)

