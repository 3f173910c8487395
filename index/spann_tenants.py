"""Tenant visibility for SPANN: who may see each id, and which posting lists hold whose vectors.

Two maps, both in memory:

- ids: restricted id -> its tenants (an id not listed is public) and the inverse, tenant ->
  ids. A scan filters a list's entries with one sorted array per tenant (built on first use,
  dropped when that tenant's ids change), so its cost does not grow with other tenants' data.
- postings: list -> how many of its live entries each tenant sees (and how many are public),
  and the inverse tenant -> lists. A search as tenant t probes only the lists of t and the
  public lists, nearest first, so a small tenant reads its own few lists instead of the
  nearest lists overall (which may hold none of its vectors); the counts let the probe go
  past the pruning bound until enough of t's entries are in reach (a scattered tenant's
  nearest vectors lie far from the query, where eps2 alone would stop).

The postings map is exact right after a list is written: every write of a list (insert,
split, merge, compaction, the bulk seal) recomputes its entry from its live entries. Between
writes it is a superset: a delete or a revoked grant leaves the list flagged until it is next
rewritten. A superset only costs a wasted read; the scan's exact per-entry filter keeps
results right, so a flag may be stale but never missing.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np


def _member(sorted_keys: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Bool per id: is it in `sorted_keys` (a sorted int64 array)."""
    if not len(sorted_keys):
        return np.zeros(len(ids), bool)
    pos = np.minimum(np.searchsorted(sorted_keys, ids), len(sorted_keys) - 1)
    return sorted_keys[pos] == ids


class TenantMap:
    """Id visibility and per-posting tenant sets of one SPANN index."""

    def __init__(self) -> None:
        self.of: dict[int, frozenset[str]] = {}
        self._members: dict[str, set[int]] = {}
        self._in_posting: dict[int, dict[str, int]] = {}
        self._public: dict[int, int] = {}
        self._postings_of: dict[str, set[int]] = {}
        self._restricted: np.ndarray | None = None
        self._visible: dict[str, np.ndarray] = {}
        self._allowed: dict[str | None, np.ndarray] = {}

    def __bool__(self) -> bool:
        """True when some id is restricted (otherwise every id is public)."""
        return bool(self.of)

    # -- ids --------------------------------------------------------------------------------------

    def set(self, ids: Iterable[int], tenants: Sequence[Iterable[str]]) -> None:
        """Record who sees each id: an empty tenant set makes it public."""
        for i, ts in zip(ids, tenants):
            self._set_one(int(i), frozenset(ts))

    def drop(self, ids: Iterable[int]) -> None:
        """Forget deleted ids."""
        for i in ids:
            self._set_one(int(i), frozenset())

    def _set_one(self, i: int, new: frozenset[str]) -> None:
        old = self.of.get(i, frozenset())
        if old == new:
            return
        if bool(old) != bool(new):
            self._restricted = None
        for t in old - new:
            self._members[t].discard(i)
            if not self._members[t]:
                del self._members[t]
            self._visible.pop(t, None)
        for t in new - old:
            self._members.setdefault(t, set()).add(i)
            self._visible.pop(t, None)
        if new:
            self.of[i] = new
        else:
            del self.of[i]

    def restricted_ids(self) -> np.ndarray:
        if self._restricted is None:
            self._restricted = np.sort(np.fromiter(self.of.keys(), np.int64, len(self.of)))
        return self._restricted

    def visible_mask(self, ids: np.ndarray, tenant: str | None) -> np.ndarray | None:
        """Bool per id: may `tenant` (None: only public ids) see it. None when all may."""
        if not self.of:
            return None
        mask = ~_member(self.restricted_ids(), ids)
        if tenant is not None and tenant in self._members:
            own = self._visible.get(tenant)
            if own is None:
                members = self._members[tenant]
                own = self._visible[tenant] = np.sort(np.fromiter(members, np.int64, len(members)))
            mask |= _member(own, ids)
        return mask

    # -- postings ---------------------------------------------------------------------------------

    def note_posting(self, head: int, live_ids: np.ndarray) -> None:
        """Set the entry of list `head` from the ids of its live entries (exact)."""
        live_ids = np.asarray(live_ids, np.int64)
        if self.of and len(live_ids):
            restricted = _member(self.restricted_ids(), live_ids)
            public = int((~restricted).sum())
            sets = Counter(self.of[i] for i in live_ids[restricted].tolist())  # few distinct sets
            tenants: dict[str, int] = {}
            for ts, n in sets.items():
                for t in ts:
                    tenants[t] = tenants.get(t, 0) + n
        else:
            public, tenants = len(live_ids), {}
        self._update(int(head), public, tenants)

    def forget_posting(self, head: int) -> None:
        self._update(int(head), 0, {})

    def _update(self, head: int, public: int, tenants: dict[str, int]) -> None:
        if bool(public) != (head in self._public):
            self._allowed.clear()
        if public:
            self._public[head] = public
        else:
            self._public.pop(head, None)
        old = self._in_posting.get(head, {})
        if old.keys() != tenants.keys():
            self._postings_changed(head, frozenset(old), frozenset(tenants))
        if tenants:
            self._in_posting[head] = tenants
        else:
            self._in_posting.pop(head, None)

    def _postings_changed(self, head: int, old: frozenset[str], tenants: frozenset[str]) -> None:
        for t in old - tenants:
            self._postings_of[t].discard(head)
            if not self._postings_of[t]:
                del self._postings_of[t]
            self._allowed.pop(t, None)
        for t in tenants - old:
            self._postings_of.setdefault(t, set()).add(head)
            self._allowed.pop(t, None)

    def postings_for(self, tenant: str | None) -> np.ndarray:
        """Sorted ids of the lists that may hold a vector `tenant` sees (public ones included)."""
        got = self._allowed.get(tenant)
        if got is None:
            heads = set(self._public.keys())
            if tenant is not None:
                heads |= self._postings_of.get(tenant, set())
            got = self._allowed[tenant] = np.sort(np.fromiter(heads, np.int64, len(heads)))
        return got

    def visible_counts(self, tenant: str | None, heads: np.ndarray) -> np.ndarray:
        """Live entries of each list (any shape of head ids; -1 counts 0) that `tenant` sees,
        as of the list's last write."""
        flat = np.asarray(heads, np.int64).ravel().tolist()
        out = np.fromiter((self._public.get(h, 0) + (self._in_posting.get(h, {}).get(tenant, 0) if tenant else 0)
                           for h in flat), np.int64, len(flat))
        return out.reshape(np.shape(heads))

    def tenants_of_posting(self, head: int) -> frozenset[str]:
        return frozenset(self._in_posting.get(int(head), {}))

    def clear_postings(self) -> None:
        self._in_posting, self._public, self._postings_of, self._allowed = {}, {}, {}, {}

    # -- persistence and accounting ---------------------------------------------------------------

    def state(self) -> dict:
        return {"ids": {str(i): sorted(t) for i, t in self.of.items()},
                "postings": {str(h): t for h, t in self._in_posting.items()},
                "public": {str(h): n for h, n in self._public.items()}}

    @classmethod
    def restore(cls, state: dict) -> TenantMap:
        out = cls()
        for i, ts in state.get("ids", {}).items():
            out._set_one(int(i), frozenset(ts))
        postings, public = state.get("postings", {}), state.get("public", {})
        for h in set(postings) | set(public):
            out._update(int(h), int(public.get(h, 0)), {t: int(n) for t, n in postings.get(h, {}).items()})
        return out

    def memory_bytes(self) -> int:
        """An estimate of what the Python containers hold (about 64 bytes a set entry)."""
        ids = sum(64 + 32 * len(t) for t in self.of.values()) + 64 * sum(map(len, self._members.values()))
        postings = sum(64 + 48 * len(t) for t in self._in_posting.values())
        postings += 64 * (len(self._public) + sum(map(len, self._postings_of.values())))
        return ids + postings
