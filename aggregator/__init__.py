"""The broker-side role: runs rounds, folds updates as they arrive, publishes
the next global model.

``config`` is the job's configuration and its checks, ``rounds`` the
protocol core (no I/O), ``selection`` who takes part in a round, ``fold`` the
streaming weighted sum, ``optimizers`` the server optimizers, ``lineage``
the global model's key and deltas, ``state`` the crash-safe state
directory, ``artifacts`` the ONNX exports, ``service`` the thin shell that
runs it all over a transport.
"""
