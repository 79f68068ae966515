"""Run a command in this network namespace (a fresh one holding only loopback, see
tests/cluster/loopback.py) and record every packet that goes to or comes from an address other
than loopback, whatever process sends it.

    python _no_network.py OUT.json COMMAND [ARG ...]

Every address is routed to the loopback device (`ip route add local 0.0.0.0/0 dev lo`, and ::/0),
so a connection attempt or a DNS query to the outside, which would otherwise fail in the kernel
without sending anything, becomes a packet on `lo`; a raw socket on `lo` sees them all. Before the
command runs, one UDP probe to 192.0.2.1 checks that the capture sees such a packet. OUT.json:
{"probe_seen": bool, "packets": [[protocol, source, destination, destination port, the name a
DNS query asked for], ...], "returncode": int}; the exit status is the command's."""

from __future__ import annotations

import ipaddress
import json
import socket
import struct
import subprocess
import sys
import threading
import time

ETH_P_ALL = 0x0003


def outside(frame: bytes) -> tuple | None:
    """(protocol, source, destination, port, DNS name) of an IP packet with a non-loopback end,
    else None."""
    kind = struct.unpack("!H", frame[12:14])[0]
    if kind == 0x0800 and len(frame) >= 34:
        header = 14 + (frame[14] & 0x0F) * 4
        protocol, source, destination = frame[23], frame[26:30], frame[30:34]
    elif kind == 0x86DD and len(frame) >= 54:
        header = 54
        protocol, source, destination = frame[20], frame[22:38], frame[38:54]
    else:
        return None
    source, destination = ipaddress.ip_address(source), ipaddress.ip_address(destination)
    if source.is_loopback and destination.is_loopback:
        return None
    port = struct.unpack("!H", frame[header + 2:header + 4])[0] if protocol in (6, 17) and len(frame) >= header + 4 else 0
    return (protocol, str(source), str(destination), port, dns_name(frame[header + 8:]) if protocol == 17 and port == 53 else "")


def dns_name(message: bytes) -> str:
    """The first question's name of a DNS query (what was looked up), or ''."""
    labels, position = [], 12
    while position < len(message) and message[position] and len(labels) < 64:
        length = message[position]
        labels.append(message[position + 1:position + 1 + length].decode("ascii", "replace"))
        position += 1 + length
    return ".".join(labels)


class Capture(threading.Thread):
    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(ETH_P_ALL))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        self.sock.bind(("lo", 0))
        self.sock.settimeout(0.2)
        self.packets: list[tuple] = []
        self.running = True

    def run(self) -> None:
        while self.running:
            try:
                frame = self.sock.recv(65535)
            except socket.timeout:
                continue
            seen = outside(frame)
            if seen is not None:
                self.packets.append(seen)


def main(out_path: str, command: list[str]) -> int:
    subprocess.run(["ip", "route", "add", "local", "0.0.0.0/0", "dev", "lo"], check=True)
    subprocess.run(["ip", "-6", "route", "add", "local", "::/0", "dev", "lo"], check=True)
    capture = Capture()
    capture.start()
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.sendto(b"probe", ("192.0.2.1", 9))
    probe.close()
    deadline = time.time() + 5
    while not any(p[2] == "192.0.2.1" for p in capture.packets) and time.time() < deadline:
        time.sleep(0.05)
    probe_seen = any(p[2] == "192.0.2.1" for p in capture.packets)
    time.sleep(0.2)  # the probe can show up twice on loopback (sent, then received): wait for both
    probes = set(capture.packets)
    capture.packets = []
    returncode = subprocess.run(command).returncode
    time.sleep(0.5)
    capture.running = False
    capture.join()
    # A copy of the probe seen late (a loaded machine) is not the command's; any other packet is.
    packets = sorted(set(capture.packets) - {p for p in probes if p[2] == "192.0.2.1"})
    with open(out_path, "w") as handle:
        json.dump({"probe_seen": probe_seen, "packets": packets, "returncode": returncode}, handle)
    return returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:]))
