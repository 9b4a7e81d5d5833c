"""The ``edge-awq`` subcommands, one module each, named after it: ``add_arguments(p)`` and ``run(args) -> int``.

They parse flags and call the API (``edge_awq.load``) or the formats; they print, nothing below them does.
(``export`` needs torch and lives in ``edge_awq.offline.export``.)
"""
