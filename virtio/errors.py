"""Exception hierarchy shared by every vhostx layer. Any thread may raise or catch these."""

from __future__ import annotations

__all__ = ["ConfigError", "GuestError", "RemoteProtocolError", "VhostError"]


class VhostError(Exception):
    """Root of all vhostx errors."""


class RemoteProtocolError(VhostError):
    """The frontend broke the vhost-user protocol: close that connection."""


class GuestError(VhostError):
    """Bad ring contents or guest addresses: break (NEEDS_RESET) that device."""


class ConfigError(VhostError):
    """Bad configuration or parameter: the message names the key, the value and the range."""
