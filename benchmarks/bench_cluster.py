"""Requests/s and latency of `ossrt serve` (one process) against `ossrt serve-cluster` with 1 and 2 replicas, on
one machine, with a tiny synthetic model (random weights, so the answers are noise: a request generates up to
--max-tokens tokens, the same number in every configuration, as its seed is the same).

    python benchmarks/bench_cluster.py [--requests 48] [--clients 4] [--max-tokens 64] [--parallel 2]

Each configuration serves the same model file on a free port of 127.0.0.1; `--clients` threads send chat requests
(each a different one-message conversation, so no answer comes from a cache) until `--requests` are answered.
Latency is a request's whole time (non-streamed). Each replica has one thread and reserves one of Ray's CPUs; the
single process is shown with one thread and with as many as the cluster's replicas have together. The cluster rows
run on a local Ray cluster started here (head only).

Last run (2 cores Sapphire Rapids shared with other work, tiny model: 4 layers, hidden 64, full o200k vocabulary;
48 requests of at most 64 tokens, 4 clients, 2 slots per replica or process; load average ~5 from other work
during the run, so the rows are noisy, within ~15%):

| configuration | requests/s | tokens/s | p50 ms | p95 ms |
|---|---|---|---|---|
| ossrt serve, 1 thread(s) | 3.20 | 203 | 1092 | 1985 |
| ossrt serve, 2 thread(s) | 2.82 | 179 | 1249 | 1867 |
| serve-cluster, 1 replica(s) x 1 thread | 2.79 | 177 | 1424 | 2183 |
| serve-cluster, 2 replica(s) x 1 thread | 4.12 | 261 | 839 | 1567 |

One replica costs ~13% of the single process's throughput (Ray's proxy, the ingress and the relaying run on the
same two cores). Two replicas of one thread beat one process of two threads (1.46x): the tiny model's matrices are
too small for two threads to speed up one forward pass, while two replicas run two at once. A real model's forward
passes split across threads well, so on one machine `ossrt serve --threads ALL` stays the better choice; replicas
pay off across machines.

With N nodes, each node runs its own replicas (threads per replica x replicas per node = its cores) and throughput
scales with the number of replicas as long as the one ingress replica and Ray's proxies keep up: the ingress only
relays bytes (a few hundred microseconds of Python per request and per streamed chunk), so for a real model, whose
tokens take tens of milliseconds each, it is far from the bottleneck; with the tiny model here, whose tokens take
about a millisecond, the relaying and Ray's per-request overhead are a visible share of each request. Latency at
low load is one replica's (plus a millisecond or two through the ingress); conversation affinity keeps prefill
work per turn as on one machine.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ID = "bench"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_model(directory: Path) -> Path:
    from ossrt.testing import synthetic

    return synthetic.write_gguf(directory / "tiny.gguf", synthetic.hf_config("tiny"), outtype="q8_0")


def wait_until_up(url: str, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not come up")


def load(url: str, *, requests: int, clients: int, max_tokens: int) -> dict[str, float]:
    """Send `requests` chat requests from `clients` threads; requests/s, generated tokens/s and latency
    percentiles (ms)."""
    def one(i: int) -> tuple[float, int]:
        body = {"model": ID, "messages": [{"role": "user", "content": f"Request {i}: tell me something."}],
                "max_tokens": max_tokens, "seed": i}
        start = time.perf_counter()
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=300)
        r.raise_for_status()
        return time.perf_counter() - start, r.json()["usage"]["completion_tokens"]

    for i in range(clients):  # warm up: every slot compiles and touches its caches once
        one(requests + i)
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        answered = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - start
    latencies = sorted(seconds for seconds, _ in answered)
    return {"rps": requests / wall, "tokens/s": sum(tokens for _, tokens in answered) / wall,
            "p50": 1000 * statistics.median(latencies), "p95": 1000 * latencies[int(0.95 * (len(latencies) - 1))]}


def measure(port: int, args) -> dict[str, float]:
    """`load` on the server at `port` of this machine, once it answers."""
    url = f"http://127.0.0.1:{port}"
    wait_until_up(url)
    return load(url, requests=args.requests, clients=args.clients, max_tokens=args.max_tokens)


def single_process(model: Path, *, threads: int, parallel: int, args) -> dict[str, float]:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "ossrt.cli", "serve", str(model), "--name", ID, "--port",
                                str(port), "--threads", str(threads), "-np", str(parallel), "--no-store"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        return measure(port, args)
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(60)


def cluster(model: Path, *, replicas: int, parallel: int, port: int, args) -> dict[str, float]:
    from ray import serve

    from ossrt.server import cluster as ossrt_cluster
    from ossrt.server.sealing import Sealer

    app = ossrt_cluster.cluster_app(str(model), model_id=ID, replicas=replicas, threads=1, parallel=parallel,
                                    sealing_key=Sealer().key, graceful_shutdown_timeout_s=5)
    serve.run(app, name=ossrt_cluster.APP_NAME, route_prefix="/")
    try:
        return measure(port, args)
    finally:
        serve.delete(ossrt_cluster.APP_NAME)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--parallel", type=int, default=2, help="slots per replica or process")
    args = parser.parse_args()

    import ray
    from ray import serve

    rows = []
    with tempfile.TemporaryDirectory() as directory:
        model = tiny_model(Path(directory))
        for threads in (1, 2):
            rows.append((f"ossrt serve, {threads} thread(s)",
                         single_process(model, threads=threads, parallel=args.parallel, args=args)))
        port = free_port()
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            for replicas in (1, 2):
                rows.append((f"serve-cluster, {replicas} replica(s) x 1 thread",
                             cluster(model, replicas=replicas, parallel=args.parallel, port=port, args=args)))
        finally:
            serve.shutdown()
            ray.shutdown()
    print(f"{args.requests} requests of {args.max_tokens} tokens, {args.clients} clients, {args.parallel} slots "
          f"per replica or process\n")
    print("| configuration | requests/s | tokens/s | p50 ms | p95 ms |\n|---|---|---|---|---|")
    for name, r in rows:
        print(f"| {name} | {r['rps']:.2f} | {r['tokens/s']:.0f} | {r['p50']:.0f} | {r['p95']:.0f} |")


if __name__ == "__main__":
    main()
