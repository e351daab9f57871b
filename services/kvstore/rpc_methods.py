"""The kvpack.v1.KVStore methods and the (de)serializers each side uses for them.

Messages that carry record bytes (PutChunk, GetChunk) go through kvpack.kvstore.wire instead of the
protobuf runtime (one copy of a block instead of four); every other message through the generated
classes. The bytes on the wire are the same either way, so grpcurl, the generated stubs and other
languages talk to the service unchanged. Used instead of the generated add_KVStoreServicer_to_server
and KVStoreStub, which would bind the protobuf runtime to every method.
"""

from __future__ import annotations

import grpc
from kvpack.kvstore import wire
from kvpack.proto import kvstore_pb2 as pb

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["KVStore"].full_name


def _as_is(message: bytes) -> bytes:
    return message


def add_to_server(servicer, server: grpc.Server) -> None:
    """Serve `servicer` (a KVStoreServicer) on `server`. Get, GetWhole and GetMany return GetChunks
    already encoded by wire.encode_get_chunk; Put and PutWhole receive wire.PutChunkView."""
    unary, server_stream, client_stream = (grpc.unary_unary_rpc_method_handler,
                                           grpc.unary_stream_rpc_method_handler,
                                           grpc.stream_unary_rpc_method_handler)
    handlers = {
        "Match": unary(servicer.Match, pb.MatchRequest.FromString,
                       pb.MatchResponse.SerializeToString),
        "Put": client_stream(servicer.Put, wire.decode_put_chunk, pb.PutResponse.SerializeToString),
        "PutWhole": unary(servicer.PutWhole, wire.decode_put_chunk,
                          pb.PutResponse.SerializeToString),
        "Get": server_stream(servicer.Get, pb.GetRequest.FromString, _as_is),
        "GetWhole": unary(servicer.GetWhole, pb.GetWholeRequest.FromString, _as_is),
        "GetMany": server_stream(servicer.GetMany, pb.GetManyRequest.FromString, _as_is),
        "Delete": unary(servicer.Delete, pb.DeleteRequest.FromString,
                        pb.DeleteResponse.SerializeToString),
        "Stats": unary(servicer.Stats, pb.StatsRequest.FromString,
                       pb.StatsResponse.SerializeToString),
    }
    declared = {method.name for method in pb.DESCRIPTOR.services_by_name["KVStore"].methods}
    if declared != handlers.keys():  # a method added to kvstore.proto must be served here too
        raise RuntimeError(f"KVStore methods in kvstore.proto {sorted(declared)} differ from the "
                           f"served ones {sorted(handlers)}")
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


class KVStoreMethods:
    """Client callables. `put`/`put_whole` take PutChunks encoded by wire.encode_put_chunk; `get`,
    `get_whole` and `get_many` answer wire.GetChunkView."""

    def __init__(self, channel: grpc.Channel) -> None:
        def method(kind, name: str, serialize, deserialize):
            return kind(f"/{SERVICE_NAME}/{name}", request_serializer=serialize,
                        response_deserializer=deserialize, _registered_method=True)

        unary, server_stream, client_stream = (channel.unary_unary, channel.unary_stream,
                                               channel.stream_unary)
        self.match = method(unary, "Match", pb.MatchRequest.SerializeToString,
                            pb.MatchResponse.FromString)
        self.put = method(client_stream, "Put", _as_is, pb.PutResponse.FromString)
        self.put_whole = method(unary, "PutWhole", _as_is, pb.PutResponse.FromString)
        self.get = method(server_stream, "Get", pb.GetRequest.SerializeToString,
                          wire.decode_get_chunk)
        self.get_whole = method(unary, "GetWhole", pb.GetWholeRequest.SerializeToString,
                                wire.decode_get_chunk)
        self.get_many = method(server_stream, "GetMany", pb.GetManyRequest.SerializeToString,
                               wire.decode_get_chunk)
        self.delete = method(unary, "Delete", pb.DeleteRequest.SerializeToString,
                             pb.DeleteResponse.FromString)
        self.stats = method(unary, "Stats", pb.StatsRequest.SerializeToString,
                            pb.StatsResponse.FromString)
