"""Static checks of untrusted model files that run before any parser or loader touches them."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

from kd_core.errors import CheckpointError

# A torch.save archive stores its tensors uncompressed, so its inflated size is its file size; this cap
# only bounds what a hand-made archive may claim.
MAX_INFLATED_BYTES = 16 * 1024**3
MAX_ZIP_MEMBERS = 100_000
# Protobuf nesting deeper than this is no model anyone exported (ONNX's own checker stops at 100).
MAX_ONNX_DEPTH = 200


def check_torch_zip(path: str | Path, source: str, *, max_inflated: int = MAX_INFLATED_BYTES) -> None:
    """Refuse a `.pt`/`.pth` whose members are compressed or would inflate past `max_inflated` bytes.

    torch.load inflates deflated members in memory: a 262 KB file can become a 256 MiB tensor inside the
    request. torch.save never compresses, so a compressed member is refused outright, before torch.load.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except zipfile.BadZipFile:
        raise CheckpointError(
            f"{source} is not a zip archive as torch.save has written since PyTorch 1.6; re-save it with a "
            "current PyTorch (torch.save(model.state_dict(), path)) or use safetensors"
        ) from None
    except OSError as e:
        raise CheckpointError(f"{source} cannot be read: {e.strerror or e}") from None
    if len(members) > MAX_ZIP_MEMBERS:
        raise CheckpointError(f"{source} holds {len(members)} archive members; at most {MAX_ZIP_MEMBERS}")
    total = 0
    for member in members:
        if member.compress_type != zipfile.ZIP_STORED or member.compress_size != member.file_size:
            raise CheckpointError(
                f"{source}: member {member.filename[:80]!r} is compressed; torch.save never compresses, "
                "so the file was not loaded"
            )
        total += member.file_size
        if total > max_inflated:
            raise CheckpointError(
                f"{source} would take more than {max_inflated // 1024**2} MiB once read; it was not loaded"
            )


def refuse_onnx_external_data(proto: Any, source: str) -> None:
    """Refuse an ONNX model if any tensor anywhere in it keeps its data in an external file.

    External data names a file on the machine that loads the model. Every message of the model is walked
    (initializers, sparse initializers, node attributes including sparse ones, subgraphs, functions,
    training_info), so a tensor hidden in a field added to ONNX later is found too.
    """
    import onnx
    from google.protobuf.message import Message

    stack: list[tuple[Any, int]] = [(proto, 0)]
    while stack:
        message, depth = stack.pop()
        if depth > MAX_ONNX_DEPTH:
            raise CheckpointError(f"{source} nests its graphs more than {MAX_ONNX_DEPTH} levels deep")
        if isinstance(message, onnx.TensorProto) and (
            message.data_location == onnx.TensorProto.EXTERNAL or len(message.external_data)
        ):
            where = f" (tensor {message.name[:80]!r})" if message.name else ""
            raise CheckpointError(
                f"{source} keeps tensor data in an external file{where}, which is never read here; "
                "export it with all weights inside the .onnx file"
            )
        for field, value in message.ListFields():
            if field.type != field.TYPE_MESSAGE:
                continue
            if isinstance(value, Message):
                stack.append((value, depth + 1))
            else:  # a repeated field, or a map field whose values are messages
                items = value.values() if hasattr(value, "values") else value
                stack.extend((item, depth + 1) for item in items)
