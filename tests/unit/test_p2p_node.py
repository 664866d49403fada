"""The libp2p node itself (a real host on loopback)."""

from __future__ import annotations

import asyncio
import time

from shard_common.identity import Identity
from shard_common.p2p.node import P2PConfig, P2PNode


def test_a_restarted_node_never_reuses_the_message_ids_of_its_previous_life():
    """gossipsub drops a message whose (sender, counter) it has seen in the last two minutes. A
    counter started at the clock in seconds is overtaken by a node that publishes more than once a
    second, so its next life would repeat ids and go unheard; in nanoseconds it cannot catch up."""

    async def first_counter() -> int:
        node = P2PNode(Identity.generate(), P2PConfig())
        await node.start({})
        try:
            return node._pubsub.counter
        finally:
            await node.stop()

    before = time.time_ns()
    assert asyncio.run(first_counter()) >= before
