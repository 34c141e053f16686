"""Data-parallel strategies: DDP, or FSDP2 (`fully_shard`) per block for the large models.

FSDP2 shards every CNN block (U-Net) / transformer block (ViT) and then the root, with
bf16 parameters and fp32 gradient reduction. Activation checkpointing recomputes each block
in the backward pass to trade compute for memory. Checkpoints of an FSDP run are
torch.distributed.checkpoint directories (sharded), loadable into a plain model.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing
from torch.nn.parallel import DistributedDataParallel

from phileo.models.blocks import CNNBlock
from training.distributed import World

log = logging.getLogger(__name__)

STRATEGIES = ("ddp", "fsdp")


def block_types() -> tuple[type[nn.Module], ...]:
    """The repeated blocks of every registered architecture: the units of sharding and recompute."""
    from timm.models.vision_transformer import Block

    return (CNNBlock, Block)


def apply_fsdp(model: nn.Module, world: World, mixed_precision: bool) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(world.device.type, (world.world_size,))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if mixed_precision else None,
                                  reduce_dtype=torch.float32)
    units = [module for module in model.modules() if isinstance(module, block_types())]
    for module in units:
        fully_shard(module, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    log.info("FSDP2: sharded %d blocks + root over %d ranks (bf16 params: %s)", len(units), world.world_size,
             mixed_precision)
    return model


def checkpoint_blocks(model: nn.Module) -> None:
    """Activation checkpointing on every block of `block_types()` (recomputed in backward), in place."""
    apply_activation_checkpointing(model, check_fn=lambda module: isinstance(module, block_types()))


def parallelize(model: nn.Module, world: World, strategy: str, mixed_precision: bool,
                activation_checkpointing: bool) -> nn.Module:
    """Return the module to call in the training step (the same object as `model` for FSDP)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"--strategy {strategy}: expected one of {', '.join(STRATEGIES)}")
    if activation_checkpointing:
        checkpoint_blocks(model)
    if strategy == "fsdp":
        if not world.distributed:
            log.info("--strategy fsdp on a single process: nothing to shard, running plain")
            return model
        return apply_fsdp(model, world, mixed_precision)
    return DistributedDataParallel(model) if world.distributed else model
