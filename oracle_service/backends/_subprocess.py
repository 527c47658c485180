"""Running external codes for the DFT oracles: scratch directories, wall-time limits, log tails.

Two ways to run a calculation out of the service's own process:

* :func:`run_command` -- one executable (``pw.x``) in its own process group,
  stdin/stdout from/to files, killed as a whole group when it exceeds its
  wall-time limit (:class:`~protos.errors.CalculationTimeout`) or when its
  ``cancel`` event is set (nobody waits for it any more:
  :class:`~oracle_service.base.CalculationCancelled`).
* :class:`PersistentWorker` -- a long-lived child Python interpreter that
  imports a heavy library once (GPAW, tblite) and runs one job at a time.
  A job that exceeds its wall-time limit kills the child's process group
  (the next job starts a fresh child); a child that dies (segfault, out of
  memory) becomes a :class:`~protos.errors.CalculationFailed`.  A job whose
  ``cancel`` event is set kills the child the same way.  Libraries
  that print from C/Fortran write into the job's log file, never into the
  protocol pipe.

Nothing here knows about a particular code.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from protos.errors import CalculationFailed, CalculationTimeout, EpicycleError, InvalidInput, SetupError

from ..base import CalculationCancelled

log = logging.getLogger(__name__)

#: how long a killed process group gets between SIGTERM and SIGKILL, s
KILL_GRACE_SECONDS = 2.0
#: how often a running process is checked for cancellation, s
CANCEL_POLL_SECONDS = 0.05
#: default number of log lines attached to a failure
TAIL_LINES = 40
#: and at most this many characters of them
TAIL_CHARS = 3000

KEEP_POLICIES = ("never", "on_failure", "always")


# ---------------------------------------------------------------------------
# small helpers


def tail_text(text: str, lines: int = TAIL_LINES, max_chars: int = TAIL_CHARS) -> str:
    """The last ``lines`` non-empty-trailing lines of ``text``, at most ``max_chars`` characters."""
    out = "\n".join(text.rstrip().splitlines()[-lines:])
    if len(out) > max_chars:
        out = "[...]" + out[-max_chars:]
    return out


def tail_file(path: str | os.PathLike | None, lines: int = TAIL_LINES, max_chars: int = TAIL_CHARS) -> str:
    """Tail of a (possibly missing, possibly huge) text file; ``""`` if there is none."""
    if path is None:
        return ""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 64 * 1024))
            data = fh.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    return tail_text(data, lines, max_chars)


def find_executable(name: str, hint: str) -> str:
    """Absolute path of ``name`` (a program on PATH or a path), or :class:`SetupError` with ``hint``."""
    if os.sep in name:
        if os.path.isfile(name) and os.access(name, os.X_OK):
            return os.path.abspath(name)
        raise SetupError(f"executable {name!r} does not exist or is not executable. {hint}")
    found = shutil.which(name)
    if found is None:
        raise SetupError(f"executable {name!r} not found on PATH. {hint}")
    return found


def thread_env(n_threads: int, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) with every threading knob set to ``n_threads``."""
    env = dict(os.environ if base is None else base)
    n = str(int(n_threads))
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS"):
        env[var] = n
    # OpenMPI refuses to start as root unless told; pw.x run without mpirun is an
    # MPI singleton and needs the same permission in containers that run as root.
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    return env


def check_keep_policy(keep: str) -> str:
    if keep not in KEEP_POLICIES:
        raise InvalidInput(f"keep_scratch must be one of {KEEP_POLICIES}, got {keep!r}")
    return keep


@contextlib.contextmanager
def scratch_directory(parent: str | os.PathLike | None, prefix: str, keep: str = "on_failure") -> Iterator[Path]:
    """A fresh directory for one calculation, removed afterwards according to ``keep``.

    keep: ``"never"`` (always removed), ``"on_failure"`` (kept when the
    body raises, so the user can read the full log; not for a cancelled
    calculation, which is no failure), ``"always"``.
    ``parent=None`` uses the system temporary directory.
    """
    check_keep_policy(keep)
    if parent is not None:
        Path(parent).mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    failed = False
    try:
        yield path
    except CalculationCancelled:
        raise
    except BaseException:
        failed = True
        raise
    finally:
        if keep == "never" or (keep == "on_failure" and not failed):
            shutil.rmtree(path, ignore_errors=True)
        elif failed:
            log.warning("kept scratch directory of a failed calculation: %s", path)


def kill_process_group(proc: subprocess.Popen, grace: float = KILL_GRACE_SECONDS) -> None:
    """SIGTERM the process group of ``proc`` (started with ``start_new_session``), then SIGKILL."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        except PermissionError:  # pragma: no cover - group not ours (should not happen)
            proc.send_signal(sig)
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def describe_returncode(code: int) -> str:
    if code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


# ---------------------------------------------------------------------------
# one executable


def run_command(
    argv: Sequence[str],
    *,
    cwd: str | os.PathLike,
    log_path: str | os.PathLike,
    stdin_path: str | os.PathLike | None = None,
    timeout: float | None = None,
    env: Mapping[str, str] | None = None,
    what: str = "",
    cancel: threading.Event | None = None,
) -> int:
    """Run ``argv`` in ``cwd`` in a new process group; stdout and stderr go to ``log_path``.

    Returns the exit code.  Raises :class:`CalculationTimeout` (after killing
    the whole process group, so ``mpirun`` children die too) when it runs
    longer than ``timeout`` seconds, with the tail of the log, and
    :class:`CalculationCancelled` (after the same kill: SIGTERM, SIGKILL after
    :data:`KILL_GRACE_SECONDS`) within :data:`CANCEL_POLL_SECONDS` of
    ``cancel`` being set.  Any other exception in the caller's thread (e.g.
    KeyboardInterrupt) also kills the group before propagating.
    """
    what = what or os.path.basename(argv[0])
    stdin = open(stdin_path, "rb") if stdin_path is not None else subprocess.DEVNULL
    try:
        with open(log_path, "wb") as out:
            try:
                proc = subprocess.Popen(
                    list(argv),
                    cwd=cwd,
                    stdin=stdin,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=dict(env) if env is not None else None,
                    start_new_session=True,
                )
            except FileNotFoundError as exc:
                raise SetupError(f"cannot start {what}: {exc}") from None
            except PermissionError as exc:
                raise SetupError(f"cannot start {what}: {exc}") from None
            try:
                return _wait_process(proc, timeout, cancel)
            except subprocess.TimeoutExpired:
                kill_process_group(proc)
                raise CalculationTimeout(
                    f"{what} exceeded its wall-time limit of {timeout:g} s and was killed",
                    tail_file(log_path),
                ) from None
            except _CancelRequested:
                kill_process_group(proc)
                log.info("%s (pid %d) killed: cancelled, no caller waits for it any more", what, proc.pid)
                raise CalculationCancelled(f"{what} was cancelled and killed: no caller waits for it any more",
                                           tail_file(log_path)) from None
            except BaseException:
                kill_process_group(proc)
                raise
    finally:
        if stdin is not subprocess.DEVNULL:
            stdin.close()


class _CancelRequested(Exception):
    pass


def _wait_process(proc: subprocess.Popen, timeout: float | None, cancel: threading.Event | None) -> int:
    """``proc.wait(timeout)`` that raises _CancelRequested soon after ``cancel`` is set."""
    if cancel is None:
        return proc.wait(timeout=timeout)
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        if cancel.is_set():
            raise _CancelRequested
        step = CANCEL_POLL_SECONDS
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise subprocess.TimeoutExpired(proc.args, timeout)
            step = min(step, left)
        try:
            return proc.wait(timeout=step)
        except subprocess.TimeoutExpired:
            continue


# ---------------------------------------------------------------------------
# a persistent Python worker

_HEADER = struct.Struct("<Q")


def _send(fh, obj: Any) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    fh.write(_HEADER.pack(len(data)))
    fh.write(data)
    fh.flush()


def _recv_blocking(fh) -> Any:
    header = fh.read(_HEADER.size)
    if len(header) < _HEADER.size:
        raise EOFError
    (n,) = _HEADER.unpack(header)
    data = fh.read(n)
    if len(data) < n:
        raise EOFError
    return pickle.loads(data)


def _read_exact(fd: int, n: int, deadline: float | None, cancel: threading.Event | None = None) -> bytes:
    """Read exactly ``n`` bytes from ``fd`` before ``deadline`` (monotonic), else TimeoutError/EOFError
    (or _CancelRequested soon after ``cancel`` is set)."""
    chunks: list[bytes] = []
    remaining = n
    while remaining:
        if cancel is not None and cancel.is_set():
            raise _CancelRequested
        wait = None if deadline is None else max(0.0, deadline - time.monotonic())
        if cancel is not None:
            wait = CANCEL_POLL_SECONDS if wait is None else min(wait, CANCEL_POLL_SECONDS)
        ready, _, _ = select.select([fd], [], [], wait)
        if not ready:
            if cancel is not None and (deadline is None or time.monotonic() < deadline):
                continue
            raise TimeoutError
        chunk = os.read(fd, min(remaining, 1 << 20))
        if not chunk:
            raise EOFError
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def project_root() -> str:
    """Directory that contains the ``oracle_service`` package (for the child's ``sys.path``)."""
    return str(Path(__file__).resolve().parents[2])


class PersistentWorker:
    """A child interpreter running ``module:function`` jobs one at a time.

    ``target`` is a ``"package.module:function"`` taking ``(job: dict)`` and
    returning a picklable result; it runs in the child with the job's
    ``cwd`` as working directory and stdout/stderr (also of C and Fortran
    code) redirected to the job's log file.  Typed Epicycle errors raised by
    it are re-raised in the parent; anything else becomes
    :class:`CalculationFailed` with the exception text and the log tail.

    Not thread-safe: one job at a time (the owning oracle sets
    ``thread_safe = False``).  ``env`` is the child's complete environment
    (set thread counts here: they must be fixed before numpy is imported).
    """

    def __init__(self, target: str, env: Mapping[str, str] | None = None, name: str = "worker",
                 preload: Sequence[str] = ()) -> None:
        self.target = target
        self.name = name
        self.preload = tuple(preload)
        self._env = dict(os.environ if env is None else env)
        root = project_root()
        self._env["PYTHONPATH"] = os.pathsep.join(p for p in (root, self._env.get("PYTHONPATH", "")) if p)
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()
        self.starts = 0
        #: seconds allowed for the child's interpreter start and imports
        self.startup_timeout = 300.0

    # -- lifecycle
    def _start(self) -> subprocess.Popen:
        proc = subprocess.Popen(
            [sys.executable, "-u", "-m", "oracle_service.backends._subprocess", self.target, *self.preload],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=self._env,
            start_new_session=True,
            cwd=tempfile.gettempdir(),
        )
        self.starts += 1
        return proc

    def _wait_ready(self, proc: subprocess.Popen) -> None:
        """Wait for the child's hello (imports done), so a job's wall time excludes start-up."""
        assert proc.stdout is not None
        deadline = time.monotonic() + self.startup_timeout
        try:
            (n,) = _HEADER.unpack(_read_exact(proc.stdout.fileno(), _HEADER.size, deadline))
            hello = pickle.loads(_read_exact(proc.stdout.fileno(), n, deadline))
        except TimeoutError:
            self._stop(polite=False)
            raise SetupError(f"{self.name}: worker process did not start within {self.startup_timeout:g} s") from None
        except (EOFError, OSError, pickle.UnpicklingError):
            code = proc.poll()
            self._stop()
            status = describe_returncode(code) if code is not None else "no answer"
            raise SetupError(f"{self.name}: worker process died during start-up ({status})") from None
        if not hello.get("ready"):
            self._stop()
            raise SetupError(f"{self.name}: worker process could not start: {hello.get('message', '?')}")

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def close(self) -> None:
        with self._lock:
            self._stop()

    def _stop(self, polite: bool = True, grace: float | None = None) -> None:
        """End the child: ask it to exit (if ``polite`` and idle), then kill its process group
        (SIGTERM, then SIGKILL after ``grace`` seconds; default 0.5 s if polite, else at once)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            if polite and proc.poll() is None and proc.stdin is not None:
                try:
                    _send(proc.stdin, None)  # polite shutdown
                    proc.wait(timeout=2.0)
                except (OSError, subprocess.TimeoutExpired, ValueError):
                    pass
        finally:
            kill_process_group(proc, grace=grace if grace is not None else 0.5 if polite else 0.0)
            for fh in (proc.stdin, proc.stdout):
                with contextlib.suppress(Exception):
                    fh.close()

    def __del__(self) -> None:  # best effort; close() is the real API
        with contextlib.suppress(Exception):
            self._stop()

    # -- one job
    def call(self, job: Mapping[str, Any], *, cwd: str | os.PathLike, log_path: str | os.PathLike,
             timeout: float | None = None, what: str = "", cancel: threading.Event | None = None) -> Any:
        """Run one job; see the class docstring for what it raises.

        ``cancel`` set while the job runs: the child's process group is killed
        (SIGTERM, SIGKILL after :data:`KILL_GRACE_SECONDS`) and
        :class:`CalculationCancelled` raised; the next job starts a fresh child.
        """
        what = what or self.name
        with self._lock:
            if not self.alive():
                self._stop()
                self._proc = self._start()
                self._wait_ready(self._proc)
            proc = self._proc
            assert proc is not None and proc.stdin is not None and proc.stdout is not None
            request = {"job": dict(job), "cwd": str(cwd), "log": str(log_path)}
            deadline = None if timeout is None else time.monotonic() + timeout
            try:
                if cancel is not None and cancel.is_set():
                    raise _CancelRequested
                _send(proc.stdin, request)
                header = _read_exact(proc.stdout.fileno(), _HEADER.size, deadline, cancel)
                (n,) = _HEADER.unpack(header)
                reply = pickle.loads(_read_exact(proc.stdout.fileno(), n, deadline))
            except _CancelRequested:
                self._stop(polite=False, grace=KILL_GRACE_SECONDS)
                log.info("%s: worker process killed: cancelled, no caller waits for the job any more", what)
                raise CalculationCancelled(f"{what} was cancelled and its worker process killed: "
                                           "no caller waits for the result any more", tail_file(log_path)) from None
            except TimeoutError:
                self._stop(polite=False)
                raise CalculationTimeout(
                    f"{what} exceeded its wall-time limit of {timeout:g} s and was killed",
                    tail_file(log_path),
                ) from None
            except (EOFError, BrokenPipeError, OSError, pickle.UnpicklingError) as exc:
                code = proc.poll()
                if code is None:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        code = proc.wait(timeout=2.0)
                self._stop(polite=False)
                status = describe_returncode(code) if code is not None else f"lost ({type(exc).__name__})"
                raise CalculationFailed(
                    f"{what}: worker process died during the calculation ({status})",
                    tail_file(log_path),
                ) from None
            except BaseException:
                self._stop(polite=False)
                raise
        if reply.get("ok"):
            return reply["result"]
        raise _rebuild_error(reply, what, log_path)


_ERROR_TYPES: dict[str, type[EpicycleError]] = {
    "CalculationTimeout": CalculationTimeout,
    "CalculationFailed": CalculationFailed,
    "SetupError": SetupError,
    "InvalidInput": InvalidInput,
}


def _rebuild_error(reply: Mapping[str, Any], what: str, log_path) -> EpicycleError:
    kind = reply.get("kind", "")
    message = reply.get("message", "unknown error")
    cls = _ERROR_TYPES.get(kind)
    if cls is None:
        return CalculationFailed(f"{what}: {message}", reply.get("log_tail") or tail_file(log_path))
    if issubclass(cls, CalculationFailed):
        return cls(message, reply.get("log_tail") or tail_file(log_path))
    return cls(message)


def _classify(exc: BaseException) -> str:
    for cls in type(exc).__mro__:
        if cls.__name__ in _ERROR_TYPES and cls.__module__ == "protos.errors":
            return cls.__name__
    return ""


def _worker_main(target: str, preload: Sequence[str]) -> None:  # pragma: no cover - runs in the child
    import importlib

    # The protocol uses the original stdout; fd 1 itself is pointed at a log file
    # (first /dev/null, then each job's log) so that C/Fortran output cannot corrupt it.
    proto_out = os.fdopen(os.dup(1), "wb")
    proto_in = os.fdopen(os.dup(0), "rb")
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    for module in preload:
        with contextlib.suppress(Exception):
            importlib.import_module(module)
    try:
        module_name, _, func_name = target.partition(":")
        func = getattr(importlib.import_module(module_name), func_name)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which raises SetupError
        _send(proto_out, {"ready": False, "message": f"cannot load {target}: {type(exc).__name__}: {exc}"})
        return
    _send(proto_out, {"ready": True, "pid": os.getpid()})
    while True:
        try:
            request = _recv_blocking(proto_in)
        except EOFError:
            return
        if request is None:
            return
        logfd = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(logfd, 1)
        os.dup2(logfd, 2)
        os.close(logfd)
        try:
            os.chdir(request["cwd"])
            result = func(request["job"])
            reply = {"ok": True, "result": result}
        except BaseException as exc:  # noqa: BLE001 - everything is reported to the parent
            sys.stdout.flush()
            kind = _classify(exc)
            message = str(exc) if kind else f"{type(exc).__name__}: {exc}"
            if isinstance(exc, CalculationFailed):
                message = super(CalculationFailed, exc).__str__()
            if not kind:
                traceback.print_exc()
            sys.stderr.flush()
            reply = {"ok": False, "kind": kind, "message": message,
                     "log_tail": getattr(exc, "log_tail", "") or ""}
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            with contextlib.suppress(OSError):
                os.chdir(tempfile.gettempdir())
        try:
            _send(proto_out, reply)
        except (pickle.PicklingError, TypeError, AttributeError) as exc:
            _send(proto_out, {"ok": False, "kind": "", "message": f"result not picklable: {exc}"})


if __name__ == "__main__":  # pragma: no cover - the child side of PersistentWorker
    _worker_main(sys.argv[1], sys.argv[2:])
