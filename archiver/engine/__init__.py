"""The batch protocol: how rows leave the database for the archive, and come back.

Owns: planning a batch, the commit protocol that every writer of batches shares
(marker, files, read-back, ledger, COMMIT, manifest, clean-up; abandon and the
uncertain COMMIT), the run loop with its read-ahead, the sweeps, recovery of batches a
crash left open, and the operations that rewrite committed batches (restore, compaction).

Where each lives: ``commit`` (the protocol, once, and its table of steps), ``run`` (a
run: recovery, the loop of batches, its limits), ``batcher`` (one batch: lock, read,
hand to the protocol, retry), ``batch`` (a planned batch: id, keys, encoding,
manifest), ``read_ahead``, ``options`` (RunOptions and the defaults), ``results``
(RunReport, BatchReport), ``report`` (the JSON run report), ``sweeps``, ``recovery``,
``restore`` and ``rewrite``, ``compact`` and ``merge``.

May import ``archiver.archive``, ``archiver.source`` and the base modules (errors,
models, policy, arrow_types, version). Never imports ``archiver.cli`` or reads
settings: callers pass plain option objects.
"""
