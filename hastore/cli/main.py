"""The hastore command."""

from __future__ import annotations

import argparse
import json
import os
import sys

from hastore.config.model import DEFAULT_CONFIG_PATH, DEFAULT_LEGACY_DIR, DEFAULT_SOCKET

LAB_HELP = "a two-node lab on this machine (network namespaces, or qemu guests with `lab vm`)"


def _default_config() -> str:
    return DEFAULT_CONFIG_PATH if os.path.exists(DEFAULT_CONFIG_PATH) else DEFAULT_LEGACY_DIR


def _parser(lab: bool = True) -> argparse.ArgumentParser:
    """`lab`: with the lab's own subcommands. Without, `lab` is only listed: the lab's modules are not imported
    (every `hastore status` and the daemon start pay for them otherwise: ~2 s in the TCG guests)."""
    p = argparse.ArgumentParser(prog="hastore", description="Two-node storage failover (a modern Heartbeat v1).")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the daemon in the foreground")
    run.add_argument("-c", "--config", default=None,
                     help=f"a TOML file or a Heartbeat directory (default {DEFAULT_CONFIG_PATH}, else {DEFAULT_LEGACY_DIR})")
    run.add_argument("--node", help="this node's name (default: uname -n)")
    run.add_argument("--socket", help=f"control socket path (default {DEFAULT_SOCKET})")
    run.add_argument("--state-dir", help="where the boot generation is kept (default /var/lib/hastore)")
    run.add_argument("--allow-insecure-auth", action="store_true", help="accept crc authkeys (authenticates nothing)")
    run.add_argument("--json-logs", action="store_true", default=None, help="JSON log lines even on a terminal")

    st = sub.add_parser("status", help="show this node, its peer, links, ping nodes and groups")
    st.add_argument("--json", action="store_true")
    st.add_argument("--socket", default=DEFAULT_SOCKET)

    for name, help_ in (("stop", "release groups, tell the peer and stop the daemon"),
                        ("reload", "reload the configuration (like SIGHUP)"),
                        ("restart", "restart the daemon in place (new code, new configuration) keeping the "
                                    "resources running: the new daemon adopts them")):
        c = sub.add_parser(name, help=help_)
        c.add_argument("--socket", default=DEFAULT_SOCKET)

    for name, scopes, help_ in (
            ("standby", ("all", "local", "foreign", "failback"), "give groups to the peer (Heartbeat's hb_standby)"),
            ("takeover", ("all", "local", "foreign"), "take groups from the peer (Heartbeat's hb_takeover)")):
        c = sub.add_parser(name, help=help_)
        c.add_argument("scope", nargs="?", default="all", choices=scopes,
                       help="local: groups whose preferred node is this one; foreign (failback): the others")
        c.add_argument("--socket", default=DEFAULT_SOCKET)

    if lab:
        from hastore.lab.cli import add_parser as add_lab_parser
        add_lab_parser(sub)
    else:
        sub.add_parser("lab", help=LAB_HELP)

    cfg = sub.add_parser("config", help="check or convert configuration")
    csub = cfg.add_subparsers(dest="config_command", required=True)
    check = csub.add_parser("check", help="validate a TOML file or a Heartbeat directory")
    check.add_argument("path")
    check.add_argument("--node")
    check.add_argument("--allow-insecure-auth", action="store_true")
    conv = csub.add_parser("convert", help="print the TOML equivalent of a Heartbeat directory")
    conv.add_argument("path")
    conv.add_argument("--node")
    conv.add_argument("--allow-insecure-auth", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else argv
    args = _parser(lab="lab" in words or not words or words[0].startswith("-")).parse_args(argv)
    if args.command == "run":
        return cmd_run(args)
    if args.command == "status":
        return cmd_status(args)
    if args.command in ("stop", "reload", "restart"):
        return cmd_simple(args.socket, "shutdown" if args.command == "stop" else args.command)
    if args.command in ("standby", "takeover"):
        return cmd_simple(args.socket, args.command, scope=args.scope)
    if args.command == "config":
        return cmd_config(args)
    if args.command == "lab":
        from hastore.lab.cli import main as lab_main
        return lab_main(args)
    return 2


def _load(path: str, node: str | None, insecure: bool):
    from hastore.config import ConfigError, load
    try:
        return load(path, node=node, allow_insecure_auth=insecure), None
    except ConfigError as e:
        return None, e


def cmd_config(args) -> int:
    cfg, err = _load(args.path, args.node, args.allow_insecure_auth)
    if err is not None:
        print(f"{args.path}: {len(err.errors)} error(s):", file=sys.stderr)
        for line in err.errors:
            print(f"  {line}", file=sys.stderr)
        return 1
    for w in cfg.warnings:
        print(f"warning: {w}", file=sys.stderr)
    if args.config_command == "convert":
        from hastore.config import to_toml
        sys.stdout.write(to_toml(cfg))
        return 0
    t = cfg.timing
    print(f"{args.path}: valid — node {cfg.node}, peers {', '.join(cfg.peers) or 'none'}, "
          f"{len(cfg.links)} link(s), keepalive {t.keepalive_ms} ms, deadtime {t.deadtime_ms} ms, "
          f"{len(cfg.ping_nodes) + len(cfg.ping_groups)} ping node(s), {len(cfg.groups)} group(s), "
          f"{len(cfg.warnings)} warning(s)")
    return 0


def cmd_run(args) -> int:
    from dataclasses import replace

    from hastore import daemon
    from hastore.io import log as hlog
    path = args.config or _default_config()
    cfg, err = _load(path, args.node, args.allow_insecure_auth)
    if err is not None:
        print(f"hastore: refusing to start, {path} has {len(err.errors)} error(s):", file=sys.stderr)
        for line in err.errors:
            print(f"  {line}", file=sys.stderr)
        return 1
    if args.socket:
        cfg = replace(cfg, control_socket=args.socket)
    if args.state_dir:
        cfg = replace(cfg, state_dir=args.state_dir)
    hlog.configure(cfg.logging.logfile, json_lines=args.json_logs)
    return daemon.run(cfg, allow_insecure_auth=args.allow_insecure_auth)


def _request(socket: str, cmd: str, **extra) -> dict | None:
    from hastore.io.control import ControlError, request
    try:
        reply = request(socket, {"cmd": cmd, **extra})
    except ControlError as e:
        print(f"hastore: {e}", file=sys.stderr)
        return None
    if not reply.get("ok"):
        print(f"hastore: {reply.get('error', 'the daemon refused')}", file=sys.stderr)
        return None
    return reply


def cmd_simple(socket: str, cmd: str, **extra) -> int:
    reply = _request(socket, cmd, **extra)
    if reply is None:
        return 1
    print(reply.get("detail", "ok"))
    return 0


def cmd_status(args) -> int:
    reply = _request(args.socket, "status")
    if reply is None:
        return 1
    status = reply["status"]
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True))
    else:
        print(format_status(status))
    return 0


def format_status(s: dict) -> str:
    ping = s["ping"]
    lines = [f"node {s['node']} (generation {s['generation']})"
             + (f", ping nodes {ping['count']}/{ping['configured']} visible" if ping["configured"] else "")
             + (", leaving" if s.get("leaving") else "")]
    rows = [("PEER", "STATE", "LINK", "LINK STATE", "LAST BEAT")]
    for name, p in s["peers"].items():
        first = True
        for lid, l in p["links"].items():
            age = "-" if l["last_beat_ms"] is None else f"{l['last_beat_ms']} ms ago"
            down = " (cannot send here)" if lid in s.get("here", {}).get("links_down", ()) else ""
            rows.append((name if first else "", p["state"] if first else "", lid, l["state"] + down, age))
            first = False
    lines += _table(rows)
    here = s.get("here") or {}
    if here.get("no_route"):
        lines.append(f"no route from here to ping node(s) {', '.join(here['no_route'])}")
    if here.get("isolated"):
        lines.append(here["isolated"])
    rows = [("GROUP / RESOURCE", "OWNER", "STATE", "PREFERRED", "WHY")]
    for name, g in s["groups"].items():
        state = g["state"] + (" (standby)" if g.get("standby") else "")
        rows.append((name, g["owner"] or "-", state, g["preferred"], g["reason"]))
        for r in g.get("resources", []):
            rows.append((f"  {r['name']}", "", r["state"], "", r["reason"]))
    if len(rows) > 1:
        lines.append("")
        lines += _table(rows)
    return "\n".join(lines)


def _table(rows: list[tuple]) -> list[str]:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


if __name__ == "__main__":
    sys.exit(main())
