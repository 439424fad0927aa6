"""The broker-side role: runs rounds, folds updates as they arrive, publishes
the next global model.

``rounds`` is the protocol core (no I/O), ``fold`` the streaming weighted
sum, ``selection`` who takes part in a round, ``optimizers`` the server
optimizers, ``checkpoint`` the crash-safe
state file, ``service`` the thin MQTT shell that runs it all.
"""
