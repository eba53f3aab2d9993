"""CRD's scores by one dense product against the memory bank, or by gathering the sampled rows.

    python benchmarks/crd_scores.py                        # B = 64, K = 16384, N up to 1.28 M
    python benchmarks/crd_scores.py --negatives 4096 --sizes 50000,200000

Times the compiled loss and its gradients (``crd_nce_loss`` with a fixed normaliser, batch
mean, ``jax.value_and_grad`` in both embeddings) with ``method="dense"`` and ``"gather"`` in
alternating blocks, for each memory size N, and prints the time of each and the N / (K + 1) at
which the dense product stops paying (where ``method="auto"`` switches, ``_DENSE_MAX_RATIO`` in
``kd_jax/losses/_crd.py``). Prints a table and, as its last line, one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from kd_jax import losses  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--negatives", type=int, default=16384)
    p.add_argument("--sizes", default="50000,100000,200000,400000,800000,1281167",
                   help="comma list of memory sizes N")
    p.add_argument("--steps", type=int, default=3, help="calls per timed block")
    p.add_argument("--repeats", type=int, default=3, help="timed blocks (the median is kept)")
    return p.parse_args(argv)


def _unit(x):
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def _loss_and_grads(method):
    def loss(s, t, m_s, m_t, idx):
        return losses.crd_nce_loss(s, t, m_s, m_t, idx, temperature=0.07,
                                   normalizers=(1e4, 1e4), method=method).mean()
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def _block(fn, args, steps):
    jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    for _ in range(steps):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / steps


def main(argv=None):
    args = parse_args(argv)
    b, d, k = args.batch_size, args.dim, args.negatives
    rows = []
    for n in (int(x) for x in args.sizes.split(",")):
        keys = jax.random.split(jax.random.PRNGKey(n), 5)
        s, t = (_unit(jax.random.normal(kk, (b, d))) for kk in keys[:2])
        m_s, m_t = (_unit(jax.random.normal(kk, (n, d))) for kk in keys[2:4])
        idx = jax.random.randint(keys[4], (b, k + 1), 0, n, dtype=jnp.int32)
        fns = {m: _loss_and_grads(m) for m in ("dense", "gather")}
        times = {m: [] for m in fns}
        for m, fn in fns.items():
            jax.block_until_ready(fn(s, t, m_s, m_t, idx))  # compile
        for _ in range(args.repeats):
            for m, fn in fns.items():
                times[m].append(_block(fn, (s, t, m_s, m_t, idx), args.steps))
        dense, gather = (statistics.median(times[m]) for m in ("dense", "gather"))
        rows.append({"num_examples": n, "ratio": n / (k + 1), "dense_ms": 1e3 * dense,
                     "gather_ms": 1e3 * gather, "dense_faster": dense < gather})
        print(f"N={n:>8} N/(K+1)={n / (k + 1):6.1f} dense {1e3 * dense:8.1f} ms "
              f"gather {1e3 * gather:8.1f} ms", flush=True)
        del m_s, m_t
    device = jax.devices()[0]
    print(f"{device.device_kind} x {jax.device_count()}, batch {b}, D {d}, K {k}")
    print("| N | N / (K + 1) | dense (ms) | gather (ms) | faster |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['num_examples']:,} | {r['ratio']:.1f} | {r['dense_ms']:.1f} | "
              f"{r['gather_ms']:.1f} | {'dense' if r['dense_faster'] else 'gather'} |")
    print(json.dumps({"device_kind": device.device_kind, "batch_size": b, "dim": d,
                      "negatives": k, "rows": rows}))


if __name__ == "__main__":
    main()
