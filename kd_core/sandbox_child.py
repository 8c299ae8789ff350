"""The sandboxed child that loads and runs one untrusted model (see kd_core/sandbox.py for the design).

Run as `python -I kd_core/sandbox_child.py READ_FD WRITE_FD` by kd_core.sandbox, never imported for its
side effects: importing this module (the parent does, for the message framing) does nothing but define.
It imports only the standard library, numpy and torch (onnxruntime later, see below), never kd_core, so
nothing under the project directory is needed once the child has locked itself in.

Order matters: imports first, then the lock-down (`restrict`), and only then the first byte of the model.
"""

from __future__ import annotations

import ctypes
import errno
import io
import json
import os
import platform
import resource
import signal
import struct
import sys
from typing import Any

# ---------------------------------------------------------------- framing (shared with the parent)

# One message: <json length, payload length> as two little-endian uint32, the JSON header, the payload.
_HEAD = struct.Struct("<II")
MAX_HEADER_BYTES = 1 << 20


class ProtocolError(Exception):
    """The other side sent something that is not a well-formed message (or closed the pipe)."""


def send(fd: int, header: dict[str, Any], payload: bytes | memoryview = b"") -> None:
    data = json.dumps(header).encode()
    _write_all(fd, _HEAD.pack(len(data), len(payload)) + data)
    if len(payload):
        _write_all(fd, payload)


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data).cast("B")
    while view:
        n = os.write(fd, view[: 1 << 20])
        view = view[n:]


def read_exact(fd: int, n: int) -> bytearray:
    """Exactly n bytes (a writable buffer, so arrays made from it need no copy)."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = os.readv(fd, [view[got:]])
        if k == 0:
            raise ProtocolError("the pipe was closed")
        got += k
    return buf


def parse_head(raw: bytes | bytearray, max_payload: int) -> tuple[int, int]:
    hlen, plen = _HEAD.unpack(raw)
    if hlen > MAX_HEADER_BYTES or plen > max_payload:
        raise ProtocolError(f"message too large (header {hlen} B, payload {plen} B)")
    return hlen, plen


def parse_header(raw: bytes | bytearray) -> dict[str, Any]:
    try:
        header = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ProtocolError("malformed message header") from None
    if not isinstance(header, dict):
        raise ProtocolError("malformed message header")
    return header


HEAD_SIZE = _HEAD.size

# ---------------------------------------------------------------- Linux constants

_PR_SET_PDEATHSIG = 1
_PR_CAPBSET_DROP = 24
_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2

# Landlock (include/uapi/linux/landlock.h): syscalls 444/445/446 on every architecture we run on.
_SYS_LANDLOCK_CREATE_RULESET, _SYS_LANDLOCK_ADD_RULE, _SYS_LANDLOCK_RESTRICT_SELF = 444, 445, 446
_LANDLOCK_CREATE_RULESET_VERSION = 1
_LANDLOCK_RULE_PATH_BENEATH = 1
FS_EXECUTE, FS_WRITE_FILE, FS_READ_FILE, FS_READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
FS_REMOVE_DIR, FS_REMOVE_FILE, FS_MAKE_CHAR, FS_MAKE_DIR = 1 << 4, 1 << 5, 1 << 6, 1 << 7
FS_MAKE_REG, FS_MAKE_SOCK, FS_MAKE_FIFO, FS_MAKE_BLOCK = 1 << 8, 1 << 9, 1 << 10, 1 << 11
FS_MAKE_SYM, FS_REFER, FS_TRUNCATE, FS_IOCTL_DEV = 1 << 12, 1 << 13, 1 << 14, 1 << 15
NET_BIND_TCP, NET_CONNECT_TCP = 1 << 0, 1 << 1
SCOPE_ABSTRACT_UNIX_SOCKET, SCOPE_SIGNAL = 1 << 0, 1 << 1
# Rights that apply to a regular file (a rule on a file may hold only these).
_FILE_RIGHTS = FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | FS_TRUNCATE | FS_IOCTL_DEV


def _fs_rights(abi: int) -> int:
    """Every filesystem right this ABI knows: all are handled, so whatever no rule grants is denied."""
    rights = (1 << 13) - 1  # ABI 1: EXECUTE .. MAKE_SYM
    if abi >= 2:
        rights |= FS_REFER
    if abi >= 3:
        rights |= FS_TRUNCATE
    if abi >= 5:
        rights |= FS_IOCTL_DEV
    return rights


# seccomp BPF (linux/filter.h, linux/seccomp.h)
_BPF_LD_W_ABS, _BPF_JEQ, _BPF_JGE, _BPF_JSET, _BPF_RET = 0x20, 0x15, 0x35, 0x45, 0x06
_RET_ALLOW, _RET_ERRNO, _RET_KILL_PROCESS = 0x7FFF0000, 0x00050000, 0x80000000
_CLONE_THREAD = 0x00010000

# Per architecture: the audit arch value, then the syscall numbers the filter names.
_ARCHES: dict[str, dict[str, Any]] = {
    "x86_64": {
        "audit": 0xC000003E,
        "x32_bit": 0x40000000,
        "socket": 41,
        "clone": 56,
        "clone3": 435,
        "kill": 62,
        "tgkill": 234,
        "tkill": 200,
        "capset": 126,
        "deny": {
            "fork": 57,
            "vfork": 58,
            "execve": 59,
            "execveat": 322,
            "ptrace": 101,
            "process_vm_readv": 310,
            "process_vm_writev": 311,
            "mount": 165,
            "umount2": 166,
            "pivot_root": 155,
            "chroot": 161,
            "unshare": 272,
            "setns": 308,
            "keyctl": 250,
            "add_key": 248,
            "request_key": 249,
            "bpf": 321,
            "perf_event_open": 298,
            "userfaultfd": 323,
            "kexec_load": 246,
            "kexec_file_load": 320,
            "init_module": 175,
            "finit_module": 313,
            "delete_module": 176,
            "reboot": 169,
            "swapon": 167,
            "swapoff": 168,
            "open_by_handle_at": 304,
            "name_to_handle_at": 303,
            "io_uring_setup": 425,
            "io_uring_enter": 426,
            "io_uring_register": 427,
            "chmod": 90,
            "fchmod": 91,
            "fchmodat": 268,
            "fchmodat2": 452,
            "chown": 92,
            "fchown": 93,
            "lchown": 94,
            "fchownat": 260,
            "setxattr": 188,
            "lsetxattr": 189,
            "fsetxattr": 190,
            "removexattr": 197,
            "lremovexattr": 198,
            "fremovexattr": 199,
            "utime": 132,
            "utimes": 235,
            "utimensat": 280,
            "futimesat": 261,
            "mknod": 133,
            "mknodat": 259,
            "acct": 163,
            "settimeofday": 164,
            "clock_settime": 227,
            "personality": 135,
            "fanotify_init": 300,
            "open_tree": 428,
            "move_mount": 429,
            "fsopen": 430,
            "fsconfig": 431,
            "fsmount": 432,
            "fspick": 433,
            "mount_setattr": 442,
            "pidfd_getfd": 438,
            "kcmp": 312,
            "process_madvise": 440,
            "quotactl": 179,
            "syslog": 103,
            "iopl": 172,
            "ioperm": 173,
            "uselib": 134,
            "socketcall": -1,
        },
    },
    "aarch64": {
        "audit": 0xC00000B7,
        "x32_bit": None,
        "socket": 198,
        "clone": 220,
        "clone3": 435,
        "kill": 129,
        "tgkill": 131,
        "tkill": 130,
        "capset": 91,
        "deny": {
            "execve": 221,
            "execveat": 281,
            "ptrace": 117,
            "process_vm_readv": 270,
            "process_vm_writev": 271,
            "mount": 40,
            "umount2": 39,
            "pivot_root": 41,
            "chroot": 51,
            "unshare": 97,
            "setns": 268,
            "keyctl": 219,
            "add_key": 217,
            "request_key": 218,
            "bpf": 280,
            "perf_event_open": 241,
            "userfaultfd": 282,
            "kexec_load": 104,
            "kexec_file_load": 294,
            "init_module": 105,
            "finit_module": 273,
            "delete_module": 106,
            "reboot": 142,
            "swapon": 224,
            "swapoff": 225,
            "open_by_handle_at": 265,
            "name_to_handle_at": 264,
            "io_uring_setup": 425,
            "io_uring_enter": 426,
            "io_uring_register": 427,
            "fchmod": 52,
            "fchmodat": 53,
            "fchmodat2": 452,
            "fchown": 55,
            "fchownat": 54,
            "setxattr": 5,
            "lsetxattr": 6,
            "fsetxattr": 7,
            "removexattr": 14,
            "lremovexattr": 15,
            "fremovexattr": 16,
            "utimensat": 88,
            "mknodat": 33,
            "acct": 89,
            "settimeofday": 170,
            "clock_settime": 112,
            "personality": 92,
            "fanotify_init": 262,
            "open_tree": 428,
            "move_mount": 429,
            "fsopen": 430,
            "fsconfig": 431,
            "fsmount": 432,
            "fspick": 433,
            "mount_setattr": 442,
            "pidfd_getfd": 438,
            "kcmp": 272,
            "process_madvise": 440,
            "quotactl": 60,
            "syslog": 116,
        },
    },
}

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.prctl.restype = ctypes.c_int
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]


class SandboxUnavailable(Exception):
    """This machine cannot lock the child in; nothing untrusted may be loaded then."""


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise SandboxUnavailable(f"{what} failed: {os.strerror(err)} (errno {err})")
    return result


def landlock_abi() -> int:
    """The kernel's Landlock ABI version, or 0 when Landlock is missing or disabled."""
    r = _libc.syscall(
        _SYS_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0), _LANDLOCK_CREATE_RULESET_VERSION
    )
    return int(r) if r > 0 else 0


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("fs", ctypes.c_uint64), ("net", ctypes.c_uint64), ("scoped", ctypes.c_uint64)]


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def _landlock(read_only: list[str], writable: list[str]) -> int:
    abi = landlock_abi()
    if abi < 1:
        raise SandboxUnavailable(
            "the kernel does not offer Landlock (needs Linux 5.13+ with landlock in lsm=)"
        )
    fs = _fs_rights(abi)
    attr = _RulesetAttr(fs, NET_BIND_TCP | NET_CONNECT_TCP if abi >= 4 else 0, 0)
    if abi >= 6:
        attr.scoped = SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL
    size = 8 if abi < 4 else 16 if abi < 6 else 24  # older kernels refuse a struct larger than they know
    ruleset = _check(
        _libc.syscall(_SYS_LANDLOCK_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size), 0),
        "landlock_create_ruleset",
    )
    read = FS_EXECUTE | FS_READ_FILE | FS_READ_DIR
    try:
        for paths, rights in ((read_only, read), (writable, fs)):
            for path in paths:
                try:
                    fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
                except OSError:
                    continue  # a path this machine lacks needs no rule
                try:
                    allowed = rights & fs
                    if not os.path.isdir(path):
                        allowed &= _FILE_RIGHTS
                    rule = _PathBeneath(allowed, fd)
                    _check(
                        _libc.syscall(
                            _SYS_LANDLOCK_ADD_RULE,
                            ruleset,
                            _LANDLOCK_RULE_PATH_BENEATH,
                            ctypes.byref(rule),
                            0,
                        ),
                        f"landlock_add_rule({path})",
                    )
                finally:
                    os.close(fd)
        _check(_libc.syscall(_SYS_LANDLOCK_RESTRICT_SELF, ruleset, 0), "landlock_restrict_self")
    finally:
        os.close(ruleset)
    return abi


def _seccomp() -> None:
    """Install the syscall filter: no new programs, processes, sockets, mounts, tracing or metadata changes."""
    arch = _ARCHES.get(platform.machine())
    if arch is None:
        raise SandboxUnavailable(f"no seccomp filter for the {platform.machine()} architecture")
    pid = os.getpid()
    prog: list[tuple[int, int, int, int]] = []
    labels: dict[str, int] = {}
    fixups: list[tuple[int, str | None, str | None]] = []

    def op(code: int, k: int, jt: str | None = None, jf: str | None = None) -> None:
        if jt or jf:
            fixups.append((len(prog), jt, jf))
        prog.append((code, 0, 0, k & 0xFFFFFFFF))

    def label(name: str) -> None:
        labels[name] = len(prog)

    op(_BPF_LD_W_ABS, 4)  # seccomp_data.arch
    op(_BPF_JEQ, arch["audit"], None, "kill")  # a foreign ABI (i386 on x86_64) is killed outright
    op(_BPF_LD_W_ABS, 0)  # seccomp_data.nr
    if arch["x32_bit"]:
        op(_BPF_JGE, arch["x32_bit"], "kill", None)
    for nr in arch["deny"].values():
        if nr >= 0:
            op(_BPF_JEQ, nr, "eperm", None)
    op(_BPF_JEQ, arch["socket"], "eperm", None)
    op(_BPF_JEQ, arch["clone3"], "enosys", None)  # glibc falls back to clone, whose flags we can read
    op(_BPF_JEQ, arch["clone"], "clone", None)
    op(_BPF_JEQ, arch["kill"], "own_pid", None)
    op(_BPF_JEQ, arch["tgkill"], "own_pid", None)
    op(_BPF_JEQ, arch["tkill"], "eperm", None)
    op(_BPF_RET, _RET_ALLOW)
    label("clone")
    op(_BPF_LD_W_ABS, 16)  # args[0] low word: the clone flags
    op(_BPF_JSET, _CLONE_THREAD, "allow", "eperm")  # threads yes, new processes no
    label("own_pid")
    op(_BPF_LD_W_ABS, 20)  # args[0] high word: zero for a positive pid
    op(_BPF_JEQ, 0, None, "eperm")
    op(_BPF_LD_W_ABS, 16)
    op(_BPF_JEQ, pid, "allow", "eperm")  # signals to itself only
    label("allow")
    op(_BPF_RET, _RET_ALLOW)
    label("eperm")
    op(_BPF_RET, _RET_ERRNO | errno.EPERM)
    label("enosys")
    op(_BPF_RET, _RET_ERRNO | errno.ENOSYS)
    label("kill")
    op(_BPF_RET, _RET_KILL_PROCESS)
    for index, jt, jf in fixups:
        code, _, _, k = prog[index]
        t = labels[jt] - index - 1 if jt else 0
        f = labels[jf] - index - 1 if jf else 0
        assert 0 <= t < 256 and 0 <= f < 256
        prog[index] = (code, t, f, k)

    class SockFilter(ctypes.Structure):
        _fields_ = [
            ("code", ctypes.c_uint16),
            ("jt", ctypes.c_uint8),
            ("jf", ctypes.c_uint8),
            ("k", ctypes.c_uint32),
        ]

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(SockFilter))]

    filters = (SockFilter * len(prog))(*[SockFilter(*ins) for ins in prog])
    fprog = SockFprog(len(prog), filters)
    _check(_libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.addressof(fprog), 0, 0), "seccomp")


def _drop_capabilities() -> None:
    """Running as root (a container's default) still leaves the caps; give all of them up."""
    for cap in range(64):
        if _libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) < 0 and ctypes.get_errno() == errno.EINVAL:
            break  # past the last capability this kernel knows
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    data = (ctypes.c_uint32 * 6)()  # effective/permitted/inheritable, twice (64 bits), all zero
    arch = _ARCHES.get(platform.machine())
    if arch is not None:
        _check(_libc.syscall(arch["capset"], header, data), "capset")


def readable_paths() -> list[str]:
    """What Python, numpy, torch and onnxruntime need to read: the interpreter's prefixes and system libraries.

    The prefixes are the virtual environment (sys.prefix) and the base interpreter, never their parents:
    a project that keeps its .venv inside its own folder stays unreadable.
    """
    prefixes = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    for mod in ("numpy", "torch"):
        module = sys.modules.get(mod)
        if module is not None and getattr(module, "__file__", None):
            prefixes.add(os.path.dirname(os.path.dirname(os.path.realpath(module.__file__))))
    system = [
        "/lib",
        "/lib64",
        "/usr/lib",
        "/usr/lib64",
        "/usr/local/lib",
        "/etc/ld.so.cache",
        "/dev/null",
        "/dev/zero",
        "/dev/urandom",
        "/dev/random",
        "/proc/self",
        "/proc/cpuinfo",
        "/proc/meminfo",
        "/proc/stat",
        "/sys/devices/system/cpu",
        "/sys/fs/cgroup",
    ]
    paths = sorted({os.path.realpath(p) for p in prefixes}) + system
    if any(os.path.realpath(p) == "/" for p in paths):
        raise SandboxUnavailable("the interpreter lives at /, which cannot be allowed read-only in part")
    return paths


def _vm_kib(field: str) -> int:
    """This process's /proc/self/status `field` (VmSize, VmData) in KiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise SandboxUnavailable(f"/proc/self/status has no {field}")


def restrict(limits: dict[str, Any], work_dir: str) -> dict[str, Any]:
    """Lock this process in; raises SandboxUnavailable when any layer cannot be put in place."""
    threads = len(os.listdir("/proc/self/task"))
    if threads != 1:  # Landlock and prctl seccomp bind the calling thread (and its future children) only
        raise SandboxUnavailable(f"{threads} threads exist before the lock-down; expected 1")
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the size limit fails instead of killing
    mem = int(limits["memory_bytes"])
    # The limit is what the model may use ON TOP of the interpreter as imported: torch's CUDA builds (2.14)
    # map about 3 GB of address space for their libraries alone, the CPU build under 1 GB, so an absolute
    # RLIMIT_AS would mean a different allowance per build. The baseline is read before the model arrives.
    as_base, data_base = _vm_kib("VmSize") << 10, _vm_kib("VmData") << 10
    for res, value in (
        (resource.RLIMIT_AS, as_base + mem),
        (resource.RLIMIT_DATA, data_base + mem),
        (resource.RLIMIT_CPU, int(limits["cpu_s"])),  # SIGXCPU at the soft limit, SIGKILL 1 s later
        (resource.RLIMIT_FSIZE, int(limits["file_bytes"])),
        (resource.RLIMIT_NOFILE, int(limits["open_files"])),
        (resource.RLIMIT_CORE, 0),
        (resource.RLIMIT_MEMLOCK, 0),
    ):
        resource.setrlimit(res, (value, value + 1 if res == resource.RLIMIT_CPU else value))
    _drop_capabilities()
    _check(_libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(NO_NEW_PRIVS)")
    abi = _landlock(readable_paths(), [work_dir])
    _seccomp()
    return {"landlock_abi": abi}


# ---------------------------------------------------------------- TorchScript op allowlist

# prim:: node kinds a plain network needs: constants, attribute access, control flow, containers, casts.
# prim::Print (output to the server), prim::fork/wait (tasks), prim::CallMethod/CallFunction left after
# inlining (interfaces, custom classes) and every kind not named here are refused.
PRIM_ALLOWED = frozenset(
    "prim::" + name
    for name in (
        "Constant GetAttr SetAttr If Loop ListConstruct ListUnpack TupleConstruct TupleUnpack TupleIndex "
        "TupleSlice DictConstruct DictIndex ListIndex CreateObject RaiseException Uninitialized "
        "unchecked_cast unchecked_unwrap_optional NumToTensor ImplicitTensorToNum device dtype layout "
        "requires_grad is_cuda is_cpu is_mkldnn is_sparse is_quantized is_meta is_nested data shape min "
        "max abs isinstance EnumName EnumValue StringIndex ConstantChunk AutogradAdd AutogradZero "
        "TypeCheck RequiresGradCheck name index id rangelist"
    ).split()
)
# aten:: ops with file, storage, process or other I/O semantics. Everything else in aten:: is a tensor,
# number, string or container operation on memory the module already holds.
ATEN_REFUSED = frozenset(
    {
        "aten::from_file",  # reads a file; with shared=True maps it writable
        "aten::save",  # writes a file
        "aten::_print",  # writes to the process's output
        "aten::set",
        "aten::set_",  # point a tensor at another storage
        "aten::_nested_view_from_buffer",
        "aten::_nested_view_from_buffer_copy",
        "aten::_nested_tensor_storage_offsets",
        "aten::_has_same_storage_numel",
        "aten::storage_offset",
        "aten::sym_storage_offset",
        "aten::_pin_memory",
        "aten::pin_memory",
        "aten::_share_memory_",
        "aten::share_memory_",
    }
)


def op_refusal(kind: str) -> str | None:
    """Why node kind `kind` may not run, or None when it is allowed."""
    namespace = kind.split("::", 1)[0]
    if namespace == "prim":
        return None if kind in PRIM_ALLOWED else "it is not a plain tensor or control-flow operation"
    if namespace == "aten":
        if kind in ATEN_REFUSED or "storage" in kind or "file" in kind:
            return "it reads or writes files, storage or process state"
        return None
    return f"operations of namespace '{namespace}' are not allowed"


def check_torchscript_ops(module: Any) -> None:
    """Walk every inlined graph of every method of every submodule; raise ValueError on the first refused op."""
    import torch

    seen_types: set[str] = set()
    for sub in module.modules():
        cls = sub._c._type().qualified_name() if hasattr(sub, "_c") else type(sub).__name__
        if cls in seen_types:
            continue
        seen_types.add(cls)
        if not hasattr(sub, "_c"):
            raise ValueError(f"submodule of type {cls} is not TorchScript")
        for name in sub._c._method_names():
            graph = sub._c._get_method(name).graph.copy()
            torch._C._jit_pass_inline(graph)
            stack = [graph.block()]
            while stack:
                block = stack.pop()
                for node in block.nodes():
                    kind = node.kind()
                    why = op_refusal(kind)
                    if why:
                        raise ValueError(f"the model uses {kind} (in {cls}.{name}), which is refused: {why}")
                    stack.extend(node.blocks())


def check_exported_program_ops(program: Any) -> None:
    """Every node of every graph of a torch.export program must be an allowed aten op (or operator.getitem
    and plain arithmetic on sizes); raise ValueError on the first other one, before any forward."""
    import operator

    import torch

    names = "getitem add sub mul floordiv truediv mod neg eq ne lt le gt ge"
    allowed_builtins = {getattr(operator, n) for n in names.split()}
    for name, graph_module in program.graph_module.named_modules():
        graph = getattr(graph_module, "graph", None)
        if graph is None:
            continue
        for node in graph.nodes:
            if node.op in ("placeholder", "output", "get_attr"):
                continue
            if node.op != "call_function":
                what = str(node.target)[:80]
                raise ValueError(f"the program has a {node.op} node ({what}), which is refused")
            target = node.target
            if target in allowed_builtins:
                continue
            if not isinstance(target, torch._ops.OpOverload):
                what = str(target)[:80]
                raise ValueError(f"the program calls {what}, which is refused: not an aten operation")
            kind = target._schema.name
            namespace = kind.split("::", 1)[0]
            # prim:: ops are TorchScript's; an exported program has none (op_refusal refuses other namespaces).
            why = "not an aten operation" if namespace == "prim" else op_refusal(kind)
            if why:
                where = name or "the graph"
                raise ValueError(f"the program uses {kind} (in {where}), which is refused: {why}")


# ---------------------------------------------------------------- the served model


class _Served:
    def __init__(self) -> None:
        self.kind = ""
        self.module: Any = None
        self.session: Any = None
        self.onnx_input = ""
        self.onnx_output = ""
        self.onnx_dtype: Any = None

    def load(self, kind: str, data: bytes | bytearray) -> dict[str, Any]:
        import torch

        self.kind = kind
        if kind == "torchscript":
            extra = {"kd_studio.json": ""}
            try:
                module = torch.jit.load(io.BytesIO(data), map_location="cpu", _extra_files=extra)
            except Exception as e:  # noqa: BLE001 - any failure to parse is the same refusal
                raise ValueError(f"is not a readable TorchScript file: {_short(e)}") from None
            check_torchscript_ops(module)
            module.eval()
            for p in module.parameters():
                p.requires_grad_(False)
            self.module = module
            meta = extra["kd_studio.json"]
            if isinstance(meta, bytes):
                meta = meta.decode("utf-8", "replace")
            return {"meta": meta[:1_000_000], "num_params": int(sum(p.numel() for p in module.parameters()))}
        if kind == "exported_program":
            extra = {"kd_studio.json": ""}
            try:
                program = torch.export.load(io.BytesIO(data), extra_files=extra)
            except Exception as e:  # noqa: BLE001 - any failure to parse is the same refusal
                raise ValueError(f"is not a readable torch.export program (.pt2): {_short(e)}") from None
            check_exported_program_ops(program)
            self.module = program.module()
            num_params = sum(int(p.numel()) for p in program.parameters())
            meta = extra["kd_studio.json"]
            if isinstance(meta, bytes):
                meta = meta.decode("utf-8", "replace")
            return {"meta": str(meta)[:1_000_000], "num_params": num_params}
        if kind == "onnx":
            import numpy as np
            import onnxruntime as ort  # imported after the lock-down: its import starts a thread

            options = ort.SessionOptions()
            options.log_severity_level = 3
            options.intra_op_num_threads = torch.get_num_threads()
            options.inter_op_num_threads = 1
            try:
                session = ort.InferenceSession(bytes(data), options, providers=["CPUExecutionProvider"])
            except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types
                raise ValueError(f"is not a runnable ONNX model: {_short(e)}") from None
            inputs, outputs = session.get_inputs(), session.get_outputs()
            names = [o.name for o in outputs]
            self.session = session
            self.onnx_output = "logits" if "logits" in names else names[0]
            info = {
                "inputs": [{"name": i.name, "type": i.type, "shape": _dims(i.shape)} for i in inputs],
                "output": {
                    "name": self.onnx_output,
                    "shape": _dims(next(o.shape for o in outputs if o.name == self.onnx_output)),
                },
            }
            if len(inputs) == 1:
                self.onnx_input = inputs[0].name
                self.onnx_dtype = {
                    "tensor(float)": np.float32,
                    "tensor(double)": np.float64,
                    "tensor(float16)": np.float16,
                }.get(inputs[0].type)
            return info
        raise ValueError(f"unknown model kind {kind!r}")

    def forward(self, arr: Any) -> Any:
        import numpy as np
        import torch

        if self.kind in ("torchscript", "exported_program"):
            with torch.no_grad():
                out = self.module(torch.from_numpy(arr))
            if isinstance(out, list | tuple) and out:
                out = out[0]
            elif isinstance(out, dict) and "logits" in out:
                out = out["logits"]
            if not isinstance(out, torch.Tensor):
                raise ValueError(
                    f"the teacher must return a tensor of logits; it returned {type(out).__name__}"
                )
            if out.is_complex():
                raise ValueError("the teacher returned complex logits")
            return out.detach().to("cpu", torch.float32).contiguous().numpy()
        if self.onnx_dtype is None:
            raise ValueError("the ONNX teacher must take one float input")
        (out,) = self.session.run(
            [self.onnx_output], {self.onnx_input: arr.astype(self.onnx_dtype, copy=False)}
        )
        return np.ascontiguousarray(np.asarray(out, dtype=np.float32))


def _dims(shape: Any) -> list[Any]:
    return [d if isinstance(d, int) else None for d in (shape or [])]


def _short(e: BaseException, limit: int = 300) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def serve(rfd: int, wfd: int) -> None:
    """Answer the parent's messages until it says close or the pipe ends."""
    import numpy as np

    served = _Served()
    while True:
        try:
            hlen, plen = parse_head(read_exact(rfd, HEAD_SIZE), 1 << 40)
            header = parse_header(read_exact(rfd, hlen))
            payload = read_exact(rfd, plen) if plen else bytearray()
        except ProtocolError:
            return
        what = header.get("op")
        try:
            if what == "close":
                send(wfd, {"ok": True})
                return
            if what == "load":
                send(wfd, {"ok": True, **served.load(str(header.get("kind")), payload)})
            elif what == "forward":
                shape = [int(d) for d in header["shape"]]
                arr = np.frombuffer(payload, dtype=np.float32).reshape(shape)
                out = served.forward(arr)
                send(wfd, {"ok": True, "shape": list(out.shape)}, memoryview(out.reshape(-1).view(np.uint8)))
            elif what == "probe_limits":  # used by the tests: what the lock-down really refuses
                send(wfd, {"ok": True, **_probe_limits(header)})
            else:
                send(wfd, {"ok": False, "error": f"unknown request {what!r}"})
        except MemoryError:
            send(wfd, {"ok": False, "error": "the teacher ran out of its memory limit"})
        except (ValueError, RuntimeError, TypeError, IndexError, KeyError, OSError) as e:
            send(wfd, {"ok": False, "error": _short(e)})
        except Exception as e:  # noqa: BLE001 - onnxruntime and TorchScript raise their own types
            send(wfd, {"ok": False, "error": f"{type(e).__name__}: {_short(e)}"})


def _probe_limits(header: dict[str, Any]) -> dict[str, Any]:
    """Try what an escaping model would (read, write, connect, exec, spin, allocate); report each result."""
    action, arg = header.get("action"), header.get("arg")
    if action == "read":
        with open(arg, "rb") as f:
            return {"result": f.read(64).hex()}
    if action == "write":
        with open(arg, "wb") as f:
            f.write(b"x")
        return {"result": "written"}
    if action == "env":
        return {"result": dict(os.environ)}
    if action == "socket":
        import socket

        family = socket.AF_UNIX if arg == "unix" else socket.AF_INET
        s = socket.socket(family, socket.SOCK_STREAM)
        s.close()
        return {"result": "socket opened"}
    if action == "exec":
        os.execv("/bin/true", ["/bin/true"])
    if action == "fork":
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        return {"result": "forked"}
    if action == "spin":
        while True:
            pass
    if action == "allocate":
        return {"result": len(bytearray(int(arg)))}
    if action == "listdir":
        return {"result": sorted(os.listdir(arg))[:50]}
    raise ValueError(f"unknown probe {action!r}")


def main(argv: list[str]) -> int:
    rfd, wfd = int(argv[1]), int(argv[2])
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # the parent gone, nothing is left running
    # numpy and torch are imported before the lock-down (they read many files on import and start no
    # threads with the *_NUM_THREADS variables the parent sets); onnxruntime waits (see _Served.load).
    import numpy  # noqa: F401
    import torch

    try:
        hlen, plen = parse_head(read_exact(rfd, HEAD_SIZE), 0)
        setup = parse_header(read_exact(rfd, hlen))
    except ProtocolError:
        return 2
    try:
        info = restrict(setup["limits"], os.getcwd())
    except SandboxUnavailable as e:
        send(wfd, {"ok": False, "unavailable": True, "error": str(e)})
        return 3
    torch.set_num_threads(int(setup["limits"]["threads"]))  # after: new threads inherit the lock-down
    send(wfd, {"ok": True, **info})
    serve(rfd, wfd)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
