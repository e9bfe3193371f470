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


# The children's common start: read the source from an inherited descriptor (nothing is on disk), set
# up the namespaces when asked (or exit 125), set limits, install the audit hook.
_PRELUDE = r'''
import json, os, resource, sys

cfg = json.loads(sys.argv[1])
sys.path.extend(p for p in cfg["site"] if p not in sys.path)  # -S skipped site.py (and its .pth files)
with open(cfg["source_fd"], "rb") as _f:
    source = _f.read().decode("utf-8", "replace")
WORK = os.path.realpath(cfg["workdir"])
KEEP = sorted({os.path.realpath(p) for p in cfg["keep"]})  # the interpreter's prefixes and site dirs


def _isolate():
    """Inside fresh user/pid/net/mount/ipc namespaces (made by `unshare`): hide the writable and
    private places (tmpfs over them), bind back the interpreter and the working directory, make every
    mount read-only but the working directory, then drop every capability for good."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)

    def check(result, what):
        if result != 0:
            code = ctypes.get_errno()
            raise OSError(code, f"{what}: {os.strerror(code)}")

    system = ("/", "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/etc", "/proc", "/dev", "/sys", "/var")
    keep = [(path, os.open(path, os.O_PATH | os.O_DIRECTORY)) for path in KEEP + [WORK]]
    for path in sorted({os.path.realpath(p) for p in cfg["hide"]}, key=len):
        if any(s == path or s.startswith(path.rstrip("/") + "/") for s in system):
            continue
        if os.path.isdir(path) and not os.path.islink(path):
            check(libc.mount(b"tmpfs", path.encode(), b"tmpfs", 2 | 4, b"size=1m,mode=755"), f"tmpfs on {path}")
    for path, fd in keep:  # MS_BIND | MS_REC, from the descriptor opened before hiding
        if path == WORK or not os.path.isdir(path):
            os.makedirs(path, exist_ok=True)
            check(libc.mount(f"/proc/self/fd/{fd}".encode(), path.encode(), None, 4096 | 16384, None), f"bind {path}")
        os.close(fd)

    class MountAttr(ctypes.Structure):
        _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                    ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]
    # mount_setattr(2) (syscall 442 on every architecture but alpha): AT_RECURSIVE, MOUNT_ATTR_RDONLY
    check(libc.syscall(442, -100, b"/", 0x8000, ctypes.byref(MountAttr(1, 0, 0, 0)), 32), "read-only /")
    check(libc.syscall(442, -100, WORK.encode(), 0, ctypes.byref(MountAttr(0, 1, 0, 0)), 32), "writable workdir")
    os.chdir(WORK)  # onto the writable bind mount

    check(libc.prctl(38, 1, 0, 0, 0), "no_new_privs")  # PR_SET_NO_NEW_PRIVS
    for cap in range(64):
        libc.prctl(24, cap, 0, 0, 0)  # PR_CAPBSET_DROP (EINVAL past the last capability)
    libc.prctl(47, 4, 0, 0, 0)  # PR_CAP_AMBIENT_CLEAR_ALL

    class CapHeader(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]
    check(libc.capset(ctypes.byref(CapHeader(0x20080522, 0)), (ctypes.c_uint32 * 6)()), "capset")
    with open("/proc/self/status") as f:
        caps = {k: v.strip() for k, _, v in (line.partition(":") for line in f) if k in ("CapEff", "CapPrm", "CapBnd")}
    if any(int(v, 16) for v in caps.values()) or len(caps) != 3:
        raise OSError(f"capabilities still held: {caps}")


if cfg["isolate"]:
    try:
        _isolate()
    except BaseException as error:
        sys.stderr.write(f"synth-sandbox: namespace setup failed: {error!r}\n")
        sys.stderr.flush()
        os._exit(125)
    if cfg.get("probe"):
        os.write(1, b"isolated\n")
        os._exit(0)
os.chdir(WORK)


def _limit(which, soft, hard):
    _, current = resource.getrlimit(which)
    if current != resource.RLIM_INFINITY:
        soft, hard = min(soft, current), min(hard, current)
    resource.setrlimit(which, (soft, hard))


_limit(resource.RLIMIT_AS, cfg["memory_bytes"], cfg["memory_bytes"])
_limit(resource.RLIMIT_CPU, cfg["cpu_s"], cfg["cpu_s"] + 1)
_limit(resource.RLIMIT_FSIZE, cfg["fsize_bytes"], cfg["fsize_bytes"])
_limit(resource.RLIMIT_CORE, 0, 0)
sys.set_int_max_str_digits(0)


def _install_guard(root, readable_dirs):
    realpath, fspath, fsdecode, sep, isdir = os.path.realpath, os.fspath, os.fsdecode, os.sep, os.path.isdir
    own_proc = f"/proc/{os.getpid()}"
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    devices = frozenset({"/dev/null", "/dev/zero", "/dev/urandom", "/dev/random"})
    # event -> positions of the paths it creates, changes or links to
    path_events = {"os.remove": (0,), "os.rename": (0, 1), "os.rmdir": (0,), "os.mkdir": (0,),
                   "os.chmod": (0,), "os.chown": (0,), "os.link": (0, 1), "os.truncate": (0,),
                   "os.utime": (0,), "os.mkfifo": (0,), "os.mknod": (0,), "shutil.rmtree": (0,),
                   "shutil.copyfile": (1,), "shutil.copytree": (1,), "shutil.move": (1,)}
    # events whose *_dir_fd arguments make a relative path mean something the hook cannot resolve
    dir_fd_args = {"os.remove": (1,), "os.rename": (2, 3), "os.rmdir": (1,), "os.mkdir": (2,),
                   "os.chmod": (2,), "os.chown": (3,), "os.link": (2, 3), "os.utime": (3,),
                   "os.mkfifo": (2,), "os.mknod": (3,), "os.symlink": (2,)}
    denied = frozenset({
        "socket.connect", "socket.bind", "socket.getaddrinfo", "socket.gethostbyname",
        "socket.gethostbyaddr", "socket.getnameinfo", "socket.sendto", "socket.sendmsg",
        "subprocess.Popen", "os.system", "os.exec", "os.fork", "os.forkpty", "os.spawn",
        "os.posix_spawn", "os.kill", "os.killpg", "signal.pthread_kill", "ctypes.dlsym",
        "ctypes.dlsym/handle", "resource.setrlimit", "resource.prlimit", "os.symlink",
        "sqlite3.enable_load_extension", "sqlite3.load_extension", "os.setns", "os.unshare",
    })
    denied_imports = frozenset({"_posixsubprocess", "_xxsubinterpreters"})

    def resolve(path):
        return realpath(fsdecode(fspath(path)))

    def within(resolved, base):
        return resolved == base or resolved.startswith(base.rstrip(sep) + sep)

    def inside(path):
        try:
            return within(resolve(path), root)
        except Exception:
            return False

    def may_read(path):
        resolved = resolve(path)
        if within(resolved, root):
            return True
        if isdir(resolved):  # a directory descriptor outside would make dir_fd-relative opens escape
            return False
        if resolved in devices:
            return True
        if within(resolved, "/proc"):
            return within(resolved, own_proc) and not resolved.endswith("/environ")
        return any(within(resolved, d) for d in readable_dirs)

    def hook(event, args):
        if event == "open":
            path, mode, flags = args
            if isinstance(path, int):  # a descriptor already held
                return
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or bool(flags & write_flags)
            try:
                ok = (inside(path) or resolve(path) == "/dev/null") if writing else may_read(path)
            except Exception:
                ok = False
            if not ok:
                raise PermissionError(f"sandbox: no {'writes' if writing else 'reads'} outside the working directory: {path!r}")
        elif event in path_events:
            for i in dir_fd_args.get(event, ()):
                if i < len(args) and args[i] not in (None, -1, -100):
                    raise PermissionError(f"sandbox: {event} with dir_fd is not allowed")
            for i in path_events[event]:
                if i < len(args) and (isinstance(args[i], int) and event != "os.truncate" or not inside(args[i])):
                    raise PermissionError(f"sandbox: {event} outside the working directory: {args[i]!r}")
        elif event == "os.chdir":
            if isinstance(args[0], int) or not inside(args[0]) or resolve(args[0]) != root:
                raise PermissionError("sandbox: os.chdir is not allowed")
        elif event == "sqlite3.connect":
            database = args[0]
            name = fsdecode(fspath(database)) if not isinstance(database, int) else "?"
            if name != ":memory:" and (name.startswith("file:") or not inside(database)):
                raise PermissionError(f"sandbox: sqlite3.connect outside the working directory: {database!r}")
        elif event == "import" and args[0] in denied_imports:
            raise PermissionError(f"sandbox: import {args[0]} is not allowed")
        elif event in denied or (event == "ctypes.dlopen" and args[0] is not None):
            # `import ctypes` opens the main program (dlopen(None)) and numpy imports ctypes: allowed;
            # loading another library, or looking up any symbol (libc's system, ...), is not.
            raise PermissionError(f"sandbox: {event} is not allowed")

    sys.addaudithook(hook)


_install_guard(WORK, tuple(KEEP))
del _isolate, _install_guard, _limit
'''


# The solution's process. "io": the solution runs as __main__ on stdin; the parent compares stdout.
# "rpc": the solution is imported as module `solution`, then serves the tests process over two pipes:
# every value crosses as plain data (exact builtin types), anything else as an opaque handle.
_HOST = r'''
import math, traceback

if cfg["mode"] == "io":
    _code = 0
    try:
        exec(compile(source, "<solution>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
    except SystemExit as _exit:
        if _exit.code not in (None, 0):
            sys.stderr.write(f"SystemExit: {_exit.code!r}\n")
            _code = 1
    except BaseException:
        traceback.print_exc()
        _code = 1
    try:
        sys.stdout.flush()
    except BaseException:
        traceback.print_exc()
        _code = 1
    os._exit(_code)

_requests = open(cfg["requests_fd"], "rb")
_responses = open(cfg["responses_fd"], "wb")
_handles, _handle_of = {}, {}


def _builtin_names(cls):
    import builtins
    return [c.__name__ for c in cls.__mro__ if getattr(builtins, c.__name__, None) is c][:4]


def _encode(x, depth=0):
    if depth > 200:
        raise ValueError("value nested too deeply")
    t, d = type(x), depth + 1
    if x is None or t is bool or t is str:
        return x
    if t is int:
        return x if -2**53 < x < 2**53 else {"i": hex(x)}
    if t is float:
        return x if math.isfinite(x) else {"f": repr(x)}
    if t is list:
        return [_encode(v, d) for v in x]
    if t is tuple:
        return {"t": [_encode(v, d) for v in x]}
    if t is dict:
        return {"d": [[_encode(k, d), _encode(v, d)] for k, v in x.items()]}
    if t is set or t is frozenset:
        return {"s" if t is set else "fs": [_encode(v, d) for v in x]}
    if t is bytes or t is bytearray:
        return {"b" if t is bytes else "ba": x.hex()}
    if t is complex:
        return {"c": [_encode(x.real, d), _encode(x.imag, d)]}
    if t is slice:
        return {"sl": [_encode(x.start, d), _encode(x.stop, d), _encode(x.step, d)]}
    if t is range:
        return {"r": [x.start, x.stop, x.step]}
    if t.__module__ == "numpy" and getattr(x, "shape", None) == () and hasattr(x, "item"):
        return _encode(x.item(), depth)
    return _handle(x)


def _handle(x):
    if id(x) not in _handle_of:  # _handles keeps x alive, so its id stays its own
        _handle_of[id(x)] = len(_handles) + 1
        _handles[len(_handles) + 1] = x
    return {"h": _handle_of[id(x)], "k": str(getattr(type(x), "__name__", "object"))[:80]}


def _decode(x):
    if isinstance(x, list):
        return [_decode(v) for v in x]
    if not isinstance(x, dict):
        return x
    (tag, v), = x.items()
    if tag == "h":
        return _handles[v]
    if tag == "i":
        return int(v, 16)
    if tag == "f":
        return float(v)
    if tag == "t":
        return tuple(_decode(e) for e in v)
    if tag == "d":
        return {_decode(k): _decode(e) for k, e in v}
    if tag in ("s", "fs"):
        return (set if tag == "s" else frozenset)(_decode(e) for e in v)
    if tag in ("b", "ba"):
        return (bytes if tag == "b" else bytearray).fromhex(v)
    if tag == "c":
        return complex(_decode(v[0]), _decode(v[1]))
    if tag == "sl":
        return slice(*(_decode(e) for e in v))
    if tag == "r":
        return range(*v)
    raise ValueError(f"unknown tag {tag!r}")


def _send(message):
    _responses.write(json.dumps(message).encode() + b"\n")
    _responses.flush()


def _send_error(error):
    text = traceback.format_exception_only(type(error), error)[-1].strip()
    _send({"exc": _builtin_names(type(error)), "msg": str(error)[:2000], "text": text[:2000]})


_namespace = {"__name__": "solution", "__builtins__": __builtins__}
try:
    exec(compile(source, "<solution>", "exec"), _namespace)
except BaseException as _error:
    if isinstance(_error, MemoryError):
        _namespace.clear()
    traceback.print_exc()
    _send_error(_error)
    os._exit(1)

_manifest = {}
for _name, _value in list(_namespace.items()):
    if _name.startswith("__"):
        continue
    try:
        if type(_value) is type(os):
            _manifest[_name] = {"m": str(_value.__name__)}
            continue
        _encoded = _encode(_value)
        if len(json.dumps(_encoded)) > 100_000:  # a big table stays behind, reached item by item
            _encoded = _handle(_value)
        _manifest[_name] = _encoded
    except Exception:
        pass
_send({"ok": _manifest})


def _serve(request):
    op, target = request["op"], _handles[request["h"]]
    if op == "call":
        args, kwargs = _decode(request["args"]), {k: _decode(v) for k, v in request["kwargs"].items()}
        result = target(*args, **kwargs)
        # lists, dicts, sets and bytearrays the tests passed in come back as they are now (in-place edits)
        synced = [[i, _encode(args[i])] for i in request.get("mutable", []) if i < len(args)]
        synced += [[k, _encode(kwargs[k])] for k in request.get("mutable_kw", []) if k in kwargs]
        return {"ok": _encode(result), "sync": synced}
    if op in ("getattr", "setattr", "delattr"):
        name = request["name"]
        if name.startswith("__"):
            raise AttributeError(name)
        if op == "getattr":
            return {"ok": _encode(getattr(target, name))}
        setattr(target, name, _decode(request["value"])) if op == "setattr" else delattr(target, name)
        return {"ok": None}
    if op == "getitem":
        return {"ok": _encode(target[_decode(request["key"])])}
    if op == "setitem":
        target[_decode(request["key"])] = _decode(request["value"])
        return {"ok": None}
    if op == "delitem":
        del target[_decode(request["key"])]
        return {"ok": None}
    unary = {"len": len, "iter": iter, "next": next, "bool": bool, "str": str, "repr": repr}
    return {"ok": _encode(unary[op](target))}


for _line in _requests:
    try:
        _reply = _serve(json.loads(_line))
    except BaseException as _error:
        _reply = None
        try:
            _send_error(_error)
        except BaseException:
            os._exit(1)
        continue
    try:
        _send(_reply)
    except BaseException as _error:  # a result that cannot be encoded (too deep, ...)
        _send_error(_error)
os._exit(0)
'''


# The tests' process: it never runs solution code. The tests run here, in their own namespace with the
# real builtins; the solution's globals appear as plain values, as stdlib modules imported here, or as
# proxies whose operations go to the solution's process and come back as plain data. Equality, ordering,
# hashing and membership are never asked of the solution: a proxy equals only itself.
_JUDGE = r'''
import builtins, math, traceback

_requests = open(cfg["requests_fd"], "wb")
_responses = open(cfg["responses_fd"], "rb")
_report_fd = cfg["report_fd"]
_UNSAFE_MODULES = frozenset({"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "webbrowser"})


class SolutionGone(Exception):
    """The solution's process closed its pipe or sent something that is not a reply."""


def _report(outcome, phase=None, message=None, line=None):
    message = None if message is None else str(message)[:2000]
    os.write(_report_fd, json.dumps({"outcome": outcome, "phase": phase, "message": message, "line": line}).encode())


_proxies = {}


class _Remote:
    """An object that lives in the solution's process."""
    __slots__ = ("_synth_h", "_synth_k", "__weakref__")

    def __init__(self, handle, kind):
        object.__setattr__(self, "_synth_h", handle)
        object.__setattr__(self, "_synth_k", kind)

    def __call__(self, *args, **kwargs):
        mutable = [i for i, a in enumerate(args) if type(a) in (list, dict, set, bytearray)]
        mutable_kw = [k for k, a in kwargs.items() if type(a) in (list, dict, set, bytearray)]
        reply = _rpc({"op": "call", "h": self._synth_h, "args": _encode(list(args)),
                      "kwargs": {str(k): _encode(v) for k, v in kwargs.items()},
                      "mutable": mutable, "mutable_kw": mutable_kw}, whole=True)
        for key, state in reply.get("sync", []):
            original = args[key] if isinstance(key, int) else kwargs[key]
            _update(original, _decode(state))
        return _decode(reply["ok"])

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _rpc({"op": "getattr", "h": self._synth_h, "name": name})

    def __setattr__(self, name, value):
        _rpc({"op": "setattr", "h": self._synth_h, "name": name, "value": _encode(value)})

    def __delattr__(self, name):
        _rpc({"op": "delattr", "h": self._synth_h, "name": name})

    def __getitem__(self, key):
        return _rpc({"op": "getitem", "h": self._synth_h, "key": _encode(key)})

    def __setitem__(self, key, value):
        _rpc({"op": "setitem", "h": self._synth_h, "key": _encode(key), "value": _encode(value)})

    def __delitem__(self, key):
        _rpc({"op": "delitem", "h": self._synth_h, "key": _encode(key)})

    def _typed(self, op, kind):
        value = _rpc({"op": op, "h": self._synth_h})
        if type(value) is not kind:
            raise TypeError(f"{op}() of a solution object gave {type(value).__name__}, not {kind.__name__}")
        return value

    def __len__(self):
        return self._typed("len", int)

    def __bool__(self):
        return self._typed("bool", bool)

    def __str__(self):
        return self._typed("str", str)

    def __iter__(self):
        return _rpc({"op": "iter", "h": self._synth_h})

    def __next__(self):
        return _rpc({"op": "next", "h": self._synth_h})

    def __repr__(self):
        return f"<solution object {self._synth_k} #{self._synth_h}>"


def _update(original, state):
    if type(original) is not type(state):
        return
    if type(original) in (list, bytearray):
        original[:] = state
    else:
        original.clear()
        original.update(state)


def _encode(x, depth=0):
    if depth > 200:
        raise ValueError("value nested too deeply")
    t, d = type(x), depth + 1
    if x is None or t is bool or t is str:
        return x
    if t is int:
        return x if -2**53 < x < 2**53 else {"i": hex(x)}
    if t is float:
        return x if math.isfinite(x) else {"f": repr(x)}
    if t is list:
        return [_encode(v, d) for v in x]
    if t is tuple:
        return {"t": [_encode(v, d) for v in x]}
    if t is dict:
        return {"d": [[_encode(k, d), _encode(v, d)] for k, v in x.items()]}
    if t is set or t is frozenset:
        return {"s" if t is set else "fs": [_encode(v, d) for v in x]}
    if t is bytes or t is bytearray:
        return {"b" if t is bytes else "ba": x.hex()}
    if t is complex:
        return {"c": [_encode(x.real, d), _encode(x.imag, d)]}
    if t is slice:
        return {"sl": [_encode(x.start, d), _encode(x.stop, d), _encode(x.step, d)]}
    if t is range:
        return {"r": [x.start, x.stop, x.step]}
    if t is _Remote:
        return {"h": x._synth_h}
    raise TypeError(f"the tests cannot pass a {t.__name__} to the solution (plain values and solution objects only)")


_TAGS = {"t": tuple, "s": set, "fs": frozenset}


def _decode(x):
    """Plain data from the solution's process -> objects of exact builtin types, or proxies. Nothing the
    solution sends can become an object with behaviour of its own."""
    t = type(x)
    if x is None or t in (bool, int, float, str):
        return x
    if t is list:
        return [_decode(v) for v in x]
    if t is not dict or not 1 <= len(x) <= 2 or (len(x) == 2 and set(x) != {"h", "k"}):
        raise SolutionGone(f"malformed value from the solution: {t.__name__}")
    if "h" in x:
        handle = x["h"]
        if type(handle) is not int:
            raise SolutionGone("malformed handle")
        if handle not in _proxies:
            _proxies[handle] = _Remote(handle, str(x.get("k", "object"))[:80])
        return _proxies[handle]
    (tag, v), = x.items()
    if tag == "i" and type(v) is str:
        return int(v, 16)
    if tag == "f" and v in ("nan", "inf", "-inf"):
        return float(v)
    if tag in _TAGS and type(v) is list:
        return _TAGS[tag](_decode(e) for e in v)
    if tag == "d" and type(v) is list:
        return {_decode(k): _decode(e) for k, e in v}
    if tag in ("b", "ba") and type(v) is str:
        return (bytes if tag == "b" else bytearray).fromhex(v)
    if tag == "c" and type(v) is list and len(v) == 2:
        real, imag = _decode(v[0]), _decode(v[1])
        if type(real) is float and type(imag) is float:
            return complex(real, imag)
    if tag == "sl" and type(v) is list and len(v) == 3:
        return slice(*(_decode(e) for e in v))
    if tag == "r" and type(v) is list and len(v) == 3 and all(type(e) is int for e in v):
        return range(*v)
    raise SolutionGone(f"malformed value from the solution: tag {tag!r}")


def _read():
    line = _responses.readline()
    if not line:
        raise SolutionGone("the solution's process ended before the tests finished")
    try:
        reply = json.loads(line)
    except ValueError:
        raise SolutionGone("the solution's process sent something that is not a reply") from None
    if type(reply) is not dict:
        raise SolutionGone("the solution's process sent something that is not a reply")
    return reply


def _raise_remote(reply):
    names = reply.get("exc") if type(reply.get("exc")) is list else []
    cls = RuntimeError
    for name in names:
        found = getattr(builtins, name, None) if type(name) is str else None
        if isinstance(found, type) and issubclass(found, BaseException):
            cls = found
            break
    message = str(reply.get("msg", ""))[:2000]
    try:
        error = cls(message)
    except Exception:
        error = RuntimeError(message)
    error._synth_remote = str(reply.get("text", ""))[:2000] or None
    raise error


def _rpc(request, whole=False):
    try:
        _requests.write(json.dumps(request).encode() + b"\n")
        _requests.flush()
    except (BrokenPipeError, OSError):
        raise SolutionGone("the solution's process ended before the tests finished") from None
    reply = _read()
    if "exc" in reply:
        _raise_remote(reply)
    if "ok" not in reply:
        raise SolutionGone("the solution's process sent something that is not a reply")
    return reply if whole else _decode(reply["ok"])


def _message(error):
    return getattr(error, "_synth_remote", None) or traceback.format_exception_only(type(error), error)[-1].strip()


try:
    _first = _read()
    if "exc" in _first:
        _raise_remote(_first)
    _manifest = _first.get("ok")
    if type(_manifest) is not dict:
        raise SolutionGone("the solution's process sent something that is not a reply")
except MemoryError:
    _report("memory", "solution", "MemoryError")
    os._exit(1)
except SystemExit as _exit:
    _report("error", "solution", f"SystemExit: {_exit} before the tests ran")
    os._exit(1)
except BaseException as _error:
    _report("error", "solution", _message(_error))
    os._exit(1)

_namespace = {"__name__": "tests", "__builtins__": builtins}
for _name, _value in _manifest.items():
    # a solution's global that shadows a builtin never reaches the tests: they keep the real one
    if type(_name) is not str or not _name.isidentifier() or _name.startswith("__") or hasattr(builtins, _name):
        continue
    try:
        if type(_value) is dict and set(_value) == {"m"}:
            module = str(_value["m"])
            if module.partition(".")[0] in sys.stdlib_module_names and module.partition(".")[0] not in _UNSAFE_MODULES:
                import importlib
                _namespace[_name] = importlib.import_module(module)
            continue
        _namespace[_name] = _decode(_value)
    except Exception:
        continue

try:
    exec(compile(source, "<tests>", "exec"), _namespace)
except MemoryError:
    _namespace.clear()
    _report("memory", "tests", "MemoryError")
    os._exit(1)
except SystemExit as _exit:
    _report("error", "tests", f"{_message(_exit) if hasattr(_exit, '_synth_remote') else f'SystemExit: {_exit.code!r}'}"
            " before the tests finished")
    os._exit(1)
except BaseException as _error:
    _lines = [frame.lineno for frame in traceback.extract_tb(_error.__traceback__) if frame.filename == "<tests>"]
    _outcome = "wrong_output" if isinstance(_error, AssertionError) else "error"
    _report(_outcome, "tests", _message(_error), _lines[-1] if _lines else None)
    os._exit(1)
_report("ok")
os._exit(0)
'''


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
