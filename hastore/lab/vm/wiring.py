"""The host side of a VM lab's wiring: names, the LAN namespace with its bridge and taps, qemu command lines, QMP.

Everything of one lab lives in one network namespace ``<prefix>-lan``: the bridge ``<prefix>br`` (10.92.0.1/24:
the gateway, the ping node and where a client reaches the VIP), one tap per guest on it, and both qemu processes.
Since the qemus run in that namespace, the replication NIC (a UDP socket pair between the qemus) uses its
loopback, so fixed ports never clash with another lab.  The serial line is a unix-socket chardev pair (the first
guest serves, the second connects and reconnects), the command channel a virtio-serial port per guest.
"""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass
from pathlib import Path

from hastore.lab import netns

LAN_GW, LAN_PREFIXLEN = "10.92.0.1", 24
VIP = f"10.92.0.100/{LAN_PREFIXLEN}"
NFS_VIP = f"10.92.0.101/{LAN_PREFIXLEN}"  # the NFS example group's
NFS_CLIENTS = f"10.92.0.0/{LAN_PREFIXLEN}"
NODES = ("alpha", "bravo")
UDP_BASE = 40000
MEM_MB = 1024  # 512 left MariaDB + hastore 35 MiB of page cache: every Python import hit 9p
DISK_MB = 256
NFS_DISK_MB = 64


@dataclass(frozen=True)
class GuestNet:
    """One guest's addresses and host-side names."""
    name: str
    index: int
    lan_addr: str
    repl_addr: str
    tap: str
    mac_lan: str
    mac_repl: str


def prefix_for(d: Path) -> str:
    """Names of the VM lab in DIR: 'hv' + 6 hex digits, stable for a directory (netns, bridge, taps)."""
    return netns.dir_prefix("hv", d)


def guests(prefix: str) -> dict[str, GuestNet]:
    return {n: GuestNet(n, i, f"10.92.0.{11 + i}", f"10.93.0.{1 + i}", f"{prefix}t{i}",
                        f"52:54:00:92:00:{11 + i:02x}", f"52:54:00:93:00:{1 + i:02x}")
            for i, n in enumerate(NODES)}


def lan_ns(prefix: str) -> str:
    return f"{prefix}-lan"


def create_network(prefix: str) -> None:
    """The LAN namespace, its bridge with the gateway address, and one tap per guest (what is missing of it)."""
    ns, br = lan_ns(prefix), f"{prefix}br"
    if ns not in netns._list_netns():
        netns._ip(["netns", "add", ns])
    if netns._operstate(ns, br) is None:
        netns._ip(["-n", ns, "-batch", "-"], stdin="\n".join([
            "link set lo up", f"link add {br} type bridge forward_delay 0 mcast_snooping 0",
            f"addr add {LAN_GW}/{LAN_PREFIXLEN} dev {br}", f"link set {br} up"]))
    for g in guests(prefix).values():
        if netns._operstate(ns, g.tap) is None:
            netns._ip(["-n", ns, "-batch", "-"], stdin=f"tuntap add dev {g.tap} mode tap\n"
                                                       f"link set {g.tap} master {br} up")


def qemu_argv(prefix: str, d: Path, node: str, kernel: Path, initrd: Path, checkout: Path) -> list[str]:
    """The qemu command line of one guest (run it inside the LAN namespace)."""
    g = guests(prefix)[node]
    peer = next(p for p in guests(prefix).values() if p.name != node)
    hosts = ",".join(f"{p.name}={p.lan_addr}" for p in guests(prefix).values())
    # rootfstype=ramfs: the kernel unpacks the initramfs into ramfs instead of a tmpfs capped at half the RAM,
    # which the ~200 MB root would overflow.
    cmdline = (f"console=ttyS0 panic=-1 quiet rootfstype=ramfs hastore.node={node} hastore.lan={g.lan_addr}/{LAN_PREFIXLEN} "
               f"hastore.gw={LAN_GW} hastore.repl={g.repl_addr}/24 hastore.hosts={hosts}")
    serial_mode = "server=on,wait=off" if g.index == 0 else "reconnect=1"
    # Two vCPUs on multi-threaded TCG: after a power-off the survivor starts both groups at once (MariaDB's and
    # NFS's), and on one vCPU they took turns (bench/vm_failover first write 10.3 -> 5.5 s median, with the agent
    # launcher). Tried once before and reverted: tests/vm then failed 2 of 5 runs, one of them waiting for a group
    # on bravo, as the initdead race (fixed since: initdead 30 s) does; the other with the command channel to a
    # guest not answering for 70 s after it was powered off and started again. A timed-out wait in tests/vm says
    # what the guests looked like (VmLab.explain).
    # CPU model qemu64 (x86-64 baseline, SSE2): with "max" the guest sees AVX2 and its kin, and programs that pick
    # such code at run time (glibc's string functions do) ran slower under TCG here. bench/vm_failover, 5 trials
    # each, one run after the other: first write 3.5 s median with qemu64 against 3.7 s with max (MariaDB ready
    # 1.5 s after the VIP against 2.0 s); `python3 -c pass` in the guest 0.17 s against 0.25-0.29 s.
    return [
        "qemu-system-x86_64", "-name", f"hastore-vm:{prefix}:{node}", "-accel", "tcg,thread=multi,tb-size=256",
        "-cpu", "qemu64", "-smp", "2", "-m", str(MEM_MB), "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-kernel", str(kernel), "-initrd", str(initrd), "-append", cmdline,
        "-chardev", f"socket,id=con,path={d}/{node}.console,server=on,wait=off,logfile={d}/{node}.console.log",
        "-serial", "chardev:con",
        "-chardev", f"socket,id=hbser,path={d}/serial.sock,{serial_mode}", "-serial", "chardev:hbser",
        "-netdev", f"tap,id=lan,ifname={g.tap},script=no,downscript=no",
        "-device", f"virtio-net-pci,netdev=lan,mac={g.mac_lan},addr=0x4",
        "-netdev", f"socket,id=repl,udp=127.0.0.1:{UDP_BASE + peer.index},localaddr=127.0.0.1:{UDP_BASE + g.index}",
        "-device", f"virtio-net-pci,netdev=repl,mac={g.mac_repl},addr=0x5",
        "-drive", f"file={d}/{node}.disk,if=none,id=disk,format=raw,cache=writeback",
        "-device", "virtio-blk-pci,drive=disk,addr=0x6",
        "-drive", f"file={d}/{node}.nfs.disk,if=none,id=nfsdisk,format=raw,cache=writeback",
        "-device", "virtio-blk-pci,drive=nfsdisk,addr=0x7",
        "-virtfs", f"local,path={checkout},mount_tag=hastore,security_model=none,readonly=on",
        "-device", "virtio-serial-pci,id=vser",
        "-chardev", f"socket,id=ctl,path={d}/{node}.ctl,server=on,wait=off",
        "-device", "virtserialport,chardev=ctl,name=ctl",
        "-qmp", f"unix:{d}/{node}.qmp,server=on,wait=off",
        "-pidfile", f"{d}/{node}.pid",
    ]


def serial_backend(d: Path, index: int) -> dict:
    """The QMP description of a guest's serial-line chardev as qemu_argv creates it (for heal)."""
    data: dict = {"addr": {"type": "unix", "data": {"path": f"{d}/serial.sock"}}}
    data.update({"server": True, "wait": False} if index == 0 else {"server": False, "reconnect": 1})
    return {"type": "socket", "data": data}


def qmp(path: Path, command: str, timeout: float = 5.0, **arguments) -> dict:
    """Run one QMP command on a guest's monitor socket; returns its "return" or raises RuntimeError."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        f = s.makefile("rwb")
        f.readline()  # greeting
        for cmd in ({"execute": "qmp_capabilities"}, {"execute": command, "arguments": arguments}):
            f.write(json.dumps(cmd).encode() + b"\n")
            f.flush()
            while True:
                msg = json.loads(f.readline())
                if "return" in msg:
                    break
                if "error" in msg:
                    raise RuntimeError(f"QMP {command}: {msg['error'].get('desc', msg['error'])}")
        return msg["return"]
