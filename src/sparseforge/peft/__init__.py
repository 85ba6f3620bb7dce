"""Parameter-efficient fine-tuning: PaCA (partial connections trained in place) and LoRA, merged back into plain weights.

``sf.peft.apply(model, sf.peft.PaCA(rank=8, targets=["query", "value"]))``
replaces the targeted ``nn.Linear`` layers by adapter layers and returns a
:class:`PeftReport`; train :func:`trainable_parameters`; ``sf.peft.merge(model)``
writes the update into the weights and leaves a plain model;
:func:`save_adapter` / :func:`load_adapter` store the adapter alone. Pruned
bases keep their zeros; fake-quantized bases (:func:`sparseforge.quant.quantize_`)
stay at their quantized values (QPaCA).

Example:
    >>> import torch, sparseforge as sf
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    >>> report = sf.peft.apply(model, sf.peft.PaCA(rank=4, targets=["0"]))
    >>> opt = torch.optim.AdamW(sf.peft.trainable_parameters(model), lr=1e-2)
    >>> model(torch.randn(5, 8)).square().mean().backward(); opt.step()
    >>> type(sf.peft.merge(model)[0]).__name__
    'Linear'
"""

from sparseforge.peft.config import ADAPTERS, AdapterConfig, LoRA, PaCA, config_from_dict
from sparseforge.peft.layer import AdapterLayer
from sparseforge.peft.lora import LoRALinear
from sparseforge.peft.model import PeftReport, adapter_layers, apply, merge, trainable_parameters
from sparseforge.peft.paca import PaCALinear, PartialLinearFunction, select_columns
from sparseforge.peft.saving import load_adapter, save_adapter

__all__ = [
    "ADAPTERS", "AdapterConfig", "AdapterLayer", "LoRA", "LoRALinear", "PaCA", "PaCALinear", "PartialLinearFunction",
    "PeftReport", "adapter_layers", "apply", "config_from_dict", "load_adapter", "merge", "save_adapter",
    "select_columns", "trainable_parameters",
]
