"""Zeroconf advertisement of the gateway's broker: `_mqtt._tcp` with TXT records naming the bundle
(name, version) and topic prefix, so nodes configured with `broker: auto` find it."""
from __future__ import annotations

import logging
import socket

from tierlite.mqtt import SERVICE_TYPE

log = logging.getLogger("tierlite.edge.discovery")


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
    def __init__(self, name: str, port: int, properties: dict[str, str], address: str | None = None,
                 interfaces: list[str] | None = None):
        self.name, self.port, self.properties = name, port, properties
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
