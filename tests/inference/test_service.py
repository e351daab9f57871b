"""The gRPC service on loopback: streaming, every method, validation, concurrency, cancellation,
overload, health, reflection and metrics."""

from __future__ import annotations

import threading
import time
import urllib.request

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from kvpack.proto import inference_pb2
from support.streaming import generate

PROMPT = "Once upon a time, there was a little girl named Lily. She loved to"
# 64+ tokens: enough whole groups that packed tokens outweigh the full-precision tail
LONG_PROMPT = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in "
    "the park. One day, she saw a big, red ball. She wanted to play with it, but it was "
    "too high. Lily asked her mom for help."
)


def wait_for(condition, timeout_seconds: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.02)


@pytest.fixture(scope="module")
def kvquant_calibration(tmp_path_factory, tiny16, stories):
    """KVQuant codebooks for the two test models, calibrated on a few random token windows."""
    from kvpack.calibrate.calibrate import calibrate_model

    paths = {}
    generator = torch.Generator().manual_seed(0)
    for name, loaded in (("tiny16", tiny16), ("stories", stories)):
        sequences = torch.randint(3, 512, (2, 64), generator=generator)
        calibration = calibrate_model(
            loaded.model,
            sequences,
            model_id=loaded.model_id,
            bits_list=[4],
            outliers=0.05,
            sink_tokens=1,
            text_sha256="random-tokens",
            progress=False,
        )
        paths[name] = tmp_path_factory.mktemp("kvquant") / f"{name}.kvq"
        calibration.save(paths[name])
    return paths


def test_fp16_stream_equals_hf_greedy_with_usage(stories, inference_factory, connect):
    server = inference_factory(stories)
    result = generate(connect(server.address), prompt=PROMPT, max_new_tokens=24)
    prompt_ids = stories.tokenizer.encode(PROMPT)
    expected = stories.model.generate(
        torch.tensor([prompt_ids]), max_new_tokens=24, do_sample=False
    )[0, len(prompt_ids) :].tolist()
    assert result.token_ids == expected
    assert result.text == stories.tokenizer.decode(expected)
    assert result.num_messages > 2  # streamed, not one blob
    usage = result.usage
    assert usage.prompt_tokens == len(prompt_ids) and usage.completion_tokens == 24
    assert usage.cached_tokens == 0 and usage.finish_reason == "length" and usage.method == "fp16"
    assert 0 < usage.ttft_seconds < 10 and usage.tokens_per_second > 0
    # the exact cache keeps float32 here: 16-bit bytes / stored bytes is exactly one half
    assert usage.compression_ratio == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("kivi", {"bits": "2", "group_size": "16", "window": "0"}),
        # NOTE: qjl's interpreted Triton kernels take about a minute here; its kernels are compared
        # with the reference path in tests/kernels, so this end-to-end run uses the reference path.
        (
            "qjl",
            {
                "sketch_dim": "16",
                "outlier_channels": "2",
                "outlier_sketch_dim": "16",
                "group_size": "16",
                "window": "0",
                "value_bits": "2",
                "use_triton": "false",
            },
        ),
        ("kvquant", {"bits": "4", "outliers": "0.05"}),
    ],
)
def test_compressed_methods_end_to_end_through_the_kernels(
    method, params, tiny16, inference_factory, connect, kvquant_calibration
):
    """Each codec through gRPC, with its Triton kernels (interpreted on CPU), from a server whose
    default is fp16: the request names the method and its parameters."""
    if method == "kvquant":
        params = {**params, "calibration": str(kvquant_calibration["tiny16"])}
    server = inference_factory(tiny16, prefill_chunk_tokens=32)
    stub = connect(server.address)
    result = generate(
        stub, prompt=LONG_PROMPT, max_new_tokens=4, method=method, method_params=params
    )
    usage = result.usage
    assert usage.prompt_tokens >= 64
    assert usage.method == method and usage.completion_tokens == len(result.token_ids) == 4
    assert usage.compression_ratio > 1.5
    assert all(0 <= token < 512 for token in result.token_ids)


def test_kvquant_on_real_weights_tracks_fp16(
    stories, inference_factory, connect, kvquant_calibration
):
    """4-bit KVQuant on stories260K (real weights): greedy text starts like the exact cache's."""
    server = inference_factory(stories)
    stub = connect(server.address)
    exact = generate(stub, prompt=PROMPT, max_new_tokens=8)
    quantized = generate(
        stub,
        prompt=PROMPT,
        max_new_tokens=8,
        method="kvquant",
        method_params={
            "calibration": str(kvquant_calibration["stories"]),
            "bits": "4",
            "outliers": "0.05",
            "use_triton": "false",
        },
    )
    assert quantized.usage.compression_ratio > 1.5
    assert quantized.token_ids[:2] == exact.token_ids[:2]


@pytest.mark.parametrize(
    ("fields", "field_named"),
    [
        ({"prompt": "a", "prompt_token_ids": [1, 5]}, "prompt"),
        ({}, "prompt"),
        ({"prompt_token_ids": [1, 100000]}, "prompt_token_ids"),
        ({"prompt": "a" * 3000}, "prompt"),  # longer than stories260K's 512 positions
        ({"prompt": "a", "temperature": -1.0}, "temperature"),
        ({"prompt": "a", "temperature": float("nan")}, "temperature"),
        ({"prompt": "a", "top_p": 1.5}, "top_p"),
        ({"prompt": "a", "stop": [""]}, "stop"),
        ({"prompt": "a", "method": "zip"}, "method"),
        ({"prompt": "a", "method_params": {"sketch_dim": "3"}}, "method_params"),
        ({"prompt": "a", "method": "kivi", "method_params": {"bits": "7"}}, "method_params"),
    ],
)
def test_malformed_requests_are_invalid_argument_naming_the_field(
    fields, field_named, stories, inference_factory, connect
):
    server = inference_factory(stories)
    with pytest.raises(grpc.RpcError) as raised:
        generate(connect(server.address), **fields)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.details().startswith(field_named), raised.value.details()


def test_concurrent_streams_all_complete_with_their_own_output(stories, inference_factory, connect):
    server = inference_factory(stories, max_batch=4, max_queue=8)
    stub = connect(server.address)
    prompts = [
        "Once upon a time",
        "The cat",
        "Tom had a red ball",
        "One day",
        "The sun was",
        "Lily",
    ]
    expected = {p: generate(stub, prompt=p, max_new_tokens=30).token_ids for p in prompts}
    results: dict[str, list[int]] = {}

    def worker(prompt: str) -> None:
        results[prompt] = generate(stub, prompt=prompt, max_new_tokens=30).token_ids

    threads = [threading.Thread(target=worker, args=(p,)) for p in prompts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == expected


# tiny16 (random weights, 2048 positions) never ends a story early: these requests stay running.
def test_cancellation_frees_the_request_cache(tiny16, inference_factory, connect):
    server = inference_factory(tiny16)
    call = connect(server.address).Generate(
        inference_pb2.GenerateRequest(prompt=PROMPT, max_new_tokens=2000)
    )
    next(call)
    next(call)
    assert server.metrics.value("kvpack_active_requests") == 1
    call.cancel()
    wait_for(lambda: server.metrics.value("kvpack_requests_total", outcome="cancelled") == 1)
    wait_for(lambda: server.metrics.value("kvpack_active_requests") == 0)
    assert server.metrics.value("kvpack_kv_cache_bytes") == 0
    # the server keeps serving
    assert (
        generate(
            connect(server.address), prompt="The dog", max_new_tokens=3
        ).usage.completion_tokens
        == 3
    )


def test_full_queue_is_resource_exhausted(tiny16, inference_factory, connect):
    server = inference_factory(tiny16, max_batch=1, max_queue=1)
    stub = connect(server.address)
    long_request = inference_pb2.GenerateRequest(prompt=PROMPT, max_new_tokens=2000)
    running = stub.Generate(long_request)
    next(running)  # admitted: it holds the only batch slot
    queued = stub.Generate(long_request)
    wait_for(lambda: server.metrics.value("kvpack_queued_requests") == 1)
    with pytest.raises(grpc.RpcError) as raised:
        generate(stub, prompt=PROMPT, max_new_tokens=2)
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    running.cancel()
    queued.cancel()


def test_health_reflection_and_metrics_endpoint(stories, inference_factory, connect):
    server = inference_factory(stories, metrics_port=0)
    generate(connect(server.address), prompt="The dog", max_new_tokens=3)
    channel = grpc.insecure_channel(server.address)
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "kvpack.v1.Inference"):
        status = health.Check(health_pb2.HealthCheckRequest(service=service)).status
        assert status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = reflection.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    )
    names = {s.name for r in responses for s in r.list_services_response.service}
    assert "kvpack.v1.Inference" in names
    channel.close()
    body = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics").read().decode()
    for name in (
        "kvpack_ttft_seconds_bucket",
        "kvpack_time_per_output_token_seconds_bucket",
        "kvpack_kv_compression_ratio",
        "kvpack_prefix_hit_tokens_total",
        "kvpack_prefix_query_tokens_total",
        "kvpack_generated_tokens_total",
    ):
        assert name in body, name
