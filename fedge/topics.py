"""The MQTT topic tree of a job.

Everything of a job lives under ``fedge/v1/<job>/``. A device id always sits
in a topic level of its own, so a broker ACL can confine each device to its
own topics with a pattern (Mosquitto ``%c``/``%u``)::

    fedge/v1/<job>/model/key/<i>     retained  chunk i of the latest key (full) model
    fedge/v1/<job>/model/delta/<i>   retained  chunk i of the change from that key to the current model
    fedge/v1/<job>/round             retained  the current round announcement
    fedge/v1/<job>/update/<client>             the client's update chunks
    fedge/v1/<job>/status/<client>   retained  presence (last will: offline)
    fedge/v1/<job>/ack/<client>                receipts for the client's updates
    fedge/v1/<job>/events                      one record per closed round
    fedge/v1/<job>/server            retained  the aggregator's presence
    fedge/v1/<job>/artifact/<name>/<i> retained chunk i of a published artifact

A job relayed through regions (``fedge relay``) keeps the model channels
(``model/``, ``artifact/``) at the job's level, published and signed by the
root aggregator for every device, and moves every channel a device talks to
its aggregator on under its region, where the region's relay answers it::

    fedge/v1/<job>/region/<region>/round           the relay's announcement
    fedge/v1/<job>/region/<region>/update/<client> ... status/, ack/, device/,
    fedge/v1/<job>/region/<region>/events          events, server, keys as above

A relay talks to the root as a device does, on the job's own channels: its
presence on ``status/<relay>``, its region's partial sum of each round on
``update/<relay>``, the root's receipts on ``ack/<relay>``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

ROOT = "fedge/v1"
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")


def check_id(value: str, what: str) -> str:
    """Job and client ids become topic levels: no wildcards, no slashes."""
    if not isinstance(value, str) or not _ID.match(value):
        raise ValueError(
            f"{what} {value!r} is not valid: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return value


@dataclass(frozen=True)
class JobTopics:
    job: str
    region: str = ""  # a relayed job's region: the device channels live under it

    def __post_init__(self) -> None:
        check_id(self.job, "job name")
        if self.region:
            check_id(self.region, "region")

    @property
    def base(self) -> str:
        """The job's level: the model channels (and, unrelayed, everything)."""
        return f"{ROOT}/{self.job}"

    @property
    def site(self) -> str:
        """Where the device channels live: the job's level, or its region's."""
        return f"{self.base}/region/{self.region}" if self.region else self.base

    def key_chunk(self, index: int) -> str:
        return f"{self.base}/model/key/{index}"

    @property
    def key_filter(self) -> str:
        return f"{self.base}/model/key/+"

    def delta_chunk(self, index: int) -> str:
        return f"{self.base}/model/delta/{index}"

    @property
    def delta_filter(self) -> str:
        return f"{self.base}/model/delta/+"

    @property
    def round(self) -> str:
        return f"{self.site}/round"

    def update(self, client: str) -> str:
        return f"{self.site}/update/{client}"

    @property
    def update_filter(self) -> str:
        return f"{self.site}/update/+"

    def status(self, client: str) -> str:
        return f"{self.site}/status/{client}"

    @property
    def status_filter(self) -> str:
        return f"{self.site}/status/+"

    def device(self, client: str) -> str:
        """The aggregator's record of a device, retained (``messages.DeviceRecord``)."""
        return f"{self.site}/device/{client}"

    @property
    def device_filter(self) -> str:
        return f"{self.site}/device/+"

    def ack(self, client: str) -> str:
        return f"{self.site}/ack/{client}"

    @property
    def events(self) -> str:
        return f"{self.site}/events"

    @property
    def server(self) -> str:
        return f"{self.site}/server"

    @property
    def keys(self) -> str:
        """The aggregator's key rotations, retained (``messages.KeyChain``)."""
        return f"{self.site}/keys"

    def artifact_chunk(self, name: str, index: int) -> str:
        return f"{self.base}/artifact/{name}/{index}"

    def artifact_filter(self, name: str) -> str:
        return f"{self.base}/artifact/{name}/+"

    def subscription_qos(self, topic: str) -> int:
        """The QoS a device subscribes to ``topic`` (or filter) with: 0 for
        retained state (announcement, key chain, model and artifact chunks,
        its own presence), whose latest copy the broker sends again at every
        subscription and a link subscribes at every connection; 1 for its
        receipts and invitations, which are not retained. A QoS 1
        subscription is session state the broker keeps (on NATS's MQTT
        gateway, a JetStream consumer each); retained state needs none."""
        return 1 if self.channel(topic) == "ack" else 0

    def channel(self, topic: str) -> str:
        """The channel of a topic of this job (``parse``'s first part)."""
        return self.parse(topic)[0]

    def parse(self, topic: str) -> tuple[str, str | None]:
        """Split a topic of this job into (channel, client-or-name).

        ``("update", "pi-7")`` for ``fedge/v1/<job>/update/pi-7``,
        ``("key", None)`` or ``("delta", None)`` for a model chunk,
        ``("", None)`` for anything that is not ours.
        """
        prefix = self.base + "/"
        if not topic.startswith(prefix):
            return "", None
        parts = topic[len(prefix) :].split("/")
        head = parts[0]
        if head == "model" and len(parts) == 3 and parts[1] in ("key", "delta"):
            return parts[1], None
        if head == "artifact" and len(parts) == 3:
            return "artifact", parts[1]
        if self.region:
            # Only our region's device channels are ours.
            if parts[:2] != ["region", self.region]:
                return "", None
            parts = parts[2:]
            head = parts[0] if parts else ""
        if head in ("round", "events", "server", "keys") and len(parts) == 1:
            return head, None
        if head in ("update", "status", "ack", "device") and len(parts) == 2 and _ID.match(parts[1]):
            return head, parts[1]
        return "", None
