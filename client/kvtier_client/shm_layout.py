"""The layout of a same-host shared-memory segment: the one definition both sides read.

The client library creates and writes the segment (:mod:`kvtier_client.shm`); the daemon maps
it (``kvtier.transport.shm``) and imports these constants from here, the one module of this
package it imports. Pure constants: importing it costs nothing on either side.

Fixed words at the start, then areas the client lays out as it likes::

    0       16          24            32     40          48          56    64                size
    | token | fill no.  | bytes       |      | ring head | ring tail |     | request area,    |
    |       | (u64)     | written u64 |      | (daemon)  | (client)  |     | lend area, return|
    |                                                                      | ring, staging    |

- ``token`` (``TOKEN_BYTES``): random bytes the client writes before it attaches; the daemon
  compares them with the ``AttachShm`` token, proof that both map the same memory.
- fill words (at ``FILL_OFFSET``): the number of the put the segment's bytes belong to, and
  how many bytes of that put's byte stream (page 0 k, page 0 v, page 1 k, ...) the client has
  written. The client sets the number before it writes a put's bytes; the daemon checks it
  before and after reading them.
- return ring words: how many lent ranges the daemon has appended to the return ring
  (``RING_HEAD_OFFSET``) and how many the client has taken back (``RING_TAIL_OFFSET``). The
  ring itself is ``slots`` u64 offsets at an offset the client names (``shm_ring_offset``).
- from ``DATA_OFFSET`` on: the client's areas. Calls name ranges anywhere from
  ``AREA_START`` to the end of the segment; the daemon checks only those bounds, and writes
  only where a get asked it to and into the return ring and its head word.

Every offset the client names is a multiple of ``ALIGN``. A failed lending put whose ranges
all come back through the ring says so with the trailing metadata key ``RANGES_BACK``.
"""

from __future__ import annotations

TOKEN_BYTES = 16
FILL_OFFSET = 16  # u64 fill number, then u64 bytes written
AREA_START = 32  # the lowest offset a call may name
RING_HEAD_OFFSET = 40  # u64: ranges the daemon appended to the return ring
RING_TAIL_OFFSET = 48  # u64: ranges the client took back
DATA_OFFSET = 64  # where the client's areas start
ALIGN = 64
MAX_RING_SLOTS = 1 << 20  # the largest return ring a daemon accepts
RANGES_BACK = "kvtier-ranges-back"


def align_up(n: int) -> int:
    """``n`` rounded up to a multiple of ``ALIGN``."""
    return (n + ALIGN - 1) & ~(ALIGN - 1)
