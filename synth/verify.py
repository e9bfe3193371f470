"""Answer extraction and verifiers: pure functions from text to a Verdict (no store, no pipeline).

    extract_answer(text, how, pattern=None, field=None) -> str | None   how: none|boxed|final_number|regex|json
    compare(answer, reference, method, tolerance=1e-6) -> Verdict      method: exact|numeric|math
    canonical(answer, method) -> str | None                             a voting key; None when unparseable
    equivalent(a, b, method) -> bool
    extract_code(text) -> str | None
    run_code(code, tests, timeout_s=10.0, memory_mb=512) -> Verdict     Python solution vs tests, in a subprocess
    run_code_many(items, timeout_s=10.0, memory_mb=512, workers=None) -> list[Verdict]

Everything FAILS CLOSED: an answer or reference that cannot be extracted or parsed is a failure with
reason `unparseable_answer` / `unparseable_reference`, never a pass (METHODS.md: a widely used recipe
once scored unparseable gold answers as correct). Extraction never raises on a model's text; a bad
*configuration* (unknown `how`/`method`, missing regex pattern) raises ValueError, so that a pipeline
fails at validation instead of silently rejecting every row.

Methods, and the decisions behind them:
- exact: strings equal after `normalise` (strip, drop surrounding $...$, drop one trailing period,
  collapse whitespace, casefold).
- numeric: both sides must be a *whole* number, `parse_number`: signs (+, -, U+2212), thousands
  separators "1,234", decimals, exponents "1e-3", simple fractions "3/4", and a trailing percent sign
  which is dropped: "50%" reads as 50, not 0.5, because gold answers for "what percent…" questions are
  written "50" (GSM8K and friends); the cost is that "50%" does not match a gold "0.5". Equal when
  exactly equal or math.isclose(rel_tol=tolerance, abs_tol=tolerance).
- math: math-verify (`math_verify.parse` / `verify`, gold first). A string that already holds LaTeX
  delimiters ($, \\(, \\[, \\boxed) is parsed as is; a bare answer is wrapped in $...$ so that
  "\\frac{1}{2}", "0.5", "x+1" and "\\sqrt{8}" all parse (bare, math-verify reads only a leading
  number out of "2\\sqrt{2}" and nothing out of "\\sqrt{8}"). A parse that yields no sympy object
  (only math-verify's string fallback) is unparseable. math-verify's own timeouts use SIGALRM, which
  works only in the main thread, so they are on in the main thread and off in worker threads.
- In every method a reference (and an answer) that normalises to a "no answer" marker such as "n/a",
  "none", "unknown", "?" or "-" is unparseable: wrapped in $...$ math-verify would happily read "n/a"
  as the expression n/a.

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
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from synth.parsers import final_number, last_boxed, parse_json
from synth.verdicts import Verdict

EXTRACTORS = ("none", "boxed", "final_number", "regex", "json")
METHODS = ("exact", "numeric", "math")

# After `normalise`, these mean "there is no answer" and never count as one.
NO_ANSWER = frozenset({"", "n/a", "na", "none", "null", "nan", "unknown", "?", "-", "--", "\u2013", "\u2014"})

MATH_TIMEOUT_S = 5  # per math-verify parse / comparison, main thread only (SIGALRM)
SANDBOX_OUTPUT_LIMIT_MB = 16  # RLIMIT_FSIZE: caps files the solution writes and its captured stdout/stderr


# ---- extraction ------------------------------------------------------------------------------------

def extract_answer(text: str | None, how: str, pattern: str | None = None, field: str | None = None) -> str | None:
    """The answer in a completion, or None. regex: group 1 when the pattern has groups, else the whole
    match; the LAST match wins. json: `field` (dotted path "a.b", list indices allowed) of the first
    JSON object in the text; strings as they are, other values as JSON text ("3", "true", "[1, 2]"),
    null as None. Results are stripped; an empty result is None."""
    if how not in EXTRACTORS:
        raise ValueError(f"unknown answer extractor {how!r}; expected one of {', '.join(EXTRACTORS)}")
    if how == "regex" and not pattern:
        raise ValueError("extractor 'regex' needs a pattern")
    if how == "json" and not field:
        raise ValueError("extractor 'json' needs a field")
    if not isinstance(text, str):
        return None
    if how == "none":
        found = text
    elif how == "boxed":
        found = last_boxed(text)
    elif how == "final_number":
        found = final_number(text)
    elif how == "regex":
        found = _last_regex_match(text, pattern)
    else:
        found = _json_field(text, field)
    if found is None:
        return None
    return found.strip() or None


def _last_regex_match(text: str, pattern: str) -> str | None:
    compiled = re.compile(pattern)  # an invalid pattern is a configuration error: let re.error out
    last = None
    for last in compiled.finditer(text):
        pass
    if last is None:
        return None
    return last.group(1) if compiled.groups else last.group(0)  # group 1 may be None (did not take part)


def _json_field(text: str, field: str) -> str | None:
    value: object = parse_json(text)
    if value == {"parse_error": "invalid_json"}:  # parse_json's marker for "no JSON object"
        return None
    if field in value:  # a top-level key that itself contains dots
        value = value[field]
    else:
        for part in field.split("."):
            if isinstance(value, dict) and part in value:
                value = value[part]
            elif isinstance(value, list) and part.lstrip("-").isdigit() and -len(value) <= int(part) < len(value):
                value = value[int(part)]
            else:
                return None
    if value is None:
        return None
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


# ---- normalisation and numbers -------------------------------------------------------------------------

def normalise(text: str | None) -> str | None:
    """The `exact` form: stripped, surrounding $...$ (or $$...$$) removed, one trailing period removed,
    whitespace collapsed, casefolded. None for None."""
    if text is None:
        return None
    s = text.strip()
    while len(s) >= 2 and s.startswith("$") and s.endswith("$"):
        s = s[1:-1].strip()
    if s.endswith("."):
        s = s[:-1]
    return " ".join(s.split()).casefold()


def _no_answer(text: str | None) -> bool:
    n = normalise(text)
    return n is None or n in NO_ANSWER


# A whole number: sign, digits (with correct thousands grouping, or none), decimals, a short exponent
# (longer exponents would make Fraction build enormous integers), or a simple fraction of integers.
_DECIMAL = re.compile(r"[+-]?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d{1,3})?")
_RATIO = re.compile(r"[+-]?\d+\s*/\s*[+-]?\d+")


def parse_number(text: str | None) -> Fraction | None:
    """`text` as an exact number, or None when it is not one number (see the module docstring)."""
    if not isinstance(text, str):
        return None
    s = text.strip()
    while len(s) >= 2 and s.startswith("$") and s.endswith("$"):
        s = s[1:-1].strip()
    s = s.replace("\u2212", "-")
    if s.endswith("%"):
        s = s[:-1].removesuffix("\\").strip()  # "50%" and LaTeX "50\%"
    try:
        if _DECIMAL.fullmatch(s):
            return Fraction(s.replace(",", ""))
        if _RATIO.fullmatch(s):
            num, den = (int(part) for part in s.split("/"))
            return Fraction(num, den) if den else None
    except (ValueError, ZeroDivisionError, OverflowError):  # e.g. more digits than int() accepts
        return None
    return None


def _number_key(value: Fraction) -> str:
    """A canonical spelling: "0.5" for 1/2, 1/2 and 0.50; "-3" for -3.0; "1/3" when the decimal does not end."""
    if value.denominator == 1:
        return str(value.numerator)
    den, twos, fives = value.denominator, 0, 0
    while den % 2 == 0:
        den, twos = den // 2, twos + 1
    while den % 5 == 0:
        den, fives = den // 5, fives + 1
    if den != 1:
        return f"{value.numerator}/{value.denominator}"
    digits = max(twos, fives)
    scaled = abs(value.numerator) * 10**digits // value.denominator
    sign = "-" if value < 0 else ""
    return f"{sign}{scaled // 10**digits}.{scaled % 10**digits:0{digits}d}"


def _numbers_close(a: Fraction, b: Fraction, tolerance: float) -> bool:
    if a == b:
        return True
    try:
        return math.isclose(float(a), float(b), rel_tol=tolerance, abs_tol=tolerance)
    except OverflowError:  # beyond float range and not exactly equal
        return False


# ---- math-verify ---------------------------------------------------------------------------------------

_LATEX_DELIMITED = re.compile(r"(?<!\\)\$|\\\(|\\\[|\\boxed\b|\\fbox\b")
_SCIENTIFIC = re.compile(r"([+-]?(?:\d+(?:\.\d*)?|\.\d+))[eE]([+-]?\d+)")


def _math_timeout() -> int | None:
    # math-verify times out with SIGALRM, which raises ValueError outside the main thread.
    return MATH_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


def _math_parse(text: str | None) -> list | None:
    """math-verify's parse of `text` (a list with at least one sympy object), or None when unparseable."""
    if _no_answer(text):
        return None
    from math_verify import parse  # imported here: math-verify pulls in sympy (about a second)
    from sympy import Basic, MatrixBase

    s = text.strip()
    scientific = _SCIENTIFIC.fullmatch(s)
    if scientific:  # math-verify has no e-notation: "1e-3" would read as 1*e - 3
        s = f"{scientific.group(1)} \\times 10^{{{scientific.group(2)}}}"
    if not _LATEX_DELIMITED.search(s):
        s = f"${s}$"
    try:
        parsed = parse(s, parsing_timeout=_math_timeout())
    except BaseException as error:  # math-verify's TimeoutException is a BaseException
        if isinstance(error, (KeyboardInterrupt, SystemExit)):
            raise
        return None
    if not any(isinstance(p, (Basic, MatrixBase)) for p in parsed):
        return None
    return parsed


def _math_verify(gold: list, target: list) -> bool:
    from math_verify import verify

    try:
        return bool(verify(gold, target, timeout_seconds=_math_timeout()))
    except BaseException as error:
        if isinstance(error, (KeyboardInterrupt, SystemExit)):
            raise
        return False


def _math_key(parsed: list) -> str | None:
    """sympy's string of the simplified expression, floats made exact rationals first (so that 0.50
    and \\frac{1}{2} share a key); the unsimplified string when simplification fails or is too costly."""
    import sympy

    expr = next(p for p in parsed if isinstance(p, (sympy.Basic, sympy.MatrixBase)))

    def simplified():
        return sympy.simplify(sympy.nsimplify(expr, rational=True))

    try:
        if _math_timeout() is not None:
            from math_verify.utils import timeout

            expr = timeout(MATH_TIMEOUT_S)(simplified)()
        elif sympy.count_ops(expr) <= 40:  # no timeout in worker threads: simplify only small things
            expr = simplified()
    except BaseException as error:
        if isinstance(error, (KeyboardInterrupt, SystemExit)):
            raise
    try:
        return str(expr)
    except Exception:
        return None


# ---- comparing -----------------------------------------------------------------------------------------

def compare(answer: str | None, reference: str | None, method: str, tolerance: float = 1e-6) -> Verdict:
    """Does `answer` match the gold `reference`? Pass: Verdict(True, 1.0). Fail: score 0.0 and reason
    unparseable_reference (checked first), unparseable_answer or wrong_answer. `tolerance` is for numeric."""
    if method not in METHODS:
        raise ValueError(f"unknown verify method {method!r}; expected one of {', '.join(METHODS)}")
    details = {"answer": _clip(answer), "reference": _clip(reference)}
    if method == "exact":
        ref, ans = normalise(reference), normalise(answer)
        ok_ref, ok_ans = not _no_answer(reference), not _no_answer(answer)
        same = ok_ref and ok_ans and ref == ans
    elif method == "numeric":
        ref = None if _no_answer(reference) else parse_number(reference)
        ans = None if _no_answer(answer) else parse_number(answer)
        ok_ref, ok_ans = ref is not None, ans is not None
        same = ok_ref and ok_ans and _numbers_close(ans, ref, tolerance)
    else:
        ref = _math_parse(reference)
        ans = _math_parse(answer) if ref is not None else None  # parse only what will be compared
        ok_ref, ok_ans = ref is not None, ans is not None
        same = ok_ref and ok_ans and _math_verify(ref, ans)
    if not ok_ref:
        return Verdict.fail("unparseable_reference", 0.0, details)
    if not ok_ans:
        return Verdict.fail("unparseable_answer", 0.0, details)
    return Verdict.ok(1.0, details) if same else Verdict.fail("wrong_answer", 0.0, details)


def canonical(answer: str | None, method: str) -> str | None:
    """The equivalence-class key for self-consistency voting; None when unparseable. exact: the
    normalised string; numeric: `_number_key` ("0.5" for 0.5, 1/2, 0.50, 50%→"50"); math: the sympy
    string of the simplified parse (see `_math_key`). Keys ignore tolerance: 0.333333 and 1/3 get
    different keys although `equivalent` says they match under math."""
    if method not in METHODS:
        raise ValueError(f"unknown verify method {method!r}; expected one of {', '.join(METHODS)}")
    if _no_answer(answer):
        return None
    if method == "exact":
        return normalise(answer)
    if method == "numeric":
        value = parse_number(answer)
        return None if value is None else _number_key(value)
    parsed = _math_parse(answer)
    return None if parsed is None else _math_key(parsed)


def equivalent(a: str | None, b: str | None, method: str) -> bool:
    """Are two answers the same (both parseable)? Symmetric by construction: numeric uses the default
    tolerance (isclose is symmetric); math needs math-verify to agree in BOTH directions, since its
    verify(gold, target) is not symmetric and a false merge would inflate a majority."""
    if method not in METHODS:
        raise ValueError(f"unknown verify method {method!r}; expected one of {', '.join(METHODS)}")
    if method != "math":
        return compare(a, b, method).passed
    pa, pb = _math_parse(a), _math_parse(b)
    return pa is not None and pb is not None and _math_verify(pa, pb) and _math_verify(pb, pa)


def _clip(text: str | None, limit: int = 200) -> str | None:
    return text if text is None or len(text) <= limit else text[:limit] + "…"


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
# then runs the solution (and the assert tests) as __main__. The outcome goes to the status file, which
# the parent requires: a process that vanished without one (os._exit, a signal) never passes.
_RUNNER = r'''
import json, os, resource, sys, traceback

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
        "os.posix_spawn", "os.kill", "os.killpg", "ctypes.dlopen", "ctypes.dlsym",
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
        elif event in denied:
            raise PermissionError(f"sandbox: {event} is not allowed")

    sys.addaudithook(hook)


install_guard(os.path.realpath(cfg["workdir"]))
namespace = {"__name__": "__main__", "__builtins__": __builtins__}
phase = "solution"
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
    else:
        report("error", phase, f"SystemExit: {exit_.code!r} before the tests finished" if tests is not None
               else f"SystemExit: {exit_.code!r}")
except BaseException as error:
    traceback.print_exc()
    message = traceback.format_exception_only(type(error), error)[-1].strip()
    lines = [frame.lineno for frame in traceback.extract_tb(error.__traceback__) if frame.filename == "<tests>"]
    outcome = "wrong_output" if isinstance(error, AssertionError) and phase == "tests" else "error"
    report(outcome, phase, message, lines[-1] if lines else None)
else:
    report("ok")
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
    if run.returncode == -signal.SIGXFSZ:
        return "error", {**details, "limit": "output", "output_limit_mb": SANDBOX_OUTPUT_LIMIT_MB}
    if status.get("outcome") == "memory" or (not run.status and "MemoryError" in run.stderr):
        return "error", {**details, "limit": "memory", "memory_mb": memory_mb, "message": "MemoryError"}
    if status.get("outcome") == "ok" and run.returncode == 0:
        return None, details
    if status.get("outcome") in ("error", "wrong_output"):
        found = {k: status[k] for k in ("phase", "message", "line") if status.get(k) is not None}
        return status["outcome"], {**details, **found}
    if run.returncode < 0:
        details["signal"] = signal.Signals(-run.returncode).name
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
        return Verdict.ok(1.0, details) if reason is None else Verdict.fail(reason, 0.0, details)

    passed, first_failure = 0, None
    for index, case in enumerate(cases):
        reason, details = _judge_run(_run_process(source, None, case["input"], timeout_s, memory_mb),
                                     timeout_s, memory_mb)
        if reason is None:
            run_output = details.pop("stdout", None)
            del run_output
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
