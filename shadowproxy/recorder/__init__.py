"""The recorder: finished exchanges → batches → PostgreSQL (COPY), or the spool on disk.

``Recorder.submit`` is the only entry from the data path and never blocks; one writer task
per process does the rest (``recorder.py``), turning exchanges into rows (``rows.py``),
writing them with COPY (``postgres.py``) and, while the database is away, to append-only
spool files that are replayed exactly once when it is back (``spool.py``).
"""
