"""What every round mode shares: the job's closing machinery.

A mode (``aggregator.modes``) decides when a round (a buffered job's model
version) opens, whom it asks and when it is due; closing one is the same
for all: the result is released from the pipeline's ``Partial`` (or the
round fails), the server optimizer steps, the round is recorded and
checkpointed, the next model is published, and the next round opens or the
job ends. ``RoundMode`` holds that, and the hooks a mode overrides.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from aggregator.events import (
    Action,
    FromRoot,
    PublishAnnouncement,
    PublishDelta,
    PublishModel,
    RoundFinished,
    RoundState,
    SaveCheckpoint,
)
from aggregator.lifecycle import OpenRound, Phase
from aggregator.pipeline import Combined, release
from aggregator.privacy import release_private
from aggregator.secure import secure_partial, secure_summary
from fedge.codecs import CodecError, requirements
from fedge.logs import fields
from fedge.messages import MODEL_UNAVAILABLE, RegionSum
from fedge.records import RoundRecord
from fedge.secagg import CAPABILITY as SECAGG_CAPABILITY
from fedge.tensors import ModelArrays

if TYPE_CHECKING:
    from aggregator.rounds import RoundCore

log = logging.getLogger("fedge.aggregator")


def _finite(arrays: ModelArrays) -> bool:
    return all(np.isfinite(a).all() for a in arrays.values())


class RoundMode:
    """The closing of a round, shared by every mode; the opening and the
    waiting are the mode's (``try_open``, ``check_quorum``, ...)."""

    def __init__(self, core: RoundCore) -> None:
        self.core = core

    # --- hooks a mode overrides -------------------------------------------------

    def try_open(self, now: float, settle: bool = True) -> list[Action]:
        raise NotImplementedError

    def advance_secure(self, now: float, inputs_closed: bool = False) -> list[Action]:
        return []  # a mode without secure aggregation

    def round_extra(self, op: OpenRound) -> dict[str, Any]:
        """What the mode adds to a closed round's record (``extra``)."""
        return {}

    def awaits_devices(self) -> bool:
        """Whether the job waits for devices to come online (a round, or a
        version, that cannot open for too few)."""
        c = self.core
        return c.life.phase in (Phase.WAITING, Phase.SETTLING) and c.next_round <= c.policy.rounds

    @property
    def model_digest(self) -> str:
        """The model devices train from (a relay's: its root's)."""
        return self.core.models.digest

    def model_key(self) -> tuple[str, int]:
        """The digest and round of the key model the retained delta builds on."""
        return self.core.models.key_digest, self.core.models.key_round

    def on_region_sum(self, client: str, msg: RegionSum, now: float) -> list[Action]:
        """A relay's sum: only the root of a relayed job takes one."""
        return self.core._reject("not_relayed", "a region sum, but this job has no relays (relays.min_relays = 0)",
                                 client, None)

    def from_root(self, event: FromRoot) -> list[Action]:
        """What a relay's root said: only a relay listens to one."""
        self.core.counters["root_stray"] += 1
        return []

    # --- shared ----------------------------------------------------------------------

    def budget_stop(self, now: float, what: str = "round") -> list[Action] | None:
        """End the job when one more private ``what`` (a round, a buffered
        job's version) would take it past ``privacy.target_epsilon``; None
        to go on."""
        c = self.core
        dp, private = c.policy.privacy, c.private
        spend = private.over_budget() if private is not None else None
        if dp is None or private is None or spend is None:
            return None
        log.warning("privacy budget: %s %d would bring epsilon to %.3f (delta %g), over privacy.target_epsilon = "
                    "%g; the job stops after %d private %ss", what, c.next_round, spend, dp.spec.delta,
                    dp.target_epsilon, private.rounds, what, extra=fields(round=c.next_round, reason="budget_stop"))
        c.counters["budget_stop"] += 1
        return self.finish_job(now)

    def codecs(self) -> list[str]:
        """What a device must encode and decode to train this job's rounds:
        the uplink codec and the downlink's deltas."""
        c = self.core
        codecs = [SECAGG_CAPABILITY] if c.policy.secagg is not None else requirements(c.codec_params)
        if c.models.codec is not None:
            codecs += requirements(c.models.downlink_params)
        return codecs

    def eligible(self) -> list[str]:
        return self.core.roster.eligible(self.codecs(), self.core.next_round, self.needed())

    def needed(self) -> int:
        """Eligible devices a round waits for: selection.min_clients, and a
        private round's privacy.min_devices."""
        c = self.core
        dp = c.policy.privacy
        return max(c.policy.min_clients, dp.min_devices if dp is not None else 0)

    def close(self, now: float, reason: str) -> list[Action]:
        """Close the open round (``reason``: quorum or deadline): a secure
        round first unmasks; then the round's result is released and
        stepped (or the round fails), recorded, checkpointed and published,
        and the next round opens (or the job ends)."""
        c = self.core
        op, sec = c.open, c.secure
        assert op is not None
        if sec is not None and sec.stage not in ("done", "failed"):
            # Stop taking masked inputs and unmask the sum of those in hand;
            # the round closes when unmasking ends (``advance_secure``).
            c.life.close_inputs(reason)
            if sec.stage in ("keys", "shares"):
                sec.fail(f"the round closed ({reason}) before the devices had shared their keys")
            return self.advance_secure(now, inputs_closed=True)
        c.life.close()
        try:
            record, ok, key_cut = self._conclude(op, now, reason)
        except Exception:  # a bug: the round is abandoned, never the job
            log.exception("round %d: closing it failed; the round is abandoned (counted as internal_error) and the "
                          "job goes on", op.round, extra=fields(round=op.round, reason="internal_error"))
            c.counters["internal_error"] += 1
            record, ok, key_cut = None, False, False
        silent = c.roster.closed(op.round, op.selected, set(op.accepted) | op.declined | op.refused)
        if silent:
            c.counters["unresponsive"] += silent
        c.open, c.secure = None, None
        c.defence_history.begin(c.updates)
        c.next_round = op.round + 1
        c.life.next_round()
        actions = [SaveCheckpoint(*c.snapshot()), *self._model_after(op, ok, key_cut)]
        last = c.next_round > c.policy.rounds
        follow = self.finish_job(now) if last else self.try_open(now, settle=False)
        last = last or c.state == RoundState.DONE  # e.g. the privacy budget stopped the job
        return [*actions, *follow, *([RoundFinished(record, c.models.exact, last)] if record is not None else [])]

    def _conclude(self, op: OpenRound, now: float, reason: str) -> tuple[RoundRecord, bool, bool]:
        """The round's result, released and stepped (or failed), spent,
        counted and recorded: (its record, whether it succeeded, whether a
        key was cut)."""
        c = self.core
        sec = c.secure
        combined, key_cut, failure = self._result(op)
        extra: dict[str, Any] = {}
        for stage in c.stages:
            extra.update(stage.recorded(combined))
        if sec is not None or c.policy.secagg is not None:
            extra["secagg"] = secure_summary(sec, c.secure_failure)
            if failure in ("too_few_updates", MODEL_UNAVAILABLE) and (sec is None or sec.stage == "failed"):
                failure = "secagg_failed"
        ok = failure is None
        c.counters["rounds_ok" if ok else "rounds_failed"] += 1
        if failure is not None:
            # Counted in both, as a rejection is: the metrics take a failed
            # round out of the incidents (a model_unavailable incident is a
            # device's decline, a failure a round's).
            c.counters[failure] += 1
            c.failures[failure] += 1
        extra.update(self.round_extra(op))
        record = self._record(op, now, reason, combined, failure, extra)
        c.history = [*c.history[-9:], record]
        return record, ok, key_cut

    def _result(self, op: OpenRound) -> tuple[Combined | None, bool, str | None]:
        """The round's result, whether a key was cut, and why it failed (or
        None). A private round releases a model whatever arrived (noise
        alone, if nothing did): the accountant counts it, and skipping it
        would tell."""
        c = self.core
        if len(op.accepted) >= c.policy.min_updates or c.policy.privacy is not None:
            return self._step(op)
        log.warning("round %d fails: %d update(s), fewer than selection.min_updates (%d)", op.round,
                    len(op.accepted), c.policy.min_updates, extra=fields(round=op.round, reason="too_few_updates"))
        # Named by its cause where the devices gave one: the model did not
        # reach them (the broker lost it), or too few answered.
        return None, False, MODEL_UNAVAILABLE if op.model_missing else "too_few_updates"

    def _record(self, op: OpenRound, now: float, reason: str, combined: Combined | None, failure: str | None,
                extra: dict[str, Any]) -> RoundRecord:
        c = self.core
        return RoundRecord(
            round=op.round, attempt=op.attempt, status="ok" if failure is None else "failed", closed_by=reason,
            selected=len(op.selected), clients=len(op.accepted), declined=len(op.declined - set(op.accepted)),
            late=op.late, rejected=dict(op.rejected), num_samples=op.num_samples,
            train_loss=self._train_loss(op), bytes_up=op.bytes_up,
            bytes_down=op.bytes_down, seconds=round(now - op.opened_at, 4), model_digest=c.model_digest,
            accepted=tuple(sorted(op.accepted)), failure=failure,
            norm_bound=None if combined is None or combined.bound is None else float(f"{combined.bound:.6g}"),
            clipped=0 if combined is None else combined.clipped,
            weight_capped=0 if combined is None else combined.capped,
            left_out=() if combined is None else tuple(sorted(set(op.accepted) - set(combined.used))),
            extra=extra,
        )

    def _model_after(self, op: OpenRound, ok: bool, key_cut: bool) -> list[Action]:
        """The model messages a closed round publishes."""
        c = self.core
        if key_cut:
            return [PublishModel(c.models.key_message), PublishDelta(None)]
        if not ok and (op.model_missing or not op.accepted):
            # A failed round leaves the model as it was, but its retained
            # copies may be what failed it (lost, or replaced on a broker
            # without ACL): publish them again so the next round can run.
            return c.model_messages()
        return [PublishDelta(c.models.delta_message)]

    def _step(self, op: OpenRound) -> tuple[Combined | None, bool, str | None]:
        """Combine the round's updates and advance the model: (what the
        defences did, whether a key was cut, why the round failed or None).
        A round whose result is not finite or cannot be published fails, and
        the model and the optimizer's state stay as they were."""
        c = self.core
        secure = c.policy.secagg is not None
        try:
            combined = self._secure_combined() if secure else c.updates.combine()
        except ValueError as exc:  # FedgeError: SecAggError, CodecError, ...
            if not secure:
                return self._combine_failed(op, exc)
            log.error("round %d: secure aggregation failed: %s; the round fails and the model stays", op.round,
                      exc, extra=fields(round=op.round, reason="secagg_failed"))
            return None, False, "secagg_failed"
        except Exception:  # a bug: the round fails, the model stays and the job goes on
            log.exception("round %d: combining %d updates failed; the round fails and the model stays",
                          op.round, len(c.updates), extra=fields(round=op.round, reason="aggregation_failed"))
            return None, False, "secagg_failed" if secure else "aggregation_failed"
        return self._apply(op, combined)

    def _combine_failed(self, op: OpenRound, exc: ValueError) -> tuple[Combined | None, bool, str | None]:
        """E.g. every update left out as overflowing."""
        c = self.core
        log.error("round %d: %s; the round fails and the model stays", op.round, exc,
                  extra=fields(round=op.round, reason="aggregation_failed"))
        if c.updates.left and not c.updates.items:
            c.defence_history.drop_reference(op.round)
        return None, False, "aggregation_failed"

    def _secure_combined(self) -> Combined:
        """The round's mean from the unmasked sum (every survivor's update
        weighs one), or a private round's release of it: noise alone when
        secure aggregation failed. Raises ``SecAggError`` when there is no
        sum and no privacy."""
        c = self.core
        dp = c.round_dp
        samples = c.open.num_samples if c.open is not None else 0
        partial = secure_partial(c.secure, c.secure_failure, c.spec.entries, samples,
                                 clip=dp.clip if dp is not None else None, bit=dp is not None and dp.bit_std > 0)
        if dp is None:
            return release(partial)
        assert c.private is not None
        return release_private(partial, dp, noise_scale=c.private.noise_scale())

    def _apply(self, op: OpenRound, combined: Combined) -> tuple[Combined | None, bool, str | None]:
        c = self.core
        # A private round may release noise alone, and a secure one has no
        # update norms: nothing to remember for the defences.
        if combined.used and c.policy.secagg is None:
            c.defence_history.remember(combined)
        if not _finite(combined.delta):
            log.error("round %d: the averaged delta is not finite; the round fails and the model stays", op.round,
                      extra=fields(round=op.round, reason="nonfinite_model"))
            return combined, False, "nonfinite_model"
        saved = {slot: dict(named) for slot, named in c.optimizer.state().items()}
        try:
            with np.errstate(over="ignore", invalid="ignore"):  # overflow is checked below, not warned about
                exact = c.optimizer.step(c.models.exact, combined.delta)
            if not _finite(exact):
                raise ValueError("the next model is not finite")
            key_cut = c.models.advance(op.round, exact, op.num_samples)
        except (ValueError, ArithmeticError, CodecError) as exc:
            c.optimizer.load_state(saved)
            log.error("round %d: %s; the round fails and the model stays", op.round, exc,
                      extra=fields(round=op.round, reason="nonfinite_model"))
            return combined, False, "nonfinite_model"
        c.defence_history.steer(c.updates)
        return combined, key_cut, None

    def _train_loss(self, op: OpenRound) -> float | None:
        """Mean training loss the devices reported, weighted by their capped sample counts."""
        c = self.core
        if not op.losses:
            return None
        losses = list(op.losses.values())
        weights = c.defence_history.weights([n for _, n in losses])
        return float(sum(w * loss for w, (loss, _) in zip(weights, losses, strict=True)) / max(sum(weights), 1e-12))

    def finish_job(self, now: float) -> list[Action]:
        c = self.core
        if c.life.phase is Phase.DONE:
            return []
        c.life.finish()
        c.open = None
        return [PublishAnnouncement(c.announcement(RoundState.DONE, (), now))]
