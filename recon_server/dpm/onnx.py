"""The preconditioned denoiser on ONNX Runtime: export, load, and one interface for both backends.

Exported graph (``denoiser.onnx``), float32, dynamic batch ``B`` and matrix ``H x W``::

    inputs   x        (B, 2, H, W)   real/imaginary of scale-normalised slices,
                                     H and W multiples of ``size_multiple`` (2^(levels-1))
             sigma    (B,)           noise level per batch item (> 0)
             onehot   (B, S)         contrast one-hot (or soft) vectors over the S slots
    output   denoised (B, 2, H, W)   D(x; sigma, c) = c_skip x + c_out F(c_in x; c_noise, c)

Padding to the size multiple stays outside the graph: because ``c_in`` scales every pixel
equally, ``D(x) = crop(D_graph(pad(x)))`` with the same padding rule as
:class:`~recon_server.dpm.unet.EDMDenoiser` (reflect, or zeros when the image is smaller than
the pad), so :class:`OnnxDenoiser` accepts any ``H x W`` and agrees with the torch module.
The file's metadata (``metadata_props``) carries ``contrast_slots`` (JSON), ``size_multiple``,
``pad_mode``, ``sigma_data``, the model name and version.

Exporters (torch 2.13 CPU, both checked by the tests): ``dynamo`` (``torch.export``, needs the
``onnx`` and ``onnxscript`` packages; default) and ``torchscript`` (the deprecated tracer; much
faster to export). ONNX Runtime picks execution providers in the order given; with
``onnxruntime-gpu`` and no usable CUDA libraries it logs an error and silently runs on the CPU,
so :class:`OnnxDenoiser` logs the providers the session really has and warns when CUDA was asked
for and is not among them.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from recon_server.dpm.unet import EDMDenoiser, Labels, labels_onehot, normalise_contrast, slot_index

log = logging.getLogger(__name__)

INPUT_NAMES = ("x", "sigma", "onehot")
OUTPUT_NAME = "denoised"
EXPORTERS = ("dynamo", "torchscript")
DEFAULT_OPSET = 18
CUDA_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")
TENSORRT_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


@runtime_checkable
class Denoiser(Protocol):
    """``D(x, sigma, labels) -> x0_hat`` as :meth:`EDMDenoiser.forward` defines it.

    ``x`` float32 (B, 2, H, W); ``sigma`` float or (B,); ``labels`` a contrast name or index,
    a sequence of them, an integer tensor (B,) or float one-hot (B, slots). Both
    :class:`EDMDenoiser` (torch) and :class:`OnnxDenoiser` implement it; samplers that need no
    gradient through the network run on either.
    """

    @property
    def contrast_slots(self) -> tuple[str, ...]: ...

    def __call__(self, x: torch.Tensor, sigma: float | torch.Tensor, labels: Labels) -> torch.Tensor: ...


class _GraphDenoiser(nn.Module):
    """The graph that is exported: preconditioning + backbone, inputs already padded."""

    def __init__(self, model: EDMDenoiser) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
        # The coefficients of edm.precond_coefficients, without its Python-level check that
        # sigma > 0 (a graph cannot raise; OnnxDenoiser checks before calling the session).
        sd = float(self.model.config.sigma_data)
        s2 = sigma * sigma
        norm = (s2 + sd * sd).sqrt()
        c_skip = (sd * sd / (s2 + sd * sd)).reshape(-1, 1, 1, 1)
        c_out = (sigma * sd / norm).reshape(-1, 1, 1, 1)
        c_in = (1.0 / norm).reshape(-1, 1, 1, 1)
        c_noise = sigma.log() / 4.0
        f = self.model.net(c_in * x, c_noise, onehot)
        return c_skip * x + c_out * f


def _metadata(model: EDMDenoiser, name: str, version: str) -> dict[str, str]:
    return {
        "recon_server.format": "1",
        "contrast_slots": json.dumps(list(model.contrast_slots)),
        "size_multiple": str(model.config.size_multiple),
        "pad_mode": model.config.pad_mode,
        "sigma_data": repr(float(model.config.sigma_data)),
        "model_name": name,
        "model_version": version,
    }


def export_onnx(
    model: EDMDenoiser,
    path: str | os.PathLike[str],
    *,
    exporter: str = "dynamo",
    opset: int = DEFAULT_OPSET,
    name: str = "",
    version: str = "",
    example_size: int = 0,
) -> Path:
    """Write ``model`` as a single ``.onnx`` file (weights inside) with dynamic B, H, W.

    ``example_size`` is the traced matrix size (default: 4 size multiples, at least 32).
    """
    import onnx

    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {list(EXPORTERS)}, got {exporter!r}")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    m = model.config.size_multiple
    size = example_size or max(32, 4 * m)
    if size % m:
        raise ValueError(f"example_size {size} must be a multiple of {m}")
    graph = _GraphDenoiser(model.to("cpu").eval()).eval()
    n = model.config.num_slots
    gen = torch.Generator().manual_seed(0)
    example = (
        torch.randn(2, model.config.in_channels, size, size, generator=gen),
        torch.tensor([0.5, 2.0]),
        F.one_hot(torch.arange(2) % n, n).float(),
    )
    tmp = out.with_name(out.name + ".tmp")
    t0 = time.perf_counter()
    with torch.no_grad():
        if exporter == "dynamo":
            from torch.export import Dim

            batch = Dim("batch", min=1, max=4096)
            h, w = Dim("h", min=1, max=8192 // m), Dim("w", min=1, max=8192 // m)
            torch.onnx.export(
                graph,
                example,
                str(tmp),
                dynamo=True,
                external_data=False,
                opset_version=opset,
                input_names=list(INPUT_NAMES),
                output_names=[OUTPUT_NAME],
                dynamic_shapes=({0: batch, 2: m * h, 3: m * w}, {0: batch}, {0: batch}),
            )
        else:
            torch.onnx.export(
                graph,
                example,
                str(tmp),
                dynamo=False,
                opset_version=opset,
                input_names=list(INPUT_NAMES),
                output_names=[OUTPUT_NAME],
                dynamic_axes={
                    "x": {0: "batch", 2: "height", 3: "width"},
                    "sigma": {0: "batch"},
                    "onehot": {0: "batch"},
                    OUTPUT_NAME: {0: "batch", 2: "height", 3: "width"},
                },
            )
    proto = onnx.load(str(tmp))
    for key, value in _metadata(model, name, version).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    onnx.save(proto, str(tmp))
    tmp.replace(out)
    log.info("exported %s (%s exporter, opset %d) in %.1f s", out, exporter, opset, time.perf_counter() - t0)
    return out


def default_providers(device: str) -> tuple[str, ...]:
    """Execution providers for a torch-style device string: CUDA (then CPU) for ``cuda*``."""
    return CUDA_PROVIDERS if device.startswith("cuda") else ("CPUExecutionProvider",)


class OnnxDenoiser:
    """An exported denoiser on an ``onnxruntime.InferenceSession``; call it like EDMDenoiser.

    ``providers``: ONNX Runtime execution providers in order of preference (default
    :func:`default_providers` of ``device``). Outputs come back on the device of ``x``.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        providers: Sequence[str] | None = None,
        device: str = "cpu",
        threads: int = 0,
    ) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"ONNX model not found: {self.path}")
        requested = tuple(providers) if providers else default_providers(device)
        available = ort.get_available_providers()
        unknown = [p for p in requested if p not in available]
        if unknown:
            raise ValueError(f"ONNX Runtime providers {unknown} not available here; available: {available}")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(self.path), sess_options=options, providers=list(requested))
        self.requested_providers = requested
        meta = self.session.get_modelmeta().custom_metadata_map
        try:
            self._slots = tuple(normalise_contrast(s) for s in json.loads(meta["contrast_slots"]))
            self.size_multiple = int(meta["size_multiple"])
            self.pad_mode = meta["pad_mode"]
        except (KeyError, ValueError, TypeError) as exc:
            raise ValueError(f"{self.path} lacks recon-server metadata ({exc}); re-export it") from None
        self.model_name = meta.get("model_name", "")
        self.model_version = meta.get("model_version", "")
        active = self.providers
        log.info("ONNX denoiser %s: providers %s (requested %s)", self.path.name, active, list(requested))
        if any(p != "CPUExecutionProvider" for p in requested) and active == ["CPUExecutionProvider"]:
            log.warning(
                "ONNX Runtime was asked for %s but runs on the CPU only: the CUDA/cuDNN libraries "
                "onnxruntime-gpu %s needs were not found (see the error above); inference will be slow",
                [p for p in requested if p != "CPUExecutionProvider"],
                ort.__version__,
            )

    @property
    def providers(self) -> list[str]:
        """The execution providers the session actually uses, best first."""
        return list(self.session.get_providers())

    @property
    def provider(self) -> str:
        return self.providers[0]

    @property
    def contrast_slots(self) -> tuple[str, ...]:
        return self._slots

    def contrast_index(self, name: str) -> int:
        return slot_index(self._slots, name)

    def onehot(self, labels: Labels, batch: int) -> torch.Tensor:
        """Labels in any form :class:`EDMDenoiser` accepts -> float32 (B, slots) on the CPU."""
        return labels_onehot(self._slots, labels, batch).detach()

    def _pads(self, h: int, w: int) -> tuple[int, int, int, int]:
        m = self.size_multiple
        ph, pw = (-h) % m, (-w) % m
        return pw // 2, pw - pw // 2, ph // 2, ph - ph // 2

    def __call__(self, x: torch.Tensor, sigma: float | torch.Tensor, labels: Labels) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 2:
            raise ValueError(f"x must be (B, 2, H, W), got {tuple(x.shape)}")
        b, _, h, w = x.shape
        s = torch.as_tensor(sigma, dtype=torch.float32).detach().to("cpu").reshape(-1)
        if s.numel() == 1:
            s = s.expand(b)
        if s.numel() != b:
            raise ValueError(f"sigma must be a scalar or have {b} entries, got {s.numel()}")
        if torch.any(s <= 0):
            raise ValueError("sigma must be positive for EDM preconditioning")
        xin = x.detach().to("cpu", torch.float32)
        left, right, top, bottom = pads = self._pads(h, w)
        if any(pads):
            reflect_ok = max(left, right) < w and max(top, bottom) < h
            xin = F.pad(xin, pads, mode=self.pad_mode if reflect_ok else "constant")
        feeds: dict[str, Any] = {
            "x": np.ascontiguousarray(xin.numpy()),
            "sigma": np.ascontiguousarray(s.numpy()),
            "onehot": np.ascontiguousarray(self.onehot(labels, b).numpy()),
        }
        (out,) = self.session.run([OUTPUT_NAME], feeds)
        result = torch.from_numpy(out)[:, :, top : top + h, left : left + w]
        return result.to(x.device)


def load_denoiser(
    model_dir: str | os.PathLike[str],
    *,
    backend: str = "torch",
    device: str = "cpu",
    onnx_file: str | os.PathLike[str] | None = None,
    providers: Sequence[str] | None = None,
) -> Denoiser:
    """The model of a checkpoint directory on the chosen backend (``torch`` or ``onnx``).

    ``onnx``: ``onnx_file`` (default ``model_dir/denoiser.onnx``); its contrast slots must equal
    the card's, so a stale export of another model is refused.
    """
    from recon_server.dpm.checkpoint import load_checkpoint, read_card

    if backend == "torch":
        model, _ = load_checkpoint(model_dir, device=device)
        return model
    if backend != "onnx":
        raise ValueError(f"backend must be 'torch' or 'onnx', got {backend!r}")
    path = Path(onnx_file) if onnx_file is not None else Path(model_dir) / "denoiser.onnx"
    denoiser = OnnxDenoiser(path, providers=providers, device=device)
    card = read_card(model_dir)
    slots = tuple(normalise_contrast(s) for s in card.contrast_slots)
    if denoiser.contrast_slots != slots:
        raise ValueError(
            f"{path} has contrast slots {list(denoiser.contrast_slots)} but the model card in "
            f"{model_dir} lists {list(slots)}: re-export with 'recon-server export-onnx'"
        )
    return denoiser
