"""Concurrent load on a served model: N client threads, latencies and throughput.

`run_load(call, requests, clients)` sends every request once from `clients` threads (each
thread takes the next unsent request as soon as its previous one is answered; all threads
start together) and returns each request's answer or error with its latency. Point it at an
in-process `ServingSession` or a local server only.

Example:
>>> served = ServingSession("/models/gemma/1")
>>> result = run_load(lambda r: served.run("serving_default", r), requests, clients=8)
>>> result.summary()["p99_s"]
"""

from __future__ import annotations

import dataclasses
import threading
import time

import numpy as np


@dataclasses.dataclass
class LoadResult:
    """Per request (in the order given): `outputs[i]` (None if it failed), `errors[i]`
    (None if it succeeded), `latencies[i]` in seconds; `seconds`: wall time of the run."""

    outputs: list
    errors: list
    latencies: list
    seconds: float
    clients: int

    def summary(self, tokens=None):
        """Requests/s, p50/p99 latency; tokens/s when `tokens` (generated tokens per request,
        e.g. from the outputs) is given."""
        latencies = np.array(self.latencies)
        out = {"clients": self.clients, "requests": len(latencies),
               "failed": sum(e is not None for e in self.errors), "seconds": self.seconds,
               "requests_per_s": len(latencies) / self.seconds,
               "p50_s": float(np.percentile(latencies, 50)),
               "p99_s": float(np.percentile(latencies, 99))}
        if tokens is not None:
            out["tokens_per_s"] = float(np.sum(tokens)) / self.seconds
        return out


def run_load(call, requests, clients, timeout=600.0):
    """Send each of `requests` once through `call(request)` from `clients` threads."""
    if clients < 1:
        raise ValueError(f"clients must be >= 1, got {clients}")
    n = len(requests)
    outputs, errors, latencies = [None] * n, [None] * n, [0.0] * n
    next_index = iter(range(n))
    lock = threading.Lock()
    start = threading.Barrier(clients + 1)

    def client():
        start.wait()
        while True:
            with lock:
                i = next(next_index, None)
            if i is None:
                return
            t0 = time.perf_counter()
            try:
                outputs[i] = call(requests[i])
            except Exception as error:  # noqa: BLE001  (recorded per request)
                errors[i] = error
            latencies[i] = time.perf_counter() - t0

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join(max(0.0, timeout - (time.perf_counter() - t0)))
    seconds = time.perf_counter() - t0
    if any(t.is_alive() for t in threads):
        raise TimeoutError(f"{clients} clients did not finish {n} requests in {timeout} s")
    return LoadResult(outputs, errors, latencies, seconds, clients)
