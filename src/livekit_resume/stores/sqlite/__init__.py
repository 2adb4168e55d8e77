"""SQLite store: the embedded default. One file, no server, safe for several processes.

The file runs in WAL mode, so readers never wait for a writer. Every mutating operation
is one ``BEGIN IMMEDIATE`` transaction, atomic across every process on the machine. All
SQLite work runs on one dedicated thread per store with one connection, so no call ever
blocks the event loop.

The parts, each with one job:

- ``store.py``: `SQLiteStore`, the `Store` contract in SQL (leases, commits, reads);
- ``sessions.py``: session rows, their expiry and a wall clock stepped back;
- ``connection.py``: the thread and connection, opening the file, busy retries, errors;
- ``schema.py``: the file format, its mark and version, migration of older files;
- ``transactions.py``: the read and write transactions every operation runs in.
"""

from .schema import APPLICATION_ID, DEFAULT_NAMESPACE, SCHEMA_VERSION
from .store import SQLiteStore

__all__ = ["APPLICATION_ID", "DEFAULT_NAMESPACE", "SCHEMA_VERSION", "SQLiteStore"]
