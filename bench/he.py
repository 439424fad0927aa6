"""What homomorphic encryption would cost a device, next to secure
aggregation's masking: CPU seconds to encrypt one round's update and the
bytes it sends, for the digits MLP (4,810 parameters) and the MNIST 2NN
(199,210), and what the aggregator spends adding 100 of them.

Two schemes, from well-kept libraries (not project dependencies: ``pip
install phe tenseal gmpy2`` to run this):

* Paillier (``phe``, 2048-bit key, gmpy2): additively homomorphic, one
  ciphertext (512 bytes) per coordinate. Encrypting every coordinate of the
  2NN takes minutes, so it is timed on ``--paillier-sample`` coordinates and
  scaled linearly (each coordinate is an independent encryption).
* CKKS (``tenseal``, poly modulus degree 8192, 4,096 slots per ciphertext,
  scale 2^40): approximate arithmetic on packed vectors, the practical HE
  choice for model updates.

Neither removes the need for a key holder: whoever holds the secret key
decrypts each update, so single-key HE protects updates from the aggregator
only if some other party, trusted not to collude, decrypts the sum
(threshold or multi-key HE, which these libraries do not offer).

    python bench/he.py --out bench/results/he.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import emit, machine, note

MODELS = {"digits_mlp": 4_810, "mnist_2nn": 199_210}
SLOTS = 4096


def paillier(count: int, sample: int, rng: np.random.Generator) -> dict[str, Any]:
    from phe import paillier as ph

    public, private = ph.generate_paillier_keypair(n_length=2048)
    values = rng.uniform(-0.05, 0.05, min(sample, count))
    t = time.perf_counter()
    encrypted = [public.encrypt(float(v)) for v in values]
    per = (time.perf_counter() - t) / len(values)
    t = time.perf_counter()
    total = encrypted[0]
    for _ in range(99):
        total = total + encrypted[0]
    add = (time.perf_counter() - t) / 99
    assert abs(private.decrypt(total) - 100 * values[0]) < 1e-6
    ciphertext = (public.n ** 2).bit_length() // 8
    return {"scheme": "paillier-2048", "coordinates_timed": len(values),
            "device_encrypt_seconds": round(per * count, 2), "device_bytes_sent": ciphertext * count,
            "aggregator_add_seconds_100_devices": round(add * 99 * count, 2)}


def ckks(count: int, rng: np.random.Generator) -> dict[str, Any]:
    import tenseal as ts

    ctx = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=8192, coeff_mod_bit_sizes=[60, 40, 40, 60])
    ctx.global_scale = 2 ** 40
    values = rng.uniform(-0.05, 0.05, count)
    chunks = [values[i:i + SLOTS] for i in range(0, count, SLOTS)]
    t = time.perf_counter()
    encrypted = [ts.ckks_vector(ctx, list(c)) for c in chunks]
    enc = time.perf_counter() - t
    sent = sum(len(e.serialize()) for e in encrypted)
    t = time.perf_counter()
    total = [e.copy() for e in encrypted]
    for _ in range(99):
        for i, e in enumerate(encrypted):
            total[i] += e
    add = time.perf_counter() - t
    err = max(float(np.abs(np.array(t_.decrypt()) - 100 * c).max()) for t_, c in zip(total, chunks, strict=True))
    return {"scheme": "ckks-8192", "ciphertexts": len(encrypted), "device_encrypt_seconds": round(enc, 3),
            "device_bytes_sent": sent, "aggregator_add_seconds_100_devices": round(add, 3),
            "max_abs_error_of_100_sums": err}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--paillier-sample", type=int, default=500)
    p.add_argument("--out")
    args = p.parse_args()
    try:
        import phe  # noqa: F401
        import tenseal  # noqa: F401
    except ImportError:
        raise SystemExit("bench/he.py needs phe and tenseal: pip install phe tenseal gmpy2") from None
    rng = np.random.default_rng(0)
    rows = []
    for model, count in MODELS.items():
        for row in (paillier(count, args.paillier_sample, rng), ckks(count, rng)):
            rows.append({"model": model, "parameters": count, **row})
            note(rows[-1])
    emit({"benchmark": "homomorphic encryption of one update", "machine": machine(), "results": rows}, args.out)


if __name__ == "__main__":
    main()
