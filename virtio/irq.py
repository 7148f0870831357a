"""The interrupt policy cell of the C core (struct vx_irq_config) and the backend's mapping of a
posted-interrupt area (struct vx_pi_desc), contract in virtio/_core/vx_core.h and
docs/interrupts.md.

- `IrqMode`: immediate, moderate (hold until `frames` completions or `delay_ns`), adaptive
  (moderate while the completion rate is high).
- `IrqConfig`: one C cell shared by the queues that follow it (DeviceQueue.set_irq); any thread
  may change it, a queue's next decision sees the change.
- `PostedArea`: a frontend's notification area mapped in this process (an fd from
  VHOSTX_SET_POSTED_IRQ), giving the C descriptor of each domain inside it.

Threads: IrqConfig setters from any thread (aligned stores the C side loads relaxed);
PostedArea from the control thread (mapped and closed while no queue posts to it).
"""

from __future__ import annotations

import enum
import mmap
from typing import Any

from virtio._vx_core import ffi, lib
from virtio.errors import ConfigError, RemoteProtocolError

__all__ = ["PI_DESC_SIZE", "PI_MAX_BITS", "PI_ON", "PI_SN", "IrqConfig", "IrqMode",
           "PostedArea"]

PI_ON, PI_SN = int(lib.VX_PI_ON), int(lib.VX_PI_SN)
PI_DESC_SIZE, PI_MAX_BITS = int(lib.VX_PI_DESC_SIZE), int(lib.VX_PI_MAX_BITS)
_U32_MAX = 0xFFFFFFFF


class IrqMode(enum.IntEnum):
    """What a queue does with a publication its driver wants signalled."""

    IMMEDIATE = lib.VX_IRQ_IMMEDIATE
    MODERATE = lib.VX_IRQ_MODERATE
    ADAPTIVE = lib.VX_IRQ_ADAPTIVE


class IrqConfig:
    """One interrupt-policy cell in C memory, followed by any number of queues."""

    def __init__(self, mode: IrqMode = IrqMode.IMMEDIATE, frames: int = 1, delay_ns: int = 0,
                 on_pps: int = 0, off_pps: int = 0, window_ns: int = 1_000_000) -> None:
        self._c = ffi.new("struct vx_irq_config *")
        self.set(mode=mode, frames=frames, delay_ns=delay_ns, on_pps=on_pps, off_pps=off_pps,
                 window_ns=window_ns)

    @property
    def c_cell(self) -> Any:
        return self._c

    def set(self, **values: int) -> None:
        """Change some fields: mode, frames, delay_ns, on_pps, off_pps, window_ns."""
        for name, value in values.items():
            if name == "mode":
                self._c.mode = int(IrqMode(value))
            elif name == "frames":
                if not 0 <= value <= _U32_MAX:
                    raise ConfigError(f"irq frames: allowed 0..{_U32_MAX}, got {value}")
                self._c.frames = value
            elif name in ("delay_ns", "on_pps", "off_pps", "window_ns"):
                if not 0 <= value < 2**64:
                    raise ConfigError(f"irq {name}: allowed 0..2**64-1, got {value}")
                setattr(self._c, name, value)
            else:
                raise ConfigError(f"irq config: unknown field {name!r}; allowed: mode, frames, "
                                  "delay_ns, on_pps, off_pps, window_ns")
        if self._c.off_pps > self._c.on_pps:
            raise ConfigError(f"irq config: off_pps {self._c.off_pps} above on_pps "
                              f"{self._c.on_pps} (the rule needs off <= on)")

    def values(self) -> dict[str, int]:
        c = self._c
        return {"mode": int(c.mode), "frames": int(c.frames), "delay_ns": int(c.delay_ns),
                "on_pps": int(c.on_pps), "off_pps": int(c.off_pps),
                "window_ns": int(c.window_ns)}


class PostedArea:
    """A notification area shared by a frontend (VHOSTX_SET_POSTED_IRQ), mapped here.

    The descriptor of a domain is 64 bytes at a 64-byte-aligned offset inside the mapping; the
    frontend can write it at any time, and the C side only ever uses atomic operations on it.
    """

    def __init__(self, fd: int, size: int, offset: int = 0) -> None:
        if size < PI_DESC_SIZE or size > 1 << 24:
            raise RemoteProtocolError(f"posted-interrupt area: size must be {PI_DESC_SIZE}.."
                                      f"{1 << 24} bytes, got {size}")
        if offset % mmap.PAGESIZE:
            raise RemoteProtocolError(f"posted-interrupt area: mmap offset {offset:#x} is not "
                                      f"page aligned")
        try:
            self._map: mmap.mmap | None = mmap.mmap(fd, size, mmap.MAP_SHARED,
                                                    mmap.PROT_READ | mmap.PROT_WRITE,
                                                    offset=offset)
        except (OSError, ValueError) as err:
            raise RemoteProtocolError(f"posted-interrupt area: cannot map {size} bytes at "
                                      f"{offset:#x}: {err}") from err
        self.size = size
        self._buf = ffi.from_buffer(self._map)

    def desc(self, offset: int) -> Any:
        """The `struct vx_pi_desc *` at `offset` (64-byte aligned, inside the area)."""
        if self._map is None:
            raise RemoteProtocolError("posted-interrupt area: already closed")
        if offset % PI_DESC_SIZE or offset + PI_DESC_SIZE > self.size or offset < 0:
            raise RemoteProtocolError(f"posted-interrupt descriptor offset {offset:#x}: must be "
                                      f"{PI_DESC_SIZE}-byte aligned and inside the "
                                      f"{self.size}-byte area")
        return ffi.cast("struct vx_pi_desc *", self._buf + offset)

    def close(self) -> None:
        """Forget the mapping; it is unmapped once no queue holds a descriptor of it (the
        queues keep the area alive: DeviceQueue.set_posted), never under a queue's feet."""
        self._map = None
