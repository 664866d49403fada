"""The Oracle dials only addresses it observed, and of those only reachable kinds."""

from __future__ import annotations

import ipaddress

from oracle.swarm.addresses import dial_problem, own_networks

LOOPBACK, LAN = ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("192.168.1.0/24")


def test_observed_public_addresses_may_be_dialled():
    assert dial_problem("203.0.113.7", []) is not None  # TEST-NET: documentation space, not global
    assert dial_problem("8.8.8.8", []) is None
    assert dial_problem("2001:4860:4860::8888", []) is None


def test_loopback_private_and_link_local_only_on_a_network_the_oracle_is_on():
    assert "loopback" in dial_problem("127.0.0.1", [LAN])
    assert dial_problem("127.0.0.1", [LOOPBACK]) is None  # a Scout on this machine
    assert "private" in dial_problem("10.1.2.3", [LOOPBACK, LAN])
    assert dial_problem("192.168.1.20", [LAN]) is None
    assert "link-local" in dial_problem("169.254.10.1", [LOOPBACK, LAN])


def test_nothing_observed_nothing_dialled():
    assert "relayed" in dial_problem(None, [LOOPBACK])
    assert "not an IP" in dial_problem("scout.example", [LOOPBACK])
    assert dial_problem("0.0.0.0", [LOOPBACK]) is not None


def test_this_machine_is_on_loopback():
    assert any(ipaddress.ip_address("127.0.0.1") in n for n in own_networks())
