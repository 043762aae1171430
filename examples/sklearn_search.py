"""A scikit-learn hyperparameter search spread over a shoal cluster through joblib.

scikit-learn runs its parallel loops with joblib; inside ``joblib.parallel_backend("shoal")``
those loops become shoal tasks, so ``GridSearchCV(..., n_jobs=-1)`` fits its candidates on
every worker of the cluster. The training data is sent to the cluster once and shared by
all the fits (arguments over 1 MB are scattered once per search).

    python examples/sklearn_search.py            # 5-fold search over 12 candidates
    python examples/sklearn_search.py --small    # 3-fold search over 4 candidates

Needs the ``sklearn`` extra: ``pip install 'shoal[sklearn]'``.
"""

from __future__ import annotations

import argparse
import importlib
import time

import joblib
from sklearn.datasets import make_classification
from sklearn.ensemble import RandomForestClassifier
from sklearn.model_selection import GridSearchCV

import shoal
import shoal.integrations.joblib  # noqa: F401 - registers the "shoal" joblib backend


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="a small grid and data set")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    args = parser.parse_args()
    if args.small:
        samples, folds = 400, 3
        grid = {"n_estimators": [10, 20], "max_depth": [3, None]}
    else:
        samples, folds = 4_000, 5
        grid = {"n_estimators": [25, 50], "max_depth": [4, 8, None],
                "min_samples_leaf": [1, 5]}  # fmt: skip
    X, y = make_classification(n_samples=samples, n_features=20, n_informative=8,
                               random_state=0)  # fmt: skip

    with shoal.Client(n_workers=args.workers, threads_per_worker=1) as client:
        client.run(importlib.import_module, "sklearn.ensemble")  # warm up the workers (untimed)
        search = GridSearchCV(RandomForestClassifier(random_state=0), grid, cv=folds, n_jobs=-1)
        start = time.perf_counter()
        with joblib.parallel_backend("shoal"):
            search.fit(X, y)
        elapsed = time.perf_counter() - start
        workers = len(client.nthreads())

    fits = len(search.cv_results_["params"]) * folds
    print(f"grid search: {len(search.cv_results_['params'])} candidates x {folds} folds ="
          f" {fits} fits on {samples:,} samples, on {workers} workers")  # fmt: skip
    print(f"best: {search.best_params_} with accuracy {search.best_score_:.3f}")
    print(f"took {elapsed:.2f} s")


if __name__ == "__main__":
    main()
