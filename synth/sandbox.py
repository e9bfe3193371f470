"""The code verifier: a Python solution against tests in a sandboxed subprocess.

    extract_code(text) -> str | None
    run_code(code, tests, timeout_s=10.0, memory_mb=512) -> Verdict
    run_code_many(items, timeout_s=10.0, memory_mb=512, workers=None) -> list[Verdict]

The code sandbox (`run_code`) is a guard against ACCIDENTS, not a security boundary. It runs the
solution with `python -I -B` in a fresh temporary directory, under resource limits (address space,
CPU time, file size, no core dumps), with a wall-clock timeout that kills the whole process group, a
minimal environment, and an audit hook (sys.addaudithook) that refuses network access, writes outside
the working directory, process creation, signals, ctypes and raising its own limits. Audit hooks can
be bypassed by code that means to (C extensions, and more); run untrusted code inside a container or
VM with no network. Limits are set by the child itself before any user code runs, not in a
`preexec_fn`: run_code_many starts processes from threads, where preexec_fn is documented as unsafe.
RLIMIT_NPROC is not set: it counts all processes of the user (and is ignored for root), so no value
both stops fork bombs and keeps threads working; process creation is refused by the audit hook.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from synth.verdicts import Verdict
from synth.verify import _clip

SANDBOX_OUTPUT_LIMIT_MB = 16  # RLIMIT_FSIZE: caps files the solution writes and its captured stdout/stderr


# ---- code sandbox --------------------------------------------------------------------------------------

_FENCE = re.compile(r"```[ \t]*([\w+.-]*)[^\n]*\n(.*?)```", re.DOTALL)


def extract_code(text: str | None) -> str | None:
    """The Python code in a completion: the last ```python (or py/python3) block, else the last unlabelled
    ``` block; text without any fence is taken as code. Fences with no Python block (only ```cpp, or an
    unclosed fence from a truncated generation) give None."""
    if not isinstance(text, str):
        return None
    if "```" not in text:
        return text.strip() or None
    blocks = [(lang.lower(), body) for lang, body in _FENCE.findall(text)]
    for wanted in (("python", "py", "python3"), ("",)):
        chosen = [body for lang, body in blocks if lang in wanted]
        if chosen:
            return chosen[-1].strip() or None
    return None


# The child's bootstrap, written next to (not inside) the working directory. It reads its config, the
# solution and the tests, opens the status file, sets its own limits, installs the audit hook, and only
# then runs the solution (then the assert tests, in the same namespace). The outcome goes to the status
# file, which the parent requires: a process that vanished without one (os._exit, a signal) never passes.
_RUNNER = r'''
import errno, json, os, resource, sys, traceback

with open(sys.argv[1]) as f:
    cfg = json.load(f)
with open(cfg["solution"]) as f:
    solution = f.read()
tests = None
if cfg["tests"]:
    with open(cfg["tests"]) as f:
        tests = f.read()
status = open(cfg["status"], "w")


def report(outcome, phase=None, message=None, line=None):
    try:
        sys.stdout.flush()
    except Exception:
        pass
    status.write(json.dumps({"outcome": outcome, "phase": phase, "message": message, "line": line}))
    status.flush()


def limit(which, soft, hard):
    _, current = resource.getrlimit(which)
    if current != resource.RLIM_INFINITY:
        soft, hard = min(soft, current), min(hard, current)
    resource.setrlimit(which, (soft, hard))


limit(resource.RLIMIT_AS, cfg["memory_bytes"], cfg["memory_bytes"])
limit(resource.RLIMIT_CPU, cfg["cpu_s"], cfg["cpu_s"] + 1)
limit(resource.RLIMIT_FSIZE, cfg["fsize_bytes"], cfg["fsize_bytes"])
limit(resource.RLIMIT_CORE, 0, 0)


def install_guard(root):
    realpath, fspath, fsdecode, sep = os.path.realpath, os.fspath, os.fsdecode, os.sep
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    # event -> positions of the paths it creates or changes
    path_events = {"os.remove": (0,), "os.rename": (0, 1), "os.rmdir": (0,), "os.mkdir": (0,),
                   "os.chmod": (0,), "os.chown": (0,), "os.symlink": (1,), "os.link": (1,),
                   "os.truncate": (0,), "os.utime": (0,), "shutil.rmtree": (0,)}
    denied = frozenset({
        "socket.connect", "socket.bind", "socket.getaddrinfo", "socket.gethostbyname",
        "socket.gethostbyaddr", "socket.getnameinfo", "socket.sendto", "socket.sendmsg",
        "subprocess.Popen", "os.system", "os.exec", "os.fork", "os.forkpty", "os.spawn",
        "os.posix_spawn", "os.kill", "os.killpg", "ctypes.dlsym", "ctypes.dlsym/handle",
        "resource.setrlimit", "resource.prlimit",
    })

    def inside(path):
        if isinstance(path, int):  # an already open descriptor
            return True
        try:
            resolved = realpath(fsdecode(fspath(path)))
        except Exception:
            return False
        return resolved == root or resolved.startswith(root + sep)

    def hook(event, args):
        if event == "open":
            path, mode, flags = args
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or bool(flags & write_flags)
            if writing and not inside(path):
                raise PermissionError(f"sandbox: no writes outside the working directory: {path!r}")
        elif event in path_events:
            for i in path_events[event]:
                if i < len(args) and not inside(args[i]):
                    raise PermissionError(f"sandbox: {event} outside the working directory: {args[i]!r}")
        elif event in denied or (event == "ctypes.dlopen" and args[0] is not None):
            # `import ctypes` opens the main program (dlopen(None)) and numpy imports ctypes: allowed;
            # loading another library, or looking up any symbol (libc's system, ...), is not.
            raise PermissionError(f"sandbox: {event} is not allowed")

    sys.addaudithook(hook)


install_guard(os.path.realpath(cfg["workdir"]))
# A stdin/stdout program runs as __main__; with assert tests the solution is a module (its
# `if __name__ == "__main__":` block, which often reads stdin, does not run), as in HumanEval's harness.
namespace = {"__name__": "__main__" if tests is None else "solution", "__builtins__": __builtins__}
phase, failed = "solution", True
try:
    exec(compile(solution, "<solution>", "exec"), namespace)
    if tests is not None:
        phase = "tests"
        exec(compile(tests, "<tests>", "exec"), namespace)
except MemoryError:
    namespace.clear()  # free what the solution holds so that reporting has room
    report("memory", phase, "MemoryError")
except SystemExit as exit_:
    if tests is None and exit_.code in (None, 0):
        report("ok")  # a stdin/stdout program may end with sys.exit()
        failed = False
    else:
        report("error", phase, f"SystemExit: {exit_.code!r} before the tests finished" if tests is not None
               else f"SystemExit: {exit_.code!r}")
except BaseException as error:
    traceback.print_exc()
    message = traceback.format_exception_only(type(error), error)[-1].strip()
    if isinstance(error, OSError) and error.errno == errno.EFBIG:
        report("output", phase, message)  # RLIMIT_FSIZE: Python ignores SIGXFSZ, so writes fail with EFBIG
    else:
        lines = [frame.lineno for frame in traceback.extract_tb(error.__traceback__) if frame.filename == "<tests>"]
        outcome = "wrong_output" if isinstance(error, AssertionError) and phase == "tests" else "error"
        report(outcome, phase, message, lines[-1] if lines else None)
else:
    report("ok")
    failed = False
sys.exit(1 if failed else 0)
'''


@dataclass
class _Run:
    """What one child process did."""
    timed_out: bool
    returncode: int
    status: dict | None  # the runner's report; None when it never wrote one
    stdout: str
    stderr: str


def _run_process(solution: str, tests: str | None, stdin: str | None, timeout_s: float, memory_mb: int) -> _Run:
    """Run the solution (then `tests`, if given) in a fresh temporary directory; the directory is deleted."""
    with tempfile.TemporaryDirectory(prefix="synth-sandbox-", ignore_cleanup_errors=True) as tmp:
        root = Path(tmp)
        work = root / "work"  # the solution's cwd, HOME and TMPDIR; everything else lives beside it
        work.mkdir()
        (root / "runner.py").write_text(_RUNNER)
        (root / "solution.py").write_text(solution)
        if tests is not None:
            (root / "tests.py").write_text(tests)
        (root / "stdin.txt").write_text(stdin or "")
        config = {
            "workdir": str(work), "solution": str(root / "solution.py"),
            "tests": str(root / "tests.py") if tests is not None else None, "status": str(root / "status.json"),
            "memory_bytes": memory_mb * 2**20, "cpu_s": max(1, math.ceil(timeout_s)),
            "fsize_bytes": SANDBOX_OUTPUT_LIMIT_MB * 2**20,
        }
        (root / "config.json").write_text(json.dumps(config))
        env = {"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8", "HOME": str(work), "TMPDIR": str(work)}
        with open(root / "stdin.txt", "rb") as fin, open(root / "stdout.txt", "wb") as fout, \
                open(root / "stderr.txt", "wb") as ferr:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-B", str(root / "runner.py"), str(root / "config.json")],
                cwd=work, env=env, stdin=fin, stdout=fout, stderr=ferr, start_new_session=True,
            )
            timed_out = _wait_then_kill_group(proc, timeout_s)
        status_path = root / "status.json"
        try:
            status = json.loads(status_path.read_text()) if status_path.exists() else None
        except (ValueError, OSError):
            status = None
        return _Run(
            timed_out=timed_out, returncode=proc.returncode, status=status,
            stdout=(root / "stdout.txt").read_bytes().decode("utf-8", "replace"),
            stderr=(root / "stderr.txt").read_bytes().decode("utf-8", "replace"),
        )


def _wait_then_kill_group(proc: subprocess.Popen, timeout_s: float) -> bool:
    """Wait up to timeout_s for the child, then SIGKILL its whole process group either way (anything it
    left behind goes too) and reap it. True when the wall-clock limit was hit. The child is observed
    with WNOWAIT, so it stays an unreaped zombie until after killpg: its pid, which is the group id,
    cannot be reused by an unrelated process in between."""
    deadline = time.monotonic() + timeout_s
    delay, timed_out = 0.001, False
    while True:
        info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT | os.WNOHANG)
        if info is not None and info.si_pid:
            break
        if time.monotonic() >= deadline:
            timed_out = True
            break
        time.sleep(delay)
        delay = min(delay * 2, 0.05)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
    return timed_out


def _judge_run(run: _Run, timeout_s: float, memory_mb: int) -> tuple[str | None, dict]:
    """(reason or None when the process succeeded, details). Memory exhaustion is reason "error" with
    details["limit"] == "memory"; CPU or wall time is "timeout"; output over the file-size limit is
    "error" with limit "output"; a failing assert is "wrong_output"."""
    details: dict = {"exit_code": run.returncode}
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    if lines:
        details["stderr"] = _clip(lines[-1].strip(), 500)
    status = run.status or {}
    if run.timed_out:
        return "timeout", {**details, "limit": "wall", "timeout_s": timeout_s}
    if run.returncode == -signal.SIGXCPU:
        return "timeout", {**details, "limit": "cpu", "timeout_s": timeout_s}
    if run.returncode == -signal.SIGXFSZ or status.get("outcome") == "output":
        return "error", {**details, "limit": "output", "output_limit_mb": SANDBOX_OUTPUT_LIMIT_MB}
    if status.get("outcome") == "memory" or (not run.status and "MemoryError" in run.stderr):
        return "error", {**details, "limit": "memory", "memory_mb": memory_mb, "message": "MemoryError"}
    if status.get("outcome") == "ok" and run.returncode == 0:
        return None, details
    if status.get("outcome") in ("error", "wrong_output"):
        found = {k: status[k] for k in ("phase", "message", "line") if status.get(k) is not None}
        return status["outcome"], {**details, **found}
    if run.returncode < 0:
        details["signal"] = signal.Signals(-run.returncode).name if -run.returncode in signal.valid_signals() \
            else -run.returncode
    if status.get("outcome") == "ok":
        return "error", {**details, "message": "non-zero exit status after the code finished"}
    return "error", {**details, "message": "the process ended without reporting an outcome"}


def _normalise_output(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.rstrip().splitlines())


def _io_cases(tests: str) -> list[dict] | None:
    """The stdin/stdout cases when `tests` is a JSON list of {"input", "output"} objects; None otherwise
    (it is then Python source). A JSON list of anything else raises ValueError (a broken reference)."""
    try:
        cases = json.loads(tests)
    except ValueError:
        return None
    if not isinstance(cases, list):
        return None
    if not all(isinstance(c, dict) and isinstance(c.get("input"), str) and isinstance(c.get("output"), str)
               for c in cases):
        raise ValueError("a JSON test list must hold {'input': str, 'output': str} objects")
    return cases


def run_code(code: str | None, tests: str, timeout_s: float = 10.0, memory_mb: int = 512) -> Verdict:
    """Run a Python solution against tests in a sandboxed subprocess (see the module docstring).

    `code` may be a whole completion (extract_code is applied). `tests` is either a JSON list of
    {"input": str, "output": str} cases (each in its own process, stdin = input, stdout compared after
    stripping trailing whitespace; score = fraction passed; the verdict's reason is the first failing
    case's) or Python source with asserts run after the solution in the same namespace (score 1.0 or
    0.0). `timeout_s` and `memory_mb` apply to each process. Reasons: unparseable_answer (no code),
    unparseable_reference (no tests, or tests that are not valid), timeout, error (exception, non-zero
    exit, memory: details["limit"] == "memory"), wrong_output."""
    source = extract_code(code)
    if not isinstance(tests, str) or not tests.strip():
        return Verdict.fail("unparseable_reference", 0.0, {"message": "no tests"})
    try:
        cases = _io_cases(tests)
        if cases is None:
            compile(tests, "<tests>", "exec")
    except (ValueError, SyntaxError, MemoryError, RecursionError) as error:
        return Verdict.fail("unparseable_reference", 0.0, {"message": f"{type(error).__name__}: {error}"})
    if cases == []:
        return Verdict.fail("unparseable_reference", 0.0, {"message": "no test cases"})
    if source is None:
        return Verdict.fail("unparseable_answer", 0.0, {"message": "no code"})

    if cases is None:
        reason, details = _judge_run(_run_process(source, tests, None, timeout_s, memory_mb), timeout_s, memory_mb)
        if reason == "wrong_output" and details.get("line"):
            test_lines = tests.splitlines()
            if 0 < details["line"] <= len(test_lines):
                details["failed_test"] = _clip(test_lines[details["line"] - 1].strip(), 500)
        return Verdict.ok(1.0) if reason is None else Verdict.fail(reason, 0.0, details)

    passed, first_failure = 0, None
    for index, case in enumerate(cases):
        run = _run_process(source, None, case["input"], timeout_s, memory_mb)
        reason, details = _judge_run(run, timeout_s, memory_mb)
        if reason is None and _normalise_output(run.stdout) != _normalise_output(case["output"]):
            reason = "wrong_output"
            details.update(expected=_clip(case["output"], 200), got=_clip(run.stdout, 200))
        if reason is None:
            passed += 1
        elif first_failure is None:
            first_failure = (reason, {"case": index, **details})
    return Verdict.ok(1.0, {"cases": len(cases), "passed": passed}) if first_failure is None else \
        Verdict.fail(first_failure[0], passed / len(cases), {"cases": len(cases), "passed": passed, **first_failure[1]})


def run_code_many(items: list[tuple[str | None, str]], timeout_s: float = 10.0, memory_mb: int = 512,
                  workers: int | None = None) -> list[Verdict]:
    """run_code over (code, tests) pairs concurrently (threads, each waiting on its subprocess); the
    verdicts come back in input order. workers defaults to the CPU count; mind workers x memory_mb."""
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        return list(pool.map(lambda item: run_code(item[0], item[1], timeout_s, memory_mb), items))
