"""Conversions between the engines' dataclasses and the stage protos."""
from __future__ import annotations

from prism.models.base import AUDIO, IMAGE, MediaItem
from prism.v1 import common_pb2, stages_pb2
from prism.wire.tensors import tensor_from_proto, tensor_to_proto

MODALITY_TO_PROTO = {IMAGE: common_pb2.MODALITY_IMAGE, AUDIO: common_pb2.MODALITY_AUDIO}
MODALITY_FROM_PROTO = {v: k for k, v in MODALITY_TO_PROTO.items()}


def modality_from_proto(value: int, field: str) -> str:
    try:
        return MODALITY_FROM_PROTO[value]
    except KeyError:
        raise ValueError(f"{field}: unsupported modality {value}") from None


def media_info(item: MediaItem) -> stages_pb2.MediaInfo:
    return stages_pb2.MediaInfo(
        modality=MODALITY_TO_PROTO[item.modality], num_tokens=item.num_tokens,
        meta={k: tensor_to_proto(t) for k, t in item.meta.items()},
    )


def media_input(item: MediaItem) -> stages_pb2.MediaInput:
    return stages_pb2.MediaInput(info=media_info(item), tensors={k: tensor_to_proto(t) for k, t in item.tensors.items()})


def item_from_info(info: stages_pb2.MediaInfo, field: str, tensors=None) -> MediaItem:
    if info.num_tokens <= 0:
        raise ValueError(f"{field}.num_tokens: must be positive")
    return MediaItem(
        modality=modality_from_proto(info.modality, f"{field}.modality"),
        num_tokens=info.num_tokens,
        tensors={k: tensor_from_proto(t) for k, t in (tensors or {}).items()},
        meta={k: tensor_from_proto(t) for k, t in info.meta.items()},
    )


def item_from_input(msg: stages_pb2.MediaInput, field: str) -> MediaItem:
    return item_from_info(msg.info, f"{field}.info", msg.tensors)
