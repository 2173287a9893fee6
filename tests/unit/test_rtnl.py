"""hastore.agentlib.rtnl: the netlink parsing (the requests themselves run against the kernel in
tests/agents/test_ipaddr.py)."""

import socket
import struct

import pytest

from hastore.agentlib import rtnl


def test_attrs_round_trip_and_padding():
    body = rtnl.attr(rtnl.IFA_LABEL, b"eth0:1\0") + rtnl.attr(rtnl.IFA_LOCAL, bytes([10, 0, 0, 1]))
    assert len(body) % 4 == 0
    a = rtnl.attrs(body)
    assert a[rtnl.IFA_LABEL] == b"eth0:1\0"
    assert a[rtnl.IFA_LOCAL] == bytes([10, 0, 0, 1])


@pytest.mark.parametrize("cut", range(1, 12))
def test_truncated_attributes_are_dropped_not_misread(cut):
    body = rtnl.attr(rtnl.IFA_LOCAL, bytes(4)) + rtnl.attr(rtnl.IFA_LABEL, b"abcdefgh\0")  # 9 bytes + 3 padding
    a = rtnl.attrs(body[:len(body) - cut])
    if cut <= 3:  # only padding is gone
        assert a[rtnl.IFA_LABEL] == b"abcdefgh\0"
    else:
        assert rtnl.IFA_LABEL not in a
    assert a[rtnl.IFA_LOCAL] == bytes(4)


def test_messages_split_a_datagram_and_stop_at_a_bad_length():
    def msg(kind, seq, body):
        return struct.pack("=IHHII", 16 + len(body), kind, 0, seq, 0) + body + bytes(-len(body) % 4)
    data = msg(rtnl.RTM_NEWADDR, 7, b"abcde") + msg(rtnl.NLMSG_DONE, 7, b"")
    assert [(k, s, b) for k, _f, s, b in rtnl.messages(data)] == [(rtnl.RTM_NEWADDR, 7, b"abcde"),
                                                                 (rtnl.NLMSG_DONE, 7, b"")]
    assert list(rtnl.messages(struct.pack("=IHHII", 4, 3, 0, 1, 0))) == []  # length below the header


def test_loopback_is_read_from_the_kernel():
    with rtnl.Rtnl() as r:
        index, name, _mac, _flags = r.link(socket.if_nametoindex("lo"))
        assert (index, name) == (socket.if_nametoindex("lo"), "lo")
        v4 = r.addresses(socket.AF_INET)
        assert (index, bytes([127, 0, 0, 1]), 8) in [(i, a, p) for i, a, p, _f, _l in v4]
        with pytest.raises(OSError):
            r.link(2 ** 31 - 7)
