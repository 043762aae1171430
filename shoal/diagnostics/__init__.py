"""What the servers record so that people can see what the cluster does.

  task_stream.py  the scheduler's ring of finished tasks (key, group, worker, start, stop)
                  and per-group duration histograms fed from it
  logs.py         a bounded in-memory log handler per process; ``SHOAL_LOG_LEVEL``
  progress.py     ``shoal.progress(futures)``: progress bars per task group (client side)
  service.py      the scheduler's extension answering progress and log requests

Nothing here does I/O on its own; the dashboard (`shoal.dashboard`) and the client read it.
"""
