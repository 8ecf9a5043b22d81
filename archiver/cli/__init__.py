"""The commands a person runs: the ``archiver`` CLI, its console output, the run service.

Owns: typer commands (``app``), rich rendering (``console``), the operator's process
(``service``: signals, loops, metrics; ``schedule``), the read-only commands that inspect
a database (``plan``, ``doctor``), and ``settings`` (pydantic-settings: environment and
TOML), which it turns into the plain option objects the engine takes.

May import anything below it: ``archiver.engine``, ``archiver.archive``,
``archiver.source`` and the base modules. Nothing imports ``archiver.cli``; it is the
only user of typer, rich and pydantic-settings.
"""
