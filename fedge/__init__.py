"""fedge: federated learning for fleets of small devices over MQTT.

This package holds what the edge agent and the aggregator must agree on: the
wire format, topics, codecs, model-state helpers, configuration and the
``fedge`` command line. It must stay importable without PyTorch, because an
idle edge agent runs on it alone.
"""

__version__ = "0.1.0"
