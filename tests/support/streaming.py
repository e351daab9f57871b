"""Helpers to run a Generate call and collect its stream."""

from __future__ import annotations

from dataclasses import dataclass

from kvpack.proto import inference_pb2


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    usage: inference_pb2.Usage
    num_messages: int


def generate(stub, **fields) -> Completion:
    text, token_ids, usage, count = "", [], None, 0
    for response in stub.Generate(inference_pb2.GenerateRequest(**fields), timeout=120):
        text += response.text
        token_ids += list(response.token_ids)
        count += 1
        if response.HasField("usage"):
            usage = response.usage
    assert usage is not None, "the stream ended without a usage message"
    return Completion(text, token_ids, usage, count)
