"""The datastore's control records: registered tenants and API keys (stored hashed).

They live in their own small LMDB environment at DIR/control, beside the shards, so every
shard server of a directory sees the same tenants and keys. A key is shown once, at
creation: `ds_<key id>_<secret>`; only sha256(secret) is stored, compared in constant time.

Writes are synced LMDB transactions (a created tenant or key survives a crash once the
call returns); the map grows when full and a full disk is ResourceExhausted.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypeVar

import lmdb

from datastore.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unauthenticated,
)
from datastore.integrity import check_lmdb, is_disk_full, write_failed_for_space

CONTROL_DIR = "control"
TENANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")
T = TypeVar("T")
_KEY = re.compile(r"^ds_([0-9a-f]{16})_([A-Za-z0-9_-]{43})$")


@dataclass(frozen=True)
class Principal:
    """Who calls: an admin, or a tenant (whose reads are confined to that tenant)."""

    key_id: str
    tenant: str | None  # None: admin

    @property
    def admin(self) -> bool:
        return self.tenant is None


@dataclass(frozen=True)
class KeyInfo:
    key_id: str
    tenant: str | None
    created_at: str


def check_tenant_name(name: str, field: str = "tenant") -> str:
    if not isinstance(name, str) or not TENANT_NAME.match(name):
        raise InvalidArgument.field(field, f"{name!r} is not a tenant name (letters, digits, _.:- ; <= 128)")
    return name


class ControlStore:
    """Tenants and keys of one datastore directory."""

    def __init__(self, directory: Path) -> None:
        self.path = path = Path(directory) / CONTROL_DIR
        if path.exists() and not path.is_dir():
            raise FailedPrecondition(f"{path} is a file, not the control directory",
                                     hint="restore it from a backup (it holds the tenants and API keys)")
        path.mkdir(parents=True, exist_ok=True)
        try:
            self.env = lmdb.open(str(path), map_size=64 << 20, max_dbs=2, sync=True, metasync=True,
                                 writemap=False, map_async=False)
        except lmdb.Error as e:
            if is_disk_full(e):
                raise ResourceExhausted(f"disk full creating {path}: {e}", subject="disk") from e
            raise FailedPrecondition(f"cannot open {path / 'data.mdb'}: {e}",
                                     hint="the file is damaged; restore it from a backup") from e
        try:
            check_lmdb(self.env, path)
            self._tenants = self._write(lambda txn: self.env.open_db(b"tenants", txn=txn))
            self._keys = self._write(lambda txn: self.env.open_db(b"keys", txn=txn))
        except lmdb.Error as e:
            self.env.close()
            raise FailedPrecondition(f"{path / 'data.mdb'} is damaged or holds no control records: {e}",
                                     hint="restore it from a backup") from e
        except BaseException:
            self.env.close()
            raise

    def _write(self, fn: Callable[[lmdb.Transaction], T]) -> T:
        """`fn` in one write transaction; the map doubles when full, a full disk is
        ResourceExhausted (nothing written)."""
        while True:
            try:
                with self.env.begin(write=True) as txn:
                    return fn(txn)
            except lmdb.MapFullError:
                self.env.set_mapsize(self.env.info()["map_size"] * 2)
            except lmdb.Error as e:
                if write_failed_for_space(e, self.path):
                    raise ResourceExhausted(f"disk full at {self.path} ({e})", subject="disk",
                                            hint="free disk space; nothing was written") from e
                raise

    def close(self) -> None:
        self.env.close()

    # -- tenants --------------------------------------------------------------------------------

    def tenants(self) -> list[str]:
        with self.env.begin() as txn:
            return [k.decode() for k in txn.cursor(db=self._tenants).iternext(values=False)]

    def has_tenant(self, name: str) -> bool:
        with self.env.begin() as txn:
            return txn.get(name.encode(), db=self._tenants) is not None

    def add_tenants(self, names: set[str] | list[str], exist_ok: bool = True) -> None:
        stamp = json.dumps({"created_at": _now()}).encode()

        def fn(txn: lmdb.Transaction) -> None:
            for name in names:
                check_tenant_name(name)
                if not txn.put(name.encode(), stamp, db=self._tenants, overwrite=False) and not exist_ok:
                    raise AlreadyExists(f"tenant {name} exists")

        self._write(fn)

    def remove_tenant(self, name: str) -> None:
        """Drop a tenant and every key of it."""
        def fn(txn: lmdb.Transaction) -> None:
            if not txn.delete(name.encode(), db=self._tenants):
                raise NotFound(f"no tenant {name}", resource_type="tenant", resource_name=name)
            for key_id, value in list(txn.cursor(db=self._keys)):
                if json.loads(value).get("tenant") == name:
                    txn.delete(key_id, db=self._keys)

        self._write(fn)

    # -- keys -----------------------------------------------------------------------------------

    def has_keys(self) -> bool:
        with self.env.begin() as txn:
            return txn.stat(self._keys)["entries"] > 0

    def create_key(self, tenant: str | None) -> tuple[str, KeyInfo]:
        """(the key, shown only now; its record). tenant None makes an admin key."""
        if tenant is not None and not self.has_tenant(tenant):
            raise NotFound(f"no tenant {tenant}", resource_type="tenant", resource_name=tenant,
                           hint="create the tenant first (CreateTenant, or a build whose input names it)")
        key_id, secret = secrets.token_hex(8), secrets.token_urlsafe(32)
        info = KeyInfo(key_id, tenant, _now())
        record = {**asdict(info), "sha256": hashlib.sha256(secret.encode()).hexdigest()}
        self._write(lambda txn: txn.put(key_id.encode(), json.dumps(record).encode(), db=self._keys))
        return f"ds_{key_id}_{secret}", info

    def keys(self) -> list[KeyInfo]:
        with self.env.begin() as txn:
            return [KeyInfo(r["key_id"], r["tenant"], r["created_at"])
                    for r in (json.loads(v) for _, v in txn.cursor(db=self._keys))]

    def revoke_key(self, key_id: str) -> None:
        def fn(txn: lmdb.Transaction) -> None:
            if not txn.delete(key_id.encode(), db=self._keys):
                raise NotFound(f"no key {key_id}", resource_type="key", resource_name=key_id)

        self._write(fn)

    def authenticate(self, key: str | None) -> Principal:
        """The principal of a presented key; Unauthenticated for none, a malformed, unknown
        or revoked one (all answered alike)."""
        m = _KEY.match(key or "")
        if m is None:
            raise Unauthenticated("missing or malformed API key",
                                  hint="send 'authorization: Bearer ds_...' metadata (datastore keys create)")
        with self.env.begin() as txn:
            raw = txn.get(m.group(1).encode(), db=self._keys)
        digest = hashlib.sha256(m.group(2).encode()).hexdigest()
        stored = json.loads(raw)["sha256"] if raw is not None else "0" * 64
        if not hmac.compare_digest(digest, stored) or raw is None:
            raise Unauthenticated("unknown or revoked API key")
        return Principal(m.group(1), json.loads(raw)["tenant"])


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
