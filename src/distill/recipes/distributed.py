"""Data-parallel training on several processes: which process this is, and the few collective steps the
two recipes need. With one process (the default) nothing here communicates: every method is the identity.

    distill train PROJECT --processes 2                              # 2 local processes: gloo on CPU, nccl on CUDA
    torchrun --nproc-per-node 2 -m distill.cli train PROJECT         # the same, started by hand (or on several nodes)
    accelerate launch --num_processes 2 -m distill.cli train PROJECT

A launcher starts the processes with ``WORLD_SIZE`` / ``RANK`` / ``LOCAL_RANK`` / ``MASTER_ADDR`` /
``MASTER_PORT`` in their environment; ``join`` reads them and joins the process group through accelerate
(``PartialState``: gloo on CPU, nccl on CUDA, one GPU per process). ``--processes N`` is that same launcher
(``torch.distributed.run``, i.e. torchrun) started from the CLI on loopback (``launch``).

How the recipes use it:

- causal LM (``train_causal_lm``): every process computes the same global step (``step_indices``), takes its
  own contiguous share of that step's examples (``Processes.shard``), and divides its token-summed loss by the
  completion tokens of the *whole* step (``Processes.sum`` of every share's count). Summing the gradients over
  the processes (``Processes.sum_gradients``) then gives the gradient one process computes on all the examples,
  and every process applies that same update to the same weights.
- encoder classifier (``train_classifier``): HF Trainer, which wraps the model in DDP through accelerate; the
  recipe asks for split batches so that the global batch stays ``batch_size``.

Only rank 0 (``Processes.main``) writes: the project store, checkpoints, logs, the training record and the
model. The others compute, and wait at ``barrier()`` where they must not run ahead of one of its writes.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.distributed as dist


def launched() -> bool:
    """True inside a multi-process launch (torchrun, accelerate launch, ``--processes``)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def launched_rank() -> int:
    """This process's rank as the launcher set it (0 outside a launch), readable before ``join``."""
    return int(os.environ.get("RANK", "0")) if launched() else 0


@dataclass(frozen=True)
class Processes:
    """This process among the training processes: 1 of 1 unless launched on several."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))   # where collectives run

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes."""
        return self.rank == 0

    def shard(self, items: Sequence[Any]) -> list[Any]:
        """This process's contiguous share of one step's items; shares differ in size by at most one, and a
        process may get none (a last step of an epoch with fewer items than processes)."""
        n = len(items)
        return list(items[self.rank * n // self.world: (self.rank + 1) * n // self.world])

    def sum(self, values: Sequence[float]) -> list[float]:
        """Each value summed over the processes (float64, so token counts stay exact)."""
        if self.world == 1:
            return list(values)
        t = torch.tensor(list(values), dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def sum_gradients(self, params: Sequence[torch.Tensor]) -> None:
        """Replace every ``.grad`` by its sum over the processes (a parameter that saw no example here
        contributes zeros). One all-reduce of all gradients laid end to end, once per optimizer step.

        Why this and not DDP (``accelerator.prepare(model)``): DDP all-reduces inside backward, so every
        process must run the same number of synchronised backward passes, each after exactly one forward.
        Here shares of a step can differ in size (a process may have no example at all), step_by_step runs
        two forwards (answer + rationale) per backward, and on-policy steps generate with the bare model.
        Summing once after accumulation is the same arithmetic (DDP sums and divides by the world size; the
        shares here are already divided by the step's global token count) without those conditions. DDP's
        gain, overlapping communication with backward, is small for LoRA's few MB of gradients."""
        if self.world == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        for p, g in zip(params, flat.split([g.numel() for g in grads])):
            p.grad = g.view_as(p)

    def gather(self, obj: Any) -> list[Any] | None:
        """Every process's ``obj`` (picklable), in rank order, on rank 0; None on the others."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world if self.main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def barrier(self) -> None:
        """Wait until every process gets here."""
        if self.world > 1:
            dist.barrier(device_ids=[self.device.index] if self.device.type == "cuda" else None)


def join(device: str) -> Processes:
    """This process's place. Outside a launch: 1 of 1, nothing initialised. Inside one: join the process
    group (once; accelerate's ``PartialState`` is a singleton) -- gloo when ``device`` is the CPU, nccl with one
    GPU per process (``cuda:LOCAL_RANK``, whatever ``cuda:N`` the config names)."""
    if not launched():
        return Processes()
    from accelerate import PartialState

    state = PartialState(cpu=str(device).startswith("cpu"))
    dev = torch.device("cpu") if state.device.type == "cpu" else state.device
    return Processes(rank=state.process_index, world=state.num_processes, device=dev)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(processes: int, argv: Sequence[str]) -> int:
    """Run ``python *argv`` (``["-m", "distill.cli", ...]`` or ``["script.py", ...]``) as ``processes`` local
    processes and wait for them. This is torchrun (``torch.distributed.run``) with a static rendezvous on
    127.0.0.1 at a free port: it gives each process its RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR /
    MASTER_PORT and OMP_NUM_THREADS=1, and stops them all when one fails. Returns 0, or the exit code of the
    first process that failed (a DistillError has printed its message there and exited 2); 128 + the signal
    when the launcher itself was interrupted (Ctrl-C: it stops the processes first)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    target = ["--module", *argv[1:]] if argv[0] == "-m" else list(argv)
    args = parse_args([f"--nproc-per-node={processes}", "--nnodes=1", "--master-addr=127.0.0.1",
                       f"--master-port={_free_port()}", *target])
    try:
        run(args)
    except ChildFailedError as e:
        _, failure = e.get_first_failure()
        return failure.exitcode if failure.exitcode > 0 else 1     # < 0: killed by a signal
    except SignalException as e:
        return 128 + int(e.sigval)
    return 0



def take_run_lock(models_dir: Path, run_id: str, main: bool):
    """The file lock of one training run, taken (without waiting) by rank 0 only: two trainings of the same
    run id would write the same folder. Other ranks get the lock object unacquired. Release it with
    ``if main: lock.release()``."""
    import filelock

    from distill.errors import DistillError

    lock = filelock.FileLock(str(models_dir / f".{run_id}.lock"))
    if main:
        models_dir.mkdir(parents=True, exist_ok=True)
        try:
            lock.acquire(timeout=0)
        except filelock.Timeout:
            raise DistillError(f"{models_dir / run_id}: another process is training this exact run",
                               hint="wait for it to finish; its result will be reused") from None
    return lock
