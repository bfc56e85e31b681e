"""Read a small device tensor on the host later without waiting for the whole GPU queue.

`AsyncHostCopy(t)` starts a non-blocking copy of `t` into pinned host memory on the current stream and records
an event after it; `.tolist()` waits for that event only (the copy was queued early, so by the time a caller
asks, e.g. in the backward pass, it has long landed), where `t.tolist()` would drain every kernel queued so
far (a host synchronisation that leaves the GPU idle while the host catches up). On the CPU it is a plain
copy.
"""

from __future__ import annotations

import torch


class AsyncHostCopy:
    __slots__ = ("_host", "_event", "_list")

    def __init__(self, t: torch.Tensor):
        self._list = None
        if t.is_cuda:
            self._host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            self._host.copy_(t, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host, self._event = t.clone(), None

    def tolist(self) -> list:
        if self._list is None:
            if self._event is not None:
                self._event.synchronize()
            self._list = self._host.tolist()
        return self._list
