"""`hastore lab up|status|exec|fault|down|demo`: the two-node namespace lab as a command."""

from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from hastore.config.durations import parse_duration
from hastore.config.model import Timing
from hastore.config.validate import timing_errors
from hastore.lab import keeper as K
from hastore.lab import netns
from hastore.io.proc import start_ticks

DEFAULT_DIR = Path("/var/lib/hastore-lab")
OWNER_FILE = "keeper.json"
FAULT_KINDS = ("kill", "hang", "stop", "crash", "link-down", "loss", "heal", "start")


class LabCliError(RuntimeError):
    pass


def add_parser(sub) -> None:
    from hastore.cli.main import LAB_HELP
    lab = sub.add_parser("lab", help=LAB_HELP)
    lsub = lab.add_subparsers(dest="lab_command", required=True)

    def with_dir(p):
        return dir_option(p, DEFAULT_DIR)

    up = with_dir(lsub.add_parser("up", help="build the lab and start hastore on both nodes"))
    up.add_argument("--nodes", type=int, default=2, help="number of nodes (the lab has two)")
    for name, default in (("keepalive", "200ms"), ("warntime", "500ms"), ("deadtime", "1s"), ("initdead", "2s")):
        up.add_argument(f"--{name}", default=default, help=f"ha.cf {name} (default {default})")
    up.add_argument("--auto-failback", choices=("on", "off", "legacy"), default="off")
    st = with_dir(lsub.add_parser("status", help="what each node runs and holds"))
    st.add_argument("--json", action="store_true")
    ex = with_dir(lsub.add_parser("exec", help="run a command inside a node: hastore lab exec alpha -- CMD"))
    ex.add_argument("node")
    ex.add_argument("argv", nargs=argparse.REMAINDER)
    fa = with_dir(lsub.add_parser("fault", help="inject a fault: kill, hang, stop, crash, link-down hb|serial|lan, "
                                               "loss PERCENT [hb|lan], heal, start"))
    fa.add_argument("node")
    fa.add_argument("kind", choices=FAULT_KINDS)
    fa.add_argument("args", nargs="*")
    with_dir(lsub.add_parser("down", help="stop everything and remove what the lab created"))
    demo = with_dir(lsub.add_parser("demo", help="up, then a scripted failover with a timeline (text and PNG)"))
    demo.add_argument("--keep", action="store_true", help="leave the lab up afterwards")
    from hastore.lab.vm import cli as vm_cli
    vm_cli.add_parser(lsub)


def take_exec_options(args) -> None:
    """`exec NODE [--dir DIR] [--] CMD...`: argparse hands everything after NODE to the command, so a --dir
    written there would run as part of it; take it as the option it was meant to be, and drop the `--`."""
    argv = list(args.argv)
    while argv and argv[0].startswith("--dir"):
        if argv[0] == "--dir" and len(argv) > 1:
            args.dir, argv = argv[1], argv[2:]
        elif argv[0].startswith("--dir="):
            args.dir, argv = argv[0][len("--dir="):], argv[1:]
        else:
            break
    args.argv = argv[1:] if argv[:1] == ["--"] else argv


def main(args) -> int:
    if os.geteuid() != 0:
        print("hastore lab: needs root (network namespaces, loop devices, mounts)", file=sys.stderr)
        return 1
    if getattr(args, "argv", None) is not None:
        take_exec_options(args)
    if args.lab_command == "vm":
        from hastore.lab.vm import cli as vm_cli
        return vm_cli.main(args)
    d = Path(args.dir).resolve()
    try:
        if args.lab_command == "up":
            if args.nodes != 2:
                raise LabCliError("the lab has exactly two nodes (hastore is a two-node cluster)")
            info = up(d, keepalive=args.keepalive, warntime=args.warntime, deadtime=args.deadtime,
                      initdead=args.initdead, auto_failback=args.auto_failback)
            print_summary(info)
            return 0
        if args.lab_command == "status":
            return cmd_status(d, args.json)
        if args.lab_command == "exec":
            return cmd_exec(d, args.node, args.argv)
        if args.lab_command == "fault":
            resp = fault(d, args.node, args.kind, args.args)
            print(f"{resp['detail']} (t={resp['t']:.3f})")
            return 0
        if args.lab_command == "down":
            print("\n".join(down(d)) or "nothing to remove")
            return 0
        if args.lab_command == "demo":
            from hastore.lab import demo
            return demo.run(d, keep=args.keep)
    except (LabCliError, netns.LabError, OSError) as e:
        print(f"hastore lab {args.lab_command}: {e}", file=sys.stderr)
        return 1
    return 2


# ---------------------------------------------------------------------- the verbs (also the tests' API)
def prefix_for(d: Path) -> str:
    """The namespace prefix of the lab in DIR: 8 characters, stable for a directory, never 'hs…' (tests)."""
    return netns.dir_prefix("hl", d)


def dir_option(p: argparse.ArgumentParser, default: Path) -> argparse.ArgumentParser:
    """Adds --dir (a lab's directory) to a subcommand's parser."""
    p.add_argument("--dir", default=str(default), help=f"the lab's directory (default {default})")
    return p


def keeper_alive(d: Path) -> dict | None:
    """The owner record if the keeper of the lab in DIR is running."""
    try:
        rec = json.loads((d / OWNER_FILE).read_text())
    except (FileNotFoundError, ValueError):
        return None
    return rec if start_ticks(rec["pid"]) == rec["start"] else None


def state(d: Path) -> dict:
    try:
        return json.loads((d / K.STATE_FILE).read_text())
    except FileNotFoundError:
        raise LabCliError(f"no lab in {d} (run `hastore lab up --dir {d}`)") from None


def up(d: Path, owner_pid: int | None = None, **opts: str) -> dict:
    """Build and start the lab in DIR (or return the running one's description).

    owner_pid: the lab takes itself down when that process exits (what tests pass: a killed test run
    leaves nothing behind)."""
    ms = {}
    for name in ("keepalive", "warntime", "deadtime", "initdead"):
        try:
            ms[name] = parse_duration(opts.get(name) or getattr(K.Options, name))
        except ValueError as e:
            raise LabCliError(f"--{name}: {e}") from None
    bad = timing_errors(Timing(ms["keepalive"], ms["warntime"], ms["deadtime"], ms["initdead"]))
    if bad:
        raise LabCliError("; ".join(bad))
    if keeper_alive(d) and (d / K.STATE_FILE).exists():
        return state(d)
    if d.exists() and any(d.iterdir()) and not (d / OWNER_FILE).exists():
        raise LabCliError(f"{d} exists and was not made by `hastore lab up`; refusing to touch it "
                          f"(choose another --dir)")
    if (d / OWNER_FILE).exists():
        down(d)  # leftovers of a crashed or half-built lab
    d.mkdir(parents=True, exist_ok=True)
    prefix = prefix_for(d)
    argv = [sys.executable, "-m", "hastore.lab.keeper", "--dir", str(d), "--prefix", prefix]
    for k, v in opts.items():
        argv += [f"--{k.replace('_', '-')}", v]
    if owner_pid:
        argv += ["--owner-pid", str(owner_pid)]
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    with open(d / "keeper.out", "ab") as err:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err,
                                start_new_session=True, cwd="/", env=env)
    (d / OWNER_FILE).write_text(json.dumps({"pid": proc.pid, "start": start_ticks(proc.pid),
                                            "prefix": prefix}))
    line = _read_line(proc, K.READY_TIMEOUT + 60)
    proc.stdout.close()
    if line.startswith("ready "):
        return json.loads(line[6:])
    if proc.poll() is None:
        proc.terminate()
    proc.wait(120)
    down(d)
    raise LabCliError(f"the lab did not come up: {line[6:] if line.startswith('error ') else line or 'no answer'}"
                      f" (see {d}/keeper.log)")


def _read_line(proc: subprocess.Popen, timeout: float) -> str:
    buf = b""
    deadline = time.monotonic() + timeout
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([proc.stdout], [], [], left)[0]:
            return ""
        chunk = os.read(proc.stdout.fileno(), 65536)
        if not chunk:
            break
        buf += chunk
    return buf.split(b"\n", 1)[0].decode(errors="replace")


def request(d: Path, req: dict, timeout: float = 120.0) -> dict:
    if not keeper_alive(d):
        raise LabCliError(f"no running lab in {d} (run `hastore lab up --dir {d}`)")
    resp = K.request(d, req, timeout)
    if not resp.get("ok"):
        raise LabCliError(resp.get("error", "failed"))
    return resp


def fault(d: Path, node: str, kind: str, args: list[str] | tuple[str, ...] = ()) -> dict:
    return request(d, {"cmd": kind, "node": node, "args": list(args)})


def status(d: Path) -> dict:
    return request(d, {"cmd": "status"})["status"]


def down(d: Path) -> list[str]:
    """Stop the lab in DIR and remove everything it created, also after a crash of its keeper."""
    owner = None
    try:
        owner = json.loads((d / OWNER_FILE).read_text())
    except FileNotFoundError:
        if d.exists() and any(d.iterdir()):
            raise LabCliError(f"{d} was not made by `hastore lab up`; not removing it") from None
        return []
    except ValueError:
        pass
    removed = []
    live = keeper_alive(d)
    if live:
        try:
            K.request(d, {"cmd": "down"}, timeout=240)
        except (OSError, ValueError, netns.LabError) as e:
            removed.append(f"keeper did not answer ({e}); killing it")
        deadline = time.monotonic() + 30
        while start_ticks(live["pid"]) == live["start"] and time.monotonic() < deadline:
            time.sleep(0.1)
        if start_ticks(live["pid"]) == live["start"]:
            os.kill(live["pid"], signal.SIGKILL)
        removed.append(f"keeper {live['pid']} stopped")
    prefix = (owner or {}).get("prefix") or prefix_for(d)
    removed += netns.cleanup_stale(prefix, force=True)
    removed += [f"loop device {dev}" for dev in K.detach_loops(d)]
    shutil.rmtree(d, ignore_errors=True)
    removed.append(f"directory {d}")
    return removed


def cmd_exec(d: Path, node: str, argv: list[str]) -> int:
    info = state(d)
    if node not in info["nodes"]:
        raise LabCliError(f"no node {node!r}; nodes: {', '.join(info['nodes'])}")
    pid = info["nodes"][node]["anchor_pid"]
    cmd = ["nsenter", "-t", str(pid), "-n", "-m", "-u", "--wd=/", "--", *(argv or ["bash", "-i"])]
    os.execvp(cmd[0], cmd)
    return 127


def cmd_status(d: Path, as_json: bool) -> int:
    st = status(d)
    if as_json:
        print(json.dumps(st, indent=1))
        return 0
    print(f"lab {st['prefix']} in {st['dir']}, VIP {st['vip']}")
    print(f"{'node':8} {'daemon':18} {'peer':6} {'group':28} {'holds (kernel view)':30} faults")
    for name, n in st["nodes"].items():
        g = n["group"] or {}
        group = f"{g.get('state', '-')} (owner {g.get('owner') or '-'})" if g else "-"
        holds = ", ".join(k for k, v in n["holds"].items() if v) or "nothing"
        peer = "-" if n["peer_alive"] is None else "alive" if n["peer_alive"] else "dead"
        print(f"{name:8} {n['daemon']:18} {peer:6} {group:28} {holds:30} {', '.join(n['faults']) or '-'}")
    return 0


def print_summary(info: dict) -> None:
    print(f"lab {info['prefix']} is up in {info['dir']}")
    for name, n in info["nodes"].items():
        print(f"  {name}: LAN {n['lan_addr']} ({n['lan_if']}, {n['mac']}), heartbeat {n['hb_addr']}, "
              f"serial {n['serial']}, config {n['config']}, log {n['log']}")
    db = info["db"]
    print(f"  shared disk {info['image']}: lock area {info['loops']['lock']}, filesystem {info['loops']['data']} "
          f"mounted at {info['mount']} by the holder")
    print(f"  VIP {info['vip']}: MariaDB, user {db['user']} password {db['password']} database {db['database']}")
    print(f"  client side: ip netns exec {info['lan_ns']} mariadb -h {info['vip']} -u {db['user']} "
          f"-p{db['password']} {db['database']}")
    print(f"  try: hastore lab status | hastore lab fault alpha kill | hastore lab exec bravo -- hastore status")
