"""Experts in RAM within a byte budget, for machines smaller than the model (`ossrt.load(..., max_memory=...)`).

With plain memory mapping the kernel's page cache decides which pages stay, and a token's experts come in by page
faults, one 4 KiB page after another. Here every expert of every layer has a home in the file and, while cached, a
slot in three pools (gate, up, down rows, as stored), filled by large `preadv` calls several at a time; the MoE
kernels run on the pools with expert ids mapped to slots. The mapped expert tensors are never touched, so they
never count in the process's memory. A slot holds one expert of one layer: the pools hold at least one layer's
experts, so any batch of tokens fits (a prompt may route to every expert of a layer).

Which expert leaves when a slot is needed is the policy's choice (`POLICIES`). The default, least recently used
within the layer holding the most, keeps an equal share per layer: layers are visited in turn, so a plain LRU
evicts the layer needed next (below the hit rate of a random choice on uniform routing). On simulated routing
(benchmarks/bench_expert_cache.py, the 20b's 24 x 32 experts, room for 18 % of them) it hit 19 % on uniform choices,
38 % on Zipf-skewed ones and 66 % on skewed choices correlated from token to token, against 13/28/65 % for a plain
LRU and 18/53/52 % for least frequently used with aging counts.
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from . import kernels
from .kv_cache import cache_bytes
from ..errors import ModelFileError, ParameterError
from ..format.modelfile import ModelFile, Tensor

KINDS = ("gate", "up", "down")
# Activations, the tokenizer, the interpreter: what a forward pass needs besides weights and the KV cache.
WORKING_MEMORY = 1 << 30
# Reads in flight at once: enough to keep an NVMe drive's queue busy, few enough not to thrash a disk.
READERS = 8


class LeastRecentlyUsed:
    """Evict the expert whose last use is oldest."""

    def __init__(self):
        self.order: OrderedDict[tuple[int, int], None] = OrderedDict()

    def touch(self, key: tuple[int, int]) -> None:
        self.order[key] = None
        self.order.move_to_end(key)

    def forget(self, key: tuple[int, int]) -> None:
        self.order.pop(key, None)

    def victim(self, keep: set) -> tuple[int, int]:
        return next(key for key in self.order if key not in keep)


class LeastFrequentlyUsed:
    """Evict the expert used least often, counts halving every `half_life` uses of the cache so that a topic
    change is followed; ties go to the least recently used."""

    def __init__(self, half_life: int = 4096):
        self.counts: dict[tuple[int, int], float] = {}
        self.last: dict[tuple[int, int], int] = {}
        self.clock, self.half_life = 0, half_life

    def touch(self, key: tuple[int, int]) -> None:
        self.clock += 1
        if self.clock % self.half_life == 0:
            self.counts = {k: c / 2 for k, c in self.counts.items()}
        self.counts[key] = self.counts.get(key, 0.0) + 1.0
        self.last[key] = self.clock

    def forget(self, key: tuple[int, int]) -> None:
        self.last.pop(key, None)  # the count stays: an expert read again resumes its history

    def victim(self, keep: set) -> tuple[int, int]:
        return min((key for key in self.last if key not in keep), key=lambda k: (self.counts[k], self.last[k]))


class LayerBalanced(LeastRecentlyUsed):
    """Least recently used within the layer holding the most experts (the asking layer on a tie): layers are
    visited in turn, so a global LRU would push out the layer needed next; this keeps an equal share per layer."""

    def __init__(self):
        super().__init__()
        self.per_layer: dict[int, int] = {}

    def touch(self, key: tuple[int, int]) -> None:
        if key not in self.order:
            self.per_layer[key[0]] = self.per_layer.get(key[0], 0) + 1
        super().touch(key)

    def forget(self, key: tuple[int, int]) -> None:
        if key in self.order:
            self.per_layer[key[0]] -= 1
        super().forget(key)

    def victim(self, keep: set) -> tuple[int, int]:
        asking = next(iter(keep))[0]
        most = max(self.per_layer.values())
        layer = asking if self.per_layer.get(asking, 0) == most else \
            max(self.per_layer, key=lambda layer: self.per_layer[layer])
        return next((key for key in self.order if key[0] == layer and key not in keep),
                    next(key for key in self.order if key not in keep))


POLICIES = {"lru": LeastRecentlyUsed, "lfu": LeastFrequentlyUsed, "layer-lru": LayerBalanced}


class SlotTable:
    """Which expert (layer, id) holds which of `n_slots` slots, and which leaves when a slot is needed: the cache's
    bookkeeping without its I/O, so the benchmark's simulations replay exactly what the cache does."""

    def __init__(self, n_slots: int, policy: str = "layer-lru"):
        if policy not in POLICIES:
            raise ParameterError(f"expert cache policy must be one of {', '.join(POLICIES)}, got {policy!r:.80}")
        self.policy = POLICIES[policy]()
        self.slot_of: dict[tuple[int, int], int] = {}
        self._free = list(range(n_slots - 1, -1, -1))  # popped from the end: lowest slots first

    def place(self, layer: int, experts: list[int]) -> list[tuple[int, int]]:
        """Give each of a layer's `experts` (looked up together, so none evicts another) a slot; returns those that
        had none, now holding a slot the caller must fill."""
        keep = {(layer, e) for e in experts}
        placed = []
        for key in ((layer, e) for e in experts):
            if key not in self.slot_of:
                self.slot_of[key] = self._free.pop() if self._free else self._evict(keep)
                placed.append(key)
            self.policy.touch(key)
        return placed

    def drop(self, key: tuple[int, int]) -> None:
        """Free `key`'s slot (its data could not be read)."""
        self.policy.forget(key)
        self._free.append(self.slot_of.pop(key))

    def _evict(self, keep: set) -> int:
        old = self.policy.victim(keep)
        self.policy.forget(old)
        return self.slot_of.pop(old)


@dataclass
class CacheStats:
    """Counts since the cache was made: expert lookups that found the expert in RAM or read it, bytes read from the
    file and the seconds spent waiting on those reads."""

    hits: int = 0
    misses: int = 0
    bytes_read: int = 0
    read_seconds: float = 0.0
    per_layer_misses: list[int] = field(default_factory=list)
    predicted: int = 0  # experts not in RAM that a decode step's next layer was predicted to need
    predicted_used: int = 0  # of those, the ones it did need

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


def parse_size(value: int | str, name: str = "max_memory") -> int:
    """Bytes from an int or a string such as "16G", "512M", "16GiB", "16GB" (K, M, G, T are powers of 1024, as
    Docker's --memory and ulimit read them)."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ParameterError(f"{name} must be a number of bytes or a size such as '16G', got {value!r:.80}")
    if isinstance(value, int):
        size = value
    else:
        text = value.strip().upper().removesuffix("IB").removesuffix("B")
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(text[-1:], 1)
        number = text[:-1] if scale > 1 else text
        try:
            size = int(float(number) * scale)
        except ValueError:
            raise ParameterError(f"{name} must be a number of bytes or a size such as '16G', got {value!r:.80}") \
                from None
    if size <= 0:
        raise ParameterError(f"{name} must be positive, got {value!r:.80}")
    return size


def is_experts(name: str) -> bool:
    return name.endswith("_exps.weight")


def memory_plan(model_file: ModelFile, context_length: int, kv_type: str) -> tuple[int, int, int]:
    """What a RAM bound must hold besides the expert cache, and the smallest cache: (the mapped weights other than
    experts (the token embeddings count only as the rows a prompt reads), the KV cache for `context_length` tokens,
    one layer's experts). Working memory (`WORKING_MEMORY`) comes on top."""
    mapped = sum(t.nbytes for name, t in model_file.tensors.items()
                 if not is_experts(name) and name != "token_embd.weight")
    one_layer = sum(model_file.tensors[f"blk.0.ffn_{kind}_exps.weight"].nbytes for kind in KINDS)
    return mapped, cache_bytes(model_file.config, context_length, kv_type), one_layer


class ExpertCache:
    """The experts of `model_file` in pools of `budget` bytes (at least one layer's experts: ParameterError
    otherwise), evicting by `policy` (a name in `POLICIES`)."""

    def __init__(self, model_file: ModelFile, budget: int, policy: str = "layer-lru"):
        cfg = model_file.config
        self.n_layer, self.n_expert = cfg.n_layer, cfg.n_expert
        tensors = [{kind: model_file.tensors[f"blk.{i}.ffn_{kind}_exps.weight"] for kind in KINDS}
                   for i in range(cfg.n_layer)]
        first = tensors[0]
        self.expert_bytes = {kind: first[kind].nbytes // cfg.n_expert for kind in KINDS}
        self.slot_bytes = sum(self.expert_bytes.values())
        self.n_slots = min(budget // self.slot_bytes, cfg.n_layer * cfg.n_expert)
        if self.n_slots < cfg.n_expert:
            need = cfg.n_expert * self.slot_bytes
            raise ParameterError(f"the expert cache needs room for one layer's {cfg.n_expert} experts, "
                                 f"{need / 2**30:.2f} GiB; it was given {budget / 2**30:.2f} GiB")
        # Pools are allocated, not touched: a slot's pages become resident when it is first filled.
        self.pools = {kind: np.empty((self.n_slots,) + first[kind].data.shape[1:], dtype=np.uint8) for kind in KINDS}
        self.pool_tensors = {kind: Tensor(f"expert cache ({kind})", first[kind].type,
                                          (self.n_slots,) + tuple(first[kind].shape[1:]), self.pools[kind])
                             for kind in KINDS}
        # Biases are small and stay mapped; each slot gets its expert's rows of them.
        self.biases = [{kind: model_file.tensors[f"blk.{i}.ffn_{kind}_exps.bias"].data for kind in KINDS}
                       for i in range(cfg.n_layer)]
        self.bias_pools = {kind: np.zeros((self.n_slots,) + self.biases[0][kind].shape[1:], dtype=np.float32)
                           for kind in KINDS}
        self.offsets = [{kind: model_file.offset(t.name) for kind, t in layer.items()} for layer in tensors]
        self.routers = [(model_file.tensors[f"blk.{i}.ffn_gate_inp.weight"],
                         model_file.tensors[f"blk.{i}.ffn_gate_inp.bias"].data) for i in range(cfg.n_layer)]
        self.n_used = cfg.n_expert_used
        self._predicted: set[tuple[int, int]] = set()
        self.table = SlotTable(self.n_slots, policy)
        self.stats = CacheStats(per_layer_misses=[0] * cfg.n_layer)
        self.path = model_file.path
        self._fd = os.open(model_file.path, os.O_RDONLY)
        self._readers = ThreadPoolExecutor(READERS, thread_name_prefix="expert reader")
        self._lock = threading.Lock()

    @property
    def cached(self) -> int:
        return len(self.table.slot_of)

    def report(self) -> dict[str, int | float]:
        """What the cache holds and has read, for a server's /health."""
        s = self.stats
        return {"slots": self.n_slots, "cached": self.cached, "hits": s.hits, "misses": s.misses,
                "hit_rate": round(s.hit_rate, 4), "bytes_read": s.bytes_read}

    def slots(self, layer: int, experts: np.ndarray) -> np.ndarray:
        """The slots holding `experts` (ids of layer `layer`, any shape) after reading those not in the pools."""
        experts = np.asarray(experts, dtype=np.int64)
        wanted = [int(e) for e in np.unique(experts)]
        with self._lock:
            keep = {(layer, e) for e in wanted}
            self.stats.predicted_used += len(keep & self._predicted)
            self._predicted -= {key for key in self._predicted if key[0] == layer}
            loading = self.table.place(layer, wanted)
            self.stats.hits += len(wanted) - len(loading)
            self.stats.misses += len(loading)
            self.stats.per_layer_misses[layer] += len(loading)
            reads = []
            for key in loading:
                slot, e = self.table.slot_of[key], key[1]
                for kind in KINDS:
                    self.bias_pools[kind][slot] = self.biases[layer][kind][e]
                reads += [(kind, slot, self.offsets[layer][kind] + e * self.expert_bytes[kind]) for kind in KINDS]
            if reads:
                t0 = time.perf_counter()
                try:
                    for _ in self._readers.map(self._read, reads):
                        pass
                except OSError as err:  # the slots hold partial data: they are free again
                    for key in loading:
                        self.table.drop(key)
                    raise ModelFileError(f"{self.path}: cannot read experts of layer {layer}: "
                                         f"{err.strerror or err}") from None
                self.stats.read_seconds += time.perf_counter() - t0
                self.stats.bytes_read += sum(self.expert_bytes[kind] for kind, _, _ in reads)
            slots = np.array([self.table.slot_of[(layer, e)] for e in wanted], dtype=np.int64)
        return slots[np.searchsorted(wanted, experts)]

    def prefetch_next(self, layer: int, h: np.ndarray) -> None:
        """For one token (h [1, n_embd], the MoE input of `layer`): guess the next layer's experts by its router on
        h (the residual stream changes little from one layer to the next) and have the kernel start reading those
        not in RAM into the page cache (posix_fadvise WILLNEED: no thread, no GIL), so that the next layer's reads
        find them there while this layer computes. A wrong guess costs disk time, never a wrong result."""
        if layer + 1 >= self.n_layer or h.shape[0] != 1 or not hasattr(os, "posix_fadvise"):
            return
        weight, bias = self.routers[layer + 1]
        logits = kernels.matvec(weight, h[0], bias)
        with self._lock:
            for e in np.argpartition(-logits, self.n_used - 1)[:self.n_used]:
                key = (layer + 1, int(e))
                if key in self.table.slot_of:
                    continue
                self._predicted.add(key)
                self.stats.predicted += 1
                for kind in KINDS:
                    offset = self.offsets[layer + 1][kind] + int(e) * self.expert_bytes[kind]
                    os.posix_fadvise(self._fd, offset, self.expert_bytes[kind], os.POSIX_FADV_WILLNEED)

    def _read(self, job: tuple[str, int, int]) -> None:
        kind, slot, offset = job
        view = memoryview(self.pools[kind][slot].reshape(-1))
        done = 0
        while done < len(view):  # preadv may return short; a read past the end returns 0
            n = os.preadv(self._fd, [view[done:]], offset + done)
            if n == 0:
                raise OSError(f"the file ends at byte {offset + done}, inside an expert")
            done += n

    def close(self) -> None:
        self._readers.shutdown(wait=True)
        os.close(self._fd)
