"""A Keras-like model summary: each layer's output shape and parameter count.

:func:`summarize` runs one forward pass on a batch of one zero image with a
hook on every leaf module (a module without children), in call order;
:func:`format_summary` renders the result as a plain-text table in the style
of Keras' ``model.summary()``, with shapes channels-first: ``(None, C, H, W)``.
Parameter counts are PyTorch parameters; buffers (batch-norm running
statistics, which Keras counts as non-trainable) are left out.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass(frozen=True)
class LayerSummary:
    """One call of a leaf module: its dotted name, type, output shape and own parameters."""

    name: str
    type: str
    output_shape: tuple  # (None, C, H, W) or (None, F); a tuple of these for several outputs
    params: int


@dataclass
class ModelSummary:
    """The layers of one forward pass and the model's parameter totals."""

    model_name: str
    input_shape: tuple[int, int, int]
    layers: list[LayerSummary] = field(default_factory=list)
    total_params: int = 0
    trainable_params: int = 0
    non_trainable_params: int = 0


def _output_shape(output):
    """The shape of a module output with the batch dimension as None."""
    if isinstance(output, torch.Tensor):
        return (None, *output.shape[1:])
    if isinstance(output, (tuple, list)):
        return tuple(_output_shape(item) for item in output)
    return ()


@torch.no_grad()
def summarize(model: nn.Module, input_shape: tuple[int, int, int]) -> ModelSummary:
    """Record the output shape and parameter count of every leaf layer.

    Args:
        model: any ``nn.Module`` taking (N, C, H, W) images.
        input_shape: (C, H, W) of one image.

    Returns:
        A :class:`ModelSummary`; the model's training mode is left as it was.
    """
    parameters = list(model.parameters())
    first = parameters[0] if parameters else torch.empty(0)
    summary = ModelSummary(
        model_name=getattr(model, "arch", "") or type(model).__name__,
        input_shape=tuple(int(s) for s in input_shape),
        total_params=sum(p.numel() for p in parameters),
        trainable_params=sum(p.numel() for p in parameters if p.requires_grad),
    )
    summary.non_trainable_params = summary.total_params - summary.trainable_params

    def record(name: str):
        def hook(module: nn.Module, inputs, output) -> None:
            params = sum(p.numel() for p in module.parameters(recurse=False))
            summary.layers.append(LayerSummary(name, type(module).__name__, _output_shape(output), params))
        return hook

    leaves = [(name, m) for name, m in model.named_modules() if next(m.children(), None) is None]
    handles = [m.register_forward_hook(record(name or type(m).__name__)) for name, m in leaves]
    was_training = model.training
    try:
        model.eval()
        model(torch.zeros(1, *summary.input_shape, dtype=first.dtype, device=first.device))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return summary


def _format_shape(shape) -> str:
    if shape and isinstance(shape[0], tuple):
        return ", ".join(_format_shape(s) for s in shape)
    return "(" + ", ".join("None" if s is None else str(s) for s in shape) + ")"


def format_summary(summary: ModelSummary) -> str:
    """Render a summary as a plain-text, Keras-style table.

    Columns: ``Layer (type)``, ``Output Shape`` as ``(None, C, H, W)`` and
    ``Param #``; then the total, trainable and non-trainable parameter counts
    with thousands separators.
    """
    header = ("Layer (type)", "Output Shape", "Param #")
    rows = [(f"{layer.name} ({layer.type})", _format_shape(layer.output_shape), f"{layer.params:,}")
            for layer in summary.layers]
    widths = [max(len(row[i]) for row in [header, *rows]) + 3 for i in range(3)]
    widths[2] -= 3
    total_width = sum(widths)

    def line(row) -> str:
        return (row[0].ljust(widths[0]) + row[1].ljust(widths[1]) + row[2].rjust(widths[2])).rstrip()

    channels, height, width = summary.input_shape
    out = [f'Model: "{summary.model_name}"  input: (None, {channels}, {height}, {width})',
           "_" * total_width, line(header), "=" * total_width]
    for index, row in enumerate(rows):
        out.append(line(row))
        out.append("_" * total_width if index < len(rows) - 1 else "=" * total_width)
    if not rows:
        out.append("=" * total_width)
    out += [f"Total params: {summary.total_params:,}",
            f"Trainable params: {summary.trainable_params:,}",
            f"Non-trainable params: {summary.non_trainable_params:,}",
            "_" * total_width]
    return "\n".join(out)
