"""Small shared helpers with literal expectations: common.human_bytes, net.hostport, net.format_addr."""

from __future__ import annotations

import pytest

from anywhere.common import human_bytes
from anywhere.net import format_addr, hostport


@pytest.mark.parametrize("n, text", [(0, "0 B"), (999, "999 B"), (1000, "1.0 KB"), (1500, "1.5 KB"),
                                     (999_949, "999.9 KB"), (2_000_000_000, "2.0 GB"),
                                     (3 * 10**12, "3.0 TB"), (5 * 10**15, "5000.0 TB")])
def test_human_bytes(n, text):
    assert human_bytes(n) == text


@pytest.mark.parametrize("host, port, text", [("2001:db8::1", 80, "[2001:db8::1]:80"), ("127.0.0.1", 80, "127.0.0.1:80"),
                                              ("name", 80, "name:80"), ("fe80::1%eth0", 22, "[fe80::1%eth0]:22"),
                                              ("fd00::/8", 22, "[fd00::/8]:22")])
def test_hostport(host, port, text):
    assert hostport(host, port) == text


def test_format_addr_shows_a_mapped_ipv4_client_as_ipv4():
    assert format_addr(("::ffff:192.0.2.7", 5000, 0, 0)) == "192.0.2.7:5000"
    assert format_addr(("::1", 5000, 0, 0)) == "[::1]:5000"
    assert format_addr(("::ffff:zz", 1)) == "[::ffff:zz]:1"
