"""The fleet as the round core knows it: the devices it has heard of, those
online (with what their presence says), and those benched for silence.

A device selected for a round that neither sent an update (valid or
refused) nor declined sits out the next 1, 2, 4, ... rounds (at most 32),
so that devices that vanished, or presences that were never real, cost a
round's deadline once, not every round; anything it sends clears the
record. Benched devices fill in when the others are too few: a small fleet
with a slow device must not wait for good. ``known`` and ``benched`` are
checkpointed with the job; who is online is what the broker's retained
presence says after a restart.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from aggregator import selection

BENCH_MAX_ROUNDS = 32


class Roster:
    def __init__(self, max_devices: int) -> None:
        self.max_devices = max_devices
        self.known: set[str] = set()
        self.online: dict[str, dict[str, Any]] = {}
        # Selected devices that did not respond: client -> (strikes, first
        # round it may be selected again).
        self.benched: dict[str, tuple[int, int]] = {}
        self.last_selected: frozenset[str] = frozenset()  # of the round that closed last
        # For each set of codecs asked about, the online devices able to train
        # with them, kept as presences come and go: a fleet of N announcing
        # itself costs O(N), not a scan of everyone online per presence.
        self._able: dict[tuple[str, ...], set[str]] = {}
        self._sorted: dict[tuple[str, ...], list[str]] = {}  # the same, sorted, until one changes

    def heard(self, client: str, online: bool, info: dict[str, Any]) -> bool:
        """A device's presence; False (and nothing changes) for a device the
        job has never heard of once it knows ``max_devices``."""
        if client not in self.known and len(self.known) >= self.max_devices:
            return False
        self.known.add(client)
        if online:
            self.online[client] = info
        else:
            self.online.pop(client, None)
        for codecs, able in self._able.items():
            was = client in able
            if online and selection.able(info, codecs):
                able.add(client)
            else:
                able.discard(client)
            if (client in able) != was:
                self._sorted.pop(codecs, None)
        return True

    def eligible(self, codecs: Sequence[str], round_: int, needed: int) -> list[str]:
        """The online devices that can train this round (``codecs``: what
        they must encode and decode), the benched left out unless the others
        are fewer than ``needed``."""
        candidates = self.sorted_able(codecs)
        ready = [c for c in candidates if self.benched.get(c, (0, 0))[1] <= round_]
        return ready if len(ready) >= needed else list(candidates)

    def sorted_able(self, codecs: Sequence[str]) -> list[str]:
        """The online devices able to train with ``codecs``, sorted (kept
        until one comes or goes: a buffered job asks after every update).
        Not to be changed by the caller."""
        key = tuple(codecs)
        cached = self._sorted.get(key)
        if cached is None:
            cached = self._sorted[key] = sorted(self._able_with(codecs))
        return cached

    def eligible_count(self, codecs: Sequence[str], round_: int, needed: int) -> int:
        """``len(eligible(...))`` without listing them: what a round waiting
        for devices asks at every presence."""
        able = self._able_with(codecs)
        if len(able) < needed:  # the benched cannot make it fewer than that
            return len(able)
        waiting = sum(1 for c, (_, until) in self.benched.items() if until > round_ and c in able)
        ready = len(able) - waiting
        return ready if ready >= needed else len(able)

    def _able_with(self, codecs: Sequence[str]) -> set[str]:
        key = tuple(codecs)
        able = self._able.get(key)
        if able is None:  # first asked: one scan, then kept up to date by heard()
            able = self._able[key] = {c for c, info in self.online.items() if selection.able(info, key)}
        return able

    def alive(self, client: str) -> None:
        """It sent something: slow, perhaps, but real."""
        self.benched.pop(client, None)

    def closed(self, round_: int, selected: Iterable[str], responded: set[str]) -> int:
        """A round closed: its silent devices are benched, the others' record
        cleared. Returns how many were silent."""
        silent = 0
        chosen = tuple(selected)
        for client in chosen:
            if client in responded:
                self.benched.pop(client, None)
                continue
            self.strike(client, round_)
            silent += 1
        self.last_selected = frozenset(chosen)
        return silent

    def strike(self, client: str, round_: int) -> None:
        """``client`` stayed silent in ``round_``: benched for the next 1, 2, 4, ... rounds."""
        strikes = self.benched.get(client, (0, 0))[0] + 1
        self.benched[client] = (strikes, round_ + 1 + min(BENCH_MAX_ROUNDS, 2 ** (strikes - 1)))

    def sitting_out(self, round_: int) -> int:
        return sum(1 for _, until in self.benched.values() if until > round_)

    def state(self) -> dict[str, Any]:
        return {"known": sorted(self.known), "benched": {c: list(v) for c, v in self.benched.items()}}

    def load_state(self, meta: dict[str, Any]) -> None:
        self.known = set(meta.get("known", []))
        self.benched = {c: (int(v[0]), int(v[1])) for c, v in meta.get("benched", {}).items()}
