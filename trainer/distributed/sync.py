"""How data-parallel workers stay in step: every optimizer step (all-reduce), or every H steps (local SGD,
DiLoCo) for workers joined by slow links.

`distributed.sync`:
- `allreduce`: DDP; the gradients are averaged at every optimizer step (within a node, the right choice).
- `local_sgd`: each worker trains its own replica, without any gradient exchange; every `sync_every` (H)
  optimizer steps the replicas' parameters, floating-point buffers (BatchNorm statistics) and frozen
  parameters (a DQN's target network) are averaged: federated averaging / local SGD. H times fewer bytes
  than all-reduce.
- `diloco`: the same rhythm, but the average change since the last sync is an outer gradient, which an outer
  optimizer (SGD with Nesterov momentum) applies to the last synchronised parameters (DiLoCo, Douillard et
  al. 2023). With an outer learning rate of 1 and no momentum it is local SGD.

H counts optimizer steps, as `trainer.max_steps` does: a PPO rollout or a DQN Lightning step takes many, and
the workers meet within it; a GAN takes two per batch, and they meet at the end of the batch. They also meet
before every validation and at the end of training, so that what is evaluated and saved at those points is one
model. A checkpoint holds the last synchronised parameters and the outer optimizer, and every worker's own
parameters and inner optimizer state: a run killed between syncs (or a Ray worker group restarted) resumes
exactly where it stood. The bytes each worker puts into all-reduces are counted and logged
(`comm/bytes`), in every mode.
"""

import logging
import math
from collections.abc import Callable
from typing import Any, Protocol, get_args, runtime_checkable

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from trainer.config.ranges import SyncMode
from trainer.errors import UserError
from trainer.lightning_internals import is_logging_step


@runtime_checkable
class WatchesSyncs(Protocol):
    """A callback that watches each sync of local SGD / DiLoCo (the divergence guard): it is given the norm
    of the workers' average change since the last sync (the same on every worker; a non-finite one was not
    applied) and the number of local steps it spans."""

    def watch_outer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, norm: float, local_steps: int
    ) -> None: ...


log = logging.getLogger(__name__)


def check_mode(sync: str) -> None:
    if sync not in get_args(SyncMode):
        raise UserError(f"distributed.sync={sync} is not one of {', '.join(get_args(SyncMode))}")


class DataParallelStrategy(DDPStrategy):
    """Lightning's DDP strategy, which in `local_sgd` and `diloco` leaves the model unwrapped (no gradient
    all-reduce; `WorkerSync` averages the replicas) and in `allreduce` counts the bytes DDP all-reduces."""

    def __init__(self, sync: SyncMode = "allreduce", **kwargs: Any):
        check_mode(sync)
        super().__init__(**kwargs)
        self.sync = sync
        self.bytes_sent = 0  # what this worker put into all-reduces of model state
        self.worker_sync: WorkerSync | None = None  # in local_sgd and diloco, set by WorkerSync.setup

    @property
    def local_updates(self) -> bool:
        return self.sync != "allreduce"

    # SyncBatchNorm (trainer.sync_batchnorm) would all-reduce BatchNorm statistics in every forward pass:
    # between syncs each replica keeps its own, and WorkerSync averages them with the parameters.
    @property
    def _layer_sync(self) -> Any:
        return None if self.local_updates else self._sync_layers

    @_layer_sync.setter
    def _layer_sync(self, layer_sync: Any) -> None:
        self._sync_layers = layer_sync

    def _setup_model(self, model: nn.Module) -> nn.Module:
        return model if self.local_updates else super()._setup_model(model)

    def _register_ddp_hooks(self) -> None:
        if self.local_updates:
            return
        if self._ddp_comm_hook is not None:  # the user's own hook: its traffic is its own to count
            super()._register_ddp_hooks()
            return
        assert isinstance(self.model, DistributedDataParallel)
        self.model.register_comm_hook(self, _counted_allreduce)

    def optimizer_step(
        self,
        optimizer: torch.optim.Optimizer,
        closure: Callable[[], Any],
        model: L.LightningModule | nn.Module | None = None,
        **kwargs: Any,
    ) -> Any:
        """Steps the optimizer; in `local_sgd` and `diloco`, WorkerSync then meets the other workers if H
        steps have passed. Every worker comes here at every step, also one that mixed precision's scaler
        skips on one worker only."""
        output = super().optimizer_step(optimizer, closure, model, **kwargs)
        if self.worker_sync is not None:
            module = self.lightning_module
            assert module is not None
            self.worker_sync.after_optimizer_step(module.trainer, module)
        return output

    def all_reduce_mean(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """The mean over workers of each tensor, in one all-reduce of their concatenation (float32)."""
        flat = torch.cat([t.detach().reshape(-1).float() for t in tensors])
        self.bytes_sent += flat.numel() * flat.element_size()
        dist.all_reduce(flat)
        flat /= self.world_size
        return [
            part.view_as(t).to(t.dtype) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors)
        ]


def _counted_allreduce(
    strategy: DataParallelStrategy,
    bucket: dist.GradBucket,  # pyright: ignore[reportPrivateImportUsage]  # (public: torch's docs)
) -> torch.futures.Future[torch.Tensor]:
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    strategy.bytes_sent += bucket.buffer().numel() * bucket.buffer().element_size()
    # None: the default process group, which allreduce_hook takes (its annotation leaves None out)
    return allreduce_hook(None, bucket)  # pyright: ignore[reportArgumentType]


class WorkerSync(L.Callback):
    """`local_sgd` and `diloco`: averages the workers' replicas every `sync_every` optimizer steps, before
    each validation and at the end; logs the bytes sent (every mode) and the outer steps."""

    def __init__(
        self,
        sync: SyncMode = "allreduce",
        sync_every: int = 50,
        outer_lr: float = 0.7,
        outer_momentum: float = 0.9,
        nesterov: bool = True,
    ):
        check_mode(sync)
        if sync_every < 1:
            raise UserError(f"distributed.sync_every={sync_every}: workers must meet every 1 or more steps")
        if sync == "diloco" and not (outer_lr > 0 and 0 <= outer_momentum < 1):
            raise UserError(
                f"distributed.outer: lr={outer_lr}, momentum={outer_momentum}: "
                "the outer optimizer needs lr > 0 and momentum in [0, 1)"
            )
        self.sync, self.sync_every = sync, sync_every
        self.outer_lr, self.outer_momentum = outer_lr, outer_momentum
        self.nesterov = nesterov and outer_momentum > 0
        self.synced_at = 0  # the global step of the last sync
        self.outer_steps = 0
        self.anchor: list[torch.Tensor] = []  # the last synchronised parameters
        self.outer: torch.optim.SGD | None = None
        self._loaded: dict[str, Any] | None = None  # the state of a resumed run, until training starts
        self._rejoin = False
        self._resumed_bytes = 0
        self._strategy: Any = None

    @property
    def local_updates(self) -> bool:
        return self.sync != "allreduce"

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        strategy = self._strategy = trainer.strategy
        if stage != "fit" or not self.local_updates:
            return
        if not (isinstance(strategy, DataParallelStrategy) and strategy.sync == self.sync):
            raise UserError(
                f"distributed.sync={self.sync} averages data-parallel workers: use trainer=ddp or ddp_cpu, "
                f"or launcher=ray with launcher.strategy=ddp (this run's strategy is "
                f"{type(strategy).__name__})"
            )
        strategy.worker_sync = self

    # -- when the workers meet ------------------------------------------------------------------------

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if isinstance(trainer.strategy, DataParallelStrategy):
            trainer.strategy.bytes_sent = self._resumed_bytes  # the count goes on over a resume
        if not self.local_updates:
            return
        if self._loaded is None:  # a fresh run: every replica starts from rank 0's weights, as DDP's do
            for tensor in _params(pl_module) + _averaged_state(pl_module):
                dist.broadcast(tensor.data, src=0)
            self.synced_at = trainer.global_step
            self._start_outer(_params(pl_module))
            return
        state, self._loaded = self._loaded, None
        self._start_outer(state["anchor"])
        if self.outer is not None and state["outer"] is not None:
            self.outer.load_state_dict(state["outer"])
        if self._rejoin:  # saved by another number of workers: all start again from the last sync
            self._rejoin = False
            params = _params(pl_module)
            with torch.no_grad():
                torch._foreach_copy_(params, [a.data.to(p.dtype) for a, p in zip(self.anchor, params)])  # pyright: ignore[reportPrivateImportUsage]
            if trainer.is_global_zero:
                log.warning(
                    f"resumed on {trainer.world_size} workers from a checkpoint of another number: every "
                    f"worker starts from the parameters of the last sync (step {self.synced_at})"
                )
            self.synced_at = trainer.global_step

    def after_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """With one optimizer the workers meet right after its H-th step, within a batch too (a PPO rollout
        or a DQN Lightning step takes many). With several (a GAN's), at the end of the batch: until the last
        has stepped, the batch's graph may still need the weights (the generator's output is made before the
        discriminator's step and back-propagated after it). Lightning counts a step in `global_step` once
        it has returned."""
        if len(trainer.optimizers) == 1:
            self._sync_if_due(trainer, pl_module, trainer.global_step + 1)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self.local_updates:
            self._sync_if_due(trainer, pl_module, trainer.global_step)
        if is_logging_step(trainer):
            self._log(trainer, pl_module)

    def _sync_if_due(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        if step - self.synced_at >= self.sync_every:
            self.synchronise(trainer, pl_module, step)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.local_updates and not trainer.sanity_checking and trainer.global_step > self.synced_at:
            self.synchronise(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.local_updates and trainer.global_step > self.synced_at:
            self.synchronise(trainer, pl_module)

    def synchronise(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int | None = None) -> None:
        """Averages the replicas (local SGD) or applies their average change through the outer optimizer
        (DiLoCo); buffers and frozen parameters are averaged in both. One all-reduce. `step`: the optimizer
        steps taken, where Lightning has not counted the last one yet."""
        step = trainer.global_step if step is None else step
        strategy: DataParallelStrategy = trainer.strategy  # type: ignore[assignment]
        params, buffers = _params(pl_module), _averaged_state(pl_module)
        averaged = strategy.all_reduce_mean(params + buffers)
        mean_params, mean_buffers = averaged[: len(params)], averaged[len(params) :]
        # The outer gradient: from the last synchronised parameters to where the workers went, on average.
        # Computed from all-reduced numbers, its norm is the same on every worker, and so is the guard's call.
        change = torch._foreach_sub([a.data for a in self.anchor], [m.float() for m in mean_params])  # pyright: ignore[reportPrivateImportUsage]
        norm = float(torch.stack(torch._foreach_norm(change)).square().sum().sqrt())  # pyright: ignore[reportPrivateImportUsage]
        if math.isfinite(norm):
            if self.outer is None:
                torch._foreach_sub_([a.data for a in self.anchor], change)  # pyright: ignore[reportPrivateImportUsage]
            else:
                for anchor, outer_grad in zip(self.anchor, change):
                    anchor.grad = outer_grad
                self.outer.step()
            for buffer, mean in zip(buffers, mean_buffers):  # (a model may have none)
                buffer.copy_(mean)
            self.outer_steps += 1
        with torch.no_grad():  # a non-finite round is dropped: every worker goes back to the last sync
            torch._foreach_copy_(params, [a.data.to(p.dtype) for a, p in zip(self.anchor, params)])  # pyright: ignore[reportPrivateImportUsage]
        local_steps, self.synced_at = step - self.synced_at, step
        guard = next((cb for cb in trainer.callbacks if isinstance(cb, WatchesSyncs)), None)  # pyright: ignore[reportAttributeAccessIssue]  # set by Lightning
        if guard is not None:
            guard.watch_outer_step(trainer, pl_module, norm, local_steps)
        elif not math.isfinite(norm):
            log.warning(f"step {trainer.global_step}: the workers' average change is {norm}; dropped it")

    def rollback_state(self, trainer: L.Trainer) -> dict[str, Any]:
        """What a divergence rollback (trainer/divergence/rollback.py) restores besides the workers' own
        weights and optimizers: the last synchronised parameters, the outer optimizer, and how many steps past
        that sync the workers were. The counts (outer steps, bytes) go on, as `global_step` does."""
        return {
            "anchor": [a.detach() for a in self.anchor],
            "outer": self.outer.state_dict() if self.outer is not None else None,
            "steps_since_sync": trainer.global_step - self.synced_at,
        }

    def roll_back(self, trainer: L.Trainer, state: dict[str, Any]) -> None:
        with torch.no_grad():
            torch._foreach_copy_([a.data for a in self.anchor], state["anchor"])  # pyright: ignore[reportPrivateImportUsage]
        if self.outer is not None:
            self.outer.load_state_dict(state["outer"])
        self.synced_at = trainer.global_step - state["steps_since_sync"]

    def _start_outer(self, anchor: list[torch.Tensor]) -> None:
        self.anchor = [nn.Parameter(a.detach().clone().float()) for a in anchor]
        self.outer = None
        if self.sync == "diloco":
            self.outer = torch.optim.SGD(
                self.anchor, lr=self.outer_lr, momentum=self.outer_momentum, nesterov=self.nesterov
            )

    def _bytes_sent(self) -> int:
        return self._strategy.bytes_sent if isinstance(self._strategy, DataParallelStrategy) else 0

    def _log(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if isinstance(trainer.strategy, DataParallelStrategy):
            pl_module.log("comm/bytes", float(self._bytes_sent()))
        if self.local_updates:
            pl_module.log("sync/outer_step", float(self.outer_steps))

    # -- checkpoints ----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"sync": self.sync, "bytes_sent": self._bytes_sent()}
        if self.local_updates:
            state.update(
                synced_at=self.synced_at,
                outer_steps=self.outer_steps,
                anchor=[a.detach() for a in self.anchor],
                outer=self.outer.state_dict() if self.outer is not None else None,
            )
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._resumed_bytes = state.get("bytes_sent", 0)
        # Another mode than the checkpoint's (all-reduce first, DiLoCo after): it starts from the weights.
        if self.local_updates and state.get("sync") == self.sync:
            self.synced_at, self.outer_steps, self._loaded = state["synced_at"], state["outer_steps"], state

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Between syncs every worker has its own weights and inner optimizer state: rank 0 saves them all
        (its own are the checkpoint's usual ones)."""
        if not self.local_updates or trainer.world_size == 1:
            return
        own = {"state_dict": checkpoint["state_dict"], "optimizer_states": checkpoint.get("optimizer_states")}
        gathered: list[Any] | None = [None] * trainer.world_size if trainer.is_global_zero else None
        dist.gather_object(own if trainer.global_rank else None, gathered, dst=0)
        if gathered is not None:
            checkpoint["worker_states"] = gathered[1:]

    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Each worker takes its own weights and inner optimizer state back (Lightning restores the
        optimizers after this, from the entry put in place here)."""
        workers = checkpoint.get("worker_states")
        if not self.local_updates or workers is None:
            return
        if len(workers) + 1 != trainer.world_size:
            self._rejoin = True
        elif trainer.global_rank > 0:
            own = workers[trainer.global_rank - 1]
            pl_module.load_state_dict(own["state_dict"])
            if own["optimizer_states"] is not None:
                checkpoint["optimizer_states"] = own["optimizer_states"]


def local_sync(trainer: L.Trainer) -> WorkerSync | None:
    """The run's WorkerSync in `local_sgd` and `diloco`; None under all-reduce or another strategy."""
    strategy = trainer.strategy
    return strategy.worker_sync if isinstance(strategy, DataParallelStrategy) else None


def largest_over_workers(trainer: L.Trainer, values: torch.Tensor) -> torch.Tensor:
    """Between syncs each worker has its own gradients: the guard reads the largest of each number over
    the workers, so that all of them see a bad worker's step and act alike."""
    strategy = trainer.strategy
    if isinstance(strategy, DataParallelStrategy) and strategy.local_updates and trainer.world_size > 1:
        values = values.nan_to_num(nan=math.inf)  # a NaN must win the maximum
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return values


def _params(module: nn.Module) -> list[torch.Tensor]:
    return [p for p in module.parameters() if p.requires_grad]


def _averaged_state(module: nn.Module) -> list[torch.Tensor]:
    """What the workers average as it is, without the outer optimizer: float buffers (BatchNorm statistics)
    and parameters that are not trained by gradients (a DQN's target network)."""
    frozen = [p for p in module.parameters() if not p.requires_grad and p.is_floating_point()]
    return frozen + [b for b in module.buffers() if b.is_floating_point()]
