"""The code verifier: a Python solution against tests, decided where the solution cannot reach.

    extract_code(text) -> str | None
    run_code(code, tests, timeout_s=10.0, memory_mb=512) -> Verdict
    run_code_many(items, timeout_s=10.0, memory_mb=512, workers=None) -> list[Verdict]

The verdict. The solution runs in its own process and never shares memory, namespace, files or exit
status with the code that decides. Assert tests run in a second process (the tests' process) with the
real builtins and their own namespace; the solution is imported as module `solution` in the first and
reaches the tests only as data over two pipes: values of exact builtin types (int, float, str, list,
dict, ...; recursively; subclasses do not count), and anything else as an opaque proxy that forwards
calls, attributes, items, len, bool, str and iteration but never equality, ordering, hashing or
membership, so `assert f(2) == 5` compares plain values in the tests' process. Only that process writes
the outcome, to a pipe the solution never holds, and the parent (synth) passes a row only on its "ok"
plus its exit status 0. Stdin/stdout cases compare the solution's stdout, which the parent reads, with
the expected output, which never leaves the parent; a zero exit status alone passes nothing.

Isolation. Where unprivileged namespaces work (Linux; probed once per process, cached), each child
runs under `unshare` in new user, pid, network, mount, ipc and uts namespaces: no network, a fresh
/proc that shows only its own processes (everything it spawns dies with it, setsid or not), tmpfs over
/tmp, /home, /root, /run, ... (synth's files and environment are out of sight), every mount read-only
except its working directory, and no capabilities (dropped, bounding set too, no_new_privs). Where
they do not (or SYNTH_SANDBOX_NAMESPACES=0), the children run as plain processes and one WARNING says
the sandbox is weaker. In both modes: a scrubbed environment (PATH, LANG, HOME, TMPDIR only), resource
limits set by the child before any user code (address space, CPU time, file size, no core dumps), a
wall-clock timeout that kills the whole process group, and an audit hook (sys.addaudithook) that
refuses network access, process creation (also `_posixsubprocess`), signals, ctypes symbols, raising
limits, writes outside the working directory (also through dir_fd, descriptors, sqlite3, symlinks,
hard links), reads outside it other than the interpreter's own directories, and other processes'
/proc entries. Not covered: audit hooks can be bypassed by code that means to (ctypes' memmove, C
extensions), there is no seccomp filter, and in the fallback mode that bypass reaches the user's files
and other processes of the same user. Run untrusted code on a machine or container without secrets.
Limits are set by the child itself, not in a `preexec_fn`: run_code_many starts processes from
threads, where preexec_fn is documented as unsafe. RLIMIT_NPROC is not set (it counts all processes of
the user); process creation is refused by the audit hook and the pid namespace.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from synth.sandbox_children import _HOST, _JUDGE, _PRELUDE  # the child programs' source
from synth.verdicts import Verdict
from synth.verify import _clip

SANDBOX_OUTPUT_LIMIT_MB = 16  # RLIMIT_FSIZE: caps files the solution writes and its captured stdout/stderr
NAMESPACES_ENV = "SYNTH_SANDBOX_NAMESPACES"  # "0" forces the fallback (no namespaces)
_SETUP_FAILED = 125  # a child's exit status when its namespace setup failed: it never ran the solution
log = logging.getLogger("synth")


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


# ---- the parent's side ---------------------------------------------------------------------------------

# Hidden (an empty tmpfs over each) inside the namespaces; the interpreter's prefixes and the working
# directory are bound back. The parent's cwd (the user's project: its database, .env) is hidden too.
_HIDDEN = ("/tmp", "/var/tmp", "/dev/shm", "/run", "/home", "/root", "/mnt", "/media", "/srv", "/opt")
_isolation_lock = threading.Lock()
_isolation: dict = {}  # "available" (bool) and "why" once probed; "warned" once the fallback was logged


def _unshare_prefix() -> list[str]:
    """`unshare` makes the namespaces; /bin/sh is the pid namespace's init, so that the solution is an
    ordinary process (pid 1 ignores most signals, SIGXCPU included) and a signal shows as status 128+N.
    When the init dies (--kill-child: when unshare dies), the kernel kills everything in the namespace."""
    return [shutil.which("unshare") or "unshare", "--user", "--map-root-user", "--pid", "--fork", "--kill-child",
            "--mount-proc", "--net", "--mount", "--ipc", "--uts", "--", "/bin/sh", "-c", '"$@"; exit $?', "sh"]


def _use_namespaces() -> bool:
    """Whether children run in namespaces: probed once (a real child sets them up and says so), cached;
    SYNTH_SANDBOX_NAMESPACES=0 forces the fallback. The fallback is logged once, loudly."""
    forced_off = os.environ.get(NAMESPACES_ENV, "").strip().lower() in ("0", "false", "no", "off")
    with _isolation_lock:
        if forced_off:
            available, why = False, f"{NAMESPACES_ENV}={os.environ[NAMESPACES_ENV]}"
        else:
            if "available" not in _isolation:
                _isolation["available"], _isolation["why"] = _probe_namespaces()
            available, why = _isolation["available"], _isolation["why"]
        if not available and not _isolation.get("warned"):
            _isolation["warned"] = True
            log.warning("code sandbox: Linux namespaces are not available (%s): solutions run with only "
                        "an audit hook and resource limits between them and this machine (no private /proc, "
                        "/tmp or network, writable filesystem); run untrusted code in a container", why)
    return available


def _probe_namespaces() -> tuple[bool, str]:
    if sys.platform != "linux" or not shutil.which("unshare") or not os.path.exists("/bin/sh"):
        return False, "not Linux, or no unshare(1)"
    with tempfile.TemporaryDirectory(prefix="synth-sandbox-") as tmp, tempfile.TemporaryFile() as empty:
        work = Path(tmp) / "work"
        work.mkdir()
        cfg = _config(work, True, 256, 10, source_fd=empty.fileno(), probe=True)
        try:
            proc = _spawn(_PRELUDE, cfg, pass_fds=(empty.fileno(),), stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            out, err = proc.communicate(timeout=20)
        except (OSError, subprocess.SubprocessError) as error:
            return False, f"unshare failed: {error}"
        if proc.returncode == 0 and out == b"isolated\n":
            return True, "probed"
        last = (err.decode("utf-8", "replace").strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        return False, _clip(last, 300)


def _config(work: Path, isolate: bool, memory_mb: int, timeout_s: float, **more) -> dict:
    return {"workdir": str(work), "isolate": isolate, "memory_bytes": memory_mb * 2**20,
            "cpu_s": max(1, math.ceil(timeout_s)), "fsize_bytes": SANDBOX_OUTPUT_LIMIT_MB * 2**20,
            "hide": [*_HIDDEN, tempfile.gettempdir(), str(work.parent.parent), os.getcwd()],
            "site": _site_dirs(), "keep": [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
                                          *_site_dirs()], **more}


def _site_dirs() -> list[str]:
    """The interpreter's site-packages, put on the children's sys.path by hand: they start with -S (no
    site.py, no .pth files), which saves a sixth of their start-up."""
    import site
    return [p for p in site.getsitepackages() if os.path.isdir(p)]


def _spawn(script: str, cfg: dict, **popen) -> subprocess.Popen:
    """A child `python -I -S -B -c script cfg`, in its own session, with a scrubbed environment (synth's
    own, API keys included, never reaches it), under `unshare` when cfg["isolate"]."""
    argv = [sys.executable, "-I", "-S", "-B", "-c", script, json.dumps(cfg)]
    if cfg["isolate"]:
        argv = _unshare_prefix() + argv
    work = cfg["workdir"]
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": work, "TMPDIR": work}
    return subprocess.Popen(argv, cwd=work, env=env, start_new_session=True, **popen)


def _data_file(text: str):
    """An unlinked temporary file holding text, for a child to read through an inherited descriptor."""
    f = tempfile.TemporaryFile()
    f.write(text.encode("utf-8", "replace"))
    f.seek(0)
    return f


def _wait(proc: subprocess.Popen, deadline: float) -> bool:
    """Wait until the child exits or the deadline passes; True when it exited. It is observed with
    WNOWAIT, so it stays an unreaped zombie until _kill: its pid, which is its process group's id,
    cannot be reused by an unrelated process in between."""
    delay = 0.001
    while True:
        info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT | os.WNOHANG)
        if info is not None and info.si_pid:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
        delay = min(delay * 2, 0.05)


def _kill(proc: subprocess.Popen) -> int:
    """SIGKILL the child's process group (with namespaces, unshare's death kills its pid namespace and
    everything in it), reap it, and give its status; a signal shows as a negative number either way."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    code = proc.wait()
    return code


@dataclass
class _Run:
    """What the children did, as the parent saw it."""
    timed_out: bool
    returncodes: list[int]  # the solution's process first; a signal is -N (also from 128+N under the namespaces' sh)
    stderr: str  # the solution's process's stderr
    stdout: str = ""
    output_full: bool = False  # stdout or stderr reached the file-size limit
    report: dict | None = None  # the tests' process's outcome; None when it never wrote one


def _signalled(code: int, isolate: bool) -> int:
    return 128 - code if isolate and 128 < code < 160 else code


def _read_capped(path: Path, limit: int = 2**20) -> tuple[str, bool]:
    """(the last `limit` bytes of a child's output file as text, whether the file hit the size limit)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        f.seek(max(0, size - limit))
        text = f.read().decode("utf-8", "replace")
    return text, size >= SANDBOX_OUTPUT_LIMIT_MB * 2**20


def _run_io(source: str, stdin: str, timeout_s: float, memory_mb: int, isolate: bool) -> _Run:
    """The solution as __main__, stdin from the case; stdout and the status are for the parent to judge."""
    with tempfile.TemporaryDirectory(prefix="synth-sandbox-", ignore_cleanup_errors=True) as tmp:
        root = Path(tmp)
        os.chmod(root, 0o700)
        work = root / "work"
        work.mkdir()
        with _data_file(source) as sol, _data_file(stdin) as fin, open(root / "stdout", "wb") as fout, \
                open(root / "stderr", "wb") as ferr:
            cfg = _config(work, isolate, memory_mb, timeout_s, mode="io", source_fd=sol.fileno())
            proc = _spawn(_PRELUDE + _HOST, cfg, pass_fds=(sol.fileno(),), stdin=fin, stdout=fout, stderr=ferr)
            timed_out = not _wait(proc, time.monotonic() + timeout_s)
            code = _signalled(_kill(proc), isolate)
        stdout, full_out = _read_capped(root / "stdout", SANDBOX_OUTPUT_LIMIT_MB * 2**20)
        stderr, full_err = _read_capped(root / "stderr")
        return _Run(timed_out, [code], stderr, stdout, full_out or full_err)


def _run_asserts(source: str, tests: str, timeout_s: float, memory_mb: int, isolate: bool) -> _Run:
    """The solution's process and the tests' process, joined by two pipes; the outcome comes over a third
    pipe that only the tests' process holds."""
    with tempfile.TemporaryDirectory(prefix="synth-sandbox-", ignore_cleanup_errors=True) as tmp:
        root = Path(tmp)
        os.chmod(root, 0o700)
        work = root / "work"
        work.mkdir()
        requests_r, requests_w = os.pipe()
        responses_r, responses_w = os.pipe()
        report_r, report_w = os.pipe()
        procs: list[subprocess.Popen] = []
        try:
            with _data_file(source) as sol, _data_file(tests) as tst, open(root / "stdout", "wb") as fout, \
                    open(root / "stderr", "wb") as ferr:
                cfg = _config(work, isolate, memory_mb, timeout_s, mode="rpc", source_fd=sol.fileno(),
                              requests_fd=requests_r, responses_fd=responses_w)
                procs.append(_spawn(_PRELUDE + _HOST, cfg, pass_fds=(sol.fileno(), requests_r, responses_w),
                                    stdin=subprocess.DEVNULL, stdout=fout, stderr=ferr))
                cfg = _config(work, isolate, memory_mb, timeout_s, source_fd=tst.fileno(), requests_fd=requests_w,
                              responses_fd=responses_r, report_fd=report_w)
                procs.append(_spawn(_PRELUDE + _JUDGE, cfg, pass_fds=(tst.fileno(), requests_w, responses_r, report_w),
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        except BaseException:
            for proc in procs:
                _kill(proc)
            raise
        finally:
            for fd in (requests_r, requests_w, responses_r, responses_w, report_w):
                os.close(fd)
        host, judge = procs
        deadline = time.monotonic() + timeout_s
        timed_out = not _wait(judge, deadline)
        if not timed_out:  # the solution's process ends by itself once the tests' end of the pipes closes
            _wait(host, min(deadline, time.monotonic() + 0.5))
        codes = [_signalled(_kill(host), isolate), _signalled(_kill(judge), isolate)]
        with os.fdopen(report_r, "rb") as f:
            raw = f.read(65536)
        try:
            report = json.loads(raw) if raw else None
        except ValueError:
            report = None
        stderr, full_err = _read_capped(root / "stderr")
        _, full_out = _read_capped(root / "stdout", 0)
        return _Run(timed_out, codes, stderr, "", full_out or full_err,
                    report if isinstance(report, dict) else None)


def _judge_run(run: _Run, timeout_s: float, memory_mb: int, asserts: bool) -> tuple[str | None, dict]:
    """(reason or None when the solution passed, details). Passing takes, with assert tests, the tests'
    process's "ok" and its exit status 0; for stdin/stdout, exit status 0 (the caller then compares
    stdout). Memory exhaustion is reason "error" with details["limit"] == "memory"; CPU or wall time is
    "timeout"; output over the file-size limit is "error" with limit "output"; a failing assert is
    "wrong_output". The solution's stderr only ever classifies a failure, never makes a pass."""
    details: dict = {"exit_code": run.returncodes[0]}
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    if lines:
        details["stderr"] = _clip(lines[-1].strip(), 500)
    report = run.report or {}
    if run.timed_out:
        return "timeout", {**details, "limit": "wall", "timeout_s": timeout_s}
    if -signal.SIGXCPU in run.returncodes:
        return "timeout", {**details, "limit": "cpu", "timeout_s": timeout_s}
    if -signal.SIGXFSZ in run.returncodes or run.output_full or any("[Errno 27] File too large" in l for l in lines[-3:]):
        return "error", {**details, "limit": "output", "output_limit_mb": SANDBOX_OUTPUT_LIMIT_MB}
    if _SETUP_FAILED in run.returncodes:
        return "error", {**details, "message": "the sandbox could not be set up"}
    if asserts and report.get("outcome") == "ok" and run.returncodes[1] == 0:
        return None, details
    if report.get("outcome") == "memory" or any("MemoryError" in line for line in lines[-3:]):
        return "error", {**details, "limit": "memory", "memory_mb": memory_mb, "message": "MemoryError"}
    if not asserts and run.returncodes[0] == 0:
        return None, details
    if report.get("outcome") in ("error", "wrong_output"):
        found = {k: report[k] for k in ("phase", "message", "line") if report.get(k) is not None}
        return report["outcome"], {**details, **found}
    code = run.returncodes[0]
    if code < 0:
        details["signal"] = signal.Signals(-code).name if -code in signal.valid_signals() else -code
    if not asserts and lines:
        return "error", {**details, "message": _clip(lines[-1].strip(), 500)}
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
    """Run a Python solution against tests in a sandbox (see the module docstring).

    `code` may be a whole completion (extract_code is applied). `tests` is either a JSON list of
    {"input": str, "output": str} cases (each in its own process, stdin = input, stdout compared after
    stripping trailing whitespace; score = fraction passed; the verdict's reason is the first failing
    case's) or Python source with asserts, run in a process of their own against the solution imported
    as a module (score 1.0 or 0.0). `timeout_s` and `memory_mb` apply to each process. Reasons:
    unparseable_answer (no code), unparseable_reference (no tests, or tests that are not valid), timeout,
    error (exception, non-zero exit, memory: details["limit"] == "memory"), wrong_output."""
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
    isolate = _use_namespaces()

    if cases is None:
        reason, details = _judge_run(_run_asserts(source, tests, timeout_s, memory_mb, isolate), timeout_s,
                                     memory_mb, asserts=True)
        if reason == "wrong_output" and details.get("line"):
            test_lines = tests.splitlines()
            if isinstance(details["line"], int) and 0 < details["line"] <= len(test_lines):
                details["failed_test"] = _clip(test_lines[details["line"] - 1].strip(), 500)
        return Verdict.ok(1.0) if reason is None else Verdict.fail(reason, 0.0, details)

    passed, first_failure = 0, None
    for index, case in enumerate(cases):
        run = _run_io(source, case["input"], timeout_s, memory_mb, isolate)
        reason, details = _judge_run(run, timeout_s, memory_mb, asserts=False)
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
    """run_code over (code, tests) pairs concurrently (threads, each waiting on its subprocesses); the
    verdicts come back in input order. workers defaults to the CPU count; mind workers x memory_mb (an
    assert-test verdict uses two processes)."""
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        return list(pool.map(lambda item: run_code(item[0], item[1], timeout_s, memory_mb), items))
