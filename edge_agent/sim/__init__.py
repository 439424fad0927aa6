"""The fleet simulator (``fedge simulate``): many simulated devices on one
host, each with its own MQTT connection. ``profiles`` says how unequal and
intermittent those devices are (fleet profiles: the file format, the
shipped presets, the per-device draws); ``fleet`` runs them.
"""
