"""``fedge demo``: a whole federation in one command.

Starts an MQTT broker (embedded amqtt on a loopback port, or ``--broker`` for
an existing one), the aggregator, and N edge agents, each with its own MQTT
connection and its own non-IID share of scikit-learn's digits or breast
cancer set (Dirichlet over labels, alpha 0.5), sharing a small pool of warm training workers. It
prints one row per round and a summary, and can write the same as JSON.

The pieces are the real ones (``aggregator.service``, ``edge_agent.runtime``):
the demo only wires them together in one process.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from aggregator.config import AggregatorConfig, CodecSection
from fedge.config import BrokerSettings, updated
from fedge.progress import Progress, interactive
from fedge.records import RoundRecord
from fedge_cli.table import RoundTable

DATASETS = {
    # name: (data callable, model factory, job name)
    "digits": ("fedge.datasets:digits", "fedge.models:digits_mlp", "demo-digits"),
    "breast-cancer": ("fedge.datasets:breast_cancer", "fedge.models:tabular_mlp", "demo-breast-cancer"),
}


@dataclass
class DemoOptions:
    agents: int = 10
    rounds: int = 30
    data: str = "digits"
    broker: str | None = None
    protocol: str = "3.1.1"
    codec: dict[str, Any] | None = None  # None: the job default
    downlink: str = "follow"
    seed: int = 0
    alpha: float = 0.5
    workers: int = 2
    epochs: int = 2
    batch_size: int = 16
    lr: float = 0.1
    state_dir: str | None = None
    json_path: str | None = None
    timeout_s: float = 600.0
    signing: str = "required"  # or "off"
    target_epsilon: float = 0.0  # > 0: differentially private, with this budget (see DEMO_PRIVACY)
    secure_aggregation: bool = False  # the aggregator learns only each round's sum (see DEMO_SECAGG)
    dropout: float = 0.0  # each selected agent silently drops out of a round with this probability
    mode: str = "synchronous"  # or "buffered" (see buffered_settings)
    profile: str = ""  # a fleet profile: the agents run as a simulated fleet of its devices ("": none)
    relays: int = 0  # a relayed job: this many relays, the agents split between their regions


def buffered_settings(agents: int) -> dict[str, int]:
    """A buffered demo: half the agents train at once, a version takes the
    updates of a quarter of them (at least two)."""
    return {"concurrency": max(2, agents // 2), "buffer_size": max(2, agents // 4), "max_staleness": 10}


# Secure aggregation for the digits MLP: its updates' coordinates stay well
# within +-0.5 (a private job bounds them by its clip instead). Short stages:
# the demo's agents answer in milliseconds, and a dropped agent costs a stage.
DEMO_SECAGG = {"mode": "on", "bound": 0.5, "stage_s": 3.0}
DROPOUT_DEADLINE_S = 10.0  # with --dropout: an agent silent before its update is awaited this long


# Client-level DP for ten devices: each in a round with probability 0.5 (about
# five a round), noise 1.5 x the clip on the sum, delta 1e-3 (below 1/10);
# epsilon 8 allows 25 rounds. Ten devices are far too few for client-level DP
# to leave a useful model: the noise on the average is 1.5 x clip / 5 per
# coordinate, larger than any one coordinate of a clipped update (measured
# with int2 updates: 15-25% accuracy on digits at clips of 0.03 to 1, against
# 94% without DP). A small clip keeps the noise, and the damage, small. The
# private demo sends int8 updates: the aggregator clips what it decodes, and
# int2's rounding doubles a clipped update's length. bench/privacy.py shows
# client-level DP with a thousand devices.
DEMO_PRIVACY = {"mode": "central", "clip": 0.1, "noise_multiplier": 1.5, "sampling_rate": 0.5, "delta": 1e-3}
DEMO_PRIVATE_CODEC = {"name": "int8", "lossless": "zlib"}


def job_config(opts: DemoOptions, broker_url: str, state_dir: Path) -> AggregatorConfig:
    data, model, job = DATASETS[opts.data]
    cfg = updated(
        AggregatorConfig(),
        job={"name": job, "model": model, "seed": opts.seed, "rounds": opts.rounds,
             "state_dir": str(state_dir / "aggregator")},
        selection={"fraction": 1.0, "min_clients": opts.agents, "deadline_s": 30.0},
        training={"epochs": opts.epochs, "batch_size": opts.batch_size, "lr": opts.lr},
        evaluate={"data": data, "args": {"split": "test"}},
        broker={"url": broker_url, "protocol": opts.protocol},
        identity={"signing": opts.signing},
    )
    if opts.codec:
        cfg = updated(cfg, codec=CodecSection.from_spec(opts.codec))
    if opts.secure_aggregation:
        cfg = updated(cfg, secagg={**DEMO_SECAGG, "bound": 0.0 if opts.target_epsilon > 0 else DEMO_SECAGG["bound"]},
                      # the aggregator cannot look inside a masked update: say so rather than be warned
                      server={"clip": "off", "direction": "off", "weight_cap": 0.0})
    if opts.dropout > 0:
        cfg = updated(cfg, selection={"deadline_s": DROPOUT_DEADLINE_S})
    if opts.mode == "buffered":
        # A version waits for buffer_size devices online, not the whole fleet (a profile's devices come and go).
        cfg = updated(cfg, server={"mode": "buffered"}, buffered=buffered_settings(opts.agents),
                      selection={"min_clients": 1})
    elif opts.profile:
        cfg = updated(cfg, selection={"min_clients": max(1, opts.agents // 2), "settle_s": 2.0})
    if opts.relays:
        # Each region's round waits for its own agents (the regions differ by one at most).
        cfg = updated(cfg, relays={"min_relays": opts.relays, "margin_s": 5.0},
                      selection={"min_clients": max(1, opts.agents // opts.relays)})
    if opts.target_epsilon > 0:
        cfg = updated(cfg, privacy={**DEMO_PRIVACY, "target_epsilon": opts.target_epsilon})
        if not opts.codec:  # int2's rounding makes a clipped update twice as long: the clip would halve it
            cfg = updated(cfg, codec=CodecSection.from_spec(DEMO_PRIVATE_CODEC))
    return cfg


def run_demo(opts: DemoOptions, out: TextIO = sys.stdout) -> dict[str, Any]:
    from aggregator.service import AggregatorService
    from edge_agent.pool import TrainingPool
    from edge_agent.runtime import DROPOUT_STAGES, AgentRuntime, DeviceSpec
    from fedge_cli.broker import EmbeddedBroker

    embedded = None
    if opts.broker:
        url = opts.broker
    else:
        embedded = EmbeddedBroker()
        url = embedded.start()
    own_state = opts.state_dir is None
    state_dir = Path(opts.state_dir or tempfile.mkdtemp(prefix="fedge-demo-"))
    if not own_state and (state_dir / "aggregator").exists():
        shutil.rmtree(state_dir / "aggregator")
    # A simulated fleet shapes its links: what a device sends leaves later, not in the round that sent it, so
    # the rows carry the aggregator's own counts and the summary the agents' totals.
    table = RoundTable(out, privacy=opts.target_epsilon > 0, bytes_by="aggregator" if opts.profile else "agents",
                       buffered=opts.mode == "buffered")
    records: list[RoundRecord] = []
    agent_bytes: dict[int, tuple[int, int]] = {}  # round -> (sent, received) by all agents
    fleet_ref: list[Any] = []

    # On a terminal, the first round (the workers start PyTorch) shows what it waits for.
    progress = Progress("round 1", enabled=interactive(sys.stderr) and interactive(out))

    def on_record(record: RoundRecord) -> None:
        progress.close()
        # Bytes as the devices saw them: MQTT payload bytes all agents sent and
        # received for this round (announcement, every copy of the model,
        # update, receipt). The record keeps the aggregator's own count
        # (bytes_up, bytes_down), as rounds.jsonl and `fedge report` have it.
        sent, received = fleet_ref[0].traffic.get(record.round, [0, 0]) if fleet_ref else (0, 0)
        agent_bytes[record.round] = (sent, received)
        records.append(record)
        try:
            table.row(record, None if opts.profile else (sent, received))
        except BrokenPipeError:  # `fedge demo | head`: the reader is gone, so stop
            aggregator.stop()

    cfg = job_config(opts, url, state_dir)
    data, _, job = DATASETS[opts.data]
    ids = [f"agent-{i:02d}" for i in range(opts.agents)]
    # Signed as a real fleet is: each agent has its own key, enrolled with the
    # aggregator, and pins the aggregator's key. Relayed: each relay's key is
    # enrolled with the root, each agent's with its region's relay, and an
    # agent pins its relay's key and the root's (which signs the model).
    regions = {cid: f"region-{i % opts.relays}" for i, cid in enumerate(ids)} if opts.relays else {}
    relays, trust = _relay_keys(cfg, opts, ids, regions, state_dir)
    if relays:
        cfg = updated(cfg, relays={"root_key": trust["root"].to_text() if trust.get("root") else ""})
    devices = [
        DeviceSpec(
            client_id=cid, job=job, data=data, region=regions.get(cid, ""),
            data_args={"client": i, "clients": opts.agents, "partition": "dirichlet", "alpha": opts.alpha,
                       "seed": opts.seed},
            state_dir=state_dir / "agents" / cid, downlink=opts.downlink, durable=False,
            identity=trust.get(cid), aggregator_key=trust.get(f"trusts:{cid}"),
            root_key=trust.get("root") if relays else None, dropout=opts.dropout,
            # a plain round has one stage to drop out before: the update
            dropout_stages=DROPOUT_STAGES if opts.secure_aggregation else ("update",),
        )
        for i, cid in enumerate(ids)
    ]
    aggregator = AggregatorService(cfg, on_record=on_record)
    from aggregator.relay import RelayService, relay_config

    relay_services = [RelayService(relay_config(cfg, region, state_dir / region), region) for region in relays]
    broker = BrokerSettings(url=url, protocol=opts.protocol)
    pool = TrainingPool(size=opts.workers, mode="warm", threads=1)
    fleet = simulated(devices, broker, pool, opts) if opts.profile else AgentRuntime(devices, broker, pool)
    fleet_ref.append(fleet)
    codec = {"name": "secagg"} if opts.secure_aggregation else opts.codec or cfg.codec.spec
    out.write(f"fedge demo: {opts.agents} agents, {opts.rounds} {'versions' if opts.mode == 'buffered' else 'rounds'}, "
              f"{opts.data} (Dirichlet alpha={opts.alpha}), codec {json.dumps(codec)}, broker {url}"
              f"{' (embedded)' if embedded else ''}\n")
    if opts.profile:
        out.write(f"fleet profile {opts.profile}: each agent is a simulated device of it (its training speed, links "
                  f"and sessions; fedge simulate --profile does the same at scale)\n")
    if opts.mode == "buffered":
        b = cfg.buffered
        out.write(f"buffered asynchronous aggregation: {b.concurrency} agents train at once, each update is folded "
                  f"as it arrives (weighed down by its staleness), every {b.buffer_size} updates make a version; "
                  f"fast agents never wait for slow ones\n")
    if opts.relays:
        out.write(f"relays: {opts.relays} regions; each region's relay runs the round among its agents and sends the "
                  f"root one sum; the root steps and signs the model every agent checks (the clients column counts "
                  f"agents)\n")
    if opts.target_epsilon > 0:
        from aggregator.privacy import DpPolicy, rounds_within

        dp = DpPolicy.from_config(cfg.privacy, cfg.selection.min_clients)
        assert dp is not None
        allowed = rounds_within(dp.spec, opts.target_epsilon)
        out.write(f"differential privacy: clip {dp.clip}, noise multiplier {dp.spec.noise_multiplier}, sampling "
                  f"rate {dp.spec.sampling_rate}, delta {dp.spec.delta}; epsilon <= {opts.target_epsilon} allows "
                  f"{allowed} round{'s' if allowed != 1 else ''} ({dp.spec.accountant.upper()}). Ten devices are too "
                  f"few for a useful private model: the noise outweighs them\n")
    if opts.secure_aggregation:
        from aggregator.secure import SecAggPolicy

        sa = SecAggPolicy.from_config(cfg.secagg)
        assert sa is not None
        plan = sa.plan(opts.agents, cfg.privacy.clip if opts.target_epsilon > 0 else 0.0)
        out.write(f"secure aggregation: each agent masks its update with {plan.degree} neighbours; any "
                  f"{plan.threshold} of an agent's {plan.degree + 1} share holders rebuild its secrets, fewer learn "
                  f"nothing; {plan.bits}-bit coordinates within +-{plan.bound:g}, summed modulo "
                  f"2^{plan.modulus_bits}. The aggregator sees only each round's sum\n")
    if opts.dropout > 0:
        stages = "its keys, shares, update or revealed shares" if opts.secure_aggregation else "its update"
        out.write(f"dropout: each selected agent goes silent for a round with probability {opts.dropout:g}, "
                  f"before {stages} (at random); a round waits at most {cfg.selection.deadline_s:g} s for it\n")
    table.header()
    started = time.perf_counter()
    threads = [threading.Thread(target=aggregator.run, name="aggregator", daemon=True),
               threading.Thread(target=fleet.run, name="fleet", daemon=True),
               *(threading.Thread(target=r.run, name=f"relay-{r.region}", daemon=True) for r in relay_services)]
    try:
        fleet.start()
        for t in threads:
            t.start()
        deadline = time.monotonic() + opts.timeout_s
        while not aggregator.done.wait(0.2) and threads[0].is_alive() and time.monotonic() < deadline:
            if progress.enabled:
                progress.set(note=_first_round(aggregator, opts.agents))
        finished = aggregator.done.is_set()
    finally:
        progress.close()
        aggregator.stop()
        for relay in relay_services:
            relay.stop()
        fleet.stop()
        for t in threads:
            t.join(timeout=10)
        fleet.close()
        pool.close()
        if embedded:
            embedded.stop()
        if own_state:
            shutil.rmtree(state_dir, ignore_errors=True)
    wall = time.perf_counter() - started
    totals = None
    if opts.profile:
        counted = fleet.bytes_by_channel.bytes
        totals = (sum(n for (d, _), n in counted.items() if d == "out"),
                  sum(n for (d, _), n in counted.items() if d == "in"))
    summary = summarize(records, wall, finished, agent_bytes, totals)
    final = summary["final_accuracy"]
    failed = f" ({summary['failed_rounds']} failed)" if summary["failed_rounds"] else ""
    out.write(
        f"done: {len(records)} {'versions' if opts.mode == 'buffered' else 'rounds'}{failed} in {wall:.1f} s; "
        "final accuracy "
        f"{'- (no round was evaluated)' if final is None else f'{final:.4f}'}; "
        f"median {'version' if opts.mode == 'buffered' else 'round'} {summary['median_round_seconds']:.3f} s; the "
        "agents sent "
        f"{summary['agents_bytes_sent'] / 2**20:.2f} MiB and received {summary['agents_bytes_received'] / 2**20:.2f} "
        "MiB\n"
    )
    if opts.json_path:
        Path(opts.json_path).write_text(json.dumps(summary, indent=2) + "\n")
    if not finished:
        raise TimeoutError(f"the demo did not finish within {opts.timeout_s:.0f} s")
    return summary


def _relay_keys(cfg: AggregatorConfig, opts: DemoOptions, ids: list[str], regions: dict[str, str],
                state_dir: Path) -> tuple[list[str], dict[str, Any]]:
    """The regions, and who holds and trusts which key: ``trust[cid]`` is an
    agent's identity, ``trust["trusts:" + cid]`` the key it pins (the
    aggregator's, or its relay's), ``trust["root"]`` the root's."""
    from fedge_cli.identity import provision

    names = sorted(set(regions.values()))
    if opts.signing != "required":
        return names, {}
    keys = state_dir / "keys"
    root, relay_ids = provision(Path(cfg.job.state_dir), names, keys)
    trust: dict[str, Any] = {"root": root}
    for region, identity in relay_ids.items():
        (state_dir / region).mkdir(parents=True, exist_ok=True)
        identity.save(state_dir / region / "aggregator.key")
    for region in names or [""]:
        members = [cid for cid in ids if regions.get(cid, "") == region]
        pinned, identities = provision(state_dir / region if region else Path(cfg.job.state_dir), members, keys)
        trust.update(identities)
        trust.update({f"trusts:{cid}": pinned for cid in members})
    return names, trust


def simulated(devices: list[Any], broker: BrokerSettings, pool: Any, opts: DemoOptions) -> Any:
    """The agents as a simulated fleet of ``opts.profile``'s devices, on
    real time (``edge_agent.sim``)."""
    from edge_agent.sim.fleet import SimulatedFleet
    from edge_agent.sim.profiles import load
    from fedge.mqtt_loop import MqttLoop

    profile = load(opts.profile)
    conditions = profile.devices(len(devices), opts.seed)
    return SimulatedFleet(devices, {d.client_id: conditions[i] for i, d in enumerate(devices)}, broker, pool,
                          profile, loop=MqttLoop(name="fedge-demo-fleet"), seed=opts.seed)


def _first_round(aggregator: Any, agents: int) -> str:
    """What the first round waits for (read from another thread: counts only)."""
    core = aggregator.core
    op = core.open
    if op is None:
        return f"{len(core.roster.online)}/{agents} agents online"
    return f"{len(op.accepted)}/{len(op.selected)} updates in (the training workers start PyTorch)"


def summarize(records: list[RoundRecord], wall: float, finished: bool,
              agent_bytes: dict[int, tuple[int, int]] | None = None,
              totals: tuple[int, int] | None = None) -> dict[str, Any]:
    """The demo's results. ``bytes_up``/``bytes_down`` are the aggregator's
    count, as in its round records (``rounds.jsonl``, ``fedge report``):
    the update messages it received; each model message it published once
    plus the announcement once per online device. ``agents_bytes_sent`` and
    ``agents_bytes_received`` are what all agents sent and received as MQTT
    payloads, every copy of the model included (``totals``: as counted for
    the whole run, when the rounds' shares are not known)."""
    agent_bytes = agent_bytes or {}
    keys = ("round", "accuracy", "loss", "clients", "bytes_up", "bytes_down", "seconds")
    private = ("epsilon", "delta", "noise_multiplier", "sampling_rate")
    rounds = [{k: r.get(k) for k in keys} | {"status": r.status}
              | dict(zip(("agents_bytes_sent", "agents_bytes_received"), agent_bytes.get(r.round, (0, 0)), strict=True))
              | {k: r.extra[k] for k in (*private, "secagg") if k in r.extra}
              # A relayed job: the agents folded (the root's record counts relays), and the relays.
              | ({"clients": r.extra["relayed"]["devices"], "relays": r.clients} if "relayed" in r.extra else {})
              for r in records]
    secs = sorted(r.seconds for r in records) or [0.0]
    accs = [r.accuracy for r in records if r.accuracy is not None]
    return {
        "rounds": rounds,
        "failed_rounds": sum(1 for r in records if r.status != "ok"),
        "final_accuracy": accs[-1] if accs else None,
        "best_accuracy": max(accs) if accs else None,
        "median_round_seconds": secs[len(secs) // 2],
        "bytes_up": sum(r.bytes_up for r in records),
        "bytes_down": sum(r.bytes_down for r in records),
        "agents_bytes_sent": totals[0] if totals else sum(r["agents_bytes_sent"] for r in rounds),
        "agents_bytes_received": totals[1] if totals else sum(r["agents_bytes_received"] for r in rounds),
        "wall_seconds": round(wall, 3),
        "finished": finished,
    }


def check_split(opts: DemoOptions) -> None:
    """Every agent's share of the data can be made with these options (a
    tiny ``alpha`` may leave an agent without examples): else the data
    set's one-line ``ValueError``, before anything starts."""
    from fedge.imports import load_callable

    load = load_callable(DATASETS[opts.data][0], "data")
    load(client=0, clients=opts.agents, partition="dirichlet", alpha=opts.alpha, seed=opts.seed)
