"""shoal under the ecosystem's familiar APIs.

- `shoal.integrations.executor`: a `concurrent.futures.Executor` (``client.get_executor()``).
- `shoal.integrations.joblib`: a joblib backend named ``"shoal"``, registered on import
  (``import shoal.integrations.joblib`` then ``with joblib.parallel_backend("shoal"): ...``).
- `shoal.integrations.dask`: a shoal client as a dask scheduler (``client.get``,
  ``client.compute``, ``client.persist``, ``client.as_dask_scheduler()``).

Nothing here is imported by ``import shoal``: joblib and dask are optional extras
(``pip install 'shoal[joblib]'``, ``'shoal[dask]'``, ``'shoal[sklearn]'``) and each module
imports its library only when it is itself imported.
"""
