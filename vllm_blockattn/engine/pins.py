"""Pinned documents: block-cache pages that are never evicted while pinned.

vLLM's block pool evicts only pages whose reference count is 0 (they wait in its free queue, oldest
first). A pin is one more reference on every page of a document's block, taken with
``BlockPool.touch`` (what a running request that hits the page does) and given back with
``BlockPool.free_blocks`` (what a finished request does): a pinned page is never in the free queue,
so eviction falls on unpinned pages only. Pins are keyed by the block's key (the last page hash of its
chain, which covers its tokens and its namespace: model, sinks, ``cache_salt``, adapter), bounded by
``pin_fraction`` of the KV pages, of which one tenant (``cache_salt``) may hold ``pin_tenant_fraction``,
and released on unpin, on expiry (``ttl_seconds``) or never.

The API server reaches this table only through the engine core's ``blockattn_pins`` utility (added in
``plugin.py``), which its own ``POST /v1/blocks`` handler calls after validating the request; no field
of a generate request can pin anything.
"""

from __future__ import annotations

import time
from dataclasses import dataclass


class PinError(ValueError):
    """A pin request the engine refuses (over the bound); nothing was pinned."""


@dataclass
class _Pin:
    pages: list  # KVCacheBlock of every page of the block, every KV cache group
    expires: float | None  # time.monotonic() deadline, None: until unpinned
    tenant: str | None = None  # the cache_salt it was pinned under


class PinTable:
    """Pins of one engine. ``limit_pages`` bounds all pinned pages; ``tenant_limit_pages`` (default: the
    same) bounds the pages one tenant (``cache_salt``; requests without one share the tenant ``None``)
    may hold, so that no tenant can take the whole pinnable share of a shared server."""

    def __init__(self, limit_pages: int, tenant_limit_pages: int | None = None):
        self.limit_pages = limit_pages
        self.tenant_limit_pages = limit_pages if tenant_limit_pages is None else tenant_limit_pages
        self._pins: dict[object, _Pin] = {}
        self.pinned_pages = 0
        self._tenant_pages: dict[str | None, int] = {}
        self._next_expiry: float | None = None

    def __len__(self) -> int:
        return len(self._pins)

    def is_pinned(self, key) -> bool:
        return key in self._pins

    def pin(self, pool, group_ids: list[int], chains: list[list], ttl: float | None, tenant: str | None = None) -> dict:
        """Pin the blocks whose page-hash chains are ``chains`` for ``tenant``; all or nothing within the
        bounds (the engine's and the tenant's).
        A block whose pages are not all cached cannot be pinned (``missing``); one already pinned gets
        the new expiry (``refreshed``)."""
        now = time.monotonic()
        expires = None if ttl is None else now + ttl
        new, refreshed, missing = [], 0, 0
        for chain in chains:
            key = chain[-1]
            if key in self._pins:
                self._pins[key].expires = expires
                refreshed += 1
                continue
            pages = []
            for h in chain:
                found = pool.get_cached_block(h, group_ids)
                if found is None:
                    break
                pages.extend(found)
            else:
                new.append((key, pages))
                continue
            missing += 1
        need = sum(len(p) for _, p in new)
        if self.pinned_pages + need > self.limit_pages:
            raise PinError(f"pinning {len(new)} blocks ({need} KV pages) would hold {self.pinned_pages + need} pinned "
                           f"pages, over the bound of {self.limit_pages} (pin_fraction of the KV cache); unpin "
                           f"documents or raise additional_config['blockattn']['pin_fraction']")
        held = self._tenant_pages.get(tenant, 0)
        if held + need > self.tenant_limit_pages:
            raise PinError(f"pinning {len(new)} blocks ({need} KV pages) would give this tenant (cache_salt) "
                           f"{held + need} pinned pages, over its share of {self.tenant_limit_pages} "
                           f"(pin_tenant_fraction of the pinnable pages); unpin some of its documents")
        for key, pages in new:
            pool.touch(pages)
            self._pins[key] = _Pin(pages, expires, tenant)
            self.pinned_pages += len(pages)
        if new:
            self._tenant_pages[tenant] = held + need
        self._update_expiry()
        return {"pinned": len(new), "refreshed": refreshed, "missing": missing, "pinned_pages": self.pinned_pages}

    def unpin(self, pool, chains: list[list]) -> dict:
        released = 0
        for chain in chains:
            pin = self._pins.pop(chain[-1], None)
            if pin is not None:
                self._release(pool, pin)
                released += 1
        self._update_expiry()
        return {"unpinned": released, "pinned_pages": self.pinned_pages}

    def expire(self, pool, now: float | None = None) -> int:
        """Release pins whose time is up (called every scheduler step; O(1) when none is due)."""
        now = time.monotonic() if now is None else now
        if self._next_expiry is None or now < self._next_expiry:
            return 0
        due = [k for k, p in self._pins.items() if p.expires is not None and p.expires <= now]
        for key in due:
            self._release(pool, self._pins.pop(key))
        self._update_expiry()
        return len(due)

    def _release(self, pool, pin: _Pin) -> None:
        pool.free_blocks(pin.pages)
        self.pinned_pages -= len(pin.pages)
        left = self._tenant_pages.get(pin.tenant, 0) - len(pin.pages)
        if left > 0:
            self._tenant_pages[pin.tenant] = left
        else:
            self._tenant_pages.pop(pin.tenant, None)

    def tenant_pages(self, tenant: str | None) -> int:
        """Pages pinned under ``tenant``."""
        return self._tenant_pages.get(tenant, 0)

    def _update_expiry(self) -> None:
        times = [p.expires for p in self._pins.values() if p.expires is not None]
        self._next_expiry = min(times) if times else None
