"""Where the Oracle may open a data-plane connection to a Scout: policy as pure functions.

A Scout's announcement says where it listens, but a claim is not an address: a Scout that
announces ``127.0.0.1:6379`` would have the Oracle connect to its own Redis, and any Scout could
point it at any host and port it can reach (a port scanner inside the operator's network). So the
Oracle dials only the IP its libp2p connection to that Scout runs to (the port is the Scout's
claim, on the Scout's own host), and of those only ones on a network the Oracle itself is on when
they are loopback, private or link-local. Everything else is reached by the Scout dialing in.
"""

from __future__ import annotations

import ipaddress
from typing import Iterable

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# The Oracle's port for Scouts that dial in (next to libp2p's 7420); 0 picks any.
DEFAULT_DATA_PORT = 7421


def dial_problem(observed: str | None, own_networks: Iterable[Network]) -> str | None:
    """Why the Oracle must not dial a Scout whose libp2p connection comes from ``observed``
    (None: it may)."""
    if observed is None:
        return "no direct libp2p connection to it (its announcements were relayed): nothing observed to dial"
    try:
        ip = ipaddress.ip_address(observed)
    except ValueError:
        return f"observed address {observed!r} is not an IP address"
    if ip.is_unspecified or ip.is_multicast or ip.is_reserved:
        return f"observed address {ip} cannot be dialled"
    if ip.is_global:
        return None
    if any(ip in net for net in own_networks):
        return None
    return f"observed address {ip} is {'loopback' if ip.is_loopback else 'link-local' if ip.is_link_local else 'private'} " \
           "and the Oracle is not on that network"


def own_networks() -> list[Network]:
    """The networks this machine's interfaces are on (loopback included)."""
    import psutil

    out: list[Network] = []
    for addresses in psutil.net_if_addrs().values():
        for a in addresses:
            if a.netmask is None:
                continue
            try:
                out.append(ipaddress.ip_interface(f"{a.address.split('%')[0]}/{a.netmask}").network)
            except ValueError:
                continue
    return out
