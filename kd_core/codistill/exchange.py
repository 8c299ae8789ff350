"""How codistillation groups swap stale parameter copies: the GroupExchange interface and a shared-directory one."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save_file

from kd_core.atomic import atomic_write
from kd_core.errors import CheckpointError


@runtime_checkable
class GroupExchange(Protocol):
    """Where each group publishes its parameters and reads the others' latest ones.

    Neither call ever waits for another group: a group that died or lags simply leaves its
    last published copy (or none) in place, and the readers carry on with it (Anil et al. 2018,
    section 3: the groups only need rarely refreshed, possibly stale checkpoints of each other).
    """

    def publish(self, group: int, step: int, state: Mapping[str, torch.Tensor]) -> int:
        """Store `state` as `group`'s newest copy, taken after `step` steps; return its version (1, 2, ...)."""
        ...

    def latest(self, group: int) -> tuple[int, dict[str, torch.Tensor]] | None:
        """The newest complete copy `group` published, as (version, state), or None if none yet."""
        ...

    def version(self, group: int) -> int:
        """The newest version `group` published (0: none); cheap, so callers can poll it."""
        ...


class FileExchange:
    """A GroupExchange over a shared directory: `group{g}.safetensors` plus `group{g}.version`.

    The state file carries its own version and step in its metadata, so a reader never pairs a
    state with the wrong version even if a publish lands between two reads. Only the group's own
    writer bumps its counter (one writer per group), so a plain file is enough for the counter;
    the Celery side may keep the counter in Redis behind the same two methods instead.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _state_path(self, group: int) -> Path:
        return self.root / f"group{int(group)}.safetensors"

    def _version_path(self, group: int) -> Path:
        return self.root / f"group{int(group)}.version"

    def version(self, group: int) -> int:
        """The newest published version of `group` (0 when nothing was published)."""
        try:
            text = self._version_path(group).read_text().strip()
        except FileNotFoundError:
            return 0
        return int(text) if re.fullmatch(r"\d+", text) else 0

    def publish(self, group: int, step: int, state: Mapping[str, torch.Tensor]) -> int:
        version = self.version(group) + 1
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
        meta = {"version": str(version), "step": str(int(step)), "group": str(int(group))}
        atomic_write(self._state_path(group), lambda tmp: save_file(tensors, tmp, metadata=meta))
        atomic_write(self._version_path(group), lambda tmp: Path(tmp).write_text(str(version)))
        return version

    def latest(self, group: int) -> tuple[int, dict[str, torch.Tensor]] | None:
        entry = self.latest_entry(group)
        return None if entry is None else (entry[0], entry[2])

    def latest_entry(self, group: int) -> tuple[int, int, dict[str, torch.Tensor]] | None:
        """Like `latest`, with the step the copy was taken at: (version, step, state)."""
        path = self._state_path(group)
        try:
            # One read, so the metadata and the tensors come from the same file even if a
            # publish replaces it meanwhile.
            data = path.read_bytes()
            header_len = int.from_bytes(data[:8], "little")
            header = json.loads(data[8 : 8 + header_len])
            state = load(data)
        except FileNotFoundError:
            return None
        except (SafetensorError, ValueError, OSError) as exc:
            raise CheckpointError(f"exchange copy of group {group} is unreadable: {exc}") from exc
        meta = header.get("__metadata__") or {}
        return int(meta.get("version", 0)), int(meta.get("step", -1)), state


class MemoryExchange:
    """A GroupExchange inside one process (threads, tests); copies are cloned in and out."""

    def __init__(self) -> None:
        self._entries: dict[int, tuple[int, int, dict[str, torch.Tensor]]] = {}

    def publish(self, group: int, step: int, state: Mapping[str, torch.Tensor]) -> int:
        version = self.version(group) + 1
        self._entries[int(group)] = (
            version,
            int(step),
            {k: v.detach().cpu().clone() for k, v in state.items()},
        )
        return version

    def latest(self, group: int) -> tuple[int, dict[str, torch.Tensor]] | None:
        entry = self._entries.get(int(group))
        return None if entry is None else (entry[0], {k: v.clone() for k, v in entry[2].items()})

    def version(self, group: int) -> int:
        entry = self._entries.get(int(group))
        return 0 if entry is None else entry[0]
