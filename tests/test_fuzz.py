"""Seeded fuzzing (tools/fuzz.py) of every input surface, bounded to a few hundred cases each: mutated GGUF files,
checkpoint directories, HTTP requests, API arguments and command lines must all end in a clean refusal or a proper
result — never a traceback, a 500, a file left behind, or a mutated file silently giving other logits."""

import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import fuzz  # noqa: E402


def _no_others(tally: fuzz.Tally, surface: str, least_clean: int) -> None:
    counts = tally.counts(surface)
    others = tally.others()
    report = "\n\n".join(f"{r.case}\n{r.detail[-3000:]}" for r in others[:5])
    assert not others, f"{len(others)} of {sum(counts.values())} {surface} cases went wrong:\n\n{report}"
    # The cases must reach the checks, not all be waved through (or all refused for one dull reason).
    assert counts["clean"] >= least_clean, counts


def test_mutated_gguf_files_fail_cleanly_or_give_the_same_logits(tiny_gguf, tmp_path):
    tally = fuzz.Tally()
    fuzz.fuzz_gguf(tiny_gguf("q8_0"), 120, seed=11, work=tmp_path, tally=tally)
    _no_others(tally, "gguf", least_clean=60)
    assert tally.counts("gguf")["same"] >= 5


def test_mutated_checkpoints_fail_cleanly_and_leave_nothing(tmp_path):
    tally = fuzz.Tally()
    src = fuzz.small_checkpoint(tmp_path / "src")
    fuzz.fuzz_convert(src, 150, seed=12, work=tmp_path, tally=tally)
    _no_others(tally, "convert", least_clean=60)
    assert tally.counts("convert")["accepted"] >= 10


def test_malformed_requests_get_4xx_with_openai_errors(tiny_gguf):
    tally = fuzz.Tally()
    fuzz.fuzz_server(tiny_gguf("q8_0"), 200, seed=13, tally=tally)
    _no_others(tally, "server", least_clean=100)
    assert tally.counts("server")["accepted"] >= 20


def test_bad_api_arguments_raise_ossrt_errors(tiny_gguf):
    tally = fuzz.Tally()
    fuzz.fuzz_api(tiny_gguf("q8_0"), 200, seed=14, tally=tally)
    _no_others(tally, "api", least_clean=80)


def test_bad_command_lines_exit_2_with_one_error_line(tiny_gguf, tmp_path):
    tally = fuzz.Tally()
    fuzz.fuzz_cli(tiny_gguf("q8_0"), 60, seed=15, work=tmp_path, tally=tally)
    _no_others(tally, "cli", least_clean=30)
