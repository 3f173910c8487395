"""Tenant isolation as a property: random creates, upserts, grants, revokes, deletes and
searches against a model of who may see what. Invariants: no search or GetPassages returns
a passage the tenant cannot see; visible nearest neighbours are found; counts match.

The machine runs over the flat index and over Curator; Curator's runs use a deep tree with
tiny shortlists, so that grants and revokes split and merge tenants' lists all the time,
and also search with a candidate budget of 2 (the tree walk, not a whole-tenant scan), where
only isolation is asserted (recall at a budget is measured by tests/test_curator.py)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from datastore.build import BuildConfig, build
from datastore.dedup import DedupConfig
from datastore.errors import NotFound
from datastore.records import Passage
from datastore.store import open_datastore
from index.base import SearchParams

DIM = 8
TENANTS = ["t0", "t1", "t2", "t3"]


def _vec(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)


class TenantMachine(RuleBasedStateMachine):
    kind = "flat"
    index_params: dict = {}
    #: Passages built before the random steps (the tree of curator is trained on them).
    seeds = 3
    #: Search params under which only isolation is checked (None: none).
    approximate: SearchParams | None = None

    @initialize()
    def open(self) -> None:
        import tempfile
        from pathlib import Path

        self.tmp = tempfile.TemporaryDirectory()
        d = Path(self.tmp.name)
        np.save(d / "v.npy", np.stack([_vec(10**7 + i) for i in range(self.seeds)]))
        (d / "p.jsonl").write_text("".join(f'{{"text": "seed {i}"}}\n' for i in range(self.seeds)))
        build(BuildConfig([str(d / "p.jsonl")], d / "ds", embeddings=d / "v.npy", shards=2, vector_dtype="float32",
                          dedup=DedupConfig(exact=False, near=False), index_kind=self.kind,
                          index_params=dict(self.index_params), progress=False))
        self.ds = open_datastore(d / "ds")
        self.model: dict[int, tuple[np.ndarray, set[str]]] = {i: (_vec(10**7 + i), set())
                                                              for i in range(self.seeds)}
        self.tenants: set[str] = set()

    def teardown(self) -> None:
        if hasattr(self, "ds"):
            self.ds.close()
        if hasattr(self, "tmp"):
            self.tmp.cleanup()

    def _visible(self, tenant: str | None) -> list[int]:
        return [i for i, (_, ts) in self.model.items() if not ts or (tenant is not None and tenant in ts)]

    @rule(name=st.sampled_from(TENANTS))
    def create(self, name: str) -> None:
        if name in self.tenants:
            return
        self.ds.create_tenant(name)
        self.tenants.add(name)

    @rule(seed=st.integers(0, 10**6), pick=st.sets(st.sampled_from(TENANTS), max_size=3))
    def upsert(self, seed: int, pick: set[str]) -> None:
        tenants = tuple(sorted(pick & self.tenants))
        [pid] = self.ds.upsert([Passage(-1, f"p{seed}", tenants=tenants)], _vec(seed)[None])
        self.model[pid] = (_vec(seed), set(tenants))

    @precondition(lambda self: len(self.model) > 0)
    @rule(data=st.data(), tenant=st.sampled_from(TENANTS))
    def grant(self, data, tenant: str) -> None:
        if tenant not in self.tenants:
            return
        pid = data.draw(st.sampled_from(sorted(self.model)))
        self.ds.grant([pid], tenant)
        vec, ts = self.model[pid]
        self.model[pid] = (vec, (ts - {"_none"}) | {tenant})

    @precondition(lambda self: len(self.model) > 0)
    @rule(data=st.data(), tenant=st.sampled_from(TENANTS))
    def revoke(self, data, tenant: str) -> None:
        if tenant not in self.tenants:
            return
        pid = data.draw(st.sampled_from(sorted(self.model)))
        self.ds.revoke([pid], tenant)
        vec, ts = self.model[pid]
        if tenant in ts:
            ts = ts - {tenant}
            self.model[pid] = (vec, ts or {"_none"})  # the last revoke leaves it to no one

    @precondition(lambda self: len(self.model) > 0)
    @rule(data=st.data())
    def delete(self, data) -> None:
        pid = data.draw(st.sampled_from(sorted(self.model)))
        assert self.ds.delete([pid]) == 1
        del self.model[pid]

    @rule(seed=st.integers(0, 10**6), tenant=st.sampled_from([None, *TENANTS]), k=st.integers(1, 8))
    def search(self, seed: int, tenant: str | None, k: int) -> None:
        if tenant is not None and tenant not in self.tenants:
            with pytest.raises(NotFound):
                self.ds.search_vectors(_vec(seed)[None], k, tenant=tenant)
            return
        got = self.ds.search_vectors(_vec(seed)[None], k, tenant=tenant).row(0)
        visible = self._visible(tenant)
        assert {i for i, _ in got} <= set(visible), "a passage the tenant cannot see was returned"
        if self.approximate is not None:
            near = self.ds.search_vectors(_vec(seed)[None], k, tenant=tenant, params=self.approximate).row(0)
            assert {i for i, _ in near} <= set(visible), "the tree walk returned a passage the tenant cannot see"
        if visible:
            scores = np.array([self.model[i][0] @ _vec(seed) for i in visible])
            best = sorted(scores, reverse=True)[:k]
            assert len(got) == min(k, len(visible))
            np.testing.assert_allclose([s for _, s in got], best, rtol=1e-4, atol=1e-4)

    @precondition(lambda self: len(self.model) > 0)
    @rule(data=st.data(), tenant=st.sampled_from([None, *TENANTS]))
    def get(self, data, tenant: str | None) -> None:
        pid = data.draw(st.sampled_from(sorted(self.model)))
        if pid in self._visible(tenant):
            assert self.ds.get_passages([pid], tenant=tenant)[0].id == pid
        else:
            with pytest.raises(NotFound):
                self.ds.get_passages([pid], tenant=tenant)

    @invariant()
    def counts_match(self) -> None:
        if hasattr(self, "ds"):
            assert self.ds.stats().passages == len(self.model)


TenantMachine.TestCase.settings = settings(max_examples=25, stateful_step_count=25, deadline=None,
                                          suppress_health_check=[HealthCheck.too_slow])
test_tenant_isolation_flat = TenantMachine.TestCase


class CuratorTenantMachine(TenantMachine):
    """The same machine over Curator: 48 seeds under a tree of 2-way nodes, leaves of ~4, and
    shortlists of 2, so a tenant's few passages already span inner lists and leaves."""

    kind = "curator"
    seeds = 48
    index_params = {"branching": 2, "leaf_size": 4, "max_depth": 5, "shortlist_limit": 2, "bloom_bits": 64,
                    "bloom_hashes": 1, "scan_slack": 0}
    approximate = SearchParams(candidate_budget=2)


CuratorTenantMachine.TestCase.settings = settings(max_examples=15, stateful_step_count=30, deadline=None,
                                                  suppress_health_check=[HealthCheck.too_slow])
test_tenant_isolation_curator = CuratorTenantMachine.TestCase
