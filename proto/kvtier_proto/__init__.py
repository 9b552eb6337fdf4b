"""Protocol buffers of kvtier (package kvtier.v1) and the code generated from them."""
