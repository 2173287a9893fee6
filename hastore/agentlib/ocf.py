"""The OCF resource agent contract (API 1.1): exit codes, parameters, meta-data, and a dispatcher.

An agent is a small executable:

    #!/usr/bin/env python3
    from hastore.agentlib.ocf import Agent, Param, run

    agent = Agent("IPaddr", "a virtual IP address", params=[Param("ip", "the address", required=True)])

    @agent.action("start")
    def start(p): ...   # p: dict of parameter values (defaults applied); return an exit code

    if __name__ == "__main__":
        run(agent)

Rules every agent keeps: start on a started resource succeeds, stop on a stopped one succeeds, monitor on a
stopped one returns NOT_RUNNING; confirm by re-reading state, not by trusting an exit code; refuse an unsafe
configuration with NOT_CONFIGURED and a sentence on stderr.
"""

from __future__ import annotations

import os
import sys
from collections import namedtuple  # not dataclasses: an agent runs per call, and that import costs ~20 ms
from collections.abc import Callable


def escape(text: str, quote: bool = False) -> str:
    """XML character data (and attribute values when `quote`). Not xml.sax.saxutils: that imports urllib and
    http.client, half a second of every agent call on a slow machine (measured in the TCG guests)."""
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return text.replace('"', "&quot;") if quote else text


SUCCESS = 0
ERR_GENERIC = 1
ERR_ARGS = 2
ERR_UNIMPLEMENTED = 3
ERR_PERM = 4
ERR_INSTALLED = 5
ERR_CONFIGURED = 6
NOT_RUNNING = 7
RUNNING_PROMOTED = 8
FAILED_PROMOTED = 9

NAMES = {0: "success", 1: "generic error", 2: "invalid argument", 3: "unimplemented", 4: "insufficient privilege",
         5: "not installed", 6: "not configured", 7: "not running", 8: "running as promoted",
         9: "failed as promoted"}


class AgentError(Exception):
    """Raise from an action to exit with `code` after printing `message` on stderr."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


class Param(namedtuple("Param", "name description required default unique type",
                       defaults=(False, None, False, "string"))):
    # name: str, description: str, required: bool, default: str | None, unique: bool, type: str (OCF content type)
    __slots__ = ()


class Agent:
    def __init__(self, name: str, description: str, params: list[Param] | None = None,
                 timeouts: dict[str, int] | None = None, monitor_interval: int = 10, version: str = "1.0") -> None:
        self.name = name
        self.description = description
        self.params: list[Param] = list(params or [])
        self.timeouts: dict[str, int] = dict(timeouts or {"start": 20, "stop": 20, "monitor": 20})
        self.monitor_interval = monitor_interval
        self.version = version
        self.actions: dict[str, Callable[[dict], int]] = {}

    def action(self, name: str):
        def register(fn: Callable[[dict], int]) -> Callable[[dict], int]:
            self.actions[name] = fn
            return fn
        return register

    def meta_data(self) -> str:
        params = "\n".join(
            f'    <parameter name="{escape(p.name)}" unique="{int(p.unique)}" required="{int(p.required)}">\n'
            f'      <longdesc lang="en">{escape(p.description)}</longdesc>\n'
            f'      <shortdesc lang="en">{escape(p.description.split(".")[0])}</shortdesc>\n'
            f'      <content type="{escape(p.type)}"'
            + (f' default="{escape(p.default, quote=True)}"' if p.default is not None else "") + "/>\n"
            "    </parameter>"
            for p in self.params)
        names = sorted(set(self.actions) | {"meta-data", "validate-all"})
        acts = []
        for a in names:
            attrs = f'name="{a}" timeout="{self.timeouts.get(a, 20)}s"'
            if a == "monitor":
                attrs += f' interval="{self.monitor_interval}s" depth="0"'
            acts.append(f"    <action {attrs}/>")
        return (
            '<?xml version="1.0"?>\n'
            '<!DOCTYPE resource-agent SYSTEM "ra-api-1.dtd">\n'
            f'<resource-agent name="{escape(self.name)}" version="{escape(self.version)}">\n'
            "  <version>1.1</version>\n"
            f'  <longdesc lang="en">{escape(self.description)}</longdesc>\n'
            f'  <shortdesc lang="en">{escape(self.description.split(".")[0])}</shortdesc>\n'
            f"  <parameters>\n{params}\n  </parameters>\n"
            f"  <actions>\n" + "\n".join(acts) + "\n  </actions>\n"
            "</resource-agent>\n")

    def read_params(self, environ=None) -> dict[str, str]:
        environ = os.environ if environ is None else environ
        values = {}
        for p in self.params:
            v = environ.get(f"OCF_RESKEY_{p.name}")
            if v is None or v == "":
                v = p.default
            if v is not None:
                values[p.name] = v
        return values

    def missing(self, values: dict[str, str]) -> list[str]:
        return [p.name for p in self.params if p.required and not values.get(p.name)]


def log(message: str) -> None:
    """Agents talk to the operator on stderr; hastore puts it in its log with the resource's name."""
    print(f"{os.environ.get('OCF_RESOURCE_INSTANCE', 'agent')}: {message}", file=sys.stderr, flush=True)


def run(agent: Agent, argv: list[str] | None = None) -> None:
    argv = sys.argv if argv is None else argv
    sys.exit(dispatch(agent, argv[1] if len(argv) > 1 else ""))


def dispatch(agent: Agent, action: str, environ=None) -> int:
    if action == "meta-data":
        sys.stdout.write(agent.meta_data())
        return SUCCESS
    if action in ("", "usage", "help"):
        print(f"usage: {agent.name} {{{'|'.join(sorted(set(agent.actions) | {'meta-data', 'validate-all'}))}}}",
              file=sys.stderr)
        return SUCCESS if action in ("usage", "help") else ERR_ARGS
    fn = agent.actions.get(action)
    if fn is None and action != "validate-all":
        log(f"action {action!r} is not implemented")
        return ERR_UNIMPLEMENTED
    values = agent.read_params(environ)
    missing = agent.missing(values)
    if missing:
        log(f"required parameter(s) missing: {', '.join(missing)}")
        # probes of an unconfigured resource must not fail the whole group (OCF: stop/monitor of nothing)
        return NOT_RUNNING if action in ("monitor", "status") else SUCCESS if action == "stop" else ERR_CONFIGURED
    try:
        if fn is None:
            return SUCCESS
        return int(fn(values))
    except AgentError as e:
        log(str(e))
        return e.code
