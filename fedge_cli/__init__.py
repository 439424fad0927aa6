"""The top layer: the ``fedge`` command line, the one-command demo and its
table, and the embedded broker the demo runs.

This is the only package that imports the roles (``aggregator``,
``edge_agent``, ``export``); the roles import the contract (``fedge``) and
never each other, and the contract imports nothing above it
(``tests/unit/test_layers.py`` walks every import to keep it so). Each
subcommand imports its role only when it runs, so ``fedge agent`` on a device
never loads the aggregator's or the export toolchain's dependencies.
"""
