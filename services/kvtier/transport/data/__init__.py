"""The data channel: page bytes of remote workers' puts and gets over TCP frames beside gRPC.

gRPC stays the control plane: ``OpenData`` (authenticated, namespaced like every call) hands
out a one-time ticket (:mod:`.tickets`); the worker presents it as the first frame of a TCP
connection to the data port (:mod:`.server`), which binds the connection to the ticket's
namespace and rights. Frames (``kvtier_client.data_frame``) then carry puts and gets
(:mod:`.connection`), with vectored sends and reads into preallocated page buffers, under the
same deadlines and error table as the gRPC calls.
"""
