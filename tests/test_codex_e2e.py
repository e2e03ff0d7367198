"""The real Codex CLI (npm @openai/codex, pinned in tests/js/package.json) run end to end against a live `ossrt serve`
app on scripted tiny models, configured as tests/data/codex/CAPTURE.md describes: a fresh CODEX_HOME whose
config.toml names ossrt as a Responses provider. Skipped when node or the installed packages are missing (.ci/run
installs them with `npm ci --prefix tests/js`)."""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("uvicorn")

import ossrt  # noqa: E402
from server_support import live_server  # noqa: E402

CODEX = Path(__file__).parent / "js" / "node_modules" / ".bin" / "codex"
if shutil.which("node") is None or not CODEX.exists():
    pytest.skip("the Codex CLI is not installed: needs node and `npm ci --prefix tests/js`", allow_module_level=True)

ID = "gpt-oss-20b"
# Codex's first request renders to ~7,500 tokens (its instructions and tool schemas): past the tiny config's 4096
CONTEXT = 16384
# Final only: a scripted token has one successor, so `<|channel|>` cannot open both an analysis and a final message
ANSWER = "<|channel|>final<|message|>Hello from ossrt.<|return|>"
# A call on every turn: Codex runs it and sends its output back until the prompt fills the context (see the test)
EXEC_CALL = '<|channel|>commentary to=functions.exec_command <|constrain|>json<|message|>{"cmd":"echo hi"}<|call|>'
CALL_CONTEXT = 8192  # room for ~9 rounds past Codex's first prompt
CONTEXT_FULL = ("ERROR: Incomplete response returned, reason: max_output_tokens",  # how Codex reports each ending
                "ERROR: Codex ran out of room in the model's context window.")
RUN_TIMEOUT = 180  # seconds: a bound for a failing run on a loaded machine, not a measurement
CONFIG = """model = "{model}"
model_provider = "ossrt"

[model_providers.ossrt]
name = "ossrt"
base_url = "{url}/v1"
wire_api = "responses"
env_key = "OSSRT_API_KEY"
"""


def run_codex(url: str, prompt: str, home: Path, workdir: Path) -> subprocess.CompletedProcess:
    """`codex exec` in `workdir` with a fresh CODEX_HOME pointing at `url`; stdin closed (Codex would read it)."""
    home.mkdir()
    workdir.mkdir()
    (home / "config.toml").write_text(CONFIG.format(model=ID, url=url), encoding="utf-8")
    env = {**os.environ, "CODEX_HOME": str(home), "OSSRT_API_KEY": "dummy", "NO_COLOR": "1"}
    return subprocess.run([str(CODEX), "exec", "--skip-git-repo-check", prompt], cwd=workdir, env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=RUN_TIMEOUT)


def test_codex_exec_prints_the_models_answer(scripted_gguf, tmp_path):
    model = ossrt.load(scripted_gguf(ANSWER, max_position_embeddings=CONTEXT), context_length=CONTEXT)
    with live_server(model, model_id=ID) as live:
        done = run_codex(live.url, "Say hello.", tmp_path / "home", tmp_path / "work")
    assert done.returncode == 0, f"codex exited {done.returncode}:\n{done.stderr[-3000:]}"
    assert done.stdout.strip() == "Hello from ossrt.", done.stdout + done.stderr[-3000:]


def test_codex_runs_the_models_command_and_sends_its_output_back(scripted_gguf, tmp_path):
    """The scripted model calls exec_command after every prompt, and Codex sets no turn limit that ends it first: each round
    (the call, `echo hi`, its output sent back and accepted) grows the prompt, until the context leaves too little
    room for a whole call (the response ends incomplete: max_output_tokens) or for the prompt itself (400,
    context_length_exceeded), depending on the commands' output; Codex stops with that error."""
    model = ossrt.load(scripted_gguf(EXEC_CALL, max_position_embeddings=CONTEXT), context_length=CALL_CONTEXT)
    with live_server(model, model_id=ID) as live:
        done = run_codex(live.url, "Run echo hi.", tmp_path / "home", tmp_path / "work")
    ran = len(re.findall(r"^exec\n\S+ -lc 'echo hi' in ", done.stderr, re.MULTILINE))  # the user's shell runs it
    assert ran >= 2 and done.stderr.count(" succeeded in ") >= ran, done.stderr[-3000:]
    assert done.returncode == 1
    assert any(end in done.stderr for end in CONTEXT_FULL), done.stderr[-3000:]
