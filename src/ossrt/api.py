"""The Python API: `ossrt.load(name) -> Model`, with `logits`, a streaming `generate`, and `chat`."""

from __future__ import annotations

import os
from typing import Any, Iterable, Mapping, Sequence

import numba
import numpy as np

from .chat import ChatResponse, ChatSession, ChatStream
from .constrain import JsonFormat
from .engine.cpu import CpuOps
from .engine.engine import Engine, as_token_ids
from .engine.expert_cache import WORKING_MEMORY, ExpertCache, is_experts, memory_plan, parse_size
from .engine.generate import Generation, check_max_tokens
from .engine.model import Transformer
from .engine.sampling import Sampler, is_integer
from .defaults import DEFAULT_CONTEXT_LENGTH, DEFAULT_DEVICE, DEFAULT_KV_TYPE, DEVICES, KV_TYPES
from .errors import ParameterError
from .format.config import ModelConfig
from .format.modelfile import ModelFile
from .harmony import DEFAULT_REASONING_EFFORT
from .resolve import resolve_model
from .tokenizer import Tokenizer


class Model:
    """A loaded gpt-oss model. Thread-safe: forward passes are serialised, and every `generate` call has its own
    KV cache, so concurrent calls interleave without touching each other's state."""

    def __init__(self, model_file: ModelFile, *, context_length: int | None = None, threads: int | None = None,
                 kv_type: str = DEFAULT_KV_TYPE, device: str = DEFAULT_DEVICE, int8_activations: bool = True,
                 max_memory: int | str | None = None, draft_tokens: int = 0):
        check_load_params(context_length=context_length, threads=threads, kv_type=kv_type, device=device)
        if not isinstance(int8_activations, bool):
            raise ParameterError(f"int8_activations must be True or False, got {int8_activations!r:.80}")
        check_draft_tokens(draft_tokens)
        cfg = model_file.config
        if context_length is None:
            context_length = min(DEFAULT_CONTEXT_LENGTH, cfg.n_ctx_train)
        if not 1 <= context_length <= cfg.n_ctx_train:
            raise ParameterError(f"context_length must be between 1 and {cfg.n_ctx_train} "
                                 f"(the model's training context), got {context_length}")
        if kv_type == "q8_0" and cfg.head_dim % 32:
            raise ParameterError(f"kv_type q8_0 needs a head dimension that is a multiple of 32, this model's is "
                                 f"{cfg.head_dim}")
        self.model_file = model_file
        self.device = "cuda" if device == "cuda" or device == "auto" and _cuda_available() else "cpu"
        if max_memory is not None and self.device != "cpu":
            raise ParameterError("max_memory bounds the RAM of a CPU run; it cannot be used on a CUDA device")
        self.max_memory = None if max_memory is None else parse_size(max_memory)
        experts = None if max_memory is None else _expert_cache(model_file, self.max_memory, context_length, kv_type)
        ops = CpuOps(threads, int8_activations, experts) if self.device == "cpu" else _cuda_ops()
        self.engine = Engine(Transformer(model_file, ops), lambda: Tokenizer.from_model_file(model_file),
                             context_length=int(context_length), kv_type=kv_type, draft_tokens=int(draft_tokens))
        self._session = ChatSession(self.engine)
        self.expert_cache = experts  # the experts within `max_memory` (None: they stay in the memory map)

    @property
    def config(self) -> ModelConfig:
        return self.engine.config

    @property
    def context_length(self) -> int:
        return self.engine.context_length

    @property
    def kv_type(self) -> str:
        return self.engine.kv_type

    @property
    def threads(self) -> int | None:
        """The CPU threads the kernels use (None on a CUDA device)."""
        return self.engine.transformer.threads

    @property
    def tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer

    def logits(self, token_ids: Iterable[int]) -> np.ndarray:
        """float32 [len(token_ids), vocab]: the logits at every position of a fresh sequence."""
        tokens = self.engine.check_tokens(token_ids)
        return self.engine.forward(tokens, self.engine.new_cache(len(tokens)), all_logits=True)

    def generate(self, token_ids: Iterable[int], *, max_tokens: int | None, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0, seed: int | None = None,
                 stop_tokens: Iterable[int] | None = None) -> Generation:
        """Yield new token ids after `token_ids` until a stop token (not yielded; default: the model's end
        tokens <|return|>, <|call|>, <|endoftext|>), `max_tokens` (None: until the context is full) or the
        context length. Temperature 0 is greedy; the same seed gives the same tokens. Parameters are checked
        here, before the first token (ParameterError naming the first bad one). The returned iterator's `stats`
        describe the run as it goes. Non-finite logits (a corrupt file) raise ModelOutputError while iterating."""
        tokens = self.engine.check_tokens(token_ids)
        check_max_tokens(max_tokens)
        sampler = Sampler(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, seed=seed)
        if stop_tokens is None:
            stops = self.tokenizer.stop_tokens_for_assistant
        else:
            stops = frozenset(as_token_ids(stop_tokens, "stop_tokens", self.config.n_vocab, allow_empty=True).tolist())
        return Generation(self.engine, self.engine.new_cache(), tokens, sampler, max_tokens=max_tokens,
                          stop_tokens=frozenset(stops))

    def chat(self, messages: Sequence[Mapping[str, Any]], *, tools: Sequence[Mapping[str, Any]] | None = None,
             reasoning_effort: str = DEFAULT_REASONING_EFFORT, temperature: float = 1.0, top_p: float = 1.0,
             top_k: int = 0, min_p: float = 0.0, max_tokens: int | None = None, seed: int | None = None,
             stream: bool = False, current_date: str | None = None,
             response_format: Mapping[str, Any] | JsonFormat | None = None,
             tool_choice: str | Mapping[str, Any] = "auto") -> ChatResponse | ChatStream:
        """Answer OpenAI-style chat `messages` (with function `tools`): render them in Harmony, generate, parse.

        `response_format` (OpenAI's: `{"type": "json_object"}`, `{"type": "json_schema", "json_schema": {"name",
        "schema", "strict"}}`, or a `constrain.JsonFormat` already checked) makes the final answer JSON of that form,
        and `tool_choice` "required" or
        `{"type": "function", "function": {"name": ...}}` makes the model call a tool: both are enforced while
        sampling (the reasoning stays free). Calls to tools not in `tools` are answered with an error and the model
        goes on, so they never reach `tool_calls`.

        Returns a `ChatResponse` (content, reasoning, tool_calls, finish_reason, usage, timing, and the assistant
        `message` to append to the history), or with `stream=True` a `ChatStream` of events ending in `Done`;
        `ChatStream.cancel()` (any thread) or `close()` stops it. The model's own conversation cache is reused for
        the prefix shared with the previous call; use `new_session()` for independent conversations. A call made
        while another thread's turn is running on the same session gets a private cache instead of waiting."""
        return self._session.chat(messages, tools=tools, reasoning_effort=reasoning_effort, temperature=temperature,
                                  top_p=top_p, top_k=top_k, min_p=min_p, max_tokens=max_tokens, seed=seed,
                                  stream=stream, current_date=current_date, response_format=response_format,
                                  tool_choice=tool_choice)

    def new_session(self) -> ChatSession:
        """A conversation with its own KV cache: `session.chat(messages, ...)` takes the arguments of `chat`."""
        return ChatSession(self.engine)

    def close(self) -> None:
        close_ops = getattr(self.engine.transformer.ops, "close", None)
        if close_ops is not None:
            close_ops()
        self.model_file.close()

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load(path: str | os.PathLike, *, context_length: int | None = None, threads: int | None = None,
         kv_type: str = DEFAULT_KV_TYPE, device: str = DEFAULT_DEVICE, prefetch: bool = True,
         mlock: bool = False, int8_activations: bool = True, max_memory: int | str | None = None,
         draft_tokens: int = 0) -> Model:
    """Open a gpt-oss model (memory-mapped; the file is validated before anything runs). `path` is a GGUF file,
    a Hugging Face checkpoint directory or a hub name such as "gpt-oss-20b" (`ossrt.resolve`). `context_length`
    defaults to 8192 (or the model's training context if smaller); `threads` to all cores; `kv_type` is the KV
    cache's precision: "f16" (as llama.cpp), "q8_0" (8-bit, about half of f16) or "f32" (exact). The thread count
    applies to every forward pass on the CPU, in whichever thread runs it. `device` is "cpu", "cuda" (an NVIDIA GPU
    through CuPy: the `cuda12`/`cuda13` extras; DeviceError says what is missing) or "auto" (CUDA when CuPy finds a
    device, else the CPU).

    The file is memory-mapped, so its pages come from disk when first touched: `prefetch` (default) has the kernel
    read the weights into the page cache in the background while loading returns, which makes the first answer after
    a cold start much faster (skipped when the file is larger than the available RAM). `mlock` reads the whole file
    at load and locks it in RAM, so it is never evicted (as llama.cpp's --mlock); it needs a locked-memory limit
    (RLIMIT_MEMLOCK, `ulimit -l`) above the file size, else ParameterError says so.

    On CPUs with VNNI (AVX-512 or AVX-VNNI), prompts run through integer matmuls with activations quantized to 8
    bits, as llama.cpp's CPU backend does: about three times the float32 rate, the logits moved about as much as the
    q8_0 file's own rounding of the weights moves them. `int8_activations=False` keeps float32 throughout (the
    reference's numbers). Decode is float32 either way.

    `draft_tokens` > 0 turns on prompt lookup (as llama.cpp's `llama-lookup`): each decode pass also checks up to
    that many tokens (at most 3 on the CPU; none on CUDA) that followed an earlier occurrence of the text's last few
    tokens, and every one the sampler picks comes without a pass of its own. The output is the same token for token,
    greedy or sampled: each drafted token's logits are bit for bit those of a pass of it alone. It pays where the
    answer repeats its context (editing code, quoting, extracting); how many tokens a pass drafts follows the
    acceptance so far and the measured time of passes of each size, so drafting stops where it would not pay.

    Bad arguments raise ParameterError naming the first one, before the file is opened (the context length's upper
    bound, the model's, once it is)."""
    if not isinstance(path, (str, os.PathLike)) or not isinstance(os.fspath(path), str):
        raise ParameterError(f"path must be a str or a path-like object naming a model, got {path!r:.80}")
    check_load_params(context_length=context_length, threads=threads, kv_type=kv_type, device=device)
    check_draft_tokens(draft_tokens)
    for name, value in (("prefetch", prefetch), ("mlock", mlock), ("int8_activations", int8_activations)):
        if not isinstance(value, bool):
            raise ParameterError(f"{name} must be True or False, got {value!r:.80}")
    if max_memory is not None:
        parse_size(max_memory)
        if mlock:
            raise ParameterError("mlock locks the whole file in RAM; it cannot be used with max_memory")
    model_file = ModelFile.open(resolve_model(path), prefetch=prefetch and max_memory is None, mlock=mlock)
    try:
        model = Model(model_file, context_length=context_length, threads=threads, kv_type=kv_type, device=device,
                      int8_activations=int8_activations, max_memory=max_memory, draft_tokens=draft_tokens)
    except BaseException:
        model_file.close()
        raise
    if prefetch and max_memory is not None:
        model_file.start_prefetch(skip=is_experts)  # experts come through the cache, never the map
    return model


def _expert_cache(model_file: ModelFile, max_memory: int, context_length: int, kv_type: str) -> ExpertCache:
    """The expert cache for a RAM bound: what is left of `max_memory` after `memory_plan`'s mapped weights and KV
    cache and the working memory."""
    mapped, kv, one_layer = memory_plan(model_file, context_length, kv_type)
    budget = max_memory - mapped - kv - WORKING_MEMORY
    if budget < one_layer:
        need = max_memory - budget + one_layer
        raise ParameterError(f"max_memory {max_memory / 2**30:.2f} GiB is too small for {model_file.path.name}: "
                             f"its weights other than experts take {mapped / 2**30:.2f} GiB, the KV cache for "
                             f"{context_length} tokens {kv / 2**30:.2f} GiB, working memory "
                             f"{WORKING_MEMORY / 2**30:.2f} GiB, and one layer's experts "
                             f"{one_layer / 2**30:.2f} GiB: at least {need / 2**30:.2f} GiB is needed")
    return ExpertCache(model_file, budget)


def check_load_params(*, context_length: int | None, threads: int | None, kv_type: str, device: str) -> None:
    """ParameterError naming the first of `load`'s options with a wrong type or value (the context length's upper
    bound, the model's training context, is checked once the file is open)."""
    if context_length is not None and (not is_integer(context_length) or context_length < 1):
        raise ParameterError(f"context_length must be an integer >= 1 or None, got {context_length!r:.80}")
    cores = numba.config.NUMBA_NUM_THREADS
    if threads is not None and (not is_integer(threads) or not 1 <= threads <= cores):
        raise ParameterError(f"threads must be an integer between 1 and {cores} (the cores Numba may use) or None, "
                             f"got {threads!r:.80}")
    if not isinstance(kv_type, str) or kv_type not in KV_TYPES:
        raise ParameterError(f"kv_type must be one of {', '.join(KV_TYPES)}, got {kv_type!r:.80}")
    if not isinstance(device, str) or device not in DEVICES:
        raise ParameterError(f"device must be one of {', '.join(DEVICES)}, got {device!r:.80}")


def check_draft_tokens(draft_tokens: object) -> None:
    if not is_integer(draft_tokens) or draft_tokens < 0:
        raise ParameterError(f"draft_tokens must be an integer >= 0, got {draft_tokens!r:.80}")


def _cuda_available() -> bool:
    from .engine import cuda  # imports neither CuPy nor numba.cuda until asked

    return cuda.available()


def _cuda_ops():
    from .engine.cuda import CudaOps

    return CudaOps()
