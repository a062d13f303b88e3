"""Hugging Face BitNet b1.58 checkpoints -> bitnet-run model files (.bnr, docs/format.md).

Installed as `bitnet_run.convert`. It needs numpy, safetensors headers and huggingface_hub only;
no torch.
"""
from .converter import convert_checkpoint
from .errors import ConversionError

__all__ = ["convert_checkpoint", "ConversionError"]
