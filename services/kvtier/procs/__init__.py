"""Server binaries kvtier runs as private child processes: ``redis-server`` for ``kvtier up``,
the benchmarks and the tests, ``prometheus`` for ``kvtier up --monitoring``.

Launchers sit at the top of the layering: only the command line, the lab and the tests start
them; the daemon never does.
"""
