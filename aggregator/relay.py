"""A relay (``fedge relay``): the aggregator's service for one region of a
relayed job, between the region's devices and the root.

It is the aggregator's own shell (``aggregator.service``) around a round
core in the relay mode (``aggregator.modes.relay``), with three
differences:

* it serves the region's channels (``fedge/v1/<job>/region/<region>/``,
  ``fedge.topics``) and leaves the model channels to the root: it never
  publishes a model, and the devices check the root's signature on it;
* it hears the root as a device does: the root's announcement
  (``fedge/v1/<job>/round``) and its receipts (``ack/<region>``), believed
  only when signed with the root's key (``relays.root_key``);
* its presence at the root (``status/<region>``, its last will too) says
  it is a relay, and its region's sum of each round goes to the root on
  ``update/<region>``, signed with the relay's key (made in its state
  directory, as an aggregator's; the root enrolls it as a device).

A relay runs with the root's config (the job, the model, ``selection``,
``training``, ``codec``, the defences) and a state directory of its own,
where its region's devices are enrolled. The root evaluates and exports
the model; a relay does neither.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

from aggregator.config import AggregatorConfig
from aggregator.events import FromRoot, Incident, PublishDelta, PublishModel, SendToRoot
from aggregator.policy import RoundPolicy
from aggregator.reporting import RecordHook
from aggregator.rounds import Action, RoundCore
from aggregator.selection import RELAY
from aggregator.service import AggregatorService, build_core
from fedge import wire
from fedge.config import ConfigError
from fedge.identity import IdentityError, PublicKey, check_signed, read_public_key
from fedge.logs import fields
from fedge.messages import Status
from fedge.mqtt import Inbound, LinkUp, monotonic
from fedge.topics import JobTopics, check_id
from fedge.transport import LinkFactory
from fedge.wire import WireError

log = logging.getLogger("fedge.aggregator")

# A relay waiting on its root that has heard nothing from it for this long
# subscribes to the root's announcement again (its retained copy comes back).
ROOT_REFRESH_S = 30.0


def relay_config(cfg: AggregatorConfig, region: str, state_dir: Path | str) -> AggregatorConfig:
    """The config a relay runs its region by: the root's job, with the
    relay's state directory and key, no evaluation or export of its own
    (the root's), and ``selection`` for the region's devices. Its metrics
    are as the config says (give a relay beside the root a port of its own)."""
    try:
        check_id(region, "region")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if not cfg.relays.min_relays:
        raise ConfigError("this config has relays.min_relays = 0: its aggregator talks to the devices itself; set "
                          "relays.min_relays on the root's config (the relays run with the same file)")
    if cfg.identity.signing == "required" and not cfg.relays.root_key:
        raise ConfigError("relays.root_key is empty: copy the key the root logs at its start into the config, so "
                          "that the relay believes only the root's announcements")
    if cfg.relays.root_key:
        try:
            read_public_key(cfg.relays.root_key)
        except IdentityError as exc:
            raise ConfigError(f"relays.root_key: {exc}") from None
    return dataclasses.replace(
        cfg,
        job=dataclasses.replace(cfg.job, state_dir=str(state_dir)),
        relays=dataclasses.replace(cfg.relays, min_relays=0),
        identity=dataclasses.replace(cfg.identity, key_file=""),
        evaluate=dataclasses.replace(cfg.evaluate, data=""),
        onnx=dataclasses.replace(cfg.onnx, every=0),
    )


class RelayService(AggregatorService):
    """The aggregator's service for ``region``, answering its root."""

    def __init__(self, cfg: AggregatorConfig, region: str, on_record: RecordHook | None = None,
                 link_factory: LinkFactory | None = None) -> None:
        """``cfg`` is the region's (``relay_config``)."""
        self.region = check_id(region, "region")
        self.root_topics = JobTopics(cfg.job.name)
        self.root_key: PublicKey | None = (read_public_key(cfg.relays.root_key) if cfg.relays.root_key
                                           and cfg.identity.signing == "required" else None)
        self.margin_s = cfg.relays.margin_s
        self._root_heard = monotonic()  # when the root last said anything (see _turn)
        super().__init__(cfg, on_record, link_factory)
        log.info("relay %s of job %s: region channels %s/, root key %s", region, cfg.job.name, self.topics.site,
                 "not checked (identity.signing = \"off\")" if self.root_key is None else self.root_key.fingerprint,
                 extra=fields(device=region))
        if self.identity is not None:
            key = self.identity.public.to_text()
            log.info("relay key %s: enroll it on the root's host (fedge enroll --config job.toml %s %s); the "
                     "region's devices pin it as identity.aggregator_key, and the root's as identity.root_key",
                     key, region, key)

    # --- what makes it a relay ---------------------------------------------------------

    def job_topics(self, cfg: AggregatorConfig) -> JobTopics:
        return JobTopics(cfg.job.name, self.region)

    def make_core(self, cfg: AggregatorConfig) -> RoundCore:
        policy = RoundPolicy.from_config(cfg)
        # Closes before the root's deadline, so that its sum is in time.
        policy = dataclasses.replace(policy, tree="relay", deadline_s=policy.deadline_s - self.margin_s)
        core = build_core(cfg, policy)
        core.relay_region(self.region)
        return core

    def client_id(self, cfg: AggregatorConfig) -> str:
        return f"fedge-relay-{cfg.job.name}-{self.region}"

    def subscriptions(self) -> list[str]:
        return [*super().subscriptions(), self.root_topics.round, self.root_topics.ack(self.region)]

    def goodbye(self) -> tuple[str, bytes]:
        """Gone, as the root sees it (a relay's last will)."""
        return self.root_topics.status(self.region), self._relay_presence("offline")

    def subscription_qos(self, topic: str) -> int:
        """The root's announcement is retained state, at QoS 0 as the
        aggregator's own (sent again at every subscription; on NATS's
        gateway no JetStream consumer that can stall); its receipts QoS 1."""
        return 0 if topic == self.root_topics.round else super().subscription_qos(topic)

    def _turn(self) -> None:
        super()._turn()
        now = monotonic()
        if self.core.open is None and now - self._root_heard > ROOT_REFRESH_S and self.link.connected.is_set():
            # Waiting on the root, and nothing heard from it for a while: its
            # announcement may have been lost on the way (a broker node under
            # load); subscribing again brings the retained copy.
            self._root_heard = now
            self._feed_incident("root_refreshed")
            self.link.unsubscribe(self.root_topics.round)  # a broker may take the same subscription again as a no-op
            self.link.subscribe(self.root_topics.round)

    def _relay_presence(self, state: str) -> bytes:
        # Numbered (signed presence: the root refuses an older one replayed).
        return self.keys.seal(Status(self.region, state, {"role": RELAY}, int(time.time() * 1000)).encode())

    # --- the root's side ---------------------------------------------------------------

    def _dispatch(self, item: object, now: float) -> None:
        if isinstance(item, Inbound) and item.topic in (self.root_topics.round, self.root_topics.ack(self.region)):
            self.traffic.add("in", "root", len(item.payload))
            self._from_root(item.payload, now)
            return
        super()._dispatch(item, now)
        if isinstance(item, LinkUp):
            self.link.publish(self.root_topics.status(self.region), self._relay_presence("online"), retain=True)

    def _from_root(self, payload: bytes, now: float) -> None:
        """The root's announcement or receipt, believed when signed with its key."""
        self._root_heard = now
        if not payload:
            return  # a retained announcement cleared: the root publishes it again
        try:
            env = wire.decode(payload, max_body=0)
            if self.root_key is not None:
                check_signed(env, self.root_key, "the root's message")
        except (WireError, IdentityError) as exc:
            self._feed_incident("root_refused")
            if self.limits.log.allow(("root", exc.reason), now):
                log.warning("not acting on a message on the root's channels: %s", exc,
                            extra=fields(reason=exc.reason))
            return
        self._feed(FromRoot(env, now))

    def _feed_incident(self, reason: str) -> None:
        self._feed(Incident(reason, None, monotonic()))

    def _execute(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, SendToRoot):
                self.link.publish_chunked(lambda _i: self.root_topics.update(self.region),
                                          self.keys.seal(action.message))
            elif not isinstance(action, (PublishModel, PublishDelta)):  # the model is the root's to publish
                super()._execute([action])
