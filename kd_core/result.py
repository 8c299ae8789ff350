"""What one experiment produced: the result type every mode returns (no imports of its own, so no cycles)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn


@dataclass
class RunResult:
    """What one experiment produced: headline metrics, exported files, whether it was stopped early."""

    metrics: dict[str, Any]
    files: dict[str, Path | str] = field(default_factory=dict)
    stopped: bool = False
    model: nn.Module | None = None
