"""Per-layer norms of gradients and weights, summed over shards under FSDP: what the gradient monitor logs
(callbacks/gradients.py), the guard's gate measures (divergence/gate.py) and a replay measures again."""

from collections import defaultdict

import lightning as L
import torch

from trainer.distributed.fsdp import sum_over_shards


def layer_name(param_name: str) -> str:
    """'generator.net.3.weight' -> 'generator.net.3': a layer is the module that owns the parameters, also
    of a parametrized tensor (spectral norm: 'discriminator.net.0.parametrizations.weight.original')."""
    module, parametrized, _ = param_name.partition(".parametrizations.")
    return module if parametrized else param_name.rpartition(".")[0] or param_name


def layers_of(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The model's layers by name: the modules without submodules but their parametrizations (spectral
    norm's), whose own modules are not layers."""
    return {
        name: module
        for name, module in model.named_modules()
        if name
        and "parametrizations" not in name.split(".")
        and all(child == "parametrizations" for child, _ in module.named_children())
    }


def params_by_layer(
    optimizer: torch.optim.Optimizer, layer_of: dict[torch.nn.Parameter, str], sharded: bool = False
) -> dict[str, list[torch.nn.Parameter]]:
    """The optimizer's parameters that have a gradient, grouped by layer name. Sharded, all of them: a rank
    whose part of a parameter is empty has no gradient for it, and every rank must list the same ones."""
    layers: dict[str, list[torch.nn.Parameter]] = defaultdict(list)
    for p in stepped_params(optimizer, sharded):
        layers[layer_of.get(p, "unnamed")].append(p)
    return layers


def stepped_params(optimizer: torch.optim.Optimizer, sharded: bool = False) -> list[torch.nn.Parameter]:
    """The optimizer's parameters that have a gradient; sharded, all of them (see `params_by_layer`)."""
    return [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None or sharded]


def grads(params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    """The parameters' gradients; an empty tensor (norm 0) for a sharded parameter's missing part."""
    return [p.grad.detach() if p.grad is not None else p.detach().new_zeros(0) for p in params]


def layer_owners(layers: dict[str, list[torch.nn.Parameter]], device: torch.device) -> torch.Tensor:
    """For each parameter of `layers`, in order, the index of its layer: what `per_layer_norms` groups by."""
    sizes = torch.tensor([len(ps) for ps in layers.values()])
    return torch.repeat_interleave(torch.arange(len(layers)), sizes).to(device)


def per_layer_norms(
    tensors: list[torch.Tensor] | tuple[torch.Tensor, ...],
    owners: torch.Tensor,
    num_layers: int,
    trainer: L.Trainer | None = None,
) -> torch.Tensor:
    """L2 norm per layer of tensors grouped by `owners` (layer index per tensor), plus the total at the
    end. With a `trainer` whose model is sharded, of the whole model (a collective call). Accumulated in
    float64: in float32, torch's norm of MiniLM's 11.7 M-element embedding is off by 4e-4 (relative)."""
    norms = torch.stack(torch._foreach_norm(tensors, 2, dtype=torch.float64))  # pyright: ignore[reportPrivateImportUsage]
    squares = torch.zeros(num_layers, device=norms.device, dtype=norms.dtype).index_add_(
        0, owners, norms.square()
    )
    if trainer is not None:
        squares = sum_over_shards(trainer, squares)
    return torch.cat([squares.sqrt(), squares.sum().sqrt().view(1)]).float()
