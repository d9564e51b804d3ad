"""`airlock verify`: compare the primary's committed state with the vault's.

The primary side is rebuilt from the primary log alone (engine.committed_state),
the vault side is read over the link with the primary's identity (LIST and
STATUS; the link has no other way in).  Both are compared bucket by bucket,
object by object: size, ETag, the exact list of chunk ids and the metadata
(headers, user metadata, storage class, tags).  Any difference is printed;
equal states exit 0.
"""
from __future__ import annotations

import json

from airlock.link.client import LinkClient
from airlock.primary.engine import committed_state
from airlock.primary.model import ObjectMeta

LIST_PAGE = 1000


def _summary(m: dict) -> tuple:
    meta = json.dumps(ObjectMeta.from_json(m.get("meta") or {}).to_json(), sort_keys=True)
    return (m["size"], m["etag"], tuple(tuple(c) for c in m["chunks"]), meta)


async def compare(data_dir: str, link: LinkClient) -> tuple[list[str], dict]:
    """Returns (differences, summary)."""
    index = committed_state(data_dir)
    primary_last = index.applied_seq()
    await link.connect()
    try:
        status = await link.status()
        diffs: list[str] = []
        p_buckets = {b.name for b in index.buckets()}
        v_buckets = {b["bucket"] for b in (await link.list())["buckets"]}
        for b in sorted(p_buckets - v_buckets):
            diffs.append(f"bucket {b}: on the primary, not in the vault")
        for b in sorted(v_buckets - p_buckets):
            diffs.append(f"bucket {b}: in the vault, not on the primary")
        objects = 0
        for b in sorted(p_buckets & v_buckets):
            primary = {key: _summary(json.loads(manifest))
                       for key, _seq, manifest in index.scan_objects(b, None, "", LIST_PAGE)}
            vault = {}
            async for m in link.iter_objects(b, page=LIST_PAGE):
                vault[m["key"]] = _summary(m)
            objects += len(primary)
            for k in sorted(primary.keys() - vault.keys()):
                diffs.append(f"object {b}/{k}: on the primary, not in the vault")
            for k in sorted(vault.keys() - primary.keys()):
                diffs.append(f"object {b}/{k}: in the vault, not on the primary")
            for k in sorted(primary.keys() & vault.keys()):
                if primary[k] != vault[k]:
                    p, v = primary[k], vault[k]
                    what = ("size" if p[0] != v[0] else "etag" if p[1] != v[1]
                            else "chunk list" if p[2] != v[2] else None)
                    if what is None:
                        pm, vm = json.loads(p[3]), json.loads(v[3])
                        fields = ", ".join(f"{f}: primary {pm.get(f)!r}, vault {vm.get(f)!r}"
                                           for f in sorted(pm.keys() | vm.keys()) if pm.get(f) != vm.get(f))
                        diffs.append(f"object {b}/{k}: metadata differs ({fields})")
                    else:
                        diffs.append(f"object {b}/{k}: {what} differs (primary {p[0]} bytes {p[1]}, "
                                     f"vault {v[0]} bytes {v[1]})")
        summary = {"primary_last_seq": primary_last, "vault_last_seq": status.get("last_seq"),
                   "buckets": len(p_buckets), "objects": objects}
        return diffs, summary
    finally:
        await link.close()


def format_summary(summary: dict) -> str:
    return json.dumps(summary, sort_keys=True)
