"""Models from outside mirage (docs/design.md §model-formats): a ``torch.export`` archive, an
ONNX file run by onnxruntime, or any ``nn.Module`` class by import path with a safetensors state
dict. Each loads as an :class:`ExternalModel`, a module from images (B, C, H, W) to logits
(B, K) that knows its ``input_shape`` and ``num_classes``, as mirage's own classifiers do, with
a :class:`~mirage.models.ModelCard` that says where it came from.

The victim need not be a PyTorch model: a defense only needs its probabilities. An ONNX model
therefore serves as a victim but cannot be a surrogate, because GRAD² and MAD differentiate the
surrogate.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from mirage.models.checkpoints import ModelCard, load_checkpoint

Format = Literal["checkpoint", "export", "onnx", "state_dict"]
SUFFIXES: dict[str, Format] = {".pt2": "export", ".onnx": "onnx", ".safetensors": "state_dict"}


class ExternalModel(nn.Module):
    """``inner`` (a module or any callable from images to logits) with mirage's model attributes.
    ``train``/``eval`` reach ``inner`` only when it is an ordinary module: an exported program's
    module has no modes (torch raises), and an ONNX session none either."""

    def __init__(
        self,
        inner: nn.Module | Any,
        input_shape: Sequence[int],
        num_classes: int | None = None,
        *,
        has_modes: bool = True,
        batch: int | None = None,
    ) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(f"input_shape must be (C, H, W), got {tuple(input_shape)}")
        self.inner = inner
        self.batch = (
            batch  # a batch size the file fixes (torch.export's default): calls go in chunks of it
        )
        self._has_modes = has_modes and isinstance(inner, nn.Module)
        self.input_shape = tuple(int(s) for s in input_shape)
        self.num_classes = self._probe_num_classes() if num_classes is None else int(num_classes)

    def _probe_num_classes(self) -> int:
        """K from one forward pass of a zero image, in eval mode and without gradients: in training
        mode a batch-norm layer would move its running statistics. Each module's mode is
        restored."""
        modes = [(m, m.training) for m in self.inner.modules()] if self._has_modes else []
        for module, _ in modes:
            module.training = False
        try:
            with torch.no_grad():
                logits = self.forward(torch.zeros(1, *self.input_shape))
        finally:
            for module, mode in modes:
                module.training = mode
        if logits.ndim != 2 or logits.shape[1] < 2:
            raise ValueError(
                "the model must map (B, C, H, W) images to (B, K) logits, "
                f"got {tuple(logits.shape)}"
            )
        return int(logits.shape[1])

    def forward(self, x: Tensor) -> Tensor:
        if self.batch is None or len(x) == self.batch:
            return self.inner(x)
        out = []
        for chunk in x.split(
            self.batch
        ):  # the last one padded with zero images, their answers dropped
            pad = self.batch - len(chunk)
            full = torch.cat([chunk, chunk.new_zeros(pad, *chunk.shape[1:])]) if pad else chunk
            out.append(self.inner(full)[: len(chunk)])
        return torch.cat(out)

    def train(self, mode: bool = True) -> ExternalModel:
        self.training = mode
        if self._has_modes:
            self.inner.train(mode)
        return self


class OnnxSession:
    """An onnxruntime session as a callable from a float tensor to a float32 logits tensor."""

    def __init__(self, path: str | Path) -> None:
        import onnxruntime

        self.session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise ValueError(
                f"{path}: an ONNX classifier takes one input, this one takes {len(inputs)}"
            )
        self.input = inputs[0]

    def input_shape(self) -> tuple[int, int, int] | None:
        """(C, H, W) when the file fixes them."""
        dims = self.input.shape[1:]
        return tuple(dims) if len(dims) == 3 and all(isinstance(d, int) for d in dims) else None

    def batch(self) -> int | None:
        """The batch size when the file fixes it."""
        first = self.input.shape[0] if self.input.shape else None
        return first if isinstance(first, int) else None

    def __call__(self, x: Tensor) -> Tensor:
        (logits, *_) = self.session.run(None, {self.input.name: x.detach().cpu().float().numpy()})
        return torch.from_numpy(logits)


def import_class(path: str) -> type[nn.Module]:
    """``"package.module:Class"`` (or ``"package.module.Class"``) -> the class."""
    module_name, _, name = path.partition(":") if ":" in path else path.rpartition(".")
    if not module_name or not name:
        raise ValueError(f"class must be 'package.module:Class', got {path!r}")
    found = getattr(importlib.import_module(module_name), name, None)
    if not (isinstance(found, type) and issubclass(found, nn.Module)):
        raise ValueError(f"{path!r} is not an nn.Module class")  # noqa: TRY004 (bad config: ValueError)
    return found


def _exported_input(
    program: torch.export.ExportedProgram,
) -> tuple[tuple[int, ...] | None, int | None]:
    """(C, H, W) of an exported program's input when it fixes them, and its batch size when that
    is static (``torch.export.export(model, (torch.zeros(1, …),))`` without dynamic shapes)."""
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name in program.graph_signature.user_inputs:
            shape = node.meta["val"].shape
            batch = int(shape[0]) if len(shape) == 4 and isinstance(shape[0], int) else None
            return (tuple(int(s) for s in shape[1:]) if len(shape) == 4 else None), batch
    return None, None


def load_model_file(
    format: Format,
    path: str | Path,
    *,
    input_shape: Sequence[int] | None = None,
    class_path: str | None = None,
    kwargs: dict[str, Any] | None = None,
    dataset: str = "",
) -> tuple[nn.Module, ModelCard]:
    """The model at ``path`` in ``format``, in eval mode, and its card. ``input_shape`` (C, H, W)
    is read from an export or ONNX file when it fixes it; a state dict needs it, or the class's
    ``input_shape`` attribute. ``class_path`` and ``kwargs`` build a state dict's module."""
    path = Path(path)
    if format == "checkpoint":
        return load_checkpoint(path)
    inner: nn.Module | OnnxSession
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such {format} file")
    if format == "export":
        program = torch.export.load(str(path))
        fixed, batch = _exported_input(program)
        shape = input_shape or fixed
        inner, has_modes = program.module(), False
    elif format == "onnx":
        session = OnnxSession(path)
        shape, batch = input_shape or session.input_shape(), session.batch()
        inner, has_modes = session, False
    elif format == "state_dict":
        if class_path is None:
            raise ValueError(
                "a state dict needs the class of its module (model.class = 'package.module:Class')"
            )
        from safetensors.torch import load_file

        inner = import_class(class_path)(**(kwargs or {}))
        inner.load_state_dict(load_file(str(path)))
        inner.eval()  # before anything runs through it: batch norm must not update its statistics
        shape = input_shape or getattr(inner, "input_shape", None)
        has_modes, batch = True, None
    else:
        raise ValueError(
            f"unknown model format {format!r}; known: checkpoint, {', '.join(SUFFIXES.values())}"
        )
    if shape is None:
        raise ValueError(
            f"{path}: give the model's input_shape (C, H, W); the {format} file does not fix it"
        )
    model = ExternalModel(inner, shape, has_modes=has_modes, batch=batch).eval()
    channels = model.input_shape[0]
    card = ModelCard(
        architecture=f"{format}:{class_path or path.name}",
        input_shape=model.input_shape,
        num_classes=model.num_classes,
        mean=(0.0,) * channels,
        std=(1.0,) * channels,
        dataset=dataset,
        training={"source": str(path), "format": format},
    )
    return model, card


def format_of(path: str | Path) -> Format:
    """The format a file's suffix names; anything else is read as a mirage checkpoint directory."""
    return SUFFIXES.get(Path(path).suffix, "checkpoint")
