"""``bench serve --num-clients N``: the replay sent from N client processes, so that the client is not what limits a
fast server. One Python process streaming over httpx spends a core at ~10-20k streamed chunks a second (on an H200
its one process sat at ~100% of a core while two API servers served 500 streams), and then it, not the server, sets
the figure.

Request i goes to client ``i mod N``; every client sends its share at the same arrival times as one client would
(``PlannedRequest.arrival_s`` after one shared start). The clients start, import and open their connections pools
first; the parent then names a start time on the shared monotonic clock (``time.monotonic``: system-wide on Linux)
a moment ahead, and each client sends from then on. The duration runs from that start to the end of the last
request of any client. ``--max-concurrency`` is split evenly between the clients (it must be a multiple of N).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import time

from pagedllm.bench.serve import PlannedRequest, check_num_clients, replay
from pagedllm.bench.serve_metrics import RequestResult

_START_MARGIN_S = 0.2  # between naming the start time and the start: every client has read it by then
_READY_TIMEOUT_S = 120.0  # a client's start-up (imports)


def replay_in_processes(args: argparse.Namespace, planned: list[PlannedRequest]) -> tuple[list[RequestResult], float]:
    """The results in ``planned``'s order and the duration from the shared start to the last request's end."""
    check_num_clients(args.num_clients, args.max_concurrency)
    per_client = args.max_concurrency // args.num_clients if args.max_concurrency else None
    shares = [share for client in range(args.num_clients) if (share := planned[client::args.num_clients])]
    context = multiprocessing.get_context("spawn")
    barrier, start_at, answers = context.Barrier(len(shares) + 1), context.Value("d", 0.0), context.Queue()
    # What replay reads of the arguments (the namespace itself holds the CLI's handler, which does not pickle).
    client_args = argparse.Namespace(base_url=args.base_url, endpoint=args.endpoint, api_key=args.api_key,
                                     timeout=args.timeout)
    clients = [context.Process(target=_client_main, args=(client_args, share, per_client, barrier, start_at, answers),
                               daemon=True) for share in shares]
    for client in clients:
        client.start()
    try:
        barrier.wait(_READY_TIMEOUT_S)  # every client is ready
        start_at.value = time.monotonic() + _START_MARGIN_S
        barrier.wait(_READY_TIMEOUT_S)  # ... and has the start time
        finished = [answers.get(timeout=_answer_timeout(args, planned)) for _ in clients]
    finally:
        for client in clients:
            client.join(timeout=10)
            if client.is_alive():
                client.kill()
    return _merge(planned, finished, start_at.value)


def _answer_timeout(args: argparse.Namespace, planned: list[PlannedRequest]) -> float:
    """The longest a client can take: the last arrival plus one request's timeout, and some slack."""
    return max(request.arrival_s for request in planned) + args.timeout + 60.0


def _client_main(args: argparse.Namespace, share: list[PlannedRequest], max_concurrency: int | None,
                 barrier, start_at, answers) -> None:
    import httpx  # noqa: F401  (imported before the start, not on the clock)

    barrier.wait(_READY_TIMEOUT_S)
    barrier.wait(_READY_TIMEOUT_S)
    try:
        results, end = asyncio.run(replay(args, share, start_at.value, max_concurrency, show_progress=False))
        answers.put(([request.index for request in share], results, end, None))
    except Exception as exc:  # noqa: BLE001 (any failure: the parent reports it instead of waiting out the timeout)
        answers.put(([], [], 0.0, f"{type(exc).__name__}: {exc}"))


def _merge(planned: list[PlannedRequest], finished: list[tuple], start: float) -> tuple[list[RequestResult], float]:
    errors = [error for *_, error in finished if error]
    if errors:
        raise RuntimeError(f"a bench client failed: {errors[0]}")
    by_index = {index: result for indices, results, _, _ in finished for index, result in zip(indices, results)}
    return [by_index[request.index] for request in planned], max(end for _, _, end, _ in finished) - start
