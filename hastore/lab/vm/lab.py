"""`VmLab`: two qemu guests with the real DRBD module, driven from the host.

    lab = VmLab(Path("/var/lib/hastore-vmlab"))
    lab.up()                                  # builds the image if needed, boots both, waits for their servers
    lab.exec("alpha", ["drbdadm", "role", "r0"])
    lab.fault("alpha", "poweroff"); lab.fault("alpha", "start")
    lab.down()

The qemus run detached (a session of their own), so a lab outlives the command that brought it up; what a lab
created is recorded in DIR/vmlab.json before it is created, and ``down()`` removes it from that record (or,
when even the record is gone, from the names derived from DIR), after a crash of everything as well.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from hastore.io.proc import start_ticks
from hastore.lab import netns
from hastore.lab.vm import image as img
from hastore.lab.vm import wiring as w
from hastore.lab.vm.ctl import CtlClient, CtlError

RECORD = "vmlab.json"
BOOT_TIMEOUT = 180.0
PROVISION = "/hastore/vagrant/provision.sh"
DAEMON_PIDFILE = "/run/hastore-provision.pid"
FAULTS = ("poweroff", "start", "link-down", "heal", "kill", "hang", "stop")
LINKS = {"hb": "repl", "lan": "lan"}
DAEMON_SIGNALS = {"kill": "KILL", "hang": "STOP", "stop": "TERM"}


class VmLabError(RuntimeError):
    """The VM lab could not do what was asked; the message says what and why."""


def wait_until(what: str, pred, timeout: float, step: float = 0.2, explain=None):
    """pred()'s first true value, polled every `step` s; VmLabError after `timeout` s, with what `explain()`
    returns appended (what the guests looked like at the end)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(step)
    raise VmLabError(f"timed out after {timeout:g} s waiting for {what}" + (f"\n{explain()}" if explain else ""))


class VmLab:
    def __init__(self, d: Path | str) -> None:
        self.dir = Path(d).resolve()
        self.prefix = w.prefix_for(self.dir)
        self.ns = w.lan_ns(self.prefix)
        self.nodes = w.guests(self.prefix)
        self._ctl = {n: CtlClient(self.dir / f"{n}.ctl") for n in self.nodes}

    # --------------------------------------------------------------------- lifecycle
    def up(self, provision: tuple[str, ...] = ("configure", "drbd", "start")) -> dict:
        """Boot the lab (idempotent: running guests are kept) and run these provision.sh steps in each guest."""
        self._claim_dir()
        image = img.ensure_image()
        rec = self._record()
        rec.update(prefix=self.prefix, netns=self.ns, image=str(image.initrd.parent))
        self._write_record(rec)
        w.create_network(self.prefix)
        for node in self.nodes:
            for name, size_mb in ((f"{node}.disk", w.DISK_MB), (f"{node}.nfs.disk", w.NFS_DISK_MB)):
                disk = self.dir / name
                if not disk.exists():
                    with open(disk, "wb") as f:
                        f.truncate(size_mb << 20)
            if not self.running(node):
                self._boot(node, image)
        for node in self.nodes:
            self.wait_ready(node)
        for step in provision:
            self.provision_all(step)
        return self.status()

    def down(self) -> list[str]:
        """Kill the guests and remove the namespace, taps, bridge and the lab's files."""
        removed = []
        rec = self._record()
        for node in self.nodes:
            self._ctl[node].close()
            if self._kill_qemu(node, rec):
                removed.append(f"guest {node}")
        removed += netns.cleanup_stale(rec.get("prefix", self.prefix), force=True)
        if self.dir.exists() and (self.dir / RECORD).exists():
            shutil.rmtree(self.dir, ignore_errors=True)
            removed.append(f"directory {self.dir}")
        return removed

    def _claim_dir(self) -> None:
        if self.dir.exists() and any(self.dir.iterdir()) and not (self.dir / RECORD).exists():
            raise VmLabError(f"{self.dir} exists and was not made by the VM lab; choose another directory")
        self.dir.mkdir(parents=True, exist_ok=True)
        if not (self.dir / RECORD).exists():
            self._write_record({"prefix": self.prefix, "netns": self.ns, "guests": {}})

    def _record(self) -> dict:
        try:
            return json.loads((self.dir / RECORD).read_text())
        except (FileNotFoundError, ValueError):
            return {"prefix": self.prefix, "netns": self.ns, "guests": {}}

    def _write_record(self, rec: dict) -> None:
        tmp = self.dir / f".{RECORD}.tmp"
        tmp.write_text(json.dumps(rec, indent=1))
        os.replace(tmp, self.dir / RECORD)

    # --------------------------------------------------------------------- guests
    def _boot(self, node: str, image: img.Image | None = None) -> None:
        image = image or img.ensure_image()
        argv = w.qemu_argv(self.prefix, self.dir, node, image.kernel, image.initrd, img.CHECKOUT)
        with open(self.dir / f"{node}.qemu.log", "ab") as log:
            proc = subprocess.Popen(["ip", "netns", "exec", self.ns, *argv], stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=log, start_new_session=True, cwd="/")
        rec = self._record()
        rec.setdefault("guests", {})[node] = {"pid": proc.pid, "start": start_ticks(proc.pid),
                                              "booted": time.time()}
        self._write_record(rec)

    def running(self, node: str) -> bool:
        g = self._record().get("guests", {}).get(node)
        return bool(g) and start_ticks(g["pid"]) == g["start"] and netns._alive(g["pid"])

    def wait_ready(self, node: str, timeout: float = BOOT_TIMEOUT) -> float:
        """Wait until the guest's command server answers; returns the seconds waited."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if not self.running(node):
                raise VmLabError(f"guest {node} is not running (see {self.dir}/{node}.qemu.log and "
                                 f"{node}.console.log)")
            if self._ctl[node].ping(timeout=3):
                return time.monotonic() - t0
            time.sleep(0.5)
        raise VmLabError(f"guest {node}: no command server after {timeout:g} s (see {self.dir}/{node}.console.log)")

    def _kill_qemu(self, node: str, rec: dict | None = None) -> bool:
        g = (rec or self._record()).get("guests", {}).get(node)
        if not g or start_ticks(g["pid"]) != g["start"]:
            return False
        with contextlib.suppress(ProcessLookupError):
            os.kill(g["pid"], signal.SIGKILL)
        deadline = time.monotonic() + 10
        while netns._alive(g["pid"]) and time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(g["pid"], os.WNOHANG)
            time.sleep(0.02)
        return True

    # --------------------------------------------------------------------- commands
    def explain(self, *nodes: str) -> str:
        """For a failure message: per guest, `hastore status` (or why the command channel could not run it)
        and the tail of its console log."""
        out = []
        for node in nodes:
            try:
                rc, stdout, stderr = self.exec(node, ["hastore", "status"], timeout=20)
                said = stdout if rc == 0 else f"rc {rc}: {stderr}"
            except CtlError as e:
                said = f"the command channel failed: {e}"
            try:
                tail = (self.dir / f"{node}.console.log").read_text(errors="replace").splitlines()[-15:]
            except OSError as e:
                tail = [f"({e})"]
            out.append(f"--- {node}: hastore status\n{said.rstrip()}\n--- {node}: console tail\n" + "\n".join(tail))
        return "\n".join(out)

    def exec(self, node: str, argv: list[str], timeout: float = 60.0, input: str | None = None,
             env: dict[str, str] | None = None) -> tuple[int, str, str]:
        """Run argv in the guest: (rc, stdout, stderr)."""
        if node not in self.nodes:
            raise VmLabError(f"no node {node!r}; nodes: {', '.join(self.nodes)}")
        return self._ctl[node].exec(argv, timeout=timeout, input=input, env=env)

    def provision_env(self, node: str) -> dict[str, str]:
        """The environment provision.sh gets in this guest."""
        me = self.nodes[node]
        peer = next(g for g in self.nodes.values() if g.name != node)
        return {"HASTORE_NODE": node, "HASTORE_PEER": peer.name, "HASTORE_NODE_ADDR": me.repl_addr,
                "HASTORE_PEER_ADDR": peer.repl_addr, "HASTORE_DISK": "/dev/vda", "HASTORE_SERIAL": "/dev/ttyS1",
                "HASTORE_LAN_IF": "eth0", "HASTORE_VIP": w.VIP, "HASTORE_PING": w.LAN_GW,
                "HASTORE_PRIMARY": "alpha", "HASTORE_SRC": "/hastore",
                "HASTORE_NFS_DISK": "/dev/vdb", "HASTORE_NFS_VIP": w.NFS_VIP, "HASTORE_NFS_CLIENTS": w.NFS_CLIENTS}

    def provision(self, node: str, step: str, timeout: float = 400.0) -> str:
        """Run one step of vagrant/provision.sh in the guest; raises with its output when it fails."""
        rc, out, err = self.exec(node, ["bash", PROVISION, step], timeout=timeout, env=self.provision_env(node))
        if rc != 0:
            raise VmLabError(f"provision.sh {step} on {node} failed ({rc}): {(err or out).strip()[-2000:]}")
        return out

    def provision_all(self, step: str, timeout: float = 400.0) -> None:
        """One provision.sh step in both guests. `drbd` runs in one guest after the other, the secondary first, so
        that the primary finds its peer and syncs; any other step runs in both at once. Above all `start`: the two
        daemons must meet within initdead (30 s). One after the other, they once started 28 s apart under TCG in
        CI, and alpha alone took the group bravo prefers (auto_failback off keeps it there, as it should)."""
        if step == "drbd":
            for node in sorted(self.nodes, key=lambda n: n == "alpha"):
                self.provision(node, step, timeout)
            return
        with ThreadPoolExecutor(len(self.nodes), thread_name_prefix="provision") as pool:
            for done in [pool.submit(self.provision, node, step, timeout) for node in self.nodes]:
                done.result()  # the first failure is raised here, after both guests have finished

    def lan_run(self, argv: list[str], timeout: float = 60.0) -> subprocess.CompletedProcess:
        """A command in the LAN namespace (the client side of the VIP)."""
        return subprocess.run(["ip", "netns", "exec", self.ns, *argv], capture_output=True, text=True,
                              timeout=timeout)

    def group_on(self, node: str, group: str = "group1") -> dict | None:
        """`hastore status` in the guest: the group when it runs there with every resource started, else None."""
        try:
            rc, out, _ = self.exec(node, ["hastore", "status", "--json"], timeout=30)
        except CtlError:
            return None
        if rc != 0:
            return None
        g = json.loads(out)["groups"].get(group) or {}
        ok = g.get("owner") == node and g.get("state") == "started" and \
            all(r["state"] == "started" for r in g.get("resources", []))
        return g if ok else None

    def sql(self, statement: str, timeout: int = 30) -> subprocess.CompletedProcess:
        """A statement through the VIP as a client on the LAN sends it (user lab, database lab)."""
        return self.lan_run(["mariadb", "--no-defaults", f"--connect-timeout={timeout}", "-h", w.VIP.split("/")[0],
                             "-u", "lab", "-plab", "-N", "-B", "lab", "-e", statement], timeout=timeout + 30)

    def logs(self, node: str) -> list[dict]:
        """The hastore daemon's JSON log lines in the guest."""
        _, out, _ = self.exec(node, ["cat", "/var/log/hastore.log"], timeout=30)
        lines = []
        for line in out.splitlines():
            with contextlib.suppress(ValueError):
                lines.append(json.loads(line))
        return lines

    # --------------------------------------------------------------------- faults
    def fault(self, node: str, kind: str, *args: str) -> str:
        """Inject a fault; returns a sentence saying what was done."""
        if node not in self.nodes:
            raise VmLabError(f"no node {node!r}; nodes: {', '.join(self.nodes)}")
        if kind == "poweroff":
            return f"{node} powered off" if self._kill_qemu(node) else f"{node} was not running"
        if kind == "start":
            if self.running(node):
                return f"{node} is already running"
            self._ctl[node].close()
            self._boot(node)
            return f"{node} booted in {self.wait_ready(node):.1f} s"
        if kind == "link-down":
            return self._link(node, args[0] if args else "", up=False)
        if kind == "heal":
            done = [self._link(node, which, up=True) for which in ("hb", "lan", "serial")]
            self.exec(node, ["sh", "-c", f"[ -s {DAEMON_PIDFILE} ] && kill -CONT $(cat {DAEMON_PIDFILE}); true"])
            return "; ".join(done) + f"; hastore on {node} continued"
        if kind in DAEMON_SIGNALS:
            sig = DAEMON_SIGNALS[kind]
            rc, _, err = self.exec(node, ["sh", "-c", f"kill -{sig} $(cat {DAEMON_PIDFILE})"])
            if rc != 0:
                raise VmLabError(f"{kind} hastore on {node}: {err.strip() or 'not running'}")
            return f"hastore on {node}: SIG{sig} sent"
        raise VmLabError(f"unknown fault {kind!r}; kinds: {', '.join(FAULTS)}")

    def _link(self, node: str, which: str, up: bool) -> str:
        qmp = self.dir / f"{node}.qmp"
        if which in LINKS:
            w.qmp(qmp, "set_link", name=LINKS[which], up=up)
        elif which == "serial":
            backend = w.serial_backend(self.dir, self.nodes[node].index) if up else {"type": "null", "data": {}}
            w.qmp(qmp, "chardev-change", id="hbser", backend=backend)
        else:
            raise VmLabError(f"link must be hb, serial or lan, got {which!r}")
        return f"{node}: {which} link {'up' if up else 'down'}"

    # --------------------------------------------------------------------- status
    def status(self) -> dict:
        """Per guest: running, command server, DRBD role/connection/disk, hastore daemon pid."""
        out = {"dir": str(self.dir), "prefix": self.prefix, "lan_ns": self.ns, "vip": w.VIP, "nodes": {}}
        for node, g in self.nodes.items():
            st = {"running": self.running(node), "lan": g.lan_addr, "repl": g.repl_addr}
            if st["running"]:
                try:
                    _, text, _ = self.exec(node, ["sh", "-c", "for w in role cstate dstate; do "
                                                              "drbdadm $w r0 2>/dev/null || echo -; done; "
                                                              f"cat {DAEMON_PIDFILE} 2>/dev/null"], timeout=15)
                    lines = text.split("\n")
                    st.update(drbd=" ".join(lines[:3]), daemon_pid=(lines[3] or None) if len(lines) > 3 else None)
                except CtlError as e:
                    st["error"] = str(e)
            out["nodes"][node] = st
        return out
