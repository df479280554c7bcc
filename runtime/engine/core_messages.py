"""The messages between the engine core and its client, and their wire form (msgpack, via msgspec:
typed decoding, no pickle). The records inside are the engine's own dataclasses."""

from __future__ import annotations

import msgspec

from runtime.engine.outputs import CoreStats, EngineCoreOutput
from runtime.engine.validation import CoreInfo, ValidRequest


# ----- client -> core -----

class AddRequest(msgspec.Struct, tag=True):
    request_id: str
    request: ValidRequest


class Abort(msgspec.Struct, tag=True):
    request_ids: list[str]


class Shutdown(msgspec.Struct, tag=True):
    pass


# ----- core -> client -----

class Ready(msgspec.Struct, tag=True):
    info: CoreInfo
    pid: int


class Outputs(msgspec.Struct, tag=True):
    outputs: list[EngineCoreOutput]
    stats: CoreStats


class Refused(msgspec.Struct, tag=True):
    """A request the core would not take (`kind`: "overloaded" or "error")."""

    request_id: str
    kind: str
    message: str


class Failed(msgspec.Struct, tag=True):
    """The core itself broke and is exiting; every request in it is lost."""

    message: str


ToCore = AddRequest | Abort | Shutdown
FromCore = Ready | Outputs | Refused | Failed

_encoder = msgspec.msgpack.Encoder()
_to_core = msgspec.msgpack.Decoder(ToCore)
_from_core = msgspec.msgpack.Decoder(FromCore)


def encode(message: ToCore | FromCore) -> bytes:
    return _encoder.encode(message)


def decode_to_core(data: bytes) -> ToCore:
    return _to_core.decode(data)


def decode_from_core(data: bytes) -> FromCore:
    return _from_core.decode(data)
