"""What the archive is: storage layout, the Parquet codec, manifests, and the read side.

Owns: keys and atomic writes on fsspec storage, rows <-> Arrow <-> Parquet, the batch
manifest and pending marker, the catalog of committed batches, and what reads an archive
without a database (verify, show, ls, ``open_archive``).

May import only the base modules (errors, models, arrow_types, version). Never imports
``archiver.source`` (the database) or ``archiver.engine``.
"""
