"""The sandbox's child programs (source text, run with `python -I -S -B -c`): synth/sandbox.py starts them.

_PRELUDE   both children: read the source from an inherited descriptor, enter the namespaces (or exit
           125), set limits, install the audit hook; `_encode`, the plain-data wire format.
_HOST      the solution's process: runs it on stdin ("io"), or imports it and serves the tests ("rpc").
_JUDGE     the tests' process: runs the tests against proxies of the solution and reports the outcome.

They are strings, not modules: each child is a fresh interpreter that must not import synth (nothing of
the parent's, its environment included, reaches it). `_encode_other(x, t, depth)` is each child's own
end of the shared `_encode`.
"""

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


# values cross between the children as plain data: exact builtin types, tagged where JSON has none
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
    return _encode_other(x, t, depth)
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


def _encode_other(x, t, depth):
    # not a plain value: a numpy scalar as its value, anything else as a handle the tests can only forward
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


def _encode_other(x, t, depth):
    # what the tests may send back to the solution besides plain values: its own objects (handles)
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
