"""The code verifier (synth.sandbox.run_code): real subprocesses, real limits, real sockets.

The sandbox guards against accidents (a runaway loop, a memory bomb, a stray write or connection),
it is not a security boundary; these tests pin that each accident is stopped and reported with the
right reason. Kept fast: one 2 s timeout test, everything else well under a second.
"""

from __future__ import annotations

import json
import socket
import time

import pytest

from synth.sandbox import extract_code, run_code, run_code_many

ADD = "def add(a, b):\n    return a + b\n"
ADD_TESTS = "assert add(1, 2) == 3\nassert add(-1, 1) == 0\n"


def io_tests(*pairs: tuple[str, str]) -> str:
    return json.dumps([{"input": i, "output": o} for i, o in pairs])


# ---- outcomes ------------------------------------------------------------------------------------------

def test_correct_solution_passes():
    verdict = run_code(ADD, ADD_TESTS)
    assert (verdict.passed, verdict.score, verdict.reason) == (True, 1.0, None)


def test_solution_in_a_fenced_completion_passes():
    completion = f"Here is my solution:\n```python\n{ADD}```\nIt adds."
    assert run_code(completion, ADD_TESTS).passed


def test_wrong_output_names_the_failing_assert():
    verdict = run_code("def add(a, b):\n    return a - b\n", ADD_TESTS)
    assert (verdict.passed, verdict.score, verdict.reason) == (False, 0.0, "wrong_output")
    assert verdict.details["failed_test"] == "assert add(1, 2) == 3"


@pytest.mark.parametrize("code,phase", [
    ("def add(a, b):\n    return {}[a]\n", "tests"),  # KeyError while the tests run
    ("raise RuntimeError('boom')\n", "solution"),
    ("def add(a, b) return a\n", "solution"),  # SyntaxError
])
def test_exception_is_error(code, phase):
    verdict = run_code(code, ADD_TESTS)
    assert (verdict.passed, verdict.reason) == (False, "error")
    assert verdict.details["phase"] == phase
    assert verdict.details["message"]


@pytest.mark.parametrize("code", ["import sys\nsys.exit(0)\n", "import os\nos._exit(0)\n"])
def test_exiting_before_the_tests_is_not_a_pass(code):
    """A solution that exits with status 0 before the asserts ran must not pass (fail closed)."""
    verdict = run_code(code, "assert False\n")
    assert (verdict.passed, verdict.reason) == (False, "error")


def test_main_guard_does_not_run_under_assert_tests():
    """Under assert tests the solution is imported as a module: a __main__ block that reads stdin would
    otherwise fail a correct function with EOFError."""
    code = ADD + "if __name__ == '__main__':\n    print(add(int(input()), 1))\n"
    assert run_code(code, ADD_TESTS).passed
    assert run_code(code, io_tests(("41\n", "42\n"))).passed


@pytest.mark.parametrize("code,tests,reason", [
    (None, ADD_TESTS, "unparseable_answer"),
    ("", ADD_TESTS, "unparseable_answer"),
    ("```cpp\nint main() {}\n```", ADD_TESTS, "unparseable_answer"),
    (ADD, "", "unparseable_reference"),
    (ADD, "[]", "unparseable_reference"),
    (ADD, "assert (", "unparseable_reference"),
    (ADD, '[{"input": 1}]', "unparseable_reference"),
])
def test_nothing_to_run_fails_closed(code, tests, reason):
    verdict = run_code(code, tests)
    assert (verdict.passed, verdict.reason) == (False, reason)


# ---- limits --------------------------------------------------------------------------------------------

def test_infinite_loop_is_killed_at_the_time_limit():
    start = time.monotonic()
    verdict = run_code("while True:\n    pass\n", "assert True\n", timeout_s=2)
    elapsed = time.monotonic() - start
    assert (verdict.passed, verdict.reason) == (False, "timeout")
    assert elapsed < 2 + 5


def test_sleeping_past_the_wall_clock_is_a_timeout():
    """Sleeping uses no CPU, so only the wall-clock limit (killpg) can stop it."""
    start = time.monotonic()
    verdict = run_code("import time\ntime.sleep(60)\n", "assert True\n", timeout_s=1)
    assert (verdict.reason, verdict.details["limit"]) == ("timeout", "wall")
    assert time.monotonic() - start < 1 + 5


def test_memory_bomb_is_stopped():
    """4 GiB in 64 MiB bytearrays against a 256 MiB address-space limit: reason error, limit memory."""
    verdict = run_code("blocks = [bytearray(64 * 2**20) for _ in range(64)]\n", "assert True\n", memory_mb=256)
    assert (verdict.passed, verdict.reason) == (False, "error")
    assert verdict.details["limit"] == "memory"
    assert "MemoryError" in verdict.details["message"]


def test_runaway_output_hits_the_file_size_limit():
    verdict = run_code("while True:\n    print('x' * 1000)\n", io_tests(("", "")), timeout_s=5)
    assert (verdict.passed, verdict.reason) == (False, "error")
    assert verdict.details["limit"] == "output"


# ---- the audit hook ------------------------------------------------------------------------------------

@pytest.mark.parametrize("template", [
    "open({path!r}, 'w').write('x')\n",
    "import os\nos.close(os.open({path!r}, os.O_WRONLY | os.O_CREAT))\n",
    "from pathlib import Path\nPath({path!r}).write_text('x')\n",
    "import os\nos.symlink({path!r}, 'link')\nopen('link', 'w').write('x')\n",  # through a symlink
])
def test_write_outside_the_working_dir_fails(tmp_path, template):
    target = tmp_path / "outside" / "x"
    target.parent.mkdir()
    verdict = run_code(template.format(path=str(target)), "assert True\n")
    assert (verdict.passed, verdict.reason) == (False, "error")
    assert "PermissionError" in verdict.details["message"]
    assert not target.exists()


def test_deleting_outside_the_working_dir_fails(tmp_path):
    victim = tmp_path / "keep.txt"
    victim.write_text("precious")
    verdict = run_code(f"import os\nos.remove({str(victim)!r})\n", "assert True\n")
    assert (verdict.passed, verdict.reason) == (False, "error")
    assert victim.read_text() == "precious"


def test_writes_inside_the_working_dir_are_allowed():
    code = ("import os, tempfile\n"
            "os.makedirs('sub', exist_ok=True)\n"
            "open('sub/out.txt', 'w').write('hello')\n"
            "with tempfile.NamedTemporaryFile('w') as f:\n"  # TMPDIR points inside
            "    f.write('scratch')\n")
    assert run_code(code, "assert open('sub/out.txt').read() == 'hello'\n").passed


@pytest.mark.parametrize("template", [
    "import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\n",
    "import socket\ns = socket.socket()\ns.connect(('127.0.0.1', {port}))\n",
])
def test_network_connect_fails(template):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.settimeout(0.2)
        port = listener.getsockname()[1]
        verdict = run_code(template.format(port=port), "assert True\n")
        assert (verdict.passed, verdict.reason) == (False, "error")
        assert "PermissionError" in verdict.details["message"]
        with pytest.raises(TimeoutError):
            listener.accept()  # nobody ever connected


@pytest.mark.parametrize("code", [
    "import subprocess\nsubprocess.run(['true'])\n",
    "import os\nos.system('true')\n",
    "import os\nos.fork()\n",
    "import ctypes\nctypes.CDLL(None).system(b'true')\n",
    "import resource\nresource.setrlimit(resource.RLIMIT_CPU, (10**6, 10**6))\n",
])
def test_processes_ctypes_and_limits_are_refused(code):
    verdict = run_code(code, "assert True\n")
    assert (verdict.passed, verdict.reason) == (False, "error")
    assert "sandbox" in verdict.details["message"]


# ---- stdin/stdout cases --------------------------------------------------------------------------------

def test_io_cases_score_the_fraction_passed():
    doubler = "print(int(input()) * 2)\n"
    tests = io_tests(("2\n", "4\n"), ("5\n", "10   \n\n"), ("7\n", "15\n"), ("1\n", "3\n"))
    verdict = run_code(doubler, tests)
    assert (verdict.passed, verdict.score, verdict.reason) == (False, 0.5, "wrong_output")
    assert verdict.details["case"] == 2  # the first failing case
    assert run_code(doubler, io_tests(("2\n", "4"), ("3", "6\n"))).score == 1.0


def test_io_case_exit_status():
    assert run_code("import sys\nprint('ok')\nsys.exit(0)\n", io_tests(("", "ok"))).passed
    verdict = run_code("import sys\nprint('ok')\nsys.exit(3)\n", io_tests(("", "ok")))
    assert (verdict.passed, verdict.reason) == (False, "error")


# ---- many ----------------------------------------------------------------------------------------------

def test_run_code_many_keeps_order():
    items = [
        ("import time\ntime.sleep(0.3)\n" + ADD, ADD_TESTS),  # slowest first: finishes last
        ("def add(a, b):\n    return 0\n", ADD_TESTS),
        (None, ADD_TESTS),
        (ADD, ADD_TESTS),
    ]
    verdicts = run_code_many(items, timeout_s=5, memory_mb=256, workers=4)
    assert [(v.passed, v.reason) for v in verdicts] == [
        (True, None), (False, "wrong_output"), (False, "unparseable_answer"), (True, None)]


# ---- extract_code --------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,expected", [
    ("```python\nprint(1)\n```", "print(1)"),
    ("first\n```python\nx = 1\n```\nbetter:\n```py\nx = 2\n```", "x = 2"),  # the last Python block
    ("```\nprint(2)\n```", "print(2)"),  # unlabelled
    ("```cpp\nint main(){}\n```\n```python\nprint(3)\n```", "print(3)"),
    ("```cpp\nint main(){}\n```", None),
    ("```python\nprint(4)", None),  # unclosed: a truncated generation
    ("print(5)", "print(5)"),  # no fence: the text is the code
    ("   ", None),
    (None, None),
])
def test_extract_code(text, expected):
    assert extract_code(text) == expected
