"""What each strategy trains: which parameters learn (`linear`: the head; `partial`: the last N
blocks and what follows them; `full`: everything) with their AdamW groups, and the train mode that
keeps frozen BatchNorm statistics fixed. Shared by the loop (`training/train.py`) and the recipe's
probe runs (`training/recipe.py`).
"""
from __future__ import annotations

from typing import Any

from torch import nn

from training.backbones import ImageModel
from training.config import ConfigError, TrainConfig


def configure_strategy(model: ImageModel, config: TrainConfig) -> list[dict[str, Any]]:
    """Set requires_grad per strategy and return AdamW parameter groups."""
    classifier = model.classifier
    head = list(classifier.head.parameters())
    body_named = list(classifier.body.named_parameters())
    for _, p in body_named:
        p.requires_grad = config.strategy == "full"
    for p in head:
        p.requires_grad = True
    lr = config.learning_rate
    if config.strategy == "linear":
        return [{"params": head, "lr": lr, "name": "head"}]
    if config.strategy == "full":
        body = [p for _, p in body_named]
        return [
            {"params": body, "lr": lr * config.backbone_lr_scale, "name": "backbone"},
            {"params": head, "lr": lr, "name": "head"},
        ]
    # partial: the last N blocks, plus whatever follows the last block in the body (final norms, pre-logits)
    blocks = classifier.blocks
    if config.partial_blocks > len(blocks):
        raise ConfigError(f"partial_blocks={config.partial_blocks} but {len(blocks)} blocks exist in this backbone")
    in_block: dict[int, int] = {}
    for index, block in enumerate(blocks):
        for p in block.parameters():
            in_block[id(p)] = index
    first_trained = len(blocks) - config.partial_blocks
    last_block_param = max((i for i, (_, p) in enumerate(body_named) if id(p) in in_block), default=-1)
    trained = []
    for position, (_, p) in enumerate(body_named):
        block = in_block.get(id(p))
        if (block is not None and block >= first_trained) or (block is None and position > last_block_param):
            p.requires_grad = True
            trained.append(p)
    return [
        {"params": trained, "lr": lr * config.backbone_lr_scale, "name": "backbone"},
        {"params": head, "lr": lr, "name": "head"},
    ]


def set_train_mode(model: nn.Module) -> None:
    """Train mode, except frozen BatchNorm layers keep their running statistics."""
    model.train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            if not any(p.requires_grad for p in module.parameters(recurse=False)):
                module.eval()
