"""The kvstore on a real 3-master Redis Cluster on loopback."""

from kvpack.kvstore.client import KVStoreClient
from support.blocks import chain, random_record


def test_blocks_spread_over_the_cluster_and_round_trip(redis_cluster, kvstore_factory):
    server = kvstore_factory(backend=redis_cluster.url)
    hashes = chain(40)
    records = [random_record("ns", 3000 + i) for i in range(40)]
    with KVStoreClient(server.address) as client:
        for block_hash, data in zip(hashes, records, strict=True):
            client.put("ns", block_hash, data)
        assert client.match("ns", hashes) == 40
        assert client.match("other", hashes) == 0
        for block_hash, data in zip(hashes, records, strict=True):
            assert client.get("ns", block_hash) == data
        assert client.delete("ns", hashes[5]) is True
        assert client.match("ns", hashes) == 5
        stats = client.stats()
    assert stats["blocks"] == 39
    per_node = [node.client().dbsize() for node in redis_cluster.nodes]
    assert sum(per_node) == 39 and all(count > 0 for count in per_node)  # really distributed
