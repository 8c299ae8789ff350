"""The model sandbox child really is locked in: files, network, processes, environment, and its limits."""

import gc
import io
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from kd_core.checkpoints import load_teacher
from kd_core.errors import CheckpointError
from kd_core.sandbox import SandboxedModel, SandboxLimits, landlock_abi
from kd_core.sandbox_child import op_refusal

PROJECT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(landlock_abi() < 1, reason="this kernel has no Landlock: the sandbox refuses")


def _script_bytes(module: torch.nn.Module) -> bytes:
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(module), buffer)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def linear_bytes() -> bytes:
    torch.manual_seed(0)
    return _script_bytes(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)))


@pytest.fixture
def box(linear_bytes):
    with SandboxedModel(linear_bytes, "torchscript", source="m.ts") as sandbox:
        yield sandbox


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it is gone for our purposes once reaped or marked Z.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def test_forward_matches_in_process(linear_bytes, box):
    module = torch.jit.load(io.BytesIO(linear_bytes))
    x = np.random.default_rng(0).random((5, 4), dtype=np.float32)
    np.testing.assert_allclose(box.forward(x), module(torch.from_numpy(x)).detach().numpy(), rtol=1e-6)
    assert box.landlock_abi >= 1 and box.info["num_params"] == 4 * 8 + 8 + 8 * 3 + 3


def test_cannot_read_outside_its_allowlist(tmp_path, box):
    secret = tmp_path / "secret.txt"
    secret.write_text("SECRET_KEY=abc")
    for path in (secret, PROJECT / "pyproject.toml", "/etc/passwd"):
        answer = box.probe_limits("read", str(path))
        assert not answer["ok"] and "Permission denied" in answer["error"], (path, answer)
    assert not box.probe_limits("listdir", str(PROJECT))["ok"]
    # What it needs stays readable: the interpreter's own files.
    assert box.probe_limits("read", "/dev/urandom")["ok"]


def test_cannot_write_outside_its_temp_dir(tmp_path, box):
    target = tmp_path / "written.txt"
    answer = box.probe_limits("write", str(target))
    assert not answer["ok"] and "Permission denied" in answer["error"]
    assert not target.exists()
    assert not box.probe_limits("write", str(PROJECT / "var" / "sandbox-was-here"))["ok"]
    assert box.probe_limits("write", "scratch.bin")["ok"]  # its own cwd
    assert (Path(box.work_dir) / "scratch.bin").exists()
    work_dir = box.work_dir
    box.close()
    assert not Path(work_dir).exists()


@pytest.mark.parametrize("family", ["inet", "unix"])
def test_cannot_open_a_socket(box, family):
    answer = box.probe_limits("socket", family)
    assert not answer["ok"] and "not permitted" in answer["error"]


@pytest.mark.parametrize("action", ["exec", "fork"])
def test_cannot_start_programs_or_processes(box, action):
    answer = box.probe_limits(action)
    assert not answer["ok"] and "not permitted" in answer["error"]


def test_sees_an_empty_environment(box, monkeypatch):
    assert os.environ  # the parent has plenty (PATH, HOME, maybe secrets)
    env = box.probe_limits("env")["result"]
    assert set(env) <= {"OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "LC_CTYPE"}, env


def test_wall_time_limit_kills_the_child_and_the_parent_goes_on(linear_bytes):
    sandbox = SandboxedModel(linear_bytes, "torchscript", source="m.ts")
    pid = sandbox.pid
    start = time.monotonic()
    with pytest.raises(CheckpointError, match="longer than 1 s"):
        sandbox.probe_limits("spin", wall_s=1.0)
    assert time.monotonic() - start < 5
    assert not _alive(pid) and not sandbox.alive
    with pytest.raises(CheckpointError, match="closed"):
        sandbox.forward(np.zeros((1, 4), np.float32))


def test_cpu_time_limit_kills_the_child(linear_bytes):
    sandbox = SandboxedModel(linear_bytes, "torchscript", source="m.ts", limits=SandboxLimits(cpu_s=2))
    with pytest.raises(CheckpointError, match="CPU-time limit"):
        sandbox.probe_limits("spin", wall_s=30.0)
    assert not sandbox.alive


def test_memory_limit_refuses_a_large_allocation(linear_bytes):
    with SandboxedModel(
        linear_bytes, "torchscript", source="m.ts", limits=SandboxLimits(memory_mb=1024)
    ) as box:
        answer = box.probe_limits("allocate", 8 << 30)
        assert not answer["ok"] and "memory limit" in answer["error"]
        assert box.forward(np.zeros((2, 4), np.float32)).shape == (2, 3)  # still serving


class Huge(torch.nn.Module):
    def forward(self, x):
        return torch.ones(x.shape[0], 1 << 34) @ torch.ones(1 << 34, 2)


def test_a_forward_over_the_memory_limit_is_an_error_not_a_crash_of_the_parent():
    with SandboxedModel(_script_bytes(Huge()), "torchscript", source="huge.ts") as box:
        with pytest.raises(CheckpointError, match="huge.ts"):
            box.forward(np.zeros((1, 4), np.float32))


def test_closing_or_dropping_a_teacher_ends_its_child(tmp_path, linear_bytes):
    path = tmp_path / "m.ts"
    path.write_bytes(linear_bytes)
    with load_teacher(path, input_shape=(4,)) as teacher:
        pid = teacher._sandbox.pid
        assert teacher.num_classes == 3 and _alive(pid)
    assert not _alive(pid)
    teacher = load_teacher(path, input_shape=(4,))
    pid, work_dir = teacher._sandbox.pid, teacher._sandbox.work_dir
    del teacher
    gc.collect()
    assert not _alive(pid) and not Path(work_dir).exists()


def test_op_allowlist_rules():
    assert op_refusal("aten::linear") is None and op_refusal("prim::If") is None
    for kind in (
        "aten::from_file",
        "aten::save",
        "aten::set_",
        "prim::Print",
        "prim::fork",
        "quantized::add",
    ):
        assert op_refusal(kind), kind
