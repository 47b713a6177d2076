r"""`python -m rlhf_jax.label_server COMMAND`: run and feed the labeling app (spec §5.3).

  serve        --workdir DIR [--db URL] [--host 127.0.0.1] [--port 8000] [--lease_s 600]
               [--gold_every 10] [--workers 1]
  add-labeler  NAME [--admin] [--bot]         prints a new access token alone on its last line
  enqueue      --task CONFIG --samples FILE.jsonl [--kind train] [--overlap 0.1] [--round 0]
  export       --output labels.json [--format released|jsonl] [--kinds train,validation]
  stats        prints the quality-control statistics as JSON
  labelers     lists the labelers

Every command finds the store by `--db URL` (e.g. postgresql+psycopg://user@host/db) or else by
`--workdir DIR` (the SQLite file DIR/labels.sqlite). Errors print one line naming the culprit
and exit with status 2; nothing is half-written.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from rlhf_jax.labeling.schema import SchemaVersionError, StoreError
from rlhf_jax.labeling.store import LabelStore

logger = logging.getLogger("rlhf_jax.labeling")


def _store_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", help="directory of the SQLite store (labels.sqlite)")
    parser.add_argument("--db", help="SQLAlchemy URL of the store; overrides --workdir")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every command."""
    parser = argparse.ArgumentParser(prog="python -m rlhf_jax.label_server",
                                     description="Human labeling server for rlhf_jax.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the web app")
    _store_args(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--lease_s", type=float, default=600.0,
                   help="seconds a comparison stays reserved for the labeler who got it")
    p.add_argument("--gold_every", type=int, default=10,
                   help="one gold question per this many labels of a labeler (0 = none)")
    p.add_argument("--workers", type=int, default=1, help="server processes")
    p.add_argument("--pool_size", type=int, default=8, help="database connections per process")
    p.add_argument("--synchronous", default="FULL", choices=["FULL", "NORMAL"],
                   help="SQLite durability: FULL survives power cuts, NORMAL only crashes")
    p.add_argument("--access_log", action="store_true", help="log every request")

    p = sub.add_parser("add-labeler", help="add a labeler and print its access token")
    _store_args(p)
    p.add_argument("name")
    p.add_argument("--admin", action="store_true", help="may see stats, export and enqueue")
    p.add_argument("--bot", action="store_true",
                   help="a mock label worker: also receives each comparison's extra data")

    p = sub.add_parser("enqueue", help="add comparisons from a samples file")
    _store_args(p)
    p.add_argument("--task", required=True, help="experiment config, e.g. configs/sentiment.py")
    p.add_argument("--samples", required=True, help="JSONL file (see rlhf_jax.labeling.ingest)")
    p.add_argument("--kind", default="train", choices=["train", "validation", "gold"])
    p.add_argument("--round", type=int, default=0)
    p.add_argument("--overlap", type=float, default=0.1,
                   help="share of comparisons that two labelers judge (quality control)")
    p.add_argument("--instructions", default=None,
                   help="instructions to show: sentiment, descriptiveness, tldr, cnndm "
                        "(default: the config file's name)")
    p.add_argument("--keep_invalid", action="store_true",
                   help="keep comparisons with a sample that failed the truncation check")

    p = sub.add_parser("export", help="write the labels to a file")
    _store_args(p)
    p.add_argument("--output", required=True)
    p.add_argument("--format", default="released", choices=["released", "jsonl"])
    p.add_argument("--kinds", default="train,validation",
                   help="comparison kinds to export, comma-separated")

    for name, text in (("stats", "print quality-control statistics"), ("labelers", "list labelers")):
        p = sub.add_parser(name, help=text)
        _store_args(p)
    return parser


def _open(args, create: bool = True, **kw) -> LabelStore:
    return LabelStore.open(args.workdir, args.db, create=create, **kw)


def cmd_serve(args) -> int:
    """Runs uvicorn with the app (several worker processes share the database)."""
    import uvicorn

    from rlhf_jax.labeling import api

    store = _open(args, pool_size=args.pool_size, synchronous=args.synchronous)
    counts = store.counts()
    logger.info("label store %s: %d comparisons, %d labels, %d labelers", store.where,
                counts["comparisons"]["total"], counts["labels"]["total"], counts["labelers"])
    logger.info("serving on http://%s:%d/ (lease %g s, %d worker%s)", args.host, args.port,
                args.lease_s, args.workers, "" if args.workers == 1 else "s")
    common = dict(host=args.host, port=args.port, log_level="info", access_log=args.access_log,
                  timeout_graceful_shutdown=10)
    if args.workers == 1:
        app = api.create_app(store, lease_s=args.lease_s, gold_every=args.gold_every)
        uvicorn.run(app, **common)
        store.close()
        return 0
    store.close()
    os.environ.update(RLHF_JAX_LABEL_DB=store.url, RLHF_JAX_LABEL_LEASE_S=str(args.lease_s),
                      RLHF_JAX_LABEL_GOLD_EVERY=str(args.gold_every),
                      RLHF_JAX_LABEL_POOL=str(args.pool_size),
                      RLHF_JAX_LABEL_SYNCHRONOUS=args.synchronous)
    uvicorn.run("rlhf_jax.labeling.api:app_from_env", factory=True, workers=args.workers,
                **common)
    return 0


def cmd_add_labeler(args) -> int:
    """Adds a labeler; the token is printed once, alone on the last line."""
    store = _open(args)
    token = store.add_labeler(args.name, admin=args.admin, bot=args.bot)
    role = "admin" if args.admin else "bot" if args.bot else "labeler"
    print(f"added {role} {args.name!r} to {store.where}; its access token (shown only now):")
    print(token)
    store.close()
    return 0


def cmd_enqueue(args) -> int:
    """Tokenizes a samples file and enqueues it in one transaction."""
    from rlhf_jax.labeling import ingest

    config = ingest.load_config(args.task)
    name = args.instructions
    if name is None:
        name = os.path.splitext(os.path.basename(args.task.partition(".py:")[0] + ".py"))[0]
    ctx = ingest.task_context(config, name)
    records, names, skipped = ingest.read_sample_file(
        args.samples, ctx, kind=args.kind, round_=args.round, keep_invalid=args.keep_invalid)
    store = _open(args)
    result = store.enqueue(records, ctx.identity, overlap=args.overlap, names=names)
    print(f"{args.samples}: {result['added']} comparison(s) added, {result['existing']} already in "
          f"{store.where}; left out: {skipped['invalid']} with an invalid sample, "
          f"{skipped['duplicates']} duplicates")
    store.close()
    return 0


def cmd_export(args) -> int:
    """Writes the export file atomically."""
    from rlhf_jax.labeling import export

    store = _open(args, create=False)
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    count = export.export_labels(store, args.output, args.format, kinds)
    print(f"wrote {count} labels ({args.format}) to {args.output}")
    store.close()
    return 0


def cmd_stats(args) -> int:
    """Prints the statistics as JSON."""
    from rlhf_jax.labeling import stats

    store = _open(args, create=False)
    print(json.dumps(stats.compute_stats(store), indent=1))
    store.close()
    return 0


def cmd_labelers(args) -> int:
    """Prints one labeler per line."""
    store = _open(args, create=False)
    for r in store.list_labelers():
        role = "admin" if r["admin"] else "bot" if r["bot"] else "labeler"
        print(f"{r['id']}\t{r['name']}\t{role}")
    store.close()
    return 0


COMMANDS = {"serve": cmd_serve, "add-labeler": cmd_add_labeler, "enqueue": cmd_enqueue,
            "export": cmd_export, "stats": cmd_stats, "labelers": cmd_labelers}


def main(argv: list[str] | None = None) -> int:
    """Runs one command; returns the exit status (2 on a refused input)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not (args.db or args.workdir):
        print(f"error: {args.command}: give --workdir DIR or --db URL", file=sys.stderr)
        return 2
    try:
        return COMMANDS[args.command](args)
    except (StoreError, SchemaVersionError, FileNotFoundError, ValueError) as e:
        print(f"error: {args.command}: {e}", file=sys.stderr)
        return 2
