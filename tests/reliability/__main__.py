"""``python -m tests.reliability [--scale small|full] [--postgres URL] [--only NAME ...]``: run the reliability
suite and print its table (Markdown). Postgres rows need a server URL (``--postgres`` or
``AGENTSLEEP_TEST_POSTGRES_URL``); each scenario gets a fresh schema in a scratch database, dropped afterwards."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

import torch
from sqlalchemy import create_engine, make_url, text

from .report import table
from .suite import FULL, SMALL, scenarios, sqlite_url


def _schema_url(admin_url: str, db: str) -> tuple[str, str]:
    schema = f"r_{uuid.uuid4().hex[:10]}"
    engine = create_engine(make_url(admin_url).set(database=db), isolation_level="AUTOCOMMIT")
    with engine.connect() as c:
        c.execute(text(f'CREATE SCHEMA "{schema}"'))
    engine.dispose()
    url = make_url(admin_url).set(database=db).update_query_dict({"options": f"-csearch_path={schema}"})
    return url.render_as_string(hide_password=False), schema


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.reliability", description=__doc__)
    ap.add_argument("--scale", choices=["small", "full"], default="small")
    ap.add_argument("--postgres", default=os.environ.get("AGENTSLEEP_TEST_POSTGRES_URL"))
    ap.add_argument("--only", nargs="*", default=None, help="scenario names (sigkill race flips truncation ...)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    logging.basicConfig(level=logging.CRITICAL)  # the scenarios provoke errors on purpose; the table tells
    scale = FULL if args.scale == "full" else SMALL
    rows = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        db = None
        admin = None
        if args.postgres:
            admin = create_engine(args.postgres, isolation_level="AUTOCOMMIT")
            db = f"agentsleep_rel_{uuid.uuid4().hex[:10]}"
            with admin.connect() as c:
                c.execute(text(f'CREATE DATABASE "{db}"'))
        try:
            for name, pg_only, run in scenarios(scale, tmp):
                if args.only and name not in args.only:
                    continue
                if not pg_only:
                    with sqlite_url(tmp, name) as url:
                        rows.append(run(url))
                        print(table(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
                if args.postgres and db is not None:
                    url, _ = _schema_url(args.postgres, db)
                    rows.append(run(url))
                    print(table(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
        finally:
            if admin is not None and db is not None:
                with admin.connect() as c:
                    c.execute(text(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)'))
                admin.dispose()
    print(f"command: python -m tests.reliability --scale {args.scale}   ({time.perf_counter() - t0:.0f} s)")
    print(table(rows))
    for r in rows:
        for note in r.notes:
            print(f"- {r.scenario} [{r.backend}]: {note}")
    return 0 if all(r.clean for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
