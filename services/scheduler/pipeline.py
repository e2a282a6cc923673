"""Drives one admitted request through the stages: encode (media only), prefill, decode.

The decode task is queued as soon as prefill reports RUNNING, so the decode worker pulls the KV
layer by layer while the prompt pass computes later layers. The first token comes from
prefill and is relayed at once; decode streams the rest. Stop strings are checked on the text
here, and end the decode call (which frees its slot).
"""
from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import grpc

from prism.runtime.convert import media_info, media_input
from prism.v1 import common_pb2, prism_pb2, stages_pb2, stages_pb2_grpc
from services.scheduler.intake import Admitted
from services.scheduler.textstream import TextStream

FINISH_STOP, FINISH_LENGTH = common_pb2.FINISH_REASON_STOP, common_pb2.FINISH_REASON_LENGTH


class StageError(Exception):
    """A stage refused or failed the request; carries the stage's status."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message


@dataclass(frozen=True)
class StageAddresses:
    encoder: str
    prefill: str
    decode: str


class Pipeline:
    def __init__(self, addresses: StageAddresses, channel_for: Callable[[str], grpc.aio.Channel],
                 inject_trace: Callable[[], dict[str, str]] = dict):
        self.addr = addresses
        self.channel_for = channel_for
        self.inject_trace = inject_trace

    def _timeout(self, adm: Admitted, stage: str) -> float | None:
        if adm.deadline is None:
            return None
        left = adm.deadline - time.time()
        if left <= 0:
            raise StageError(grpc.StatusCode.DEADLINE_EXCEEDED, f"deadline exceeded before {stage}")
        return left

    def _header(self, adm: Admitted) -> stages_pb2.TaskHeader:
        return stages_pb2.TaskHeader(
            request_id=adm.request_id, model=adm.model.name, priority=adm.priority,
            deadline_unix_ms=int(adm.deadline * 1000) if adm.deadline else 0,
            arrival_unix_ms=int(adm.arrival * 1000), trace_context=self.inject_trace(),
        )

    @staticmethod
    def _sampling(adm: Admitted) -> common_pb2.SamplingParams:
        s = adm.sampling
        return common_pb2.SamplingParams(max_new_tokens=adm.max_new_tokens, temperature=s.temperature, top_p=s.top_p,
                                         top_k=s.top_k, seed=s.seed, ignore_eos=adm.ignore_eos)

    async def _encode(self, adm: Admitted, header: stages_pb2.TaskHeader) -> float:
        stub = stages_pb2_grpc.EncoderServiceStub(self.channel_for(self.addr.encoder))
        request = stages_pb2.EncodeRequest(header=header, items=[media_input(i) for i in adm.prompt.items])
        async for event in stub.Encode(request, timeout=self._timeout(adm, "encode")):
            if event.state == common_pb2.TASK_STATE_READY:
                return event.compute_ms
        raise StageError(grpc.StatusCode.INTERNAL, "encoder ended the task without embeddings")

    async def run(self, adm: Admitted) -> AsyncIterator[prism_pb2.GenerateResponse]:
        """Streams the response messages; raises StageError when a stage fails."""
        calls: list[grpc.aio.Call] = []
        try:
            async for message in self._run(adm, calls):
                yield message
        except grpc.aio.AioRpcError as exc:
            raise StageError(exc.code(), exc.details() or exc.code().name) from None
        finally:
            for call in calls:
                call.cancel()

    async def _run(self, adm: Admitted, calls: list) -> AsyncIterator[prism_pb2.GenerateResponse]:
        header = self._header(adm)
        timing = prism_pb2.Timing()
        if adm.prompt.items:
            timing.encode_ms = await self._encode(adm, header)
        sampling = self._sampling(adm)
        prefill = stages_pb2_grpc.PrefillServiceStub(self.channel_for(self.addr.prefill))
        decode = stages_pb2_grpc.DecodeServiceStub(self.channel_for(self.addr.decode))
        decode_request = stages_pb2.DecodeRequest(header=header, prefill_address=self.addr.prefill, sampling=sampling,
                                                  stop_token_ids=sorted(adm.stop_ids))
        need_decode = adm.max_new_tokens > 1
        decode_call = None
        prefill_call = prefill.Prefill(stages_pb2.PrefillRequest(
            header=header, input_ids=adm.prompt.input_ids, media=[media_info(i) for i in adm.prompt.items],
            encoder_address=self.addr.encoder if adm.prompt.items else "", sampling=sampling,
        ), timeout=self._timeout(adm, "prefill"))
        calls.append(prefill_call)
        first = None
        async for event in prefill_call:
            if event.state == common_pb2.TASK_STATE_RUNNING and need_decode and decode_call is None:
                decode_call = decode.Decode(decode_request, timeout=self._timeout(adm, "decode"))
                calls.append(decode_call)
            elif event.state == common_pb2.TASK_STATE_READY:
                first = event.first_token
                timing.prefill_ms = event.compute_ms
                break
        if first is None:
            raise StageError(grpc.StatusCode.INTERNAL, "prefill ended the task without a first token")

        text = TextStream(adm.model.processor.tokenizer, adm.stop)
        tokens = [first]
        first_at = time.time()
        timing.ttft_ms = (first_at - adm.arrival) * 1000
        finish = 0
        piece = text.push([first])
        if text.stopped or first in adm.stop_ids:
            finish = FINISH_STOP
        elif adm.max_new_tokens == 1:
            finish = FINISH_LENGTH
        yield prism_pb2.GenerateResponse(request_id=adm.request_id, token_ids=[first], text=piece,
                                         timing=prism_pb2.Timing(ttft_ms=timing.ttft_ms))
        if not finish:
            if decode_call is None:
                decode_call = decode.Decode(decode_request, timeout=self._timeout(adm, "decode"))
                calls.append(decode_call)
            async for event in decode_call:
                new = list(event.token_ids)
                tokens.extend(new)
                piece = text.push(new)
                if text.stopped:
                    finish = FINISH_STOP
                elif event.finish_reason:
                    finish = event.finish_reason
                if finish:
                    if new or piece:
                        yield prism_pb2.GenerateResponse(request_id=adm.request_id, token_ids=new, text=piece)
                    break
                if new:
                    yield prism_pb2.GenerateResponse(request_id=adm.request_id, token_ids=new, text=piece)
            if not finish:
                raise StageError(grpc.StatusCode.INTERNAL, "decode ended the stream without a finish reason")
        now = time.time()
        timing.e2e_ms = (now - adm.arrival) * 1000
        if len(tokens) > 1:
            timing.tpot_ms = (now - first_at) * 1000 / (len(tokens) - 1)
        yield prism_pb2.GenerateResponse(
            request_id=adm.request_id, text=text.flush(), finish_reason=finish, timing=timing,
            usage=prism_pb2.Usage(prompt_tokens=len(adm.prompt.input_ids), image_tokens=adm.image_tokens,
                                  audio_tokens=adm.audio_tokens, generated_tokens=len(tokens)),
        )
