"""The client's range sizes follow the cores its process may use (protocol.MANY_CORES)."""

import json
import os
import subprocess
import sys

from kvpack.kvstore import protocol
from kvpack.kvstore.client import KVStoreClient

_PRINT_DEFAULTS = (
    "import json, os\n"
    "{pin}"
    "from kvpack.kvstore import protocol as p\n"
    "print(json.dumps([p.GET_RANGE_BYTES, p.PUT_RANGE_BYTES]))\n"
)


def _defaults_with_cpus(cpus: set[int] | None) -> list[int]:
    pin = f"os.sched_setaffinity(0, {sorted(cpus)!r})\n" if cpus else ""
    result = subprocess.run([sys.executable, "-c", _PRINT_DEFAULTS.format(pin=pin)],
                            capture_output=True, text=True, check=True)
    return json.loads(result.stdout)


def test_one_usable_core_keeps_the_large_ranges():
    # A process pinned to one CPU (a container's CPU set) counts one core, whatever the host has.
    one = {min(os.sched_getaffinity(0))}
    assert _defaults_with_cpus(one) == [2 << 20, 4 << 20]


def test_defaults_follow_this_process_cores():
    many = len(os.sched_getaffinity(0)) >= protocol.MANY_CORES
    expected = [768 << 10, 768 << 10] if many else [2 << 20, 4 << 20]
    assert _defaults_with_cpus(None) == expected
    assert [protocol.GET_RANGE_BYTES, protocol.PUT_RANGE_BYTES] == expected


def test_many_core_ranges_split_a_4_mib_block_in_four():
    # The benchmark's 4 MiB block is 4 MiB less 22 bytes of header: 1 MiB ranges would give 3.
    with KVStoreClient("127.0.0.1:1", put_range_bytes=768 << 10) as client:  # never connects
        assert client._put_ranges_for((4 << 20) - 22) == 4
        assert client._put_ranges_for((3 << 19) - 1) == 1  # under 2 ranges: one call
    with KVStoreClient("127.0.0.1:1", put_range_bytes=1 << 20) as client:
        assert client._put_ranges_for((4 << 20) - 22) == 3
