"""Round modes: when a round opens, whom it invites, when it is due and
what closing it does.

The round core (``aggregator.rounds.RoundCore``) holds what every mode
shares: the events and actions, admission, the aggregation pipeline
(defences, privacy, secure aggregation), the model lineage, the roster of
devices and the checkpoint. A mode decides the timing and the shape of a
round on top of it. There are two:

* ``synchronous`` (``SynchronousRounds``): a round selects devices, waits
  for a quorum or its deadline, folds what arrived and publishes the next
  model; nothing waits forever.

* ``buffered`` (``BufferedRounds``): buffered asynchronous aggregation
  (FedBuff): ``concurrency`` devices train at once, each update is folded
  on arrival with a staleness weight, and every ``buffer_size`` updates
  make a new model version.

Both close a round (a version) the same way: ``RoundMode``
(``aggregator.modes.base``). A new round kind (a relay's region) is a new
module here with the same interface, chosen by ``[server] mode``.
"""

from aggregator.modes.base import RoundMode
from aggregator.modes.buffered import BufferedRounds
from aggregator.modes.synchronous import SynchronousRounds

__all__ = ["BufferedRounds", "RoundMode", "SynchronousRounds"]
