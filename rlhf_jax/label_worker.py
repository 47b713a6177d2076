r"""A mock labeler working through the label server's HTTP API, like a person (spec §5.3).

  python -m rlhf_jax.label_worker --server http://127.0.0.1:8000 --token TOKEN \
      --labeler vader|copying|rouge [--delay_s 0.5] [--noise 0.1] [--seed 0] [--max_labels 0] \
      [--idle_exit_s 0]

The token may also come from the environment variable RLHF_JAX_LABEL_TOKEN (not visible in
`ps`). Give each worker its own labeler (`label_server add-labeler NAME --bot`): a labeler holds
one comparison at a time. The worker stops cleanly on SIGTERM or SIGINT, after `--max_labels`
labels, or after `--idle_exit_s` seconds with nothing to label, giving back a comparison it
holds; it prints its counts as JSON on its last line. See `rlhf_jax.labeling.worker`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time

import httpx2


def build_parser() -> argparse.ArgumentParser:
    """The worker's flags."""
    p = argparse.ArgumentParser(prog="python -m rlhf_jax.label_worker",
                                description="Mock labeler using the label server's HTTP API.")
    p.add_argument("--server", required=True, help="e.g. http://127.0.0.1:8000")
    p.add_argument("--token", default=None, help="access token (or RLHF_JAX_LABEL_TOKEN)")
    p.add_argument("--labeler", required=True, choices=["vader", "copying", "rouge"])
    p.add_argument("--delay_s", type=float, default=0.5, help="seconds to 'read' each comparison")
    p.add_argument("--noise", type=float, default=0.0, help="probability of a random pick")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=0.0,
                   help="0: best score; > 0: softmax(score / temperature)")
    p.add_argument("--copy_ngram", type=int, default=0, help="copying labeler: n-gram mode")
    p.add_argument("--max_labels", type=int, default=0, help="stop after this many (0 = never)")
    p.add_argument("--idle_exit_s", type=float, default=0.0,
                   help="stop after this long with nothing to label (0 = never)")
    p.add_argument("--poll_s", type=float, default=1.0, help="poll interval while idle")
    p.add_argument("--wait_for_server_s", type=float, default=30.0,
                   help="how long to wait for the server at start-up")
    return p


def main(argv: list[str] | None = None) -> int:
    """Runs the worker; returns its exit status (2: bad flags, token or server)."""
    from rlhf_jax.labeling.client import ApiError, AuthError, LabelClient
    from rlhf_jax.labeling.worker import Judge, MockWorker

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    token = args.token or os.environ.get("RLHF_JAX_LABEL_TOKEN")
    if not token:
        print("error: give --token or set RLHF_JAX_LABEL_TOKEN", file=sys.stderr)
        return 2
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    try:
        judge = Judge(args.labeler, noise=args.noise, seed=args.seed,
                      temperature=args.temperature, copy_ngram=args.copy_ngram)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    with LabelClient(args.server, token) as client:
        deadline = time.monotonic() + args.wait_for_server_s
        while True:
            try:
                me = client.me()
                break
            except AuthError as e:
                print(f"error: {args.server} refused the token: {e.detail}", file=sys.stderr)
                return 2
            except (httpx2.TransportError, ApiError) as e:
                if time.monotonic() > deadline or stop.is_set():
                    print(f"error: cannot reach the label server {args.server}: {e}",
                          file=sys.stderr)
                    return 2
                stop.wait(0.5)
        logging.getLogger(__name__).info("labelling as %r (%s, noise %g) on %s", me["name"],
                                         args.labeler, args.noise, args.server)
        counts = MockWorker(client, judge, delay_s=args.delay_s, max_labels=args.max_labels,
                            idle_exit_s=args.idle_exit_s, poll_s=args.poll_s, stop=stop).run()
    print(json.dumps(counts), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
