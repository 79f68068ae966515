"""Weight sync to vLLM engine actors by broadcast (rollout.vllm.placement=actors).

Trainer rank 0 and every worker of every engine form one collective group of their own, built
from a TCPStore that trainer rank 0 hosts on its node's address: a bare ProcessGroupNCCL on
GPUs, ProcessGroupGloo on CPUs. It is never registered with torch.distributed, so neither the
trainer's default process group (its strategy's) nor the one vLLM starts inside each engine
is touched, and both sides may already have theirs.

After each actor update, trainer rank 0 sends each whole tensor, one at a time: first a
fixed-size header (HF name, dtype, shape) so that every receiver can allocate the buffer,
then the tensor itself, on the group's device (a CPU tensor in an NCCL broadcast is an error).
An empty header ends the stream. Every collective waits at most the group's timeout
(rollout.vllm.sync_timeout_s): a receiver that dies mid-stream fails the sender's broadcast
(gloo at once, when the connection closes; NCCL when the wait runs out) with a
`WeightSyncError` that names the tensor, rather than a trainer that waits for ever; the engine
actors' client then names the engine that died (vllm_actors.py).

The receiving side is `WeightReceiver`, which vLLM mixes into its worker class
(`worker_extension_cls`) and which `LLM.collective_rpc` calls in every worker, so the workers of a tensor-parallel engine in other processes receive too; each reloads what
it received a decoder layer at a time (`WeightLoader` of vllm_sampler.py: vLLM's in-place
reload takes HF names and slices each worker's own shard). Both ends are told the backend by
trainer rank 0's device; a vLLM worker on another kind of device refuses to join.
"""

from __future__ import annotations

import json
import socket
import time
from contextlib import contextmanager
from datetime import timedelta
from typing import Iterable, Iterator

import torch
import torch.distributed as dist

from rlhf.rollout.vllm_sampler import WeightLoader, layer_of

HEADER_BYTES = 4096
"""Size of the header broadcast before each tensor (JSON, zero-padded): one fixed-size message,
so that receivers know what to allocate without a length exchange first."""

GROUP_PREFIX = "rlhf-weight-sync"

DTYPES = {str(dtype): dtype for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64,
                                           torch.int32, torch.int8, torch.uint8, torch.bool)}


class WeightSyncError(RuntimeError):
    """A weight broadcast that failed or timed out part-way (a receiver died or stopped)."""

    def __init__(self, message: str, tensor: str | None):
        super().__init__(message)
        self.tensor = tensor
        """The HF name being sent when it failed (None: the end marker)."""


def open_store(host: str, rank: int, world_size: int, port: int = 0,
               timeout: timedelta = timedelta(minutes=10)) -> dist.TCPStore:
    """Rank 0 hosts the store on `host` alone; the others connect to it. A TCPStore given only
    a host name listens on every interface of the machine, so rank 0 binds the socket itself
    (port 0: one the system picks, read back from `store.port`, never guessed free and then
    taken by another process) and hands it over. Rank 0 does not wait for the others here: it
    hands the port out first."""
    if rank != 0:
        return dist.TCPStore(host, port, world_size, is_master=False, timeout=timeout)
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    listener = socket.socket(family, kind, proto)
    try:
        listener.bind(address)
        listener.listen()
        bound = listener.getsockname()[1]
        descriptor = listener.detach()
    except BaseException:
        listener.close()
        raise
    try:
        return dist.TCPStore(host, bound, world_size, is_master=True, timeout=timeout, wait_for_workers=False,
                             master_listen_fd=descriptor)
    except BaseException:
        socket.close(descriptor)
        raise


def backend_for(device: torch.device) -> str:
    """The collective backend for tensors on `device`: NCCL for CUDA tensors, gloo for CPU."""
    return "nccl" if device.type == "cuda" else "gloo"


class WeightGroup:
    """One side's member of the weight-sync group; rank 0 (trainer rank 0) is the sender."""

    def __init__(self, store: dist.Store, rank: int, world_size: int, device: torch.device,
                 timeout: timedelta = timedelta(minutes=10), address: str | None = None):
        """`address`: this process's node address (gloo listens there and tells the others
        to connect to it; by default gloo takes what the host name resolves to, often a
        loopback address that other nodes cannot reach)."""
        self.rank, self.world_size, self.device, self.timeout = rank, world_size, device, timeout
        store = dist.PrefixStore(GROUP_PREFIX, store)
        # Constructing the backend is the rendezvous: it returns once every rank has joined.
        if backend_for(device) == "nccl":
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = timeout
            self.backend = dist.ProcessGroupNCCL(store, rank, world_size, options)
        elif address:
            options = dist.ProcessGroupGloo._Options()
            options._timeout = timeout
            options._devices = [dist.ProcessGroupGloo.create_device(hostname=address)]
            self.backend = dist.ProcessGroupGloo(store, rank, world_size, options)
        else:
            self.backend = dist.ProcessGroupGloo(store, rank, world_size, timeout)
        self._store = store  # the store must outlive the group

    def _broadcast(self, tensor: torch.Tensor) -> None:
        if tensor.device != self.device:
            raise ValueError(f"weight sync: a tensor on {tensor.device} in a broadcast on {self.device}")
        options = dist.BroadcastOptions()
        options.rootRank, options.rootTensor = 0, 0
        self.backend.broadcast([tensor], options).wait(self.timeout)

    def _header(self, header: dict | None = None) -> dict | None:
        """Broadcast one header from rank 0; every rank returns it (None: the stream's end)."""
        buffer = torch.zeros(HEADER_BYTES, dtype=torch.uint8, device=self.device)
        if self.rank == 0:
            encoded = json.dumps(header).encode() if header is not None else b""
            if len(encoded) > HEADER_BYTES:
                raise ValueError(f"weight sync: the header of {header['name']!r} exceeds {HEADER_BYTES} bytes")
            if encoded:
                buffer[: len(encoded)] = torch.tensor(list(encoded), dtype=torch.uint8, device=self.device)
        self._broadcast(buffer)
        raw = bytes(buffer.cpu().tolist()).rstrip(b"\0")
        return json.loads(raw) if raw else None

    def send(self, named: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype | None = None) -> int:
        """Rank 0: every (HF name, whole tensor) of `named`, cast to `dtype` (the trainer's
        compute dtype; None: as given), one at a time; returns how many were sent. A broadcast
        that fails or outlasts the group's timeout raises `WeightSyncError` naming the tensor."""
        assert self.rank == 0, "only rank 0 sends"
        count, started = 0, time.monotonic()
        for name, tensor in named:
            tensor = tensor.detach().to(device=self.device, dtype=dtype or tensor.dtype).contiguous()
            with self._failing_as(f"tensor {count + 1} ({name!r})", name, started):
                self._header({"name": name, "dtype": str(tensor.dtype), "shape": list(tensor.shape)})
                self._broadcast(tensor)
            count += 1
        with self._failing_as("the end-of-stream marker", None, started):
            self._header(None)
        return count

    @contextmanager
    def _failing_as(self, what: str, name: str | None, started: float) -> Iterator[None]:
        """A failed or timed-out collective (gloo and NCCL raise RuntimeErrors) as a WeightSyncError."""
        try:
            yield
        except RuntimeError as error:
            raise WeightSyncError(
                f"weight sync: the broadcast of {what} to the {self.world_size - 1} vLLM engine worker(s) failed "
                f"{time.monotonic() - started:.1f} s into the sync (timeout {self.timeout.total_seconds():.0f} s, "
                f"rollout.vllm.sync_timeout_s): a receiver died or stopped receiving ({str(error).splitlines()[0]})",
                name) from error

    def receive(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Ranks > 0: each (name, tensor) as it arrives, until rank 0 ends the stream."""
        while (header := self._header()) is not None:
            tensor = torch.empty(header["shape"], dtype=DTYPES[header["dtype"]], device=self.device)
            self._broadcast(tensor)
            yield header["name"], tensor


class WeightReceiver(WeightLoader):
    """Mixed into vLLM's worker class (`worker_extension_cls`): the engine actor calls these
    through `LLM.collective_rpc`, which runs them in every worker of its engine. Names carry
    a prefix, since vLLM refuses an extension whose attributes its worker already has. Loading
    goes through `WeightLoader.rlhf_load_weights` a decoder layer at a time (the CPU backend
    repacks a layer's linears once its weights are in), so a worker holds one layer of
    received tensors at most."""

    def rlhf_join_weight_group(self, host: str, port: int, first_rank: int, world_size: int, backend: str,
                               timeout_s: float = 600.0) -> int:
        """Join as rank `first_rank` + this worker's rank in its engine; returns that rank.
        `backend`: the sender's (from its device); a worker on another kind of device could
        not take part in the same collective, and says so rather than waiting for it."""
        if backend_for(self.device) != backend:
            raise RuntimeError(f"weight sync: trainer rank 0 broadcasts with {backend}, but this vLLM worker is on "
                               f"{self.device} ({backend_for(self.device)}): trainer and engines need the same kind "
                               "of device")
        rank = first_rank + int(getattr(self, "rank", 0))
        timeout = timedelta(seconds=timeout_s)
        store = open_store(host, rank, world_size, port, timeout)
        self.rlhf_weight_group = WeightGroup(store, rank, world_size, self.device, timeout, node_address())
        return rank

    def rlhf_receive_weights(self) -> int:
        """Load every tensor rank 0 sends into this worker's model; returns how many."""
        count, batch, current = 0, [], None
        for name, tensor in self.rlhf_weight_group.receive():
            layer = layer_of(name)
            if batch and layer != current:
                count += self.rlhf_load_weights(batch)
                batch = []
            current = layer
            batch.append((name, tensor))
        if batch:
            count += self.rlhf_load_weights(batch)
        return count


def node_address() -> str | None:
    """This process's node address as Ray reports it (None outside Ray)."""
    try:
        import ray
    except ImportError:
        return None
    return ray.util.get_node_ip_address() if ray.is_initialized() else None
