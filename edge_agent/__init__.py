"""The device-side role: receives the global model, trains on local data that
never leaves the device, publishes a compressed delta.

``config`` is the device's configuration and its checks, ``core`` the
protocol core (no I/O), ``inference`` the inference-only device's core,
``runtime`` the shell that runs one agent (a device) or many (a simulated
fleet) over a transport, ``pool`` and ``worker`` the training processes that
own PyTorch, ``state`` the restart-safe state directory, ``batched`` the
training of many simulated devices at once (the same updates as
``training``, less than half its CPU). Nothing here may import PyTorch except
``training``, ``batched`` and ``worker``, which run in the worker process.
"""
