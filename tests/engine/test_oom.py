"""Out of memory inside a real training step: a failed run whose message says what to change, never a dead process."""

import dataclasses
import gc
import weakref

import pytest
import torch
from torch import nn

from kd_core.config import parse_config
from kd_core.data import load_dataset
from kd_core.errors import KDError, OutOfMemory, TrainingError
from kd_core.models import build_model
from kd_core.sinks import ListSink
from kd_core.trainer import train_model

# What the CUDA caching allocator says when it gives up (its exception type, raised the way it raises it).
CUDA_MESSAGE = (
    "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.10 GiB of which "
    "1.19 GiB is free. Of the allocated memory 75.50 GiB is allocated by PyTorch"
)


class RunsOutOfMemory(nn.Module):
    """A real model that runs out of memory at its `after + 1`-th forward in training (or in evaluation).

    "cuda": raises torch.OutOfMemoryError as the CUDA allocator does; "cpu": asks the CPU allocator for
    1 PiB, which it refuses for real (nothing is touched).
    """

    def __init__(self, inner: nn.Module, *, after: int, how: str = "cuda", in_eval: bool = False) -> None:
        super().__init__()
        self.inner, self.after, self.how, self.in_eval = inner, after, how, in_eval
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training != self.in_eval:
            self.calls += 1
            if self.calls > self.after:
                if self.how == "cuda":
                    raise torch.OutOfMemoryError(CUDA_MESSAGE)
                torch.empty(2**50, dtype=torch.uint8)
        return self.inner(x)


@pytest.fixture(scope="module")
def digits():
    ds = load_dataset("digits")
    return dataclasses.replace(ds, x_train=ds.x_train[:256], y_train=ds.y_train[:256])


def _model(ds):
    torch.manual_seed(0)
    return build_model({"arch": "mlp", "hidden": [16]}, ds.input_shape, ds.num_classes, ds.preprocessing)


def _cfg(**kw):
    return parse_config(
        {"dataset": "digits", "epochs": 3, "batch_size": 64, "lr": 0.01, "log_every": 2, **kw}
    )


def test_a_cuda_out_of_memory_error_in_a_step_fails_the_run_with_advice(digits):
    model = RunsOutOfMemory(_model(digits), after=2)
    sink = ListSink()
    with pytest.raises(OutOfMemory) as info:
        train_model(model, digits, _cfg(), sink=sink, device="cpu")
    message = str(info.value)
    assert isinstance(info.value, TrainingError) and isinstance(info.value, KDError)  # a job failure in words
    assert "ran out at training step 3 with batch_size 64" in message
    assert "try batch_size 32 or smaller" in message and "a smaller model" in message
    assert '(PyTorch: "CUDA out of memory. Tried to allocate 2.00 GiB.")' in message  # what it asked for
    assert [s for s, _ in sink.series("train/loss")] == [2]  # it trained until then


def test_the_cpu_allocators_refusal_is_the_same_kind_of_failure(digits):
    model = RunsOutOfMemory(_model(digits), after=4, how="cpu")
    with pytest.raises(OutOfMemory) as info:
        train_model(model, digits, _cfg(batch_size=33, precision="fp32"), sink=ListSink(), device="cpu")
    message = str(info.value)
    assert message.startswith("the CPU's memory ran out at training step 5 with batch_size 33")
    assert "batch_size 16 or smaller" in message and "precision 'bf16'" in message
    assert "DefaultCPUAllocator: can't allocate memory" in message


def test_running_out_while_evaluating_does_not_blame_the_batch_size(digits):
    model = RunsOutOfMemory(_model(digits), after=0, in_eval=True)
    with pytest.raises(OutOfMemory) as info:
        train_model(model, digits, _cfg(), sink=ListSink(), device="cpu")
    message = str(info.value)
    assert "ran out at the evaluation after step 4" in message  # 256 samples / 64 = 4 steps per epoch
    assert "batch_size" not in message and "a smaller model" in message


@pytest.mark.parametrize("in_eval", [False, True])
def test_a_failed_run_gives_its_memory_back_and_the_process_trains_on(digits, in_eval):
    """Without the garbage collector: the error holds no reference to the run (weights, optimizer, batches)."""
    model = RunsOutOfMemory(_model(digits), after=1, in_eval=in_eval)
    weights = weakref.ref(model.inner.classifier.weight)
    gc.disable()
    try:
        with pytest.raises(OutOfMemory) as info:
            train_model(model, digits, _cfg(), sink=ListSink(), device="cpu")
        assert info.value.__cause__ is None and info.value.__context__ is None
        del model, info
        assert weights() is None, gc.get_referrers(weights())
    finally:
        gc.enable()
    out = train_model(_model(digits), digits, _cfg(), sink=ListSink(), device="cpu")
    assert out.steps == 12 and not out.stopped


def test_other_runtime_errors_are_not_mistaken_for_memory(digits):
    class Broken(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (64x3 and 5x16)")

    with pytest.raises(RuntimeError, match="shapes cannot be multiplied") as info:
        train_model(Broken(_model(digits)), digits, _cfg(), sink=ListSink(), device="cpu")
    assert not isinstance(info.value, OutOfMemory)
