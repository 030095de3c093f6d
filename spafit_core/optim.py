"""The optimizer of a training run: AdamW over the trainable tensors only, in parameter groups per kind of
tensor (head, bias deltas, LoRA factors, the rest) each at its own learning rate, with linear warmup then
linear decay to zero.
"""

from __future__ import annotations

import torch

from .config import TrainConfig
from .model import SpafitModel


def build_optimizer(model: SpafitModel, cfg: TrainConfig, total_steps: int):
    """(AdamW over `param_groups`, its LambdaLR schedule: linear warmup over `cfg.warmup_ratio` of
    `total_steps`, then linear decay to zero)."""
    optimizer = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr_for(model.method_config.name))
    warmup = int(cfg.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / (warmup + 1) if s < warmup else
        max(0.0, (total_steps - s) / max(1, total_steps - warmup)))
    return optimizer, scheduler


def param_groups(model: SpafitModel, cfg: TrainConfig) -> list[dict]:
    """AdamW groups: (head | bias deltas | LoRA factors | other) x (decayed weights | biases and norms), each
    kind at its own learning rate (`TrainConfig.lr_for`). The layout depends on the model only, so a
    checkpoint's optimizer state maps onto it whatever the rates."""
    kind: dict[int, str] = {id(p): "head" for _, p in model.head_named_parameters()}
    for mod in model.adapted.values():
        for name, k in (("bias_delta", "bias"), ("lora_A", "lora"), ("lora_B", "lora")):
            t = getattr(mod, name, None)
            if t is not None:
                kind[id(t)] = k
    groups: dict[tuple[str, bool], list] = {}
    for _, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault((kind.get(id(p), "other"), p.dim() >= 2), []).append(p)
    order = [(k, d) for k in ("other", "lora", "bias", "head") for d in (True, False)]
    method = model.method_config.name
    return [{"params": groups[key], "weight_decay": cfg.weight_decay if key[1] else 0.0,
             "lr": cfg.lr_for(method, None if key[0] == "other" else key[0]), "kind": key[0]}
            for key in order if key in groups]
