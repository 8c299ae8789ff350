"""Runs untrusted model files (TorchScript, ONNX) in a locked-down child process; the parent side.

Design (also in ARCHITECTURE.md, "Untrusted model files"):

- A TorchScript archive is a program, and an ONNX file is a graph run by a native runtime: neither is run
  in the web or worker process. `SandboxedModel` starts `python -I kd_core/sandbox_child.py` with
  `subprocess` (never fork: the parent's memory, sockets and database connections are not inherited),
  an empty environment (only *_NUM_THREADS=1) and a new, empty, private temp directory as its cwd, which
  is removed on close.
- The child imports numpy and torch, then locks itself in before it reads a byte of the model, with
  unprivileged Linux mechanisms only:
  * rlimits: address space (RLIMIT_AS), CPU seconds, file size, open files, no core dumps;
  * all capabilities dropped (a container's root keeps them otherwise), then prctl(NO_NEW_PRIVS);
  * Landlock (syscalls 444-446, ABI 1-7 handled): read-only access to the interpreter's prefixes (the
    virtual environment itself, not the project folder around it), system library folders and a few
    /dev, /proc/self and /sys files; write access to its temp dir only. ABI >= 4 also refuses TCP bind
    and connect; ABI >= 6 scopes abstract UNIX sockets and signals to the sandbox;
  * a seccomp BPF filter: no socket() of any family (Landlock does not govern connecting to an existing
    named UNIX socket, such as a database's), no execve/execveat, fork/vfork or clone without
    CLONE_THREAD (threads stay allowed), no ptrace, process_vm_*, mount, namespaces, bpf, io_uring,
    kexec/modules, chmod/chown/xattr/utime (Landlock does not cover metadata), signals only to itself.
  Bubblewrap is not used: it is an extra system package and needs user namespaces, which Docker's default
  seccomp profile blocks. Landlock + seccomp + rlimits work unprivileged in a default container.
  A kernel without Landlock (or any layer that fails) makes the child refuse to start: the caller gets a
  CheckpointError saying why and nothing is loaded; there is no insecure fallback.
- The model's bytes come over a pipe (never a path) and are loaded from memory
  (`torch.jit.load(BytesIO)`, `onnxruntime.InferenceSession(bytes)`). A TorchScript module is then checked
  against an op allowlist (`sandbox_child.check_torchscript_ops`) before any forward. `__setstate__` code
  runs during torch.jit.load itself, which is why the lock-down comes first.
- Requests (float32 batches) and answers go over the same pipes, so one child serves an upload's probe
  and a whole job's teacher logits. The parent bounds every answer's size, enforces a wall-time limit on
  each request and kills the child (SIGKILL to its process group) when it is exceeded.
- `.pt2` (torch.export ExportedProgram) is another `kind` of `_Served.load` in the child
  (`torch.export.load(BytesIO)`), every node of its graphs checked against the same aten allowlist
  (`sandbox_child.check_exported_program_ops`) before any forward.
"""

from __future__ import annotations

import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from kd_core import sandbox_child as proto
from kd_core.errors import CheckpointError

log = logging.getLogger(__name__)

CHILD_SCRIPT = Path(proto.__file__).resolve()
KINDS = ("torchscript", "onnx", "exported_program")
# The largest answer a forward may send back (rows x classes x 4 bytes is far below this).
MAX_ANSWER_BYTES = 1 << 31


def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


@dataclass(frozen=True)
class SandboxLimits:
    """What one sandboxed child may use. Defaults come from KD_SANDBOX_* environment variables."""

    memory_mb: int = field(default_factory=lambda: int(_env_float("KD_SANDBOX_MEMORY_MB", 4096)))
    cpu_s: int = field(default_factory=lambda: int(_env_float("KD_SANDBOX_CPU_S", 96 * 3600)))
    wall_s: float = field(default_factory=lambda: _env_float("KD_SANDBOX_WALL_S", 600.0))
    startup_s: float = field(default_factory=lambda: _env_float("KD_SANDBOX_STARTUP_S", 60.0))
    threads: int = field(
        default_factory=lambda: int(_env_float("KD_SANDBOX_THREADS", min(4, os.cpu_count() or 1)))
    )
    file_mb: int = 16
    open_files: int = 256

    def with_wall(self, wall_s: float, cpu_s: int | None = None) -> SandboxLimits:
        return replace(self, wall_s=wall_s, cpu_s=cpu_s if cpu_s is not None else self.cpu_s)


# Limits for an upload inspected inside a web request: short, so the web process stays responsive.
def inspection_limits() -> SandboxLimits:
    wall = _env_float("KD_SANDBOX_INSPECT_WALL_S", 20.0)
    return SandboxLimits().with_wall(wall, cpu_s=int(max(5, wall * 4)))


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        log.error("sandbox child %s did not die after SIGKILL", proc.pid)


def _cleanup(proc: subprocess.Popen, fds: list[int], work_dir: str) -> None:
    """Kill the child, close the pipes, remove its temp dir (also run at garbage collection and exit)."""
    if proc.poll() is None:
        _kill(proc)
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
    shutil.rmtree(work_dir, ignore_errors=True)


class SandboxedModel:
    """One untrusted model in its own locked-down child; `forward(array)` -> float32 array.

    Use as a context manager or call close(); an object dropped without close() is cleaned up at garbage
    collection or interpreter exit (weakref.finalize), so a forgotten child never outlives its owner.
    """

    def __init__(self, data: bytes, kind: str, *, source: str, limits: SandboxLimits | None = None) -> None:
        if kind not in KINDS:
            raise CheckpointError(f"{source}: no sandbox for model kind {kind!r}")
        self.source = source
        self.kind = kind
        self.limits = limits or SandboxLimits()
        self._lock = threading.Lock()
        self.timings: dict[str, float] = {}
        t0 = time.monotonic()
        self._start(len(data))
        self.timings["start_s"] = time.monotonic() - t0
        t0 = time.monotonic()
        self.info = self._request({"op": "load", "kind": kind}, data, self.limits.wall_s, what="loading it")
        self.timings["load_s"] = time.monotonic() - t0

    # -- process

    def _start(self, model_bytes: int) -> None:
        self.work_dir = tempfile.mkdtemp(prefix="kd-sandbox-")
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        threads = {k: "1" for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
        log_file = open(os.path.join(self.work_dir, "child.log"), "wb")  # noqa: SIM115 - handed to the child
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-I", "-B", str(CHILD_SCRIPT), str(to_child_r), str(from_child_w)],
                env=threads,
                cwd=self.work_dir,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=log_file,
                pass_fds=(to_child_r, from_child_w),
                close_fds=True,
                start_new_session=True,  # its own process group: killed as a whole
            )
        except OSError as e:
            for fd in (to_child_r, to_child_w, from_child_r, from_child_w):
                os.close(fd)
            shutil.rmtree(self.work_dir, ignore_errors=True)
            raise CheckpointError(f"{self.source}: could not start the model sandbox: {e}") from None
        finally:
            log_file.close()
        os.close(to_child_r)
        os.close(from_child_w)
        self._w, self._r = to_child_w, from_child_r
        self._finalizer = weakref.finalize(self, _cleanup, self._proc, [self._w, self._r], self.work_dir)
        # The model's bytes are held twice while loading (pipe buffer, then the parsed module).
        memory = (self.limits.memory_mb << 20) + 3 * model_bytes
        limits = {
            "memory_bytes": memory,
            "cpu_s": self.limits.cpu_s,
            "file_bytes": self.limits.file_mb << 20,
            "open_files": self.limits.open_files,
            "threads": self.limits.threads,
        }
        answer = self._request({"op": "setup", "limits": limits}, b"", self.limits.startup_s, what="starting")
        self.landlock_abi = answer.get("landlock_abi")

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def alive(self) -> bool:
        return self._finalizer.alive and self._proc.poll() is None

    def close(self) -> None:
        """Ask the child to exit, then make sure it did; idempotent."""
        if not self._finalizer.alive:
            return
        if self._proc.poll() is None:
            try:
                proto.send(self._w, {"op": "close"})
                self._proc.wait(timeout=2)
            except (OSError, subprocess.TimeoutExpired):
                pass
        self._finalizer()

    def __enter__(self) -> SandboxedModel:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- requests

    def forward(self, arr: np.ndarray, *, wall_s: float | None = None) -> np.ndarray:
        """Run the model on one float32 batch; the answer is checked to be a float32 array of sane size."""
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        header = self._request(
            {"op": "forward", "shape": list(arr.shape)},
            memoryview(arr.reshape(-1).view(np.uint8)),
            wall_s or self.limits.wall_s,
            what=f"running it on a batch of shape {tuple(arr.shape)}",
            answer=True,
        )
        return header["array"]

    def probe_limits(self, action: str, arg: Any = None, *, wall_s: float | None = None) -> dict[str, Any]:
        """Test hook: ask the child to try something its lock-down should refuse (see sandbox_child)."""
        return self._request(
            {"op": "probe_limits", "action": action, "arg": arg},
            b"",
            wall_s or 10.0,
            what=f"probing {action}",
            raw=True,
        )

    def _request(
        self,
        header: dict[str, Any],
        payload: bytes | memoryview,
        wall_s: float,
        *,
        what: str,
        answer: bool = False,
        raw: bool = False,
    ) -> dict[str, Any]:
        with self._lock:
            if not self.alive:
                raise CheckpointError(f"{self.source}: the model sandbox is closed")
            deadline = time.monotonic() + wall_s
            try:
                self._send(header, payload, deadline)
                head = self._recv(proto.HEAD_SIZE, deadline)
                hlen, plen = proto.parse_head(head, MAX_ANSWER_BYTES)
                reply = proto.parse_header(self._recv(hlen, deadline))
                body = self._recv(plen, deadline) if plen else b""
            except TimeoutError:
                self._finalizer()
                raise CheckpointError(
                    f"{self.source}: the model took longer than {wall_s:g} s {what} and was stopped"
                ) from None
            except (proto.ProtocolError, OSError) as e:
                try:  # the pipe closes a moment before the exit status can be read
                    code = self._proc.wait(timeout=2)
                except subprocess.TimeoutExpired:
                    code = None
                self._finalizer()
                raise CheckpointError(
                    f"{self.source}: the model sandbox died {what} ({self._why(code, e)})"
                ) from None
        if raw:
            return reply
        if not reply.get("ok"):
            error = str(reply.get("error") or "unknown error")[:500]
            if reply.get("unavailable"):
                self._finalizer()
                raise CheckpointError(
                    f"{self.source}: TorchScript and ONNX files run only in a sandbox, which this server "
                    f"cannot set up ({error}); the file was not loaded"
                )
            raise CheckpointError(
                f"{self.source} {error}" if error.startswith("is ") else f"{self.source}: {error}"
            )
        if answer:
            reply["array"] = _array(reply, body)
        return reply

    def _why(self, code: int | None, exc: Exception) -> str:
        if code is None:
            return f"protocol error: {exc}"
        if code < 0:
            sig = -code
            named = {
                signal.SIGKILL: "killed: out of memory or past its CPU-time limit",
                signal.SIGXCPU: "CPU-time limit reached",
                signal.SIGSYS: "a forbidden system call",
                signal.SIGSEGV: "segmentation fault",
            }
            return named.get(sig, f"signal {sig}")
        return f"exit status {code}"

    def _send(self, header: dict[str, Any], payload: bytes | memoryview, deadline: float) -> None:
        import json

        data = json.dumps(header).encode()
        self._write(proto._HEAD.pack(len(data), len(payload)) + data, deadline)
        if len(payload):
            self._write(payload, deadline)

    def _write(self, data: bytes | memoryview, deadline: float) -> None:
        view = memoryview(data).cast("B")
        while view:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            _, ready, _ = select.select([], [self._w], [], remaining)
            if ready:
                n = os.write(self._w, view[: 1 << 16])
                view = view[n:]

    def _recv(self, n: int, deadline: float) -> bytearray:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            ready, _, _ = select.select([self._r], [], [], min(remaining, 1.0))
            if not ready:
                continue
            k = os.readv(self._r, [view[got:]])
            if k == 0:
                raise proto.ProtocolError("the child closed its pipe")
            got += k
        return buf


def _array(reply: dict[str, Any], body: bytes | bytearray) -> np.ndarray:
    shape = reply.get("shape")
    if not isinstance(shape, list) or len(shape) > 8 or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise CheckpointError("the model sandbox answered with a malformed shape")
    if int(np.prod(shape, dtype=np.int64)) * 4 != len(body):
        raise CheckpointError("the model sandbox answered with a wrongly sized array")
    # A bytearray body is ours alone: wrap it writable (torch refuses read-only arrays) without a copy.
    buffer = body if isinstance(body, bytearray) else bytearray(body)
    return np.ndarray(tuple(shape), dtype=np.float32, buffer=buffer)


def landlock_abi() -> int:
    """The kernel's Landlock ABI (0 when unavailable); for diagnostics and tests."""
    return proto.landlock_abi()
