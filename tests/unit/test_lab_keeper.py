"""The lab keeper says `ready` only once its control socket listens: `hastore lab up` returns on that line, and
the first request right after it (a test's heal_all) must find the socket, however loaded the machine is."""

from __future__ import annotations

import socket

from hastore.lab import keeper as K


def test_the_socket_listens_before_ready_is_printed(tmp_path, monkeypatch, capfd):
    seen = {}

    def built(self):
        return {"dir": str(self.d)}

    def served(keeper, srv):
        seen["served"] = srv

    real_print = print

    def looking_print(*args, **kwargs):
        if args and str(args[0]).startswith("ready "):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(str(tmp_path / K.SOCKET))  # refused or missing unless it listens already
                seen["connected"] = True
            finally:
                probe.close()
        real_print(*args, **kwargs)

    monkeypatch.setattr(K.Keeper, "build", built)
    monkeypatch.setattr(K, "serve", served)
    monkeypatch.setattr(K.os, "dup2", lambda *a: None)  # keep pytest's stdout
    monkeypatch.setattr(K.logging, "basicConfig", lambda **kw: None)  # and this process's logging
    monkeypatch.setattr("builtins.print", looking_print)
    assert K.main(["--dir", str(tmp_path), "--prefix", "t0"]) == 0
    assert seen.get("connected") is True
    assert capfd.readouterr().out.startswith("ready ")
    seen["served"].close()
