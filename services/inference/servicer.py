"""The `kvpack.v1.Inference` gRPC servicer: request validation, streaming, cancellation."""

from __future__ import annotations

import logging
import math
from typing import Any

import grpc
from kvpack.inference.engine import Delta, Done, Engine, GenerationRequest, Overloaded
from kvpack.inference.methods import MethodSpec
from kvpack.inference.sampling import SamplingParams
from kvpack.proto import inference_pb2, inference_pb2_grpc

log = logging.getLogger("kvpack.inference")
DEFAULT_MAX_NEW_TOKENS = 128
MAX_STOP_STRINGS = 16


def parse_param_value(text: str) -> Any:
    """Codec parameters travel as strings: "4" -> 4, "0.5" -> 0.5, "true" -> True, else str."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            continue
    return text


class InvalidField(ValueError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")


class InferenceServicer(inference_pb2_grpc.InferenceServicer):
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def _method(self, request: inference_pb2.GenerateRequest) -> MethodSpec:
        default = self.engine.default_method
        overrides = {key: parse_param_value(value) for key, value in request.method_params.items()}
        if not request.method or request.method == default.name:
            method = default.merged(overrides)
        else:
            method = MethodSpec.of(request.method, overrides)
        try:
            self.engine.codecs_for(method)
        except (ValueError, TypeError) as error:
            field = (
                "method_params"
                if request.method_params and "unknown method" not in str(error)
                else "method"
            )
            raise InvalidField(field, str(error)) from None
        return method

    def _prompt_ids(self, request: inference_pb2.GenerateRequest) -> list[int]:
        if request.prompt and request.prompt_token_ids:
            raise InvalidField("prompt", "give prompt or prompt_token_ids, not both")
        if request.prompt_token_ids:
            return list(request.prompt_token_ids)
        if not request.prompt:
            raise InvalidField("prompt", "empty (give prompt text or prompt_token_ids)")
        return self.engine.loaded.tokenizer.encode(request.prompt)

    def _sampling(self, request: inference_pb2.GenerateRequest) -> SamplingParams:
        if len(request.stop) > MAX_STOP_STRINGS:
            raise InvalidField("stop", f"at most {MAX_STOP_STRINGS} stop strings")
        for name in ("temperature", "top_p"):
            if not math.isfinite(getattr(request, name)):
                raise InvalidField(name, "must be a finite number")
        try:
            return SamplingParams(
                max_new_tokens=request.max_new_tokens or DEFAULT_MAX_NEW_TOKENS,
                temperature=request.temperature,
                top_p=request.top_p or 1.0,
                top_k=request.top_k,
                seed=request.seed if request.HasField("seed") else None,
                stop=tuple(request.stop),
            )
        except ValueError as error:  # messages start with the field name
            raise InvalidField(str(error).split(" ", 1)[0], str(error)) from None

    def Generate(self, request, context):
        try:
            generation = GenerationRequest(
                prompt_ids=self._prompt_ids(request),
                sampling=self._sampling(request),
                method=self._method(request),
                tenant=request.tenant,
                reuse=request.reuse if request.HasField("reuse") else True,
            )
            handle = self.engine.submit(generation)
        except Overloaded as error:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"server busy: {error}")
        except ValueError as error:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        # Frees the request's cache at the scheduler's next iteration when the client goes away.
        context.add_callback(handle.cancel)
        try:
            for event in handle:
                if isinstance(event, Delta):
                    yield inference_pb2.GenerateResponse(text=event.text, token_ids=event.token_ids)
                elif isinstance(event, Done):
                    usage = event.usage
                    yield inference_pb2.GenerateResponse(
                        usage=inference_pb2.Usage(
                            prompt_tokens=usage.prompt_tokens,
                            cached_tokens=usage.cached_tokens,
                            completion_tokens=usage.completion_tokens,
                            ttft_seconds=usage.ttft_seconds,
                            tokens_per_second=usage.tokens_per_second,
                            compression_ratio=usage.compression_ratio,
                            finish_reason=usage.finish_reason,
                            method=generation.method.name,
                        )
                    )
        except RuntimeError as error:
            context.abort(grpc.StatusCode.INTERNAL, str(error))
        finally:
            handle.cancel()  # no-op when finished; frees the cache if the stream was abandoned
