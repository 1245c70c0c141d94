"""The one device-to-host copy of a step: several device tensors packed into one transfer. Needs torch only."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

_NUMPY = {
    torch.float32: np.float32,
    torch.float16: np.float16,
    torch.int64: np.int64,
    torch.int32: np.int32,
    torch.bool: np.bool_,
    torch.uint8: np.uint8,
}


class HostCopy:
    """The one device-to-host copy of a step: several device tensors packed into one transfer.

    On a GPU the tensors' bytes are concatenated on the device and copied without blocking into a
    pinned buffer kept between steps; the host then waits on an event for that copy alone (a wait
    that ``torch.cuda.set_sync_debug_mode`` does not count as a synchronising call). On the CPU the
    tensors are the arrays already. ``copies`` counts the transfers made.
    """

    def __init__(self) -> None:
        self._pinned: torch.Tensor | None = None
        self.copies = 0

    def __call__(self, tensors: Sequence[torch.Tensor]) -> list[np.ndarray]:
        """NumPy copies of ``tensors`` (CPU or one device), after at most one transfer."""
        self.copies += 1
        on_device = [t.device.type != "cpu" for t in tensors]
        if not any(on_device):
            return [t.detach().numpy() for t in tensors]
        moved = [t for t, d in zip(tensors, on_device, strict=True) if d]
        packed = pack_bytes(moved)
        if packed.device.type != "cuda":  # no pinned memory to copy into without blocking: one plain copy
            raw = packed.cpu().numpy()
        else:
            if self._pinned is None or self._pinned.numel() < packed.numel():
                self._pinned = torch.empty(2 * packed.numel(), dtype=torch.uint8, pin_memory=True)
            host = self._pinned[: packed.numel()]
            host.copy_(packed, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
            done.synchronize()
            raw = host.numpy()
        unpacked = iter(unpack_bytes(moved, raw))
        return [next(unpacked) if d else t.detach().numpy() for t, d in zip(tensors, on_device, strict=True)]


def pack_bytes(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The bytes of ``tensors`` (one device), one after the other, as one uint8 tensor on that device."""
    return torch.cat([t.detach().reshape(-1).view(torch.uint8) for t in tensors])


def unpack_bytes(tensors: Sequence[torch.Tensor], raw: np.ndarray) -> list[np.ndarray]:
    """Arrays shaped and typed like ``tensors`` from ``raw``, the bytes :func:`pack_bytes` made of them."""
    out: list[np.ndarray] = []
    offset = 0
    for t in tensors:
        size = t.numel() * t.element_size()
        out.append(raw[offset : offset + size].view(_NUMPY[t.dtype]).reshape(t.shape).copy())
        offset += size
    return out
