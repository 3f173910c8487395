"""API keys and tenant isolation through a real server: codes for every kind of caller."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from datastore.cli import main
from datastore.control import ControlStore
from datastore.errors import NotFound, PermissionDenied, Unauthenticated
from datastore.records import Passage
from service.client import DatastoreClient

DIM = 384


@pytest.fixture
def secured(server, store_copy):
    """(address, admin key, acme key, store) on a datastore with tenants acme and beta."""
    client, store, port = server
    store.create_tenant("acme")
    store.create_tenant("beta")
    admin, _ = store.control.create_key(None)
    acme, _ = store.control.create_key("acme")
    return f"127.0.0.1:{port}", admin, acme, store


def _vec(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def test_missing_malformed_unknown_and_revoked_keys_are_unauthenticated(secured):
    address, admin, acme, store = secured
    for key in (None, "not-a-key", "ds_0123456789abcdef_" + "x" * 43, admin[:-1] + ("A" if admin[-1] != "A" else "B")):
        with DatastoreClient(address, api_key=key) as c, pytest.raises(Unauthenticated) as e:
            c.search(["anything"], k=1)
        assert e.value.grpc_code == grpc.StatusCode.UNAUTHENTICATED
    with DatastoreClient(address, api_key=acme) as c:
        assert c.search(["painting"], k=1)
        store.control.revoke_key(acme.split("_")[1])
        with pytest.raises(Unauthenticated):
            c.search(["painting"], k=1)


def test_tenant_keys_read_only_their_tenant_and_never_write(secured):
    address, admin, acme, _ = secured
    with DatastoreClient(address, api_key=admin) as a:
        [secret] = a.upsert([Passage(-1, "beta's secret plan", "Plan", tenants=("beta",))], _vec(1)[None])
        [mine] = a.upsert([Passage(-1, "acme's own note", "Note", tenants=("acme",))], _vec(2)[None])
    with DatastoreClient(address, api_key=acme) as c:
        hits = c.search([_vec(1), _vec(2)], k=50)
        ids = {h.id for row in hits for h in row}
        assert mine in ids and secret not in ids
        assert hits[1][0].id == mine  # searches run as the key's tenant without asking
        with pytest.raises(PermissionDenied):
            c.search([_vec(1)], k=5, tenant="beta")
        with pytest.raises(NotFound) as nf:  # indistinguishable from a missing id
            c.get_passages([secret])
        with pytest.raises(NotFound) as missing:
            c.get_passages([10**12])
        assert nf.value.resource_type == missing.value.resource_type == "passage"
        for call in (lambda: c.upsert([Passage(-1, "x")], _vec(3)[None]), lambda: c.delete([mine]),
                     lambda: c.create_tenant("gamma"), lambda: c.grant([secret], "acme"),
                     lambda: c.revoke([mine], "acme"), lambda: c.drop_tenant("beta"), lambda: c.list_tenants()):
            with pytest.raises(PermissionDenied) as e:
                call()
            assert e.value.grpc_code == grpc.StatusCode.PERMISSION_DENIED


def test_grant_revoke_and_drop_tenant(secured):
    address, admin, acme, _ = secured
    with DatastoreClient(address, api_key=admin) as a, DatastoreClient(address, api_key=acme) as c:
        shared, only_beta = a.upsert([Passage(-1, "shared", tenants=("beta",)), Passage(-1, "beta only",
                                                                                    tenants=("beta",))],
                                     np.stack([_vec(5), _vec(6)]))
        assert shared not in [h.id for h in c.search([_vec(5)], k=5)[0]]
        assert a.grant([shared], "acme") == 1
        assert c.search([_vec(5)], k=1)[0][0].id == shared
        assert a.revoke([shared], "acme") == 1
        assert shared not in [h.id for h in c.search([_vec(5)], k=5)[0]]
        a.grant([shared], "acme")
        assert a.drop_tenant("beta") == (1, 1)  # only_beta deleted, shared loses beta
        assert a.list_tenants() == ["acme"]
        with pytest.raises(NotFound):
            a.get_passages([only_beta])
        assert a.get_passages([shared], tenant="acme")[0].tenants == ("acme",)
        with pytest.raises(NotFound):
            a.search([_vec(5)], k=1, tenant="beta")


def test_revoking_the_last_grant_never_makes_a_passage_public(secured):
    address, admin, _, _ = secured
    with DatastoreClient(address, api_key=admin) as a:
        [pid] = a.upsert([Passage(-1, "private", tenants=("acme",))], _vec(8)[None])
        a.revoke([pid], "acme")
        assert pid not in [h.id for h in a.search([_vec(8)], k=5)[0]]  # not public
        assert pid not in [h.id for h in a.search([_vec(8)], k=5, tenant="acme")[0]]


def test_keys_cli_shows_a_key_once_and_lists_no_secret(store_copy, capsys):
    ControlStore(store_copy).close()
    assert main(["tenants", "create", str(store_copy), "acme"]) == 0
    assert main(["keys", "create", str(store_copy), "--tenant", "acme"]) == 0
    key = capsys.readouterr().out.strip()
    assert key.startswith("ds_")
    assert main(["keys", "list", str(store_copy)]) == 0
    listing = capsys.readouterr().out
    assert "tenant acme" in listing and key.split("_")[2] not in listing
    assert main(["keys", "create", str(store_copy), "--tenant", "nobody"]) == 2
    assert main(["keys", "create", str(store_copy)]) == 2


def test_serving_a_public_address_without_keys_needs_insecure(store_copy, capsys):
    assert main(["serve", str(store_copy), "--host", "0.0.0.0", "--port", "0"]) == 2
    assert "--insecure" in capsys.readouterr().err
