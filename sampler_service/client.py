"""Client of the Sampler service."""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc
import numpy as np
from ase import Atoms

from protos import wire
from protos.client import ClientTLS, make_channel, wait_until_serving
from protos.epicycle.v1 import sampler_pb2, sampler_pb2_grpc
from protos.status import error_from_rpc


@dataclass
class RunResult:
    frames: list = field(default_factory=list)   # sampler_pb2.Frame, in order
    stop: sampler_pb2.StopReport | None = None


class SamplerClient:
    def __init__(self, address: str, tls: ClientTLS | None = None, timeout: float = 3600.0) -> None:
        self.address = address
        self.timeout = timeout
        # a name that resolves to several samplers (dns:///sampler-headless:50053) is balanced per Run call;
        # a checkpoint holds the engine's whole state, so consecutive chunks may run on different replicas
        self._channel = make_channel(address, tls=tls, round_robin=address.startswith(("dns:", "ipv4:", "ipv6:")))
        self._stub = sampler_pb2_grpc.SamplerStub(self._channel)

    def wait_ready(self, timeout: float = 30.0) -> None:
        wait_until_serving(self._channel, "epicycle.v1.Sampler", timeout)

    def run(self, request: sampler_pb2.RunRequest, on_frame=None, timeout: float | None = None) -> RunResult:
        """Send a Run request; collect (or hand to ``on_frame``) the frames and return the stop report.

        If ``on_frame`` raises, the call is cancelled (the sampler stops its
        engine) and the exception propagates.
        """
        result = RunResult()
        call = self.open_run(request, timeout)
        try:
            for reply in call:
                if reply.HasField("frame"):
                    if on_frame is not None:
                        on_frame(reply.frame)
                    else:
                        result.frames.append(reply.frame)
                else:
                    result.stop = reply.stop
        finally:
            call.cancel()  # no-op after a normal end
        return result

    def open_run(self, request: sampler_pb2.RunRequest, timeout: float | None = None) -> "RunCall":
        """Start a Run call and return it: iterate it for the replies, ``cancel()`` it from any thread."""
        return RunCall(self._stub.Run(request, timeout=self.timeout if timeout is None else timeout), self.address)

    def start(self, atoms: Atoms, settings: sampler_pb2.MDSettings, threshold: float = 0.0, max_steps: int = 100,
              frame_interval: int = 0, learner: str = "", on_frame=None) -> RunResult:
        req = sampler_pb2.RunRequest(learner_address=learner)
        wire.structure_to_proto(atoms, out=req.new_run.structure)
        req.new_run.settings.CopyFrom(settings)
        req.control.sigma_threshold = threshold
        req.control.max_steps = max_steps
        req.control.frame_interval = frame_interval
        return self.run(req, on_frame)

    def resume(self, checkpoint: bytes, threshold: float = 0.0, max_steps: int = 100, frame_interval: int = 0,
               learner: str = "", forces: np.ndarray | None = None, energy: float | None = None,
               stress: np.ndarray | None = None, on_frame=None) -> RunResult:
        req = sampler_pb2.RunRequest(checkpoint=checkpoint, learner_address=learner)
        req.control.sigma_threshold = threshold
        req.control.max_steps = max_steps
        req.control.frame_interval = frame_interval
        if forces is not None:
            wire.labels_to_proto(energy, forces, stress, out=req.override_forces)
        return self.run(req, on_frame)

    def describe(self) -> sampler_pb2.SamplerDescribeResponse:
        try:
            return self._stub.Describe(sampler_pb2.SamplerDescribeRequest(), timeout=10)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, f"sampler {self.address}") from None

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "SamplerClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class RunCall:
    """An open Run call: iterating yields ``RunResponse`` messages; errors arrive as domain errors.

    :meth:`cancel` (thread-safe) ends the call; the sampler then stops its
    engine before the next step, and iteration ends with :attr:`cancelled` set.
    """

    def __init__(self, call, address: str) -> None:
        self._call = call
        self._address = address
        self.cancelled = False

    def __iter__(self):
        try:
            for reply in self._call:
                yield reply
        except grpc.RpcError as exc:
            if self.cancelled and exc.code() == grpc.StatusCode.CANCELLED:
                return
            raise error_from_rpc(exc, f"sampler {self._address}") from None

    def cancel(self) -> None:
        if self._call.done():
            return
        self.cancelled = True
        self._call.cancel()
