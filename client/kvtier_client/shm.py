"""The client side of the same-host shared-memory path (see ``kvtier.transport.shm``).

:class:`Segment` creates ``/dev/shm/kvtier-<32 hex>`` with mode 0600, writes a random token at
its start and maps it. After the daemon attached it (``AttachShm``) the client unlinks the path:
from then on only the two mappings exist, and the memory is freed when both unmap, whatever
happens to either process.
"""

from __future__ import annotations

import mmap
import os
import secrets
from pathlib import Path

TOKEN_BYTES = 16
DATA_OFFSET = 64
ALIGN = 64
SHM_DIR = Path("/dev/shm")


def align_up(n: int) -> int:
    return (n + ALIGN - 1) & ~(ALIGN - 1)


def available() -> bool:
    return SHM_DIR.is_dir() and os.access(SHM_DIR, os.W_OK)


class Segment:
    """A client-owned shared-memory segment of ``size`` bytes."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.token = secrets.token_bytes(TOKEN_BYTES)
        self.path = str(SHM_DIR / f"kvtier-{secrets.token_hex(16)}")
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.ftruncate(fd, size)
            self._mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.unlink(self.path)
            raise
        finally:
            os.close(fd)
        self._mm[:TOKEN_BYTES] = self.token
        self.view = memoryview(self._mm)
        self._linked = True

    @property
    def capacity(self) -> int:
        """Bytes usable for page data."""
        return self.size - DATA_OFFSET

    def unlink(self) -> None:
        if self._linked:
            self._linked = False
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    def close(self) -> None:
        self.unlink()
        self.view.release()
        self._mm.close()
