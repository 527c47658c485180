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
        self._channel = make_channel(address, tls=tls)
        self._stub = sampler_pb2_grpc.SamplerStub(self._channel)

    def wait_ready(self, timeout: float = 30.0) -> None:
        wait_until_serving(self._channel, "epicycle.v1.Sampler", timeout)

    def run(self, request: sampler_pb2.RunRequest, on_frame=None, timeout: float | None = None) -> RunResult:
        """Send a Run request; collect (or hand to ``on_frame``) the frames and return the stop report."""
        result = RunResult()
        try:
            for reply in self._stub.Run(request, timeout=self.timeout if timeout is None else timeout):
                if reply.HasField("frame"):
                    if on_frame is not None:
                        on_frame(reply.frame)
                    else:
                        result.frames.append(reply.frame)
                else:
                    result.stop = reply.stop
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, f"sampler {self.address}") from None
        return result

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
