"""The legacy front door: a Heartbeat directory (ha.cf, authkeys, haresources) -> Config.

ha.cf is parsed by `hacf`; authkeys and haresources here. Messages are "FILE:LINE: message";
problems with a whole file (missing, unreadable, mode) are "FILE: message".
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re

from .common import default_timing, make_link
from .errors import ConfigError
from .files import check_private, read_text
from .hacf import HaCf, parse_hacf
from .model import (
    DEFAULT_BAUD,
    DEFAULT_UDP_PORT,
    Auth,
    AuthAlgorithm,
    AuthKey,
    AutoFailback,
    Config,
    Group,
    Logging,
    Resource,
    Stonith,
)
from .validate import Locator, check

_IPV4_LIKE = re.compile(r"\d+\.\d+\.\d+\.\d+")


def load_legacy(directory: str, node: str, allow_insecure: bool = False) -> Config:
    paths = {name: os.path.join(directory, name) for name in ("ha.cf", "authkeys", "haresources")}
    errors: list[str] = []
    text = read_text(paths["ha.cf"], errors)
    cf = parse_hacf(paths["ha.cf"], text or "")
    where = dict(cf.where)
    auth, auth_ok = _read_authkeys(paths["authkeys"], allow_insecure, errors, where)
    groups = _read_haresources(paths["haresources"], errors, where)
    cfg = _build(cf, node.lower(), auth, groups, directory)
    errors = cf.errors + errors
    warnings = list(cf.warnings)
    if cf.auto_failback is None and text is not None:
        warnings.append(f"{cf.path}: no auto_failback line: Heartbeat's default 'legacy' applies; "
                        f"write 'auto_failback on' or 'auto_failback off'")
    if text is not None:
        skip = set(cf.broken) | ({"auth"} if not auth_ok else set())
        locator = _locator(paths, where)
        more_errors, more_warnings = check(cfg, locator, frozenset(skip))
        errors += more_errors
        warnings += more_warnings
    if errors:
        raise ConfigError(_in_file_order(errors, paths), _in_file_order(warnings, paths))
    return dataclasses.replace(cfg, warnings=tuple(_in_file_order(warnings, paths)))


def _in_file_order(messages: list[str], paths: dict[str, str]) -> list[str]:
    """Sort by file (ha.cf, authkeys, haresources) then line, so a reader can walk the files once."""
    order = list(paths.values())

    def key(msg: str) -> tuple[int, int]:
        for i, path in enumerate(order):
            if msg.startswith(path + ":"):
                line = msg[len(path) + 1:].split(":", 1)[0]
                return i, int(line) if line.isdigit() else 0
        return len(order), 0
    return sorted(messages, key=key)


def _locator(paths: dict[str, str], where: dict[str, str]) -> Locator:
    def fallback(key: str) -> str:
        if key.startswith("auth"):
            return paths["authkeys"]
        if key.startswith("groups"):
            return paths["haresources"]
        return paths["ha.cf"]
    return Locator(fallback, where, nodes_label="ha.cf")


def _build(cf: HaCf, node: str, auth: Auth | None, groups: list[Group], directory: str) -> Config:
    udpport = cf.udpport if cf.udpport is not None else DEFAULT_UDP_PORT
    baud = cf.baud if cf.baud is not None else DEFAULT_BAUD
    links = []
    for spec, _at in cf.media:
        spec = dict(spec)
        kind = spec.pop("kind")
        spec.setdefault("port", udpport)
        links.append(make_link(kind, baud=baud, **spec))
    t = cf.timing
    stonith_type, stonith_file = cf.stonith
    return Config(
        node=node,
        nodes=tuple(cf.nodes),
        timing=default_timing(t.get("keepalive_ms"), t.get("warntime_ms"), t.get("deadtime_ms"),
                              t.get("initdead_ms")),
        udpport=udpport,
        links=tuple(links),
        auth=auth,
        auto_failback=cf.auto_failback or AutoFailback.LEGACY,
        ping_nodes=tuple(cf.ping_nodes),
        ping_groups=tuple(cf.ping_groups),
        groups=tuple(groups),
        respawn=tuple(cf.respawn),
        watchdog=cf.watchdog,
        logging=Logging(**cf.logging),
        autojoin=cf.autojoin,
        stonith=Stonith(config_file=stonith_file, hosts=tuple(cf.stonith_hosts), type=stonith_type),
        source=directory,
    )


# ---------------------------------------------------------------- authkeys

def _read_authkeys(path: str, allow_insecure: bool, errors: list[str],
                   where: dict[str, str]) -> tuple[Auth | None, bool]:
    """Returns (auth, ok): ok is False when the file had problems of its own already reported."""
    before = len(errors)
    text = read_text(path, errors, raw=True)
    if text is None:
        return None, False
    check_private(path, errors, "the heartbeat signing keys")
    keys: list[AuthKey] = []
    active: int | None = None
    for no, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        at = f"{path}:{no}"
        if line.split()[0] == "auth":
            active = _auth_line(line, at, active, errors)
            if active is not None:
                where.setdefault("auth.active_key", at)
            continue
        key = _key_line(line, at, errors)
        if key is not None:
            where[f"auth.keys[{len(keys)}]"] = at
            keys.append(key)
    if active is None and keys and len(errors) == before:
        errors.append(f"{path}: no 'auth N' line says which key signs heartbeats (e.g. 'auth {keys[0].id}')")
    where.setdefault("auth", path)
    ok = len(errors) == before
    if not keys and active is None:
        return None, ok
    return Auth(keys=tuple(keys), active_key=active if active is not None else -1,
                allow_insecure=allow_insecure), ok


def _auth_line(line: str, at: str, active: int | None, errors: list[str]) -> int | None:
    words = line.split("#", 1)[0].split()[1:]
    if active is not None:
        errors.append(f"{at}: a second 'auth' line; only one key may sign heartbeats")
        return active
    if len(words) != 1 or not words[0].isdigit():
        hint = " ('//' does not start a comment; only '#' does)" if any(w.startswith("//") for w in words) else ""
        errors.append(f"{at}: 'auth' takes one key number, as in 'auth 1'; got {' '.join(words)!r}{hint}")
        return None
    return int(words[0])


def _key_line(line: str, at: str, errors: list[str]) -> AuthKey | None:
    words = line.split(None, 2)
    if not words[0].isdigit():
        errors.append(f"{at}: expected 'auth N' or 'N ALGORITHM SECRET' (e.g. '1 sha1 s3cret'), "
                      f"got {_printable(words[0])!r}")
        return None
    if len(words) < 2:
        errors.append(f"{at}: key {words[0]} needs an algorithm: sha256, sha1, md5 (or crc)")
        return None
    try:
        algorithm = AuthAlgorithm(words[1].lower())
    except ValueError:
        errors.append(f"{at}: key {words[0]}: unknown algorithm {_printable(words[1])!r}; "
                      f"use sha256, sha1 or md5")
        return None
    secret = words[2].encode("utf-8", "surrogateescape") if len(words) > 2 else b""
    return AuthKey(id=int(words[0]), algorithm=algorithm, secret=secret)


def _printable(text: str) -> str:
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


# ---------------------------------------------------------------- haresources

def _read_haresources(path: str, errors: list[str], where: dict[str, str]) -> list[Group]:
    """Missing haresources is fine: no groups. Groups are named group1, group2... in file order."""
    text = read_text(path, errors, required=False)
    if text is None:
        return []
    groups: list[Group] = []
    for no, tokens in _logical_lines(path, text, errors):
        at = f"{path}:{no}"
        if any("{{" in t or "}}" in t for t in tokens):
            errors.append(f"{at}: {' '.join(tokens)[:30]!r} holds a template placeholder ('{{{{ ... }}}}') "
                          f"that was never filled in: replace it with the real value")
            continue
        if len(tokens) < 2:
            errors.append(f"{at}: line names node {tokens[0]!r} but no resources; "
                          f"write 'NODE RESOURCE...' (e.g. 'node1 IPaddr::10.0.0.100/24/eth0 httpd')")
            continue
        resources = [_resource(t, at, errors) for t in tokens[1:]]
        if None in resources:
            continue  # reported; an incomplete group would only bring follow-on errors
        where[f"groups[{len(groups)}]"] = at
        groups.append(Group(name=f"group{len(groups) + 1}", preferred_node=tokens[0].lower(),
                            resources=tuple(resources), source=at))
    return groups


def _logical_lines(path: str, text: str, errors: list[str]):
    """Yield (first line number, tokens), joining '\\' continuations and dropping comments."""
    pending: list[str] = []
    start = 0
    for no, raw in enumerate(text.splitlines(), start=1):
        line = raw.rstrip()
        if not pending:
            start = no
        if line.endswith("\\"):
            pending.append(line[:-1])
            continue
        pending.append(line)
        tokens = _tokens(" ".join(pending), f"{path}:{start}", errors)
        pending = []
        if tokens:
            yield start, tokens
    if pending:
        tokens = _tokens(" ".join(pending), f"{path}:{start}", errors)
        if tokens:
            yield start, tokens


def _tokens(text: str, at: str, errors: list[str]) -> list[str]:
    tokens: list[str] = []
    for tok in text.split():
        if tok.startswith("#"):
            break
        if tok.startswith("//"):
            errors.append(f"{at}: '//' does not start a comment in haresources, only '#' does: "
                          f"change {tok[:30]!r}... to '# ...'")
            break
        tokens.append(tok)
    return tokens


def _resource(token: str, at: str, errors: list[str]) -> Resource | None:
    """`Name::a::b` -> Resource("Name", ("a", "b")); a bare `IP[/mask[/if[/bcast]]]` -> IPaddr."""
    if _is_ip(token.split("/", 1)[0]):
        return Resource(agent="IPaddr", args=(token,), raw=token)
    head = token.split("::", 1)[0].split("/", 1)[0]
    if _is_ip(head):
        errors.append(f"{at}: {token!r}: an address takes no '::' arguments; write IPaddr::ADDRESS")
        return None
    if _IPV4_LIKE.fullmatch(head):
        errors.append(f"{at}: {token!r}: {head} is not a valid IP address")
        return None
    parts = token.split("::")
    if any(not p for p in parts):
        errors.append(f"{at}: {token!r} has an empty part (a '::' at the start or end, or '::::')")
        return None
    return Resource(agent=parts[0], args=tuple(parts[1:]), raw=token)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True
