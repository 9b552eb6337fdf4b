"""kvtier_client: what an inference worker imports to talk to a kvtier daemon.

Importing it pulls in neither torch nor fastapi nor the server package ``kvtier``.
"""
