"""`hastore lab vm up|status|exec|fault|down`: the two-guest DRBD lab as a command."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEFAULT_DIR = Path("/var/lib/hastore-vmlab")


def add_parser(lsub) -> None:
    vm = lsub.add_parser("vm", help="two qemu guests with real DRBD (image cached in /var/cache/hastore-vm)")
    vsub = vm.add_subparsers(dest="vm_command", required=True)

    from hastore.lab.cli import dir_option

    def with_dir(p):
        return dir_option(p, DEFAULT_DIR)

    up = with_dir(vsub.add_parser("up", help="build the image if needed, boot both guests, provision them"))
    up.add_argument("--no-provision", action="store_true", help="only boot (no DRBD, no hastore)")
    st = with_dir(vsub.add_parser("status", help="guests, DRBD state, hastore daemon"))
    st.add_argument("--json", action="store_true")
    ex = with_dir(vsub.add_parser("exec", help="run a command in a guest: hastore lab vm exec alpha -- CMD"))
    ex.add_argument("node")
    ex.add_argument("argv", nargs=argparse.REMAINDER)
    fa = with_dir(vsub.add_parser("fault", help="poweroff, start, link-down hb|serial|lan, heal, kill, hang, stop"))
    fa.add_argument("node")
    fa.add_argument("kind")
    fa.add_argument("args", nargs="*")
    with_dir(vsub.add_parser("down", help="kill the guests, remove the namespace, taps and files"))


def main(args) -> int:
    from hastore.lab.vm.ctl import CtlError
    from hastore.lab.vm.image import ImageError
    from hastore.lab.vm.lab import VmLab, VmLabError
    lab = VmLab(Path(args.dir))
    try:
        if args.vm_command == "up":
            st = lab.up(provision=() if args.no_provision else ("configure", "drbd", "start"))
            print_status(st)
            print(f"  client side: ip netns exec {st['lan_ns']} mariadb -h {st['vip'].split('/')[0]} -u lab -plab lab")
            return 0
        if args.vm_command == "status":
            st = lab.status()
            print(json.dumps(st, indent=1)) if args.json else print_status(st)
            return 0
        if args.vm_command == "exec":
            rc, out, err = lab.exec(args.node, args.argv or ["true"], timeout=3600)
            sys.stdout.write(out)
            sys.stderr.write(err)
            return rc
        if args.vm_command == "fault":
            print(lab.fault(args.node, args.kind, *args.args))
            return 0
        if args.vm_command == "down":
            print("\n".join(lab.down()) or "nothing to remove")
            return 0
    except (VmLabError, CtlError, ImageError, OSError, RuntimeError) as e:
        print(f"hastore lab vm {args.vm_command}: {e}", file=sys.stderr)
        return 1
    return 2


def print_status(st: dict) -> None:
    print(f"VM lab {st['prefix']} in {st['dir']}, LAN namespace {st['lan_ns']}, VIP {st['vip']}")
    for name, n in st["nodes"].items():
        state = "running" if n["running"] else "off"
        print(f"  {name:6} {state:8} lan {n['lan']:12} repl {n['repl']:10} drbd {n.get('drbd', '-'):45} "
              f"hastore pid {n.get('daemon_pid') or '-'}")
