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

    def __post_init__(self) -> None:
        check_id(self.job, "job name")

    @property
    def base(self) -> str:
        return f"{ROOT}/{self.job}"

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
        return f"{self.base}/round"

    def update(self, client: str) -> str:
        return f"{self.base}/update/{client}"

    @property
    def update_filter(self) -> str:
        return f"{self.base}/update/+"

    def status(self, client: str) -> str:
        return f"{self.base}/status/{client}"

    @property
    def status_filter(self) -> str:
        return f"{self.base}/status/+"

    def device(self, client: str) -> str:
        """The aggregator's record of a device, retained (``messages.DeviceRecord``)."""
        return f"{self.base}/device/{client}"

    @property
    def device_filter(self) -> str:
        return f"{self.base}/device/+"

    def ack(self, client: str) -> str:
        return f"{self.base}/ack/{client}"

    @property
    def events(self) -> str:
        return f"{self.base}/events"

    @property
    def server(self) -> str:
        return f"{self.base}/server"

    @property
    def keys(self) -> str:
        """The aggregator's key rotations, retained (``messages.KeyChain``)."""
        return f"{self.base}/keys"

    def artifact_chunk(self, name: str, index: int) -> str:
        return f"{self.base}/artifact/{name}/{index}"

    def artifact_filter(self, name: str) -> str:
        return f"{self.base}/artifact/{name}/+"

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
        if head in ("round", "events", "server", "keys") and len(parts) == 1:
            return head, None
        if head == "model" and len(parts) == 3 and parts[1] in ("key", "delta"):
            return parts[1], None
        if head in ("update", "status", "ack", "device") and len(parts) == 2 and _ID.match(parts[1]):
            return head, parts[1]
        if head == "artifact" and len(parts) == 3:
            return "artifact", parts[1]
        return "", None
