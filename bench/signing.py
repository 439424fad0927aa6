"""What signing costs per message: time to sign and to verify, and bytes.

For the messages a job sends, at their real sizes: a device's presence, an
update of the 1.66M-parameter model in the default codec (int2 + zlib) and
in float32, and that model as a key. Signing is ``wire.seal`` (digest again
over the whole message, then one Ed25519 signature); verifying is
``wire.decode`` plus ``identity.check_signed``, against ``wire.decode`` of
the unsigned message. Best of ``--repeat`` runs, in milliseconds.

    python bench/signing.py --out bench/results/signing.json
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import emit, machine, note
from fedge import tensors, wire
from fedge.codecs import make_codec
from fedge.identity import Identity, check_signed
from fedge.messages import Status

PARAMS = 1_660_000  # the aggregate benchmark's model size


def best_ms(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return round(min(times) * 1000, 4)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    me = Identity.generate()
    rng = np.random.default_rng(0)
    delta = {"w": (rng.normal(size=PARAMS) * 0.01).astype(np.float32)}
    messages = {
        "presence": Status("dev-001", "online", {"ram_mb": 3800, "cores": 4, "codecs": ["int2", "int8"]}, 1).encode(),
        "update_int2_zlib": wire.encode(wire.Kind.UPDATE, {"round": 1, "sender": "dev-001"},
                                        make_codec({"name": "int2", "lossless": "zlib"}).encode(delta, rng)),
        "update_float32": wire.encode(wire.Kind.UPDATE, {"round": 1, "sender": "dev-001"}, tensors.pack(delta)),
        "key_model_float32": wire.encode(wire.Kind.MODEL, {"round": 1}, tensors.pack(delta)),
    }
    rows = {}
    for name, plain in messages.items():
        note(f"{name} ({len(plain)} bytes) ...")
        signed = wire.seal(plain, me)
        rows[name] = {
            "bytes": len(plain),
            "signature_bytes": len(signed) - len(plain),
            "sign_ms": best_ms(lambda p=plain: wire.seal(p, me), args.repeat),
            "decode_unsigned_ms": best_ms(lambda p=plain: wire.decode(p), args.repeat),
            "decode_and_verify_ms": best_ms(lambda s=signed: check_signed(wire.decode(s), me.public, "m"),
                                            args.repeat),
        }
        r = rows[name]
        r["verify_overhead_ms"] = round(r["decode_and_verify_ms"] - r["decode_unsigned_ms"], 4)
    emit({"benchmark": "signing", "machine": machine(), "repeat": args.repeat, "messages": rows}, args.out)


if __name__ == "__main__":
    main()
