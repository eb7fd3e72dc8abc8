"""Point-to-point channels that carry protocol messages between RL roles.

The roles only ever exchange `protocol.Message` bytes, so a channel is just
"send bytes to one peer, receive bytes from one peer". Three carriers:

- PipeChannel: a multiprocessing Connection (roles on one node, tests);
- MPIChannel: mpi4py, for roles launched as one MPI job (e.g. a Slurm
  heterogeneous job under srun --mpi=pmix);
- TorchChannel: torch.distributed send/recv, for roles that already share a
  process group. Use a gloo group: control messages are small and CPU-side;
  model weights go over NCCL separately (see WeightsReady).

None of them pickles: bytes go as raw buffers and `protocol.decode` validates
them. Channels are not thread-safe; use one per thread or lock around them.
mpi4py and torch are imported on use: a reward or controller process that
uses pipes needs neither.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from megatron_ernie.rl.protocol import Message, decode


class Channel(ABC):
    """Ordered, reliable, one-peer message channel."""

    def send(self, message: Message) -> None:
        self.send_bytes(message.to_bytes())

    def recv(self) -> Message:
        """Block until the next message arrives; ProtocolError if its bytes are malformed."""
        return decode(self.recv_bytes())

    @abstractmethod
    def send_bytes(self, data: bytes) -> None: ...

    @abstractmethod
    def recv_bytes(self) -> bytes: ...


class PipeChannel(Channel):
    """Over a multiprocessing Connection (send_bytes / recv_bytes never pickle)."""

    def __init__(self, connection):
        self.connection = connection

    def send_bytes(self, data: bytes) -> None:
        self.connection.send_bytes(data)

    def recv_bytes(self) -> bytes:
        return self.connection.recv_bytes()

    def poll(self, timeout: float = 0.0) -> bool:
        """True if a message is waiting (after up to `timeout` seconds)."""
        return self.connection.poll(timeout)


def pipe_pair() -> tuple[PipeChannel, PipeChannel]:
    """Two connected channels, e.g. for a controller and a role started with multiprocessing."""
    import multiprocessing

    a, b = multiprocessing.Pipe(duplex=True)
    return PipeChannel(a), PipeChannel(b)


class MPIChannel(Channel):
    """Over an MPI communicator: one MPI message per protocol message, sized by MPI_Probe."""

    def __init__(self, comm, peer: int, tag: int = 0):
        self.comm, self.peer, self.tag = comm, peer, tag

    def send_bytes(self, data: bytes) -> None:
        from mpi4py import MPI

        self.comm.Send([np.frombuffer(data, dtype=np.uint8), MPI.BYTE], dest=self.peer, tag=self.tag)

    def recv_bytes(self) -> bytes:
        from mpi4py import MPI

        status = MPI.Status()
        self.comm.Probe(source=self.peer, tag=self.tag, status=status)
        buffer = np.empty(status.Get_count(MPI.BYTE), dtype=np.uint8)
        self.comm.Recv([buffer, MPI.BYTE], source=self.peer, tag=self.tag)
        return buffer.tobytes()

    def poll(self) -> bool:
        """True if a message from the peer is waiting (MPI_Iprobe)."""
        return bool(self.comm.Iprobe(source=self.peer, tag=self.tag))


class TorchChannel(Channel):
    """Over torch.distributed: a length (int64) then the bytes (uint8), both to the same global rank."""

    def __init__(self, peer: int, group=None, tag: int = 0):
        self.peer, self.group, self.tag = peer, group, tag

    def send_bytes(self, data: bytes) -> None:
        import torch
        import torch.distributed as dist

        dist.send(torch.tensor([len(data)], dtype=torch.int64), self.peer, group=self.group, tag=self.tag)
        dist.send(torch.frombuffer(bytearray(data), dtype=torch.uint8), self.peer, group=self.group, tag=self.tag)

    def recv_bytes(self) -> bytes:
        import torch
        import torch.distributed as dist

        size = torch.empty(1, dtype=torch.int64)
        dist.recv(size, self.peer, group=self.group, tag=self.tag)
        buffer = torch.empty(int(size.item()), dtype=torch.uint8)
        dist.recv(buffer, self.peer, group=self.group, tag=self.tag)
        return buffer.numpy().tobytes()
