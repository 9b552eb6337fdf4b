"""Version 1 of the kvtier protocol (package kvtier.v1)."""
