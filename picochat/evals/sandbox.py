"""A sandbox for untrusted, model-written Python (HumanEval grading, code rewards).

run_python(program) runs one program in a fresh `python -s -S` process and returns a
SandboxResult; run_many() runs a batch on a small thread pool. The child jails itself in layers
before it runs the program. Which layers this platform has is probed once (sandbox_features());
a layer the probe found is then required: without it the child refuses to run the program.

Kernel-enforced (no trick in the program can undo them):
- rlimits: address space (memory_mb), CPU seconds, file size, open files, no core dumps.
- seccomp (Linux x86-64/aarch64): no new processes. fork, vfork and clone without CLONE_THREAD
  fail with EPERM (threads still work), so a fork bomb is one busy process until the timeout.
- user + network namespaces (unshare): the only network is a loopback that is down, and the
  child has no capabilities in the host's user namespace, even when the host runs as root.
- Landlock (Linux >= 5.13): reads only the Python installation and the system libraries, writes
  only its temporary directory, cannot ptrace host processes (so /proc/<pid>/environ is closed);
  ABI >= 4: no TCP bind/connect; ABI >= 6: no signals out of the sandbox.
- RLIMIT_NPROC where it is a per-sandbox limit: a non-root user in its own user namespace.
Enforced by the parent: a wall-clock timeout; output caps (the child is killed once stdout or
stderr passes max_output bytes, so it cannot flood our memory); a new session whose process
group is killed at the end; a scrubbed environment; a fresh working directory, deleted after.
Best effort: the Python guard (os.system, os.kill, subprocess.Popen, shutil.rmtree, ... set to
None, as in human-eval), which any program can get around (`import posix`). Where the Linux
layers are missing (macOS), the guard, the rlimits and the parent's limits are all there is:
enough for honest model output, not for hostile code, and without seccomp a process that
leaves the session (setsid) outlives the kill.
"""

from __future__ import annotations

import os
import sys

# ----------------------------------------------------------------------------- child side
# The child is `python -s -S <this file> probe|run ...`: its half comes first and exits before
# the parent's imports, so that starting a sandbox costs tens of milliseconds, not a hundred.

CLONE_NEWUSER, CLONE_NEWNET, CLONE_THREAD = 0x10000000, 0x40000000, 0x00010000
SETUP_FAILED = 120  # the child's exit code when a required layer could not be applied
# seccomp, per machine: audit arch, clone, and the syscalls that only make processes (fork, vfork)
_SECCOMP_ARCH = {"x86_64": (0xC000003E, 56, (57, 58)), "aarch64": (0xC00000B7, 220, ())}


def _ctypes_call(fn, *args, what: str) -> int:
    """Call a libc function, ints as C longs (syscall() is variadic); OSError when it fails."""
    import ctypes
    ret = fn(*[ctypes.c_long(a) if isinstance(a, int) else a for a in args])
    if ret < 0:
        raise OSError(ctypes.get_errno(), f"{what}: {os.strerror(ctypes.get_errno())}")
    return ret


def _libc():
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return ctypes, libc


def _rlimits(memory_mb: int, cpu_s: int) -> None:
    import resource
    for name, value in (("RLIMIT_AS", memory_mb << 20), ("RLIMIT_CPU", cpu_s), ("RLIMIT_CORE", 0),
                        ("RLIMIT_FSIZE", 64 << 20), ("RLIMIT_NOFILE", 256)):
        kind = getattr(resource, name)
        hard = resource.getrlimit(kind)[1]
        room = hard == resource.RLIM_INFINITY or value < hard
        value = value if room else hard
        try:  # CPU: SIGXCPU at the soft limit, SIGKILL a second later
            resource.setrlimit(kind, (value, value + 1 if name == "RLIMIT_CPU" and room else value))
        except (ValueError, OSError):
            if name != "RLIMIT_AS" or sys.platform == "linux":  # macOS refuses RLIMIT_AS
                raise


def _nproc(namespaced: bool, root: bool) -> None:
    # RLIMIT_NPROC counts every process of the user, but (Linux >= 5.14) per user namespace, so it
    # limits one sandbox only inside its own namespace; and root is exempt from it.
    if not namespaced or root:
        raise OSError("RLIMIT_NPROC would not be a per-sandbox limit here")
    import resource
    resource.setrlimit(resource.RLIMIT_NPROC, (16, 16))


def _landlock(workdir: str) -> list[str]:
    """Landlock: what the program may read and write; no TCP and no signals out, by the ABI."""
    ctypes, libc = _libc()
    abi = _ctypes_call(libc.syscall, 444, None, 0, 1, what="landlock ABI")  # ..._CREATE_RULESET_VERSION
    fs = (1 << 13) - 1 | (1 << 13 if abi >= 2 else 0) | (1 << 14 if abi >= 3 else 0) | (1 << 15 if abi >= 5 else 0)
    net = 0b11 if abi >= 4 else 0    # TCP bind and connect: no rule allows any port
    scope = 0b11 if abi >= 6 else 0  # signals and abstract unix sockets, out of the sandbox
    attr = (ctypes.c_uint64 * 3)(fs, net, scope)
    ruleset = _ctypes_call(libc.syscall, 444, ctypes.byref(attr), 24 if scope else 16 if net else 8, 0,
                           what="landlock_create_ruleset")

    class PathBeneath(ctypes.Structure):
        _pack_ = 1
        _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]
    # Read (execute | read file | read dir): the Python installation and the system's libraries,
    # not the rest of the disk (keys, data, other projects). Write: workdir, and /dev/null.
    rules = [(path, 0b1101) for path in {sys.base_prefix, sys.prefix, "/usr", "/lib", "/lib64"}]
    rules += [("/etc/localtime", 0b101), ("/dev/urandom", 0b101), ("/dev/null", fs & 0x4006), (workdir, fs)]
    for path, allowed in rules:
        try:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        _ctypes_call(libc.syscall, 445, ruleset, 1, ctypes.byref(PathBeneath(allowed, fd)), 0,
                     what="landlock_add_rule")
        os.close(fd)
    _ctypes_call(libc.prctl, 38, 1, 0, 0, 0, what="PR_SET_NO_NEW_PRIVS")  # needed to self-restrict
    _ctypes_call(libc.syscall, 446, ruleset, 0, what="landlock_restrict_self")
    return ["landlock_fs"] + ["landlock_net"] * bool(net) + ["landlock_scope"] * bool(scope)


def _seccomp_nofork() -> None:
    """A BPF filter: process-making syscalls fail (EPERM; clone3 ENOSYS, so glibc falls back to
    clone, whose flags a filter can read); other architectures' syscalls kill the process."""
    import errno
    arch, clone, forks = _SECCOMP_ARCH[os.uname().machine]
    ret, allow, kill = 0x06, 0x7FFF0000, 0x80000000
    fail = lambda e: 0x00050000 | e  # noqa: E731  (SECCOMP_RET_ERRNO)
    prog = [(0x20, 0, 0, 4), (0x15, 1, 0, arch), (ret, 0, 0, kill), (0x20, 0, 0, 0)]  # arch, then nr
    if arch == 0xC000003E:  # x32 syscalls are the x86-64 numbers with bit 30 set
        prog += [(0x35, 0, 1, 0x40000000), (ret, 0, 0, fail(errno.EPERM))]
    for nr, err in [(435, errno.ENOSYS)] + [(nr, errno.EPERM) for nr in forks]:
        prog += [(0x15, 0, 1, nr), (ret, 0, 0, fail(err))]
    prog += [(0x15, 1, 0, clone), (ret, 0, 0, allow),  # clone: a thread, or no clone at all
             (0x20, 0, 0, 16), (0x45, 0, 1, CLONE_THREAD), (ret, 0, 0, allow), (ret, 0, 0, fail(errno.EPERM))]
    ctypes, libc = _libc()

    class Insn(ctypes.Structure):
        _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]

    class Prog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(Insn))]
    insns = (Insn * len(prog))(*[Insn(*i) for i in prog])
    _ctypes_call(libc.prctl, 38, 1, 0, 0, 0, what="PR_SET_NO_NEW_PRIVS")
    _ctypes_call(libc.prctl, 22, 2, ctypes.byref(Prog(len(prog), insns)), 0, 0, what="PR_SET_SECCOMP")


def _python_guard() -> None:
    """human-eval's reliability_guard, in short: it stops accidents, not an attacker."""
    import builtins
    import shutil
    import subprocess
    for mod, names in ((os, ("kill killpg system putenv remove unlink removedirs rmdir fchdir setuid fork "
                             "forkpty rename renames truncate replace fchmod fchown chmod chown chroot lchown")),
                       (shutil, "rmtree move chown"), (subprocess, "Popen"), (builtins, "help")):
        for name in names.split():
            setattr(mod, name, None)


def _jail(layers: set[str], workdir: str, memory_mb: int, cpu_s: int, probe: bool) -> set[str]:
    """Apply the layers in order; a failure is fatal, except when probing for what works."""
    done: set[str] = set()
    root = os.geteuid() == 0  # asked before unshare: inside the namespace we are "nobody"
    unshare = lambda flags: _ctypes_call(_libc()[1].unshare, flags, what="unshare")  # noqa: E731
    steps = [("rlimits", lambda: _rlimits(memory_mb, cpu_s)),
             ("userns", lambda: unshare(CLONE_NEWUSER | CLONE_NEWNET)),
             ("netns", lambda: "userns" in done or unshare(CLONE_NEWNET)),  # root without userns
             ("nproc", lambda: _nproc("userns" in done, root)),
             ("landlock", lambda: done.update(_landlock(workdir))),
             ("seccomp_nofork", _seccomp_nofork)]
    for name, apply in steps:
        if probe or any(layer.startswith(name) for layer in layers):
            try:
                apply()
                done.add(name)
            except Exception as e:  # noqa: BLE001  (OSError, ctypes errors, KeyError for the arch)
                if not probe:
                    print(f"sandbox: cannot apply {name}: {e}", file=sys.stderr)
                    sys.exit(SETUP_FAILED)
    if probe and "seccomp_nofork" in done:  # trust, but verify: a fork must fail
        try:
            if os.fork() == 0:
                os._exit(0)
            os.wait()
            done.discard("seccomp_nofork")
        except PermissionError:
            pass
    return done - {"landlock"}


def peak_rss_kb(status_fd: int) -> int:
    """VmHWM of an open /proc/<pid>/status: the peak resident memory of the process's own address
    space since its exec (the rusage max RSS is no good for this: on Linux it keeps the peak of
    the address space the exec replaced, i.e. of the big parent the child was forked from)."""
    for line in os.pread(status_fd, 1 << 14, 0).splitlines():
        if line.startswith(b"VmHWM:"):
            return int(line.split()[1])
    return 0


def _child_main(argv: list[str]) -> None:
    del sys.path[0]  # this file's directory: the program must not import the project's modules
    mode, layers, memory_mb, cpu_s = argv[0], set(argv[1].split(",")), int(argv[2]), int(argv[3])
    # opened before the jail (Landlock closes /proc), to report the program's peak memory at the end
    status = os.open("/proc/self/status", os.O_RDONLY) if mode == "run" and os.path.exists("/proc/self") else -1
    done = _jail(layers, os.getcwd(), memory_mb, cpu_s, probe=mode == "probe")
    if mode == "probe":
        print(",".join(sorted(done)))
        return
    with open("program.py", encoding="utf-8") as f:
        code = compile(f.read(), "program.py", "exec")
    sys.argv = ["program.py"]
    _python_guard()
    try:
        exec(code, {"__name__": "__main__", "__builtins__": __builtins__})  # noqa: S102  (what we are here for)
    finally:  # on the way out, even after a MemoryError; a program killed by a signal reports nothing
        try:
            if status >= 0:
                os.write(int(argv[4]), b"%d\n" % peak_rss_kb(status))
        except (OSError, ValueError, MemoryError):
            pass


if __name__ == "__main__":
    _child_main(sys.argv[1:])
    raise SystemExit(0)  # never fall through to the parent's half

# ----------------------------------------------------------------------------- parent side

import concurrent.futures  # noqa: E402  (after the child's exit, on purpose)
import dataclasses  # noqa: E402
import functools  # noqa: E402
import selectors  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

from picochat.common import PicochatError  # noqa: E402

KERNEL_LAYERS = ("rlimits", "userns", "netns", "nproc", "landlock_fs", "landlock_net", "landlock_scope",
                 "seccomp_nofork")


@dataclasses.dataclass
class SandboxResult:
    passed: bool        # exited 0 within every limit
    status: str         # passed | failed | timeout | memory | output_limit | killed | sandbox_error
    returncode: int     # negative: killed by that signal (-9 after a timeout or an output limit)
    stdout: str         # at most max_output bytes of each stream, decoded (bad bytes replaced)
    stderr: str
    seconds: float      # wall time, start to cleanup
    pid: int = 0        # the child's pid, which is also its session and process-group id
    max_rss_kb: int = 0  # the program's peak resident memory in KiB (Linux; 0 where unknown)


def _child_cmd(mode: str, layers, memory_mb: int, cpu_s: int, report_fd: int = -1) -> list[str]:
    return [sys.executable, "-s", "-S", os.path.abspath(__file__), mode, ",".join(layers) or "-",
            str(memory_mb), str(cpu_s), str(report_fd)]


def _peak_of(pid: int) -> int:
    """The peak memory (KiB) of a running process, 0 when it cannot be read (gone, not Linux)."""
    try:
        fd = os.open(f"/proc/{pid}/status", os.O_RDONLY)
    except OSError:
        return 0
    try:
        return peak_rss_kb(fd)
    except (OSError, ValueError):
        return 0
    finally:
        os.close(fd)


def _env(workdir: str) -> dict[str, str]:
    # All of it: API keys, tokens, PYTHONPATH and proxies stay with the parent.
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "USER": "sandbox",
            "LANG": "C.UTF-8", "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONIOENCODING": "utf-8"}


@functools.cache
def sandbox_features() -> dict[str, bool]:
    """Which protections are active here (to print before an eval). Probed once per process."""
    on: set[str] = set()
    if os.name == "posix":
        with tempfile.TemporaryDirectory(prefix="picochat-probe-") as tmp:
            try:
                out = subprocess.run(_child_cmd("probe", [], 256, 10), cwd=tmp, env=_env(tmp), capture_output=True,
                                     text=True, timeout=30, check=False, start_new_session=True)
                on = set(out.stdout.split()[-1].split(",")) if out.returncode == 0 and out.stdout.split() else set()
            except (OSError, subprocess.TimeoutExpired):
                pass
    return {**{k: k in on for k in KERNEL_LAYERS}, "new_session": True, "scrubbed_env": True, "python_guard": True}


def _exited(proc: subprocess.Popen) -> bool:
    # Asked without reaping it (WNOWAIT): until its group is killed, the child's id must not go
    # back to the system for reuse.
    if hasattr(os, "waitid"):
        return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    return proc.poll() is not None  # macOS


def _collect(proc: subprocess.Popen, deadline: float, cap: int) -> tuple[bytes, bytes, str | None]:
    """Read both pipes until EOF, the deadline, or one passing `cap` bytes (none kept past it)."""
    bufs = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}
    why = None
    with selectors.DefaultSelector() as sel:
        for fd in bufs:
            sel.register(fd, selectors.EVENT_READ)
        while sel.get_map() and why is None:
            left = deadline - time.monotonic()
            why = "timeout" if left <= 0 else None
            for key, _ in sel.select(max(left, 0)):
                chunk = os.read(key.fd, 1 << 16)
                if not chunk:
                    sel.unregister(key.fd)
                bufs[key.fd] += chunk[: cap + 1 - len(bufs[key.fd])]
                why = "output_limit" if len(bufs[key.fd]) > cap else why
    while why is None and not _exited(proc):
        if time.monotonic() > deadline:
            why = "timeout"
        time.sleep(0.002)
    out, err = (bytes(b[:cap]) for b in bufs.values())
    return out, err, why


def run_python(program: str, timeout: float = 10.0, memory_mb: int = 1024, max_output: int = 65536) -> SandboxResult:
    """Run `program` in the sandbox; it passes iff it exits 0 within the limits."""
    if not (timeout > 0 and memory_mb >= 64 and max_output >= 0):
        raise PicochatError(f"sandbox: need timeout > 0, memory_mb >= 64 and max_output >= 0 "
                            f"(got {timeout}, {memory_mb}, {max_output})")
    layers = [k for k, on in sandbox_features().items() if on and k in KERNEL_LAYERS]
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="picochat-sandbox-", ignore_cleanup_errors=True) as tmp:
        with open(os.path.join(tmp, "program.py"), "w", encoding="utf-8") as f:
            f.write(program)
        report_r, report_w = os.pipe()  # the child writes its peak memory here as it exits
        os.set_blocking(report_r, False)  # read once it has exited: whatever is there, or nothing
        try:
            with subprocess.Popen(_child_cmd("run", layers, memory_mb, int(timeout) + 1, report_w), cwd=tmp,
                                  env=_env(tmp), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, start_new_session=True, pass_fds=(report_w,)) as proc:
                os.close(report_w)
                report_w = -1
                try:
                    out, err, why = _collect(proc, start + timeout, max_output)
                finally:
                    peak = _peak_of(proc.pid)  # if still running: stopped by a limit, about to be killed
                    try:  # the whole session's process group, whatever the program left behind
                        os.killpg(proc.pid, signal.SIGKILL)
                    except (ProcessLookupError, PermissionError):
                        pass
                    proc.wait()
            try:
                peak = int(os.read(report_r, 64).split()[0])
            except (OSError, ValueError, IndexError):
                pass
        finally:
            for fd in (report_r, report_w):
                if fd >= 0:
                    os.close(fd)
    rc = proc.returncode
    why = why or ("passed" if rc == 0 else "sandbox_error" if rc == SETUP_FAILED
                  else "timeout" if rc == -signal.SIGXCPU else "killed" if rc == -signal.SIGKILL
                  else "memory" if b"MemoryError" in err[-2000:] else "failed")
    return SandboxResult(passed=why == "passed", status=why, returncode=rc, stdout=out.decode("utf-8", "replace"),
                         stderr=err.decode("utf-8", "replace"), seconds=time.monotonic() - start, pid=proc.pid,
                         max_rss_kb=peak)


def run_many(programs, workers: int | None = None, **kw) -> list[SandboxResult]:
    """run_python over many programs, `workers` at a time (default: the number of cores), in order."""
    sandbox_features()  # probe once, before the threads race to
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        return list(pool.map(lambda p: run_python(p, **kw), programs))
