"""Fixtures of the kvstore tests."""

import pytest


@pytest.fixture(params=["memory", "redis"])
def store(request, kvstore_factory):
    """A kvstore on each backend in turn."""
    if request.param == "memory":
        return kvstore_factory(capacity_bytes=512 << 20)
    redis_server = request.getfixturevalue("redis_server")
    return kvstore_factory(backend=redis_server.url)


@pytest.fixture(params=["memory", "redis", "cluster"])
def any_store(request, kvstore_factory):
    """A kvstore on each backend in turn, Redis Cluster included."""
    if request.param == "memory":
        return kvstore_factory(capacity_bytes=512 << 20)
    fixture = "redis_cluster" if request.param == "cluster" else "redis_server"
    return kvstore_factory(backend=request.getfixturevalue(fixture).url)
