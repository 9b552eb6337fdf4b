"""The daemon's side of the same-host shared-memory path.

    session.py    attaching a client's segment, one namespace per session; the registry
    copy.py       copying a put's pages out of the segment, following the fill words
    lend.py       lent pages kept where they lie, and the return ring that hands ranges back
    relocate.py   copying lent pages out when the lend area is full or the session ended
"""
