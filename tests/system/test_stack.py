"""End to end: redis-server, kvstore and inference started by the `kvpack` CLI, a real Prometheus
scraping both, clients in two tenants, every dashboard panel evaluated, and Redis killed mid-run."""

from __future__ import annotations

import json

import grpc
import pytest
from kvpack.common.grpc_server import CHANNEL_OPTIONS
from kvpack.common.healthcheck import is_serving
from kvpack.proto import inference_pb2, inference_pb2_grpc
from support.processes import RedisServer, free_port, wait_for
from support.stack import Prometheus, kvpack_argv, start_grpc_service
from support.threads import run_in_threads

from kvpack.up import prometheus_config

BLOCK_TOKENS = 16
STORY = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the "
         "park with her friends. One day, she saw a big red ball under a tree. She wanted to play "
         "with it, but it was too high. Lily asked her mom for help.")
DASHBOARD = "deploy/compose/grafana/dashboards/kvpack.json"


@pytest.fixture(scope="module")
def stack(tmp_path_factory, shared_data):
    workdir = tmp_path_factory.mktemp("stack")
    redis_server = RedisServer(workdir / "redis").start()
    kvstore_address = f"127.0.0.1:{free_port()}"
    inference_address = f"127.0.0.1:{free_port()}"
    kvstore_metrics, inference_metrics = free_port(), free_port()
    processes = []
    prometheus = None
    try:
        processes.append(start_grpc_service("kvstore", kvpack_argv(
            "kvstore", "serve", "--listen", kvstore_address, "--backend", redis_server.url,
            "--metrics-port", str(kvstore_metrics)), kvstore_address, workdir))
        processes.append(start_grpc_service("inference", kvpack_argv(
            "inference", "serve", "--listen", inference_address,
            "--model", str(shared_data / "models" / "stories260K"), "--kvstore", kvstore_address,
            "--method", "fp16", "--block-tokens", str(BLOCK_TOKENS),
            "--metrics-port", str(inference_metrics)), inference_address, workdir))
        prometheus = Prometheus(prometheus_config(
            kvstore=f"127.0.0.1:{kvstore_metrics}", inference=f"127.0.0.1:{inference_metrics}",
            scrape_seconds=1), workdir / "prometheus")
        channel = grpc.insecure_channel(inference_address, options=CHANNEL_OPTIONS)
        yield {"redis": redis_server, "prometheus": prometheus, "kvstore": kvstore_address,
               "stub": inference_pb2_grpc.InferenceStub(channel)}
        channel.close()
    finally:
        for process in reversed(processes):
            process.stop()
        if prometheus:
            prometheus.stop()
        redis_server.stop()


def generate(stub, prompt: str, tenant: str, max_new_tokens: int = 12) -> tuple[str, dict]:
    request = inference_pb2.GenerateRequest(prompt=prompt, max_new_tokens=max_new_tokens,
                                            tenant=tenant)
    text, usage = [], None
    for response in stub.Generate(request, timeout=120):
        text.append(response.text)
        if response.HasField("usage"):
            usage = response.usage
    return "".join(text), {"cached_tokens": usage.cached_tokens,
                           "prompt_tokens": usage.prompt_tokens}


def generate_reused(stub, prompt: str, tenant: str) -> tuple[str, dict]:
    """Blocks are put asynchronously: ask again until the previous request's blocks are in."""
    result = {}

    def reused() -> bool:
        result["value"] = generate(stub, prompt, tenant)
        return result["value"][1]["cached_tokens"] > 0

    wait_for(reused, timeout_seconds=30, interval_seconds=0.5)
    return result["value"]


def test_prefix_hits_happen_only_within_a_tenant(stack):
    stub, prometheus = stack["stub"], stack["prometheus"]
    text_a1, usage_a1 = generate(stub, STORY, "tenant-a")
    assert usage_a1["cached_tokens"] == 0 and usage_a1["prompt_tokens"] > 4 * BLOCK_TOKENS
    # A second session of tenant A shares the prefix; tenant B asks the same prompt.
    text_a2, usage_a2 = generate_reused(stub, STORY + " Her mom smiled.", "tenant-a")
    assert usage_a2["cached_tokens"] % BLOCK_TOKENS == 0
    assert usage_a2["cached_tokens"] >= (
        (usage_a1["prompt_tokens"] // BLOCK_TOKENS - 1) * BLOCK_TOKENS)
    text_b, usage_b = generate(stub, STORY, "tenant-b")
    assert usage_b["cached_tokens"] == 0
    assert text_b == text_a1  # greedy: reuse never changes the output
    # Prometheus saw exactly the hits of tenant A's later sessions, nothing for tenant B.
    hits = usage_a2["cached_tokens"]
    total_hits = prometheus.wait_value("sum(kvpack_prefix_hit_tokens_total)", lambda v: v >= hits)
    reused_requests = total_hits / hits
    assert reused_requests == int(reused_requests) and total_hits > 0
    assert prometheus.wait_value('sum(kvpack_kvstore_hits_total{job="kvstore"})',
                                 lambda v: v > 0) > 0
    assert prometheus.wait_value('sum(kvpack_kvstore_put_bytes_total{job="kvstore"})',
                                 lambda v: v > 0) > 0


def test_redis_killed_during_50_calls_then_restarted(stack):
    stub, prometheus, redis_server = stack["stub"], stack["prometheus"], stack["redis"]
    prompts = [f"{STORY} Number {index} was the best." for index in range(5)]
    expected = {prompt: generate(stub, prompt, "outage")[0] for prompt in prompts}
    errors_before = prometheus.scalar("sum(kvpack_kvstore_errors_total)") or 0.0
    failures, mismatches = [], []
    for call in range(50):
        if call == 10:
            redis_server.stop()
        prompt = prompts[call % len(prompts)]
        try:
            text, _ = generate(stub, prompt, "outage")
        except grpc.RpcError as error:
            failures.append(f"call {call}: {error.code().name} {error.details()}")
            continue
        if text != expected[prompt]:
            mismatches.append(call)
    assert failures == [] and mismatches == []
    prometheus.wait_value("sum(kvpack_kvstore_errors_total)", lambda v: v > errors_before)
    assert not is_serving(stack["kvstore"], "kvpack.v1.KVStore")
    redis_server.start()  # empty: the blocks are recomputed and stored again
    wait_for(lambda: is_serving(stack["kvstore"], "kvpack.v1.KVStore"), timeout_seconds=30)
    text, usage = generate_reused(stub, prompts[0] + " Again.", "outage")
    assert usage["cached_tokens"] > 0


def test_concurrent_sessions_all_complete(stack):
    stub = stack["stub"]
    results, errors = {}, []

    def session(index: int) -> None:
        try:
            results[index] = generate(stub, f"{STORY} Session {index}.", f"tenant-{index % 3}")
        except grpc.RpcError as error:
            errors.append(error)

    run_in_threads(session, 8)
    assert errors == [] and len(results) == 8


def test_every_dashboard_panel_returns_data(stack):
    """Last: by now the stack has served hits, misses, puts, an outage and a recovery."""
    stub, prometheus = stack["stub"], stack["prometheus"]
    for index in range(3):  # fresh traffic inside every rate() window
        generate(stub, STORY, f"panel-{index % 2}")
    with open(DASHBOARD) as f:
        panels = json.load(f)["panels"]
    assert len(panels) >= 12
    empty = []
    for panel in panels:
        for target in panel["targets"]:
            try:
                wait_for(lambda expr=target["expr"]: prometheus.query(expr), timeout_seconds=20)
            except TimeoutError:
                empty.append(f"{panel['title']}: {target['expr']}")
    assert empty == []
