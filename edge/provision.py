"""`tierlite provision`: the fleet's identities, broker password/ACL files and one ready folder per node.

    tierlite provision --dir fleet --gateway-host gw.local --gateway-host 192.168.1.10 --node cam1 --node cam2
    tierlite provision revoke cam2 --dir fleet [--pid PID | --state-dir /var/lib/tierlite/edge]
    tierlite provision cloud --dir fleet-cloud --cloud-host cloud.example.com --site north --site south
    tierlite provision revoke north --dir fleet-cloud --pid PID       (a site's bridge, at the cloud broker)

A fleet folder (kept on the machine that provisions, never on a node):
    fleet.json                 prefix, gateway, hosts, identities, revoked nodes
    ca/ca.crt, ca/ca.key       the fleet CA (or the user's, --ca-cert/--ca-key), key 0600
    broker/                    server cert/key, passwd (mosquitto_passwd hashes), acl, crl.pem, edge-security.yaml
                               (the `mosquitto:` and `broker:` sections to paste into edge.yaml)
    cloud/<id>/, publisher/    client cert/key and a <name>-security.yaml with the `broker:` section
    nodes/<id>/                the node's folder: node.yaml, ca.crt, node.crt, node.key, tierlite-node.service

A cloud folder (`provision cloud`, the cloud broker that several site bridges share; its own CA):
    fleet.json, ca/            as above ("kind": "cloud"; sites instead of nodes)
    broker/                    server cert/key, acl, cloud-broker.yaml (the `mosquitto:` section),
                               mosquitto.conf (ready for `mosquitto -c`)
    sites/<site>/              the site bridge's cert/key and bridge-security.yaml (edge.yaml's `cloud:` section)
    cloud/<id>/, publisher/, monitor/   client cert/key and <name>-security.yaml

The cloud broker authenticates by certificate only (its CN is the username the ACL sees): no
password exists for a bridge, so none is written into a site's generated mosquitto.conf. Each site
bridge may touch its own <prefix>/<site>/... topics only; revoking a site drops it from the ACL.

Identities: username = node id for nodes (the ACL's `pattern` rules substitute it); workers and the
publisher get names that start with `_`, which no node id can. Every client needs both a certificate
signed by the fleet CA (mutual TLS) and its password; revocation deletes the password, adds the
certificate to broker/crl.pem (signed by the CA; Mosquitto's `crlfile`) and reloads the broker
(SIGHUP): that client is disconnected and its certificate refused at the next TLS handshake, the
others stay connected and keep their certificates. See docs/SECURITY.md.
"""
from __future__ import annotations

import argparse
import base64
import datetime as dt
import hashlib
import ipaddress
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import yaml

from tierlite import topics
from tierlite.errors import ConfigError
from tierlite.homeassistant import node_device_id
from tierlite.topics import valid_node_id

__all__ = ["CloudFleet", "Fleet", "acl_text", "check_crl", "cloud_acl_text", "configure_provision", "hash_password",
           "make_crl", "password_hash", "reload_broker", "run_provision"]

log = logging.getLogger("tierlite.edge.provision")

EDGE_WORKER_REPORTS = 64  # edge workers report updates as <gateway>-w<i>, i < 64 (EdgeConfig.workers <= 64)
CERT_DAYS = 3650
# A CRL past its nextUpdate makes OpenSSL refuse every client certificate, so an offline CA whose CRL
# is not re-signed in time would lock the whole fleet out: it is valid as long as the certificates.
CRL_DAYS = CERT_DAYS


def _write(path: Path, data: bytes | str, mode: int = 0o644) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(fd, mode)
        f.write(data.encode() if isinstance(data, str) else data)
    return path


# -- certificates -------------------------------------------------------------------------------
def _name(cn: str):
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "tierlite fleet"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _key():
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _pem_cert(cert) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.PEM)


def make_ca(cn: str = "tierlite fleet CA"):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    key = _key()
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=CERT_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return cert, key


def issue(ca_cert, ca_key, cn: str, server_names: list[str] | None = None):
    """A client (or, with server_names, a server) certificate for `cn`, signed by the fleet CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID

    key = _key()
    now = dt.datetime.now(dt.timezone.utc)
    b = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca_cert.subject)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=CERT_DAYS))
         .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
         .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False))
    if server_names:
        sans = []
        for n in server_names:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(n)))
            except ValueError:
                sans.append(x509.DNSName(n))
        b = (b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
             .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False))
    else:
        b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    return b.sign(ca_key, hashes.SHA256()), key


def _load_pair(cert_path: Path, key_path: Path):
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        return (x509.load_pem_x509_certificate(Path(cert_path).read_bytes()),
                serialization.load_pem_private_key(Path(key_path).read_bytes(), None))
    except (OSError, ValueError, TypeError) as e:
        raise ConfigError(f"cannot load CA {cert_path} / {key_path}: {e}") from None


def make_crl(ca_cert, ca_key, serials: list[int], number: int) -> bytes:
    """A CRL (PEM) of the given certificate serials, signed by the fleet CA. Re-signing it is all a
    revocation needs: no other certificate changes."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization

    now = dt.datetime.now(dt.timezone.utc)
    b = (x509.CertificateRevocationListBuilder().issuer_name(ca_cert.subject)
         .last_update(now - dt.timedelta(minutes=5)).next_update(now + dt.timedelta(days=CRL_DAYS))
         .add_extension(x509.CRLNumber(number), critical=False))
    for serial in sorted(set(serials)):
        b = b.add_revoked_certificate(x509.RevokedCertificateBuilder().serial_number(serial)
                                      .revocation_date(now).build())
    return b.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def check_crl(crl_path: Path, ca_path: Path) -> int:
    """The number of revoked certificates in `crl_path`, or a ConfigError (one line) when it is not a
    current CRL signed by the CA in `ca_path`: Mosquitto 2.0.11 given a foreign CRL refuses every
    client, after a SIGHUP too (measured, docs/SECURITY.md), so it never gets one."""
    from cryptography import x509

    try:
        data = Path(crl_path).read_bytes()
        crl = (x509.load_pem_x509_crl(data) if b"-----BEGIN" in data else x509.load_der_x509_crl(data))
    except (OSError, ValueError) as e:
        raise ConfigError(f"CRL {crl_path}: not a readable CRL ({e})") from None
    try:
        cas = x509.load_pem_x509_certificates(Path(ca_path).read_bytes())
    except (OSError, ValueError) as e:
        raise ConfigError(f"CRL {crl_path}: cannot read the CA {ca_path} ({e})") from None
    issuers = [ca for ca in cas if ca.subject == crl.issuer]
    if not issuers:
        raise ConfigError(f"CRL {crl_path} is issued by {crl.issuer.rfc4514_string()!r}, not by the CA in "
                          f"{ca_path}: refusing it (a foreign CRL)")
    if not any(crl.is_signature_valid(ca.public_key()) for ca in issuers):
        raise ConfigError(f"CRL {crl_path}: its signature does not verify with the CA in {ca_path}: refusing it "
                          "(tampered)")
    next_update = crl.next_update_utc
    if next_update is not None and next_update <= dt.datetime.now(dt.timezone.utc):
        raise ConfigError(f"CRL {crl_path} expired on {next_update:%Y-%m-%d %H:%M} UTC: re-sign it with "
                          "`tierlite provision --dir FLEET` (an expired CRL refuses every client)")
    return len(crl)


# -- passwords ----------------------------------------------------------------------------------
def hash_password(password: str) -> str:
    """Mosquitto 2's password hash ($7$: PBKDF2-SHA512, 101 iterations), as mosquitto_passwd writes it."""
    salt = secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, 101)
    return f"$7$101${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def _passwd_tool() -> str | None:
    return shutil.which("mosquitto_passwd") or next(
        (p for p in ("/usr/bin/mosquitto_passwd", "/usr/sbin/mosquitto_passwd") if Path(p).is_file()), None)


def password_hash(user: str, password: str) -> str:
    """The hash Mosquitto's own mosquitto_passwd writes; the same scheme in Python where it is missing."""
    tool = _passwd_tool()
    if tool is None:
        return hash_password(password)
    with tempfile.TemporaryDirectory() as tmp:
        f = Path(tmp) / "passwd"
        done = subprocess.run([tool, "-c", "-b", str(f), user, password], capture_output=True, text=True)
        if done.returncode != 0 or not f.is_file():
            raise ConfigError(f"mosquitto_passwd failed: {done.stderr.strip() or done.stdout.strip()}")
        return f.read_text().strip().split(":", 1)[1]


# -- the ACL ------------------------------------------------------------------------------------
def acl_text(prefix: str, gateway_id: str, cloud_ids: list[str], nodes: list[str]) -> str:
    """Mosquitto ACL: nodes by `pattern` (%u = node id), every other identity exactly its topics."""
    p = prefix
    lines = [
        "# Generated by `tierlite provision`; regenerated on every run (edit fleet.json, not this file).",
        "# Nodes (username = node id): write only their own topics, read only their answer and updates.",
        f"pattern write {p}/%u/feature",
        f"pattern write {p}/%u/result",
        f"pattern write {p}/%u/status",
        f"pattern write {p}/%u/{topics.HA_STATE}",
        f"pattern read {p}/%u/answer",
        f"pattern read {p}/update/#",
        f"pattern write {p}/update/+/report/%u",
        f"pattern write {p}/update/+/frames/%u",
        "",
        f"user _edge-{gateway_id}",
        f"topic read {p}/+/feature",
        f"topic write {p}/+/answer",
        f"topic write {p}/+/escalate",
        f"topic readwrite {p}/_gateway/{gateway_id}/#",
        f"topic read {p}/update/#",
        *(f"topic write {p}/update/+/report/{gateway_id}-w{i}" for i in range(EDGE_WORKER_REPORTS)),
    ]
    for cid in cloud_ids:  # the only identities that may read escalations (and so join the cloud $share)
        lines += ["", f"user _cloud-{cid}", f"topic read {p}/+/escalate", f"topic write {p}/+/answer",
                  f"topic write {p}/_cloud/{cid}/status", f"topic read {p}/update/+/frames/+"]
    lines += ["", "user _publisher", f"topic readwrite {p}/update/#",
              "", "# read-only: dashboards, Home Assistant", "user _monitor",
              f"topic read {p}/+/result", f"topic read {p}/+/status", f"topic read {p}/+/{topics.HA_STATE}",
              f"topic read {p}/_gateway/#",
              f"topic read {p}/_cloud/#", "topic read homeassistant/#"]
    for node in nodes:  # its Home Assistant discovery configs (tierlite.homeassistant, default discovery prefix)
        lines += ["", f"user {node}", f"topic write homeassistant/+/{node_device_id(node)}/+/config"]
    return "\n".join(lines) + "\n"


def cloud_acl_text(prefix: str, sites: list[str], cloud_ids: list[str]) -> str:
    """The cloud broker's ACL (username = certificate CN): a site bridge writes its own site's
    escalations and reads its own site's answers only; cloud workers serve every site."""
    p = prefix
    lines = ["# Generated by `tierlite provision cloud`; regenerated on every run (edit fleet.json, not this file).",
             "# No `pattern` rules: a client without a `user` section here (a revoked site) may do nothing."]
    for site in sites:
        here = topics.site_prefix(p, site)
        lines += ["", f"user _bridge-{site}",
                  f"topic write {topics.node_filter(here, topics.ESCALATE)}",
                  f"topic read {topics.node_filter(here, topics.ANSWER)}",
                  f"topic read {topics.updates(p)}", f"topic read {topics.updates(here)}",  # fleet's, its own
                  # its nodes' update reports and frame uploads, under its site (keyed <site>/<node>)
                  f"topic write {topics.update_reports(here)}", f"topic write {topics.frame_uploads(here)}"]
    for cid in cloud_ids:  # the only identities that may read escalations (and so join the cloud $share)
        lines += ["", f"user _cloud-{cid}",
                  f"topic read {topics.node_filter(p, topics.ESCALATE)}",
                  f"topic read {topics.site_node_filter(p, topics.ESCALATE)}",
                  f"topic write {topics.node_filter(p, topics.ANSWER)}",
                  f"topic write {topics.site_node_filter(p, topics.ANSWER)}",
                  f"topic write {topics.cloud_status(p, cid)}", f"topic read {topics.frame_uploads(p)}",
                  f"topic read {topics.site_frame_uploads(p)}"]
    lines += ["", "user _publisher", f"topic readwrite {topics.updates(p)}",
              f"topic read {topics.site_update_reports(p)}",
              # a site's updates (`tierlite publish --site`): announcements, chunks (not its frames)
              f"topic readwrite {p}/+/{topics.UPDATE}/+", f"topic write {p}/+/{topics.UPDATE}/+/+/+",
              "", "# read-only: dashboards", "user _monitor", f"topic read {topics.cloud_statuses(p)}"]
    return "\n".join(lines) + "\n"


# -- the fleet ----------------------------------------------------------------------------------
NODE_UNIT = """# tierlite camera node {node} (written by `tierlite provision`; docs/PI_NODE.md)
[Unit]
Description=tierlite camera node {node}
Wants=network-online.target
After=network-online.target

[Service]
# READY=1 once the model is loaded; WATCHDOG=1 only while frames keep being decided (tierlite.systemd).
Type=notify
NotifyAccess=main
WatchdogSec=60
User=tierlite
Group=tierlite
SupplementaryGroups=video
Environment=TIERLITE_LOG_FORMAT=json
# the board profile is `board:` in node.yaml, so the unit is the same on every board
ExecStart=/opt/tierlite/bin/tierlite device --config /etc/tierlite/node.yaml
KillSignal=SIGTERM
TimeoutStopSec=15
Restart=on-failure
RestartSec=5
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
ReadWritePaths=/var/lib/tierlite

[Install]
WantedBy=multi-user.target
"""


INSTALL_SH = """#!/bin/sh
# tierlite first boot for node {node} (written by `tierlite provision`; docs/PI_NODE.md).
# Runs as root on the Pi from the folder it is in (e.g. /boot/firmware/tierlite); safe to run again.
# Put beside it: the tierlite wheel (tierlite-*.whl) and the bundle (bundle.tar.gz).
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
id tierlite >/dev/null 2>&1 || useradd --system --create-home --home-dir /var/lib/tierlite --groups video tierlite
install -d -m 0750 -o root -g tierlite /etc/tierlite
if [ -f "$HERE/node.key" ]; then
  install -m 0640 -o root -g tierlite "$HERE/node.yaml" "$HERE/node.key" /etc/tierlite/
  install -m 0644 "$HERE/node.crt" "$HERE/ca.crt" /etc/tierlite/
fi
[ -f "$HERE/bundle.tar.gz" ] && install -m 0644 -o tierlite -g tierlite "$HERE/bundle.tar.gz" /var/lib/tierlite/
if [ ! -x /opt/tierlite/bin/tierlite ]; then
  python3 -m venv /opt/tierlite 2>/dev/null || {{
    apt-get update && apt-get install -y python3-venv && python3 -m venv /opt/tierlite; }}
  WHEEL=$(ls "$HERE"/tierlite-*.whl | head -n 1)
  /opt/tierlite/bin/pip install "$WHEEL[device]"
fi
install -m 0644 "$HERE/tierlite-node.service" /etc/systemd/system/tierlite-node.service
systemctl daemon-reload
systemctl enable --now tierlite-node.service
systemctl disable tierlite-firstboot.service 2>/dev/null || true
# the FAT boot partition is readable by anyone holding the card: take the secrets off it
rm -f "$HERE/node.key" "$HERE/node.yaml"
"""

FIRSTBOOT_UNIT = """# Runs install.sh once the network is up on the node's first boot (docs/PI_NODE.md).
[Unit]
Description=tierlite first boot: install the node {node}
Wants=network-online.target
After=network-online.target
ConditionPathExists=/boot/firmware/tierlite/install.sh

[Service]
Type=oneshot
ExecStart=/bin/sh /boot/firmware/tierlite/install.sh
RemainAfterExit=yes

[Install]
WantedBy=multi-user.target
"""


class Fleet:
    """A provisioning folder (see the module doc). Every change rewrites passwd and acl."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.state_path = self.root / "fleet.json"
        self.state = json.loads(self.state_path.read_text()) if self.state_path.is_file() else {}

    # paths
    @property
    def ca_cert_path(self) -> Path:
        return self.root / "ca" / "ca.crt"

    @property
    def broker_dir(self) -> Path:
        return self.root / "broker"

    @property
    def passwd_path(self) -> Path:
        return self.broker_dir / "passwd"

    @property
    def acl_path(self) -> Path:
        return self.broker_dir / "acl"

    def node_dir(self, node: str) -> Path:
        return self.root / "nodes" / node

    def _save(self) -> None:
        _write(self.state_path, json.dumps(self.state, indent=2, sort_keys=True) + "\n", 0o600)

    def init(self, prefix: str = "tierlite", gateway_id: str = "edge", hosts: list[str] | None = None,
             port: int = 8883, cloud_ids: list[str] | None = None, ca_cert: Path | None = None,
             ca_key: Path | None = None) -> None:
        """Create (or, when fleet.json exists, keep) the CA, the broker's and the workers' identities."""
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        if not self.state:
            self.state = {"format": "tierlite-fleet/1", "prefix": prefix, "gateway_id": gateway_id,
                          "hosts": list(dict.fromkeys([*(hosts or []), "127.0.0.1", "localhost"])), "port": port,
                          "cloud_ids": cloud_ids or ["cloud"], "identities": {}, "nodes": [], "revoked": [],
                          # Mosquitto 2.0's acl_file checks reads at delivery, not at SUBSCRIBE: a client that
                          # joins a worker group is denied each message it is dealt, and that message is lost.
                          # A secret group name (only in the workers' configs) keeps other clients out of it.
                          "share_groups": {"edge": f"tierlite-edge-{secrets.token_hex(8)}",
                                           "cloud": f"tierlite-cloud-{secrets.token_hex(8)}"}}
        if not self.ca_cert_path.is_file():
            if ca_cert:
                cert, key = _load_pair(ca_cert, ca_key or ca_cert)
            else:
                cert, key = make_ca()
            _write(self.ca_cert_path, _pem_cert(cert))
            _write(self.root / "ca" / "ca.key", _pem_key(key), 0o600)
        ca = self._ca()
        if not (self.broker_dir / "server.crt").is_file():
            cert, key = issue(*ca, f"tierlite-broker-{self.state['gateway_id']}", self.state["hosts"])
            _write(self.broker_dir / "server.crt", _pem_cert(cert))
            _write(self.broker_dir / "server.key", _pem_key(key), 0o600)
            shutil.copyfile(self.ca_cert_path, self.broker_dir / "ca.crt")
        gw = self.state["gateway_id"]
        groups = self.state.get("share_groups", {})
        self._identity(f"_edge-{gw}", self.broker_dir, "edge")
        for cid in self.state["cloud_ids"]:
            self._identity(f"_cloud-{cid}", self.root / "cloud" / cid, "cloud",
                           extra={"share_group": groups["cloud"]} if "cloud" in groups else None)
        self._identity("_publisher", self.root / "publisher", "publisher")
        self._identity("_monitor", self.root / "monitor", "monitor")
        self._write_edge_snippet()
        self._write_broker_files()
        self._save()

    def _ca(self):
        return _load_pair(self.ca_cert_path, self.root / "ca" / "ca.key")

    def _identity(self, user: str, folder: Path, stem: str, host: str | None = None,
                  extra: dict | None = None) -> dict:
        ids = self.state["identities"]
        if user in ids and (folder / f"{stem}.crt").is_file():
            return ids[user]
        cert, key = issue(*self._ca(), user)
        _write(folder / f"{stem}.crt", _pem_cert(cert))
        _write(folder / f"{stem}.key", _pem_key(key), 0o600)
        shutil.copyfile(self.ca_cert_path, folder / "ca.crt")
        password = secrets.token_urlsafe(24)
        ids[user] = {"folder": str(folder.relative_to(self.root)), "stem": stem,
                     "hash": password_hash(user, password), "serial": cert.serial_number}
        broker = self._broker_section(user, password, folder, stem, host)
        _write(folder / f"{stem}-security.yaml", yaml.safe_dump({"broker": broker, **(extra or {})}, sort_keys=False),
               0o600)
        return ids[user]

    def _broker_section(self, user: str, password: str, folder: Path, stem: str, host: str | None) -> dict:
        return {"host": host or self.state["hosts"][0], "port": self.state["port"], "username": user,
                "password": password,
                "tls": {"ca_file": "ca.crt", "cert_file": f"{stem}.crt", "key_file": f"{stem}.key"}}

    def _write_edge_snippet(self) -> None:
        gw = self.state["gateway_id"]
        creds = yaml.safe_load((self.broker_dir / "edge-security.yaml").read_text())["broker"]
        snippet = {
            "mosquitto": {"bind": "0.0.0.0", "port": self.state["port"], "password_file": "passwd",
                          "acl_file": "acl", "persistence": True,
                          "tls": {"ca_file": "ca.crt", "cert_file": "server.crt", "key_file": "server.key",
                                  "require_certificate": True, "crl_file": "crl.pem"}},
            "broker": {**creds, "host": "127.0.0.1"},
        }
        if "edge" in self.state.get("share_groups", {}):
            snippet["share_group"] = self.state["share_groups"]["edge"]
        text = (f"# Paste into edge.yaml (gateway {gw}); relative paths are relative to edge.yaml, so keep edge.yaml\n"
                "# in this folder or make them absolute. Written by `tierlite provision`; 0600 (holds a password).\n")
        _write(self.broker_dir / "edge-security.yaml", text + yaml.safe_dump(snippet, sort_keys=False), 0o600)

    def _write_broker_files(self) -> None:
        live = {u: i for u, i in self.state["identities"].items() if u not in self.state["revoked"]}
        _write(self.passwd_path, "".join(f"{u}:{i['hash']}\n" for u, i in sorted(live.items())), 0o600)
        nodes = [n for n in self.state["nodes"] if n not in self.state["revoked"]]
        _write(self.acl_path, acl_text(self.state["prefix"], self.state["gateway_id"], self.state["cloud_ids"],
                                       nodes), 0o600)
        self._write_crl(self.state["revoked"])

    @property
    def crl_path(self) -> Path:
        return self.broker_dir / "crl.pem"

    def _write_crl(self, revoked_users: list[str]) -> None:
        """broker/crl.pem: the certificates of every revoked identity, re-signed when that list
        changes (or the file is missing). Mosquitto re-reads it on SIGHUP."""
        ids = self.state["identities"]
        serials = sorted(ids[u]["serial"] for u in revoked_users if u in ids and "serial" in ids[u])
        if self.crl_path.is_file() and self.state.get("crl_serials") == serials:
            try:
                check_crl(self.crl_path, self.ca_cert_path)
                return
            except ConfigError as e:  # damaged or replaced since: this folder holds the CA, so re-sign it
                log.warning("%s; writing a fresh one", e)
        self.state["crl_number"] = self.state.get("crl_number", 0) + 1
        self.state["crl_serials"] = serials
        _write(self.crl_path, make_crl(*self._ca(), serials, self.state["crl_number"]))
        check_crl(self.crl_path, self.ca_cert_path)

    def add_node(self, node: str, bundle: str = "/var/lib/tierlite/bundle.tar.gz", source: str = "0",
                 board: str = "pi4", host: str | None = None) -> Path:
        if not valid_node_id(node):
            raise ConfigError(f"node id {node!r}: 1-64 of [A-Za-z0-9_.-], not starting with '_' or '.', not 'update'")
        if node in self.state["revoked"]:
            raise ConfigError(f"node {node} was revoked; provision it under a new id")
        folder = self.node_dir(node)
        self._identity(node, folder, "node", host)
        broker = yaml.safe_load((folder / "node-security.yaml").read_text())["broker"]
        broker["tls"] = {k: f"/etc/tierlite/{v}" for k, v in broker["tls"].items()}
        node_yaml = {"node_id": node, "prefix": self.state["prefix"], "bundle": bundle, "board": board,
                     "source": {"uri": source}, "broker": broker,
                     "results_file": "/var/lib/tierlite/results.jsonl"}
        _write(folder / "node.yaml", "# written by `tierlite provision` (docs/PI_NODE.md); holds the node's "
               "password: 0600\n" + yaml.safe_dump(node_yaml, sort_keys=False), 0o600)
        (folder / "node-security.yaml").unlink()
        _write(folder / "tierlite-node.service", NODE_UNIT.format(node=node))
        _write(folder / "install.sh", INSTALL_SH.format(node=node), 0o755)
        _write(folder / "tierlite-firstboot.service", FIRSTBOOT_UNIT.format(node=node))
        if node not in self.state["nodes"]:
            self.state["nodes"].append(node)
        self._write_broker_files()
        self._save()
        return folder

    def revoke(self, node: str) -> None:
        if node not in self.state.get("identities", {}):
            raise ConfigError(f"{node} is not provisioned in {self.root}")
        if node not in self.state["revoked"]:
            self.state["revoked"].append(node)
        self._write_broker_files()
        self._save()
        folder = self.node_dir(node)
        if folder.is_dir():
            shutil.rmtree(folder)  # its key and password must not be handed out again


class CloudFleet(Fleet):
    """A cloud folder (see the module doc): the cloud broker, its workers and one bridge identity
    per site. Certificates only; every change rewrites the ACL (reload the broker with SIGHUP)."""

    def init(self, prefix: str = "tierlite", hosts: list[str] | None = None, port: int = 8883,
             cloud_ids: list[str] | None = None, sites: list[str] | None = None, ca_cert: Path | None = None,
             ca_key: Path | None = None) -> None:
        if self.state and self.state.get("kind") != "cloud":
            raise ConfigError(f"{self.root} is a site's fleet folder; give `provision cloud` a folder of its own")
        for site in sites or []:
            if not valid_node_id(site):
                raise ConfigError(f"site id {site!r}: 1-64 of [A-Za-z0-9_.-], not starting with '_' or '.', "
                                  "not 'update'")
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        if not self.state:
            self.state = {"format": "tierlite-fleet/1", "kind": "cloud", "prefix": prefix,
                          "hosts": list(dict.fromkeys([*(hosts or []), "127.0.0.1", "localhost"])), "port": port,
                          "cloud_ids": cloud_ids or ["cloud"], "sites": [], "identities": {}, "revoked": [],
                          # why secret: see Fleet.init (Mosquitto 2.0 checks reads at delivery)
                          "share_groups": {"cloud": f"tierlite-cloud-{secrets.token_hex(8)}"}}
        for cid in cloud_ids or []:
            if cid not in self.state["cloud_ids"]:
                self.state["cloud_ids"].append(cid)
        for site in sites or []:
            if site in self.state["revoked"]:
                raise ConfigError(f"site {site} was revoked; provision it under a new id")
            if site not in self.state["sites"]:
                self.state["sites"].append(site)
        if not self.ca_cert_path.is_file():
            cert, key = _load_pair(ca_cert, ca_key or ca_cert) if ca_cert else make_ca("tierlite cloud CA")
            _write(self.ca_cert_path, _pem_cert(cert))
            _write(self.root / "ca" / "ca.key", _pem_key(key), 0o600)
        if not (self.broker_dir / "server.crt").is_file():
            cert, key = issue(*self._ca(), "tierlite-cloud-broker", self.state["hosts"])
            _write(self.broker_dir / "server.crt", _pem_cert(cert))
            _write(self.broker_dir / "server.key", _pem_key(key), 0o600)
            shutil.copyfile(self.ca_cert_path, self.broker_dir / "ca.crt")
        host, cloud_port = self.state["hosts"][0], self.state["port"]
        for site in self.state["sites"]:
            bridge = {"host": host, "port": cloud_port, "site": site,
                      "tls": {"ca_file": "ca.crt", "cert_file": "bridge.crt", "key_file": "bridge.key"}}
            self._certificate_identity(f"_bridge-{site}", self.root / "sites" / site, "bridge",
                                       {"cloud": {"mode": "bridge", "bridge": bridge}}, f"site {site}'s edge.yaml")
        for cid in self.state["cloud_ids"]:
            self._certificate_identity(f"_cloud-{cid}", self.root / "cloud" / cid, "cloud",
                                       {"broker": self._client_broker("cloud"),
                                        "share_group": self.state["share_groups"]["cloud"]},
                                       f"cloud worker {cid}'s cloud.yaml")
        self._certificate_identity("_publisher", self.root / "publisher", "publisher",
                                   {"broker": self._client_broker("publisher")}, "the publisher's config")
        self._certificate_identity("_monitor", self.root / "monitor", "monitor",
                                   {"broker": self._client_broker("monitor")}, "the dashboard's config")
        self._write_broker_files()
        self._save()

    def _client_broker(self, stem: str) -> dict:
        return {"host": self.state["hosts"][0], "port": self.state["port"],
                "tls": {"ca_file": "ca.crt", "cert_file": f"{stem}.crt", "key_file": f"{stem}.key"}}

    def _certificate_identity(self, user: str, folder: Path, stem: str, snippet: dict, where: str) -> None:
        ids = self.state["identities"]
        if user not in ids or not (folder / f"{stem}.crt").is_file():
            cert, key = issue(*self._ca(), user)
            _write(folder / f"{stem}.crt", _pem_cert(cert))
            _write(folder / f"{stem}.key", _pem_key(key), 0o600)
            shutil.copyfile(self.ca_cert_path, folder / "ca.crt")
            ids[user] = {"folder": str(folder.relative_to(self.root)), "stem": stem, "serial": cert.serial_number}
        text = (f"# Paste into {where}; paths are relative to that file (keep it in this folder or make them\n"
                "# absolute). Written by `tierlite provision cloud`. No password: the certificate is the identity.\n")
        _write(folder / f"{stem}-security.yaml", text + yaml.safe_dump(snippet, sort_keys=False))

    def _write_broker_files(self) -> None:
        from tierlite.config import MosquittoConfig, config_from_dict
        from tierlite.edge.broker import mosquitto_config

        sites = [s for s in self.state["sites"] if s not in self.state["revoked"]]
        _write(self.acl_path, cloud_acl_text(self.state["prefix"], sites, self.state["cloud_ids"]), 0o600)
        self._write_crl([f"_bridge-{s}" for s in self.state["revoked"]])
        section = self.mosquitto_settings(absolute=False)
        _write(self.broker_dir / "cloud-broker.yaml",
               "# The cloud broker's `mosquitto:` settings (paths relative to this folder); mosquitto.conf is the\n"
               "# same as a Mosquitto config. Written by `tierlite provision cloud`.\n"
               + yaml.safe_dump({"mosquitto": section}, sort_keys=False))
        m = config_from_dict(section, MosquittoConfig, "cloud broker", self.broker_dir.resolve())
        state = self.broker_dir / "state"  # retained update announcements survive a restart
        state.mkdir(mode=0o700, exist_ok=True)
        conf = mosquitto_config(m, state_dir=state).splitlines()
        # Run Mosquitto as this folder's owner: `user root` only says who provisioned, not who will serve.
        conf = ["# Generated by `tierlite provision cloud` (the cloud broker of every site bridge); `mosquitto -c` it",
                *(line for line in conf[1:] if line != "user root")]
        _write(self.broker_dir / "mosquitto.conf", "\n".join(conf) + "\n", 0o600)

    def mosquitto_settings(self, absolute: bool = True) -> dict:
        """The cloud broker's `mosquitto:` settings (cloud-broker.yaml); file paths absolute, or
        relative to broker/. No password_file: the certificate's CN is the username."""
        def path(name: str) -> str:
            return str((self.broker_dir / name).resolve()) if absolute else name

        return {"bind": "0.0.0.0", "port": self.state["port"], "acl_file": path("acl"), "persistence": True,
                "tls": {"ca_file": path("ca.crt"), "cert_file": path("server.crt"), "key_file": path("server.key"),
                        "require_certificate": True, "crl_file": path("crl.pem")}}

    def add_node(self, *args, **kwargs) -> Path:
        raise ConfigError("a cloud folder has sites, not nodes: `tierlite provision cloud --site SITE`")

    def revoke(self, site: str) -> None:
        """Drop a site's bridge from the ACL: after a reload it may read or write nothing."""
        if site not in self.state.get("sites", []):
            raise ConfigError(f"site {site} is not provisioned in {self.root}")
        if site not in self.state["revoked"]:
            self.state["revoked"].append(site)
        self._write_broker_files()
        self._save()
        folder = self.root / "sites" / site
        if folder.is_dir():
            shutil.rmtree(folder)  # its key must not be handed out again


def reload_broker(pid: int) -> None:
    """SIGHUP: Mosquitto re-reads its password and ACL files and disconnects clients no longer allowed."""
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        raise ConfigError(f"no broker process {pid}") from None
    log.info("broker pid %d reloaded (SIGHUP)", pid)


# -- command line -------------------------------------------------------------------------------
def configure_provision(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", nargs="*", metavar="revoke NODE | cloud",
                   help="without it: create/extend the fleet; `revoke NODE...`: revoke nodes (in a cloud folder: "
                        "sites) and reload the broker; `cloud`: create/extend the cloud broker's folder (--site)")
    p.add_argument("--dir", required=True, help="the fleet folder (CA, broker files, node folders)")
    p.add_argument("--node", action="append", default=[], help="node id to provision (repeatable)")
    p.add_argument("--gateway-host", action="append", default=[],
                   help="a name or address nodes use for the gateway (repeatable; server certificate SANs)")
    p.add_argument("--gateway-id", default="edge")
    p.add_argument("--cloud-id", action="append", default=[], help="cloud worker id (repeatable; default cloud)")
    p.add_argument("--prefix", default="tierlite")
    p.add_argument("--port", type=int, default=8883, help="the broker's TLS port (default 8883)")
    p.add_argument("--ca-cert", help="use this CA (PEM) instead of creating one; with --ca-key")
    p.add_argument("--ca-key", help="the CA's private key (PEM, unencrypted)")
    p.add_argument("--bundle", default="/var/lib/tierlite/bundle.tar.gz", help="bundle path in the nodes' node.yaml")
    p.add_argument("--node-broker-host", help="broker host in the nodes' node.yaml: 'auto' (zeroconf; the "
                   "gateway's address must be a --gateway-host) or a name; default the first --gateway-host")
    p.add_argument("--source", default="0", help="camera source in the nodes' node.yaml (default camera 0)")
    p.add_argument("--board", default="pi4", help="board profile written into the node's node.yaml (`board:`)")
    p.add_argument("--site", action="append", default=[],
                   help="cloud: a site whose gateway bridges to the cloud broker (repeatable; its bridge identity)")
    p.add_argument("--cloud-host", action="append", default=[],
                   help="cloud: a name or address the site bridges use for the cloud broker (repeatable; SANs)")
    p.add_argument("--pid", type=int, help="revoke: the running Mosquitto's pid to reload")
    p.add_argument("--state-dir", help="revoke: the gateway's mosquitto.state_dir (its mosquitto.pid is reloaded)")


def _provision_cloud(args: argparse.Namespace) -> int:
    fleet = CloudFleet(Path(args.dir))
    if (args.ca_cert is None) != (args.ca_key is None):
        raise ConfigError("--ca-cert and --ca-key go together")
    if args.node:
        raise ConfigError("`provision cloud` takes --site, not --node (nodes belong to a site's fleet folder)")
    fleet.init(args.prefix, args.cloud_host, args.port, args.cloud_id or None, args.site,
               Path(args.ca_cert) if args.ca_cert else None, Path(args.ca_key) if args.ca_key else None)
    for site in fleet.state["sites"]:
        if site not in fleet.state["revoked"]:
            print(f"site {site}: {fleet.root / 'sites' / site} (paste bridge-security.yaml into its edge.yaml)")
    print(f"cloud broker files: {fleet.broker_dir} (mosquitto.conf, acl; docs/SECURITY.md)")
    return 0


def run_provision(args: argparse.Namespace) -> int:
    if args.action == ["cloud"]:
        return _provision_cloud(args)
    fleet = Fleet(Path(args.dir))
    if fleet.state.get("kind") == "cloud":
        fleet = CloudFleet(Path(args.dir))
        if not args.action:
            return _provision_cloud(args)
    if args.action:
        if args.action[0] != "revoke" or len(args.action) < 2:
            raise ConfigError("usage: tierlite provision revoke NODE... --dir FLEET [--pid PID | --state-dir DIR], "
                              "or tierlite provision cloud --dir FOLDER --site SITE...")
        if not fleet.state:
            raise ConfigError(f"{args.dir} is not a fleet folder (no fleet.json)")
        for node in args.action[1:]:
            fleet.revoke(node)
            files = fleet.acl_path if isinstance(fleet, CloudFleet) else f"{fleet.passwd_path} and {fleet.acl_path}"
            print(f"revoked {node}: removed from {files}; its certificate is in {fleet.crl_path}")
        pid = args.pid
        if pid is None and args.state_dir:
            pid_file = Path(args.state_dir) / "mosquitto.pid"
            try:
                pid = int(pid_file.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                raise ConfigError(f"cannot read the broker pid from {pid_file}") from None
        if pid is not None:
            check_crl(fleet.crl_path, fleet.ca_cert_path)
            reload_broker(pid)
            print(f"broker {pid} reloaded: the revoked nodes are disconnected, their certificates refused at the "
                  "TLS handshake, the others stay connected")
        else:
            print("no --pid/--state-dir: reload the broker yourself (kill -HUP <mosquitto pid>)")
        return 0
    if (args.ca_cert is None) != (args.ca_key is None):
        raise ConfigError("--ca-cert and --ca-key go together")
    if fleet.state and args.gateway_host and not set(args.gateway_host) <= set(fleet.state["hosts"]):
        print(f"note: {fleet.state_path} keeps its hosts {fleet.state['hosts']}; to change the server "
              "certificate, edit `hosts` there and delete broker/server.crt (docs/SECURITY.md)")
    fleet.init(args.prefix, args.gateway_id, args.gateway_host, args.port, args.cloud_id or None,
               Path(args.ca_cert) if args.ca_cert else None, Path(args.ca_key) if args.ca_key else None)
    for node in args.node:
        folder = fleet.add_node(node, args.bundle, args.source, args.board, args.node_broker_host)
        print(f"node {node}: {folder} (copy to the Pi: docs/PI_NODE.md)")
    print(f"broker files: {fleet.broker_dir} (paste edge-security.yaml into edge.yaml; docs/SECURITY.md)")
    return 0
