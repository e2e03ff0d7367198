"""`ossrt serve-cluster`'s application on a real local Ray cluster (head only, 127.0.0.1): two replicas of a tiny
scripted model behind Ray Serve's HTTP proxy, driven by the openai client and compared with a single-process
`ossrt serve` of the same model. One cluster for the module: Ray takes seconds to start."""

import concurrent.futures
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'ossrt[ray]')")
serve = pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'ossrt[ray]')")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

import ossrt  # noqa: E402
from ossrt.errors import OssrtError  # noqa: E402
from ossrt.server import cluster  # noqa: E402
from ossrt.server.store import ResponseStore  # noqa: E402
from server_support import live_server  # noqa: E402

ID = "gpt-oss-test"
KEY = "sekrit"
# Endless (the script loops), so every request sets max_tokens; long requests are what the replica kill needs.
ENDLESS = "<|channel|>final<|message|>one two three four five"
CONTEXT = 4096
PARALLEL = 4
START_TIMEOUT = 240.0  # seconds for the cluster and its replicas on a loaded 2-core machine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model_path(scripted_gguf):
    return scripted_gguf(ENDLESS, loop=True)


@pytest.fixture(scope="module")
def single(model_path, tmp_path_factory):
    """The same model under single-process `ossrt serve`: the reference answers."""
    model = ossrt.load(model_path, context_length=CONTEXT, threads=1)
    with ResponseStore(tmp_path_factory.mktemp("single") / "responses.sqlite3") as store, \
            live_server(model, model_id=ID, api_key=KEY, parallel=PARALLEL, store=store) as live:
        yield live


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster for the module; this process is a driver of it too, to look at and kill replicas."""
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        serve.shutdown()
        ray.shutdown()


@dataclass
class Cli:
    process: subprocess.Popen
    url: str
    log: Path


@pytest.fixture(scope="module")
def cli(ray_cluster, model_path, tmp_path_factory):
    """`ossrt serve-cluster` joining the module's cluster: two replicas with one thread each, responses kept by the
    store actor in a file of this test's."""
    home = tmp_path_factory.mktemp("cli")
    port = _free_port()
    log = home / "serve-cluster.log"
    command = [sys.executable, "-m", "ossrt.cli", "serve-cluster", str(model_path), "--replicas", "2", "--threads",
               "1", "-np", str(PARALLEL), "--ctx", str(CONTEXT), "--api-key", KEY, "--name", ID, "--address",
               ray_cluster, "--port", str(port), "--store", str(home / "responses.sqlite3"), "--drain-timeout", "60"]
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                   env={**os.environ, "OSSRT_CACHE": str(home)})  # its reasoning key goes there
    deadline = time.monotonic() + START_TIMEOUT
    while b"serving " not in log.read_bytes():
        assert process.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
        time.sleep(0.5)
    try:
        yield Cli(process, f"http://127.0.0.1:{port}/v1", log)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            process.wait(120)


@pytest.fixture(scope="module")
def url(cli):
    return cli.url


def client(base_url: str, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key=KEY, max_retries=0, timeout=120, **kw)


def chat(base_url, messages, **kw):
    return client(base_url).chat.completions.create(model=ID, messages=messages, max_tokens=kw.pop("max_tokens", 12),
                                                    seed=7, temperature=1.0, **kw)


def streamed_text(base_url, messages, max_tokens=12) -> str:
    with client(base_url).chat.completions.create(model=ID, messages=messages, max_tokens=max_tokens, seed=7,
                                                  temperature=1.0, stream=True) as stream:
        return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)


ASK = [{"role": "user", "content": "Count for me."}]


def test_answers_equal_single_process_serve(url, single):
    here, there = chat(url, ASK), chat(single.url + "/v1", ASK)
    assert here.choices[0].message.content == there.choices[0].message.content
    assert here.choices[0].message.content.startswith("one two three")
    assert here.choices[0].finish_reason == there.choices[0].finish_reason == "length"
    assert here.usage.completion_tokens == there.usage.completion_tokens == 12
    assert here.model == ID
    streamed = streamed_text(url, ASK)
    assert streamed == streamed_text(single.url + "/v1", ASK) and streamed.startswith("one two three")
    r1 = client(url).responses.create(model=ID, input="Count for me.", max_output_tokens=12, store=False)
    r2 = client(single.url + "/v1").responses.create(model=ID, input="Count for me.", max_output_tokens=12,
                                                       store=False)
    assert r1.output_text == r2.output_text and r1.output_text.startswith("one two")
    assert [m.id for m in client(url).models.list().data] == [ID]


def test_errors_equal_single_process_serve(url, single):
    def answer(base, path, **kw):
        r = httpx.request(kw.pop("method", "POST"), base.removesuffix("/v1") + path, timeout=60, **kw)
        return r.status_code, r.json()

    auth = {"Authorization": f"Bearer {KEY}"}
    cases = [
        dict(path="/v1/chat/completions", json={"model": "other", "messages": ASK}, headers=auth),
        dict(path="/v1/chat/completions", content=b"{not json", headers={**auth, "Content-Type": "application/json"}),
        dict(path="/v1/chat/completions", json={"model": ID, "messages": "hi"}, headers=auth),
        dict(path="/v1/chat/completions", json={"model": ID, "messages": ASK}),  # no key
        dict(path="/v1/responses/resp_missing", method="GET", headers=auth),
        dict(path="/v1/nowhere", method="GET", headers=auth),
        dict(path="/v1/chat/completions", content=b'{"model":"' + b"x" * (9 * 2**20) + b'"}',
             headers={**auth, "Content-Type": "application/json"}),
    ]
    for case in cases:
        path = case.pop("path")
        got, expected = answer(url, path, **dict(case)), answer(single.url + "/v1", path, **dict(case))
        assert got == expected, path
        assert got[0] >= 400 and "error" in got[1]


def test_concurrent_streams(url, single):
    expected = streamed_text(single.url + "/v1", ASK, max_tokens=40)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        texts = list(pool.map(lambda _: streamed_text(url, ASK, max_tokens=40), range(8)))
    assert texts == [expected] * 8


def test_health(url):
    health = httpx.get(url.removesuffix("/v1") + "/health", timeout=30).json()
    assert health["status"] == "ok" and health["model"] == ID and health["parallel"] == PARALLEL


def test_follow_up_turns_reuse_their_replicas_cache(url):
    """Each conversation's next turn finds its whole first prompt cached: it ran on the replica holding it. On the
    other replica (a coin flip without affinity: 1 in 2**8 to pass by chance) it would find only the system message
    every conversation shares. Turns follow one another, as a replica's session pool keeps one conversation per
    idle session and a new one takes over the session sharing the longest prefix."""
    for i in range(8):  # by prompt_cache_key, and by the conversation's head
        messages = [{"role": "user", "content": f"Conversation {i}: count."}]
        key = {"prompt_cache_key": f"user-{i}"} if i % 2 else {}
        first = chat(url, messages, extra_body=key)
        follow = [*messages, {"role": "assistant", "content": first.choices[0].message.content},
                  {"role": "user", "content": "And again."}]
        second = chat(url, follow, extra_body=key)
        assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens, messages


def test_previous_response_id_turns_reuse_cache_and_shared_store(url):
    responses = client(url).responses
    firsts = []
    for i in range(6):
        first = responses.create(model=ID, input=f"Story {i}: count.", max_output_tokens=8)
        second = responses.create(model=ID, previous_response_id=first.id, input="More.", max_output_tokens=8)
        assert second.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens
        firsts.append(first)
    for first in firsts:  # whichever replica answers reads the one store
        assert responses.retrieve(first.id).output_text == first.output_text
    responses.delete(firsts[0].id)
    with pytest.raises(openai.NotFoundError):
        responses.retrieve(firsts[0].id)


def test_a_busy_replica_sends_its_conversations_elsewhere(url):
    """With every slot of the replica holding a conversation busy, the conversation's next request runs on the
    other replica at once rather than waiting the tens of seconds those slots stay busy."""
    key = {"prompt_cache_key": "busy"}
    with contextlib.ExitStack() as streams:
        chunks = []
        for _ in range(PARALLEL):  # one after another, so each is routed after the previous one's replica is known
            stream = streams.enter_context(client(url).chat.completions.create(
                model=ID, messages=ASK, max_tokens=3000, stream=True, extra_body=key))
            chunks.append(iter(stream))
            next(chunks[-1])
        start = time.monotonic()
        quick = chat(url, ASK, max_tokens=5, extra_body=key)
        assert quick.choices[0].finish_reason == "length" and time.monotonic() - start < 10
        for chunk in chunks:  # the long ones are still generating
            assert next(chunk).choices[0].finish_reason is None


def test_client_leaving_a_stream_stops_its_turn(url):
    """A stream closed after a few chunks ends its turn on the replica: both replicas soon report nothing running."""
    with client(url).chat.completions.create(model=ID, messages=ASK, max_tokens=3000, stream=True) as stream:
        for _, _ in zip(stream, range(3)):
            pass
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if all(h["running"] == 0 for h in _replica_healths()) and sum(h["disconnected"] for h in
                                                                       _replica_healths()) >= 1:
            break
        time.sleep(0.2)
    healths = _replica_healths()
    assert all(h["running"] == 0 for h in healths) and sum(h["disconnected"] for h in healths) >= 1


def _replica_names() -> list[str]:
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(f"SERVE_REPLICA::{cluster.APP_NAME}#Replica#")]


def _replica_healths() -> list[dict]:
    """Each replica's counts (`Replica.health`), asked through a handle until both replicas have answered."""
    handle = serve.get_deployment_handle("Replica", cluster.APP_NAME)
    seen: dict[str, dict] = {}
    for _ in range(40):  # the router picks at random between equally loaded replicas
        health = handle.health.remote().result()
        seen[health["replica"]] = health
        if len(seen) == 2:
            break
    return list(seen.values())


def test_killing_a_replica_loses_no_request_that_had_not_started(url, single):
    """Requests waiting or generating (unstreamed) on a replica that dies are sent again elsewhere and answered in
    full; the cluster keeps serving, and Ray replaces the replica."""
    expected = chat(single.url + "/v1", ASK, max_tokens=200).choices[0].message.content
    results, errors = [], []

    def ask() -> None:
        try:
            results.append(chat(url, ASK, max_tokens=200).choices[0].message.content)
        except Exception as e:  # noqa: BLE001 — the assertion below shows it
            errors.append(e)

    threads = [threading.Thread(target=ask) for _ in range(12)]  # 8 running on the two replicas, 4 waiting
    for t in threads:
        t.start()
    time.sleep(1.0)
    victim = _replica_names()[0]
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    for t in threads:
        t.join(180)
    assert errors == [] and results == [expected] * 12
    assert chat(url, ASK, max_tokens=200).choices[0].message.content == expected  # still serving
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline and (len(_replica_names()) < 2 or victim in _replica_names()):
        time.sleep(1)
    assert len(_replica_names()) == 2 and victim not in _replica_names()


def test_stopping_drains_requests_in_flight(cli, single):
    """SIGTERM to `ossrt serve-cluster`: the request in flight is answered in full before the replicas stop."""
    expected = chat(single.url + "/v1", ASK, max_tokens=1500).choices[0].message.content
    results = []
    asking = threading.Thread(target=lambda: results.append(chat(cli.url, ASK, max_tokens=1500)))
    asking.start()
    time.sleep(1.0)
    cli.process.send_signal(signal.SIGTERM)
    asking.join(120)
    assert [r.choices[0].message.content for r in results] == [expected]
    assert cli.process.wait(120) == 128 + signal.SIGTERM
    assert b"draining" in cli.log.read_bytes()
    assert _replica_names() == []


def test_without_ray_the_command_says_what_to_install(model_path):
    code = ("import sys; sys.modules['ray'] = None; from ossrt.cli import main; "
            f"main(['serve-cluster', {str(model_path)!r}])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "pip install 'ossrt[ray]'" in done.stderr and "Traceback" not in done.stderr


def test_build_app_says_what_it_takes():
    with pytest.raises(OssrtError, match="unknown: replica"):
        cluster.build_app({"model": "m.gguf", "replica": "2"})
    with pytest.raises(OssrtError, match="takes model="):
        cluster.build_app({"replicas": "2"})
    with pytest.raises(OssrtError, match="invalid literal"):
        cluster.build_app({"model": "m.gguf", "replicas": "two"})


def test_core_package_and_cli_do_not_import_ray():
    code = "import sys, ossrt, ossrt.cli, ossrt.server.serve; print(sorted(m for m in sys.modules if m.startswith('ray')))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr
