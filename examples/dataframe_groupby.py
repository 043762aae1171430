"""A dataframe group-by aggregation with dask.dataframe, run on a shoal cluster.

The table (sales: store, product, quantity, price) is made in partitions on the workers
(``dd.from_map``); the group-by runs as one task graph on shoal, with the shoal client as
dask's scheduler. The answer is checked against pandas on the same rows.

    python examples/dataframe_groupby.py            # 100 partitions x 100,000 rows
    python examples/dataframe_groupby.py --small    # 10 partitions x 5,000 rows

Needs the ``dask`` extra: ``pip install 'shoal[dask]'``.
"""

from __future__ import annotations

import argparse
import importlib
import time

import dask.dataframe as dd
import numpy as np
import pandas as pd

import shoal


def make_sales(part: int, rows: int) -> pd.DataFrame:
    """Partition ``part`` of the sales table (deterministic)."""
    rng = np.random.default_rng(part)
    return pd.DataFrame({
        "store": rng.integers(0, 50, rows),
        "product": rng.integers(0, 200, rows),
        "quantity": rng.integers(1, 10, rows),
        "price": rng.uniform(1.0, 100.0, rows).round(2),
    })  # fmt: skip


def summarize(sales: pd.DataFrame) -> pd.DataFrame:
    """Revenue, units and average price per store (works on pandas and dask frames)."""
    sales = sales.assign(revenue=sales["quantity"] * sales["price"])
    return sales.groupby("store").agg({"revenue": "sum", "quantity": "sum", "price": "mean"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="10 partitions x 5,000 rows")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    args = parser.parse_args()
    parts, rows = (10, 5_000) if args.small else (100, 100_000)

    meta = make_sales(0, 0)
    with shoal.Client(n_workers=args.workers, threads_per_worker=1) as client:
        client.run(importlib.import_module, "dask.dataframe")  # warm up the workers (untimed)
        start = time.perf_counter()
        sales = dd.from_map(make_sales, range(parts), rows=rows, meta=meta)
        with client.as_dask_scheduler():  # or: .compute(scheduler=client.get)
            result = summarize(sales).compute()
        elapsed = time.perf_counter() - start

    expected = summarize(pd.concat([make_sales(i, rows) for i in range(parts)]))
    pd.testing.assert_frame_equal(result.sort_index(), expected.sort_index())
    best = result.sort_values("revenue", ascending=False).head(3)
    print(f"group-by: {parts} partitions x {rows:,} rows = {parts * rows:,} sales,"
          f" {len(result)} stores, on {args.workers} workers")  # fmt: skip
    print("top stores by revenue: " + ", ".join(
        f"store {s} ({r:,.0f})" for s, r in best["revenue"].items()))  # fmt: skip
    print(f"took {elapsed:.2f} s")


if __name__ == "__main__":
    main()
