"""Batch document generation: render 200 small HTML reports, fanned out over the workers.

Each report (one per customer of a made-up shop) computes its figures and writes an HTML
file to the output folder (a temporary directory here; the workers share this machine's
disk). The calls go through the standard `concurrent.futures` interface that
``client.get_executor()`` provides, so code written for a ``ThreadPoolExecutor`` or
``ProcessPoolExecutor`` runs on the cluster unchanged.

    python examples/reports.py            # 200 reports
    python examples/reports.py --small    # 20 reports (a smoke test)
"""

from __future__ import annotations

import argparse
import concurrent.futures
import html
import os
import random
import tempfile
import time
from pathlib import Path

import shoal

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>Statement for {name}</title></head>
<body>
<h1>Statement for {name}</h1>
<p>{count} orders, {total:,.2f} EUR in total; largest order {largest:,.2f} EUR.</p>
<table>
<tr><th>order</th><th>date</th><th>amount (EUR)</th></tr>
{rows}
</table>
</body></html>
"""


def render_report(customer: int, folder: str) -> tuple[str, int]:
    """Make customer ``customer``'s statement; returns the file written and its size."""
    rng = random.Random(customer)
    orders = [(f"#{customer:04d}-{i:03d}", f"2026-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
               rng.uniform(5, 500)) for i in range(rng.randint(5, 40))]  # fmt: skip
    rows = "\n".join(f"<tr><td>{o}</td><td>{d}</td><td>{a:,.2f}</td></tr>"
                     for o, d, a in sorted(orders, key=lambda o: o[1]))  # fmt: skip
    amounts = [a for _, _, a in orders]
    page = PAGE.format(name=html.escape(f"customer {customer}"), count=len(orders),
                       total=sum(amounts), largest=max(amounts), rows=rows)  # fmt: skip
    path = os.path.join(folder, f"statement-{customer:04d}.html")
    with open(path, "w") as f:
        f.write(page)
    return path, len(page.encode())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="20 reports instead of 200")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    args = parser.parse_args()
    count = 20 if args.small else 200

    with tempfile.TemporaryDirectory(prefix="shoal-reports-") as folder, \
            shoal.Client(n_workers=args.workers, threads_per_worker=1) as client:  # fmt: skip
        start = time.perf_counter()
        with client.get_executor() as executor:
            assert isinstance(executor, concurrent.futures.Executor)
            written = list(executor.map(render_report, range(count), [folder] * count))
        elapsed = time.perf_counter() - start
        files = sorted(Path(folder).glob("*.html"))
        assert len(files) == count and all(Path(p).exists() for p, _ in written)
        print(f"reports: {count} HTML statements written to {folder} by {args.workers} workers")
        print(f"{sum(size for _, size in written):,} bytes in total; first: {files[0].name}")
        print(f"took {elapsed:.2f} s")


if __name__ == "__main__":
    main()
