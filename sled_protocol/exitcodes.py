"""Exit statuses of every SLED command, in one place (sysexits.h, so systemd and scripts can tell them apart).

systemd units restart on EX_SOFTWARE and EX_UNAVAILABLE but not on EX_CONFIG (``RestartPreventExitStatus``):
a bad configuration will not fix itself.
"""

from __future__ import annotations

EX_OK = 0            # done, or stopped by a signal
EX_DATAERR = 65      # the peer refused our data (a verifier's error verdict; vocabularies that differ)
EX_NOINPUT = 66      # an input file or directory that does not exist
EX_UNAVAILABLE = 69  # nothing to serve us now (no broker, no verifier of our target): try again later
EX_SOFTWARE = 70     # a crash: a bug, logged with its traceback
EX_CONFIG = 78       # a configuration that cannot work; the message says which value and why

__all__ = ["EX_CONFIG", "EX_DATAERR", "EX_NOINPUT", "EX_OK", "EX_SOFTWARE", "EX_UNAVAILABLE"]
