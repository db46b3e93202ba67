"""Zeroconf (mDNS/DNS-SD) discovery of the gateway's broker: the gateway advertises `_mqtt._tcp`
with the TXT record `GatewayRecord`; nodes with `broker: {host: auto}` browse for it.
docs/protocol.md (Discovery) lists the TXT keys."""
from __future__ import annotations

import logging
import socket
import threading
import time
from dataclasses import dataclass
from typing import Callable

__all__ = ["SERVICE_TYPE", "Advertiser", "DiscoveredBroker", "GatewayRecord", "discover_broker", "local_address"]

log = logging.getLogger("tierlite.discovery")

SERVICE_TYPE = "_mqtt._tcp.local."
MARKER = ("tierlite", "1")  # the TXT entry that makes an _mqtt._tcp service a tierlite gateway


@dataclass(frozen=True)
class GatewayRecord:
    """The TXT record: tierlite=1, bundle, version, prefix, gateway."""

    bundle: str
    version: int
    prefix: str
    gateway: str

    def properties(self) -> dict[str, str]:
        return {MARKER[0]: MARKER[1], "bundle": self.bundle, "version": str(self.version),
                "prefix": self.prefix, "gateway": self.gateway}

    @staticmethod
    def matches(properties: dict[str, str], match: dict[str, str] | None = None) -> bool:
        """A tierlite gateway's TXT properties whose entries include `match` (values compared as text)."""
        return properties.get(MARKER[0]) == MARKER[1] and all(
            properties.get(k) == str(v) for k, v in (match or {}).items())


@dataclass(frozen=True)
class DiscoveredBroker:
    host: str
    port: int
    name: str
    properties: dict[str, str]


def discover_broker(timeout: float = 3.0, interfaces: list[str] | None = None,
                    match: dict[str, str] | None = None,
                    skip: Callable[[DiscoveredBroker], bool] | None = None) -> DiscoveredBroker | None:
    """Browse for a tierlite gateway's `_mqtt._tcp` service, optionally one whose TXT records include
    `match` (e.g. {"bundle": "digits-small"}). Returns the first one resolved within `timeout`
    seconds, else None."""
    from zeroconf import InterfaceChoice, ServiceBrowser, ServiceInfo, ServiceStateChange, Zeroconf

    names: list[str] = []
    seen = threading.Event()

    def on_change(zeroconf, service_type, name, state_change):  # runs on zeroconf's thread: no blocking
        if state_change in (ServiceStateChange.Added, ServiceStateChange.Updated) and name not in names:
            names.append(name)
            seen.set()

    zc = Zeroconf(interfaces=interfaces or InterfaceChoice.All)
    try:
        ServiceBrowser(zc, SERVICE_TYPE, handlers=[on_change])
        deadline = time.monotonic() + timeout
        tried: set[str] = set()
        while time.monotonic() < deadline:
            seen.wait(max(0.0, deadline - time.monotonic()))
            seen.clear()
            for name in [n for n in names if n not in tried]:
                tried.add(name)
                info = ServiceInfo(SERVICE_TYPE, name)
                if not info.request(zc, 1000):
                    continue
                props = {k.decode(errors="replace"): (v or b"").decode(errors="replace")
                         for k, v in (info.properties or {}).items()}
                if not GatewayRecord.matches(props, match):
                    continue
                addrs = info.parsed_addresses()
                if not addrs or not info.port:
                    continue
                host = next((a for a in addrs if ":" not in a), addrs[0])
                found = DiscoveredBroker(host, int(info.port), name, props)
                if skip is not None and skip(found):  # e.g. one that failed TLS: keep looking
                    continue
                return found
        return None
    finally:
        zc.close()


def local_address() -> str:
    """This host's outward address (no packet is sent); loopback when there is no route."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.connect(("192.0.2.1", 9))  # TEST-NET-1: only selects the interface
        return s.getsockname()[0]
    except OSError:
        return "127.0.0.1"
    finally:
        s.close()


class Advertiser:
    """Registers the gateway's broker (`start`) until `stop`."""

    def __init__(self, name: str, port: int, record: GatewayRecord, address: str | None = None,
                 interfaces: list[str] | None = None):
        self.name, self.port, self.properties = name, port, record.properties()
        self.interfaces = interfaces
        if address is None:
            address = interfaces[0] if interfaces and len(interfaces) == 1 else local_address()
        self.address = address
        self._zc = None
        self._info = None

    def start(self) -> None:
        from zeroconf import InterfaceChoice, ServiceInfo, Zeroconf

        self._zc = Zeroconf(interfaces=self.interfaces or InterfaceChoice.All)
        self._info = ServiceInfo(
            SERVICE_TYPE, f"{self.name}.{SERVICE_TYPE}", port=self.port,
            addresses=[socket.inet_pton(socket.AF_INET6 if ":" in self.address else socket.AF_INET, self.address)], properties=self.properties,
            server=f"{self.name}.local.")
        self._zc.register_service(self._info, allow_name_change=True)
        log.info("zeroconf: advertising %s at %s:%d (%s)", self._info.name, self.address, self.port,
                 ", ".join(f"{k}={v}" for k, v in sorted(self.properties.items())))

    def stop(self) -> None:
        if self._zc is not None:
            try:
                self._zc.unregister_service(self._info)
            except Exception as e:  # shutting down anyway
                log.debug("zeroconf unregister failed: %s", e)
            self._zc.close()
            self._zc = None
