"""Redis store: the workers of one deployment share sessions through one Redis.

Plain Redis 6+ or Valkey, standalone, behind Sentinel, or a Redis Cluster; no modules.
Every operation on a session is one Lua script (``stores/lua/``) run on the server, so
it is atomic: a commit checks the fencing epoch and the expected base version, appends
only its new records, writes the version record, moves the head, trims old versions and
refreshes the session's TTL, all or nothing.

Key layout, for namespace ``ns`` and session key ``k`` (``{``, ``}`` and ``%`` in ``k``
are percent-escaped so the hash tag is always exactly the key):

- ``ns:{k}:head``      hash: fencing epoch, lease (owner, expires), latest and oldest
  retained version, current log generation, last write time
- ``ns:{k}:v:<n>``     hash: version ``n`` (epoch, created, log generation and length
  it reads, records in that log, bytes written, commit id): short values only, so that
  Redis keeps it as a listpack (no value over ``hash-max-listpack-value``, 64 bytes)
- ``ns:{k}:v:<n>:b``   string: version ``n``'s body, its head bytes and info, longer
  than 64 bytes each: ``<length of head in decimal>:<head><info>`` (``read_body`` in
  session.lua). A version record of a release before it holds ``head`` and ``info`` as
  fields of its hash and has no body: every script reads either (a hash with both
  fields, or the body; a body missing is a corrupt record). A user whose ACL lacks
  ``SET`` (docs/security.md's line before staging) writes its versions that way too
- ``ns:{k}:log:<g>``   list: msgpack records ``[stream, id, after, data]`` of generation ``g``
  (``[stream, id, data]`` when ``after`` is the id its stream's previous record placed;
  the snapshot's streams as ``0`` and ``1``: `records.pack_records`)
- ``ns:up:{k}:<token>`` string: a log element over a megabyte, written a quarter
  megabyte per command ahead of the script that moves it into the log (``staged_keys``
  in session.lua), each piece renewing its TTL; one the script did not take is deleted
  by the client, or expires within two minutes of its last piece (a client that died).
  Outside the prefix, so that one left behind is never taken for a session's remains
- ``ns:rm:<sha256(k)>{<t>}`` string: a deleted session's tombstone, its last epoch,
  for a day (`TOMBSTONE_TTL`), laid before the delete script runs: a writer whose
  commit or renewal finds no head reads it, and one at that epoch or older is fenced
  rather than told to write the session back. Named by a hash of ``k`` (``rm`` leaves
  no trace of the key) and a tag ``t`` of four letters in ``k``'s slot
  (`keys.slot_tags`), so it lives on the session's node and a failover that keeps the
  delete keeps it too
- ``ns:rm:<sha256(k)>`` string: the same tombstone as releases before the one above
  lay it, in a slot of its own; still laid beside it and read with it (the higher
  epoch counts), for their workers during a rolling deploy
- ``ns:sessions``      sorted set: the namespace's session keys, for `keys()`
- ``ns:events``        pub/sub channel of state changes (JSON objects)

All keys of one session share the hash tag ``{k}``, hence one Cluster slot: the scripts
declare the head key and derive the others from its prefix, which Redis Cluster accepts
for keys of the declared slot (it refuses keys of another slot, checked by the tests on
a real cluster). The namespace index is a key of its own (another slot on a Cluster),
so it is written by separate commands, never inside a session script; see
`namespace.py` for how it stays a superset of the live sessions.

Scripts (each file runs behind ``clock.lua`` and ``session.lua``, the shared preludes;
``index`` behind ``clock.lua`` only, ``publish`` alone):
``acquire``, ``renew``, ``release``, ``commit``, ``compact``, ``load``, ``versions``,
``info``, ``delete``, ``index`` and ``publish``. Every session script starts from
``live_head()`` (read the head; an expired one counts as none, and writing scripts
purge it). They are called by SHA and, on NOSCRIPT, loaded again on the node of the
call's key alone. Times come from the server's ``TIME`` inside the scripts (``clock.lua``).

Compaction: after a commit whose log outgrew `needs_compaction`, the client reads the
version's records, folds them with `fold_records` and hands the result to ``compact``,
which writes it as the next log generation only if the head is still at that commit
(same version, generation and commit id); otherwise it does nothing and a later commit
tries again. Reads (``load``) are one script, so a compaction never tears them.

Faults, and what the store does about them (tests: ``tests/test_redis_faults.py``):

- **A stall or a lost reply.** A commit carries its id (`Commit.commit_id`, or a random
  one) into its version record. A server that stalls past ``socket_timeout`` may still
  run the commit later: the bytes of the first attempt, and of redis-py's retries, wait
  in its socket buffers. The caller gets `StoreUnavailable`; sending the *same* commit
  again returns the version that landed, whichever of the copies ran first, and writes
  nothing twice. A different commit on the old base is refused.
- **A restart without data** (no persistence, a failover to an empty replica): commit
  and renew raise `LeaseLost` with ``vanished=True`` (the head is gone, nobody holds
  it; acquire again and write the whole snapshot). If another worker acquired first,
  it is a takeover: ``vanished=False`` with the new epoch.
- **Server settings.** Before its first operation the store reads each primary's
  ``maxmemory-policy`` and persistence (`RedisStore.check`). ``allkeys-*`` (and
  ``volatile-*`` when sessions have a ``ttl``) can evict session keys: warned once,
  refused with `StoreUnavailable` when ``strict=True``. No persistence at all is
  warned once. A server hiding CONFIG (renamed, ACL) is used unchecked. A server that
  does not answer fails that first operation there (not on a Cluster, where the node
  down may not be the session's), and the check runs again on the next.
  Required for a deployment: ``maxmemory-policy noeviction`` (or ``volatile-*`` with
  ``ttl=None``), ``appendonly yes`` with ``appendfsync everysec`` or ``always``, and
  replicas with ``wait_replicas`` where a failover must not lose acknowledged commits.
- **Out of memory** (``noeviction`` at ``maxmemory``): `StoreUnavailable` saying so,
  nothing written. Only WRONGTYPE and the scripts' own ``corrupt`` findings are
  `SnapshotCorrupt`; no other server error is taken for damaged data.
- **A lost head** (evicted, or deleted by hand, while ``v:*`` / ``log:*`` keys remain):
  never read as "no snapshot", which would start the conversation afresh. When the
  head is missing and there is reason to look (the session's first log or version key (or its body)
  exists, the namespace index lists the key (an entry not recorded for two TTLs is
  collected first: its session expired), or the server's eviction policy was seen
  to evict keys), the store SCANs the session's prefix
  (on a Cluster, on the node of its slot; O(keys in the database), never on a commit).
  The rule: ``load`` and ``acquire`` raise `SnapshotCorrupt` naming the head and what
  remains, and ``acquire`` creates nothing over the remains, until the session is
  deleted (``delete`` / ``livekit-resume rm``), which removes the remains too; the
  versions cannot be read without the head, so no automatic repair is attempted. On a
  server whose policy could not be read (CONFIG hidden) with the index evicted too,
  remains that are not the session's first keys go unnoticed until a commit would
  collide with one: a commit checks that the log it
  appends to holds exactly what its latest version read, so it never adopts a former
  life's records (`SnapshotCorrupt` naming the key). A missing version or log under a
  present head is `SnapshotCorrupt` naming the key.
- **Replication.** With ``wait_replicas=n`` a commit is followed, on the same
  connection (one pipeline, on the node of the session's slot on a Cluster), by
  ``WAIT n wait_timeout``: when it returns, the commit is on ``n`` replicas. Fewer is
  logged as a warning and counted in ``under_replicated``, not raised: the commit is
  applied on the primary and only a failover in that window can lose it. A delete
  waits the same way, for itself and the tombstone in the session's slot before it.

The parts, one job each:

- ``url.py``        `RedisURL`: the store URL parsed once into a typed value
- ``client.py``     opening the redis-py client; naming the server; its errors as ours
- ``health.py``     the server's eviction and persistence settings (`RedisStore.check`)
- ``keys.py``       the names of a namespace's keys
- ``scripts.py``    the Lua sources, their registration, running one (and ``WAIT``)
- ``records.py``    log records and version info as stored, read back with checks
- ``namespace.py``  the index of a namespace's sessions; remains of a lost head
- ``events.py``     `EventStream`, the namespace's pub/sub channel
- ``store.py``      `RedisStore`, the `Store` protocol over the parts above
"""

from .events import EventStream
from .store import DEFAULT_NAMESPACE as DEFAULT_NAMESPACE
from .store import RedisStore
from .url import RedisURL

__all__ = ["EventStream", "RedisStore", "RedisURL"]
