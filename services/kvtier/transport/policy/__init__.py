"""The ``kvtier.v1.PolicyService`` (a live policy in a process of its own) and the daemon's
client of it (:class:`~kvtier.transport.policy.client.RemotePolicy`)."""
