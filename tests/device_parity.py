"""Running the same encoded images through the Pillow path and the tensor image path and measuring
how far apart they land: preprocessed pixels, model inputs, logits, top-1 classes and maps."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from app.engine.models import LoadedModel
from app.engine.options import CamOptions
from app.serving.device_decode import DeviceImage, decode_batch
from app.serving.device_preprocess import preprocess_batch
from app.serving.images import decode
from tests.image_corpus import Sample


@dataclass
class ParityReport:
    images: int
    top1_agreement: float
    map_pearson_mean: float
    map_pearson_min: float
    pixel_max_abs: int  # uint8 levels of the preprocessed model input
    pixel_mean_abs: float
    input_max_abs: float  # the normalised model input
    logit_max_abs: float
    logit_mean_abs: float
    accuracy_pillow: float | None = None  # shapes images only
    accuracy_device: float | None = None
    decoders: Counter[str] = field(default_factory=Counter)

    def line(self) -> str:
        return (
            f"{self.images} images: top-1 agreement {self.top1_agreement:.4f}, map Pearson mean "
            f"{self.map_pearson_mean:.5f} (min {self.map_pearson_min:.4f}), pixels max {self.pixel_max_abs} "
            f"mean {self.pixel_mean_abs:.5f}, input max {self.input_max_abs:.4f}, logits max "
            f"{self.logit_max_abs:.5f} mean {self.logit_mean_abs:.6f}, decoders {dict(self.decoders)}"
        )


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation of two maps; 1 for two constant maps, 0 for one."""
    x, y = a.double().flatten(), b.double().flatten()
    x, y = x - x.mean(), y - y.mean()
    nx, ny = float(x.norm()), float(y.norm())
    if nx == 0.0 or ny == 0.0:
        return 1.0 if nx == ny else 0.0
    return float((x @ y) / (nx * ny))


def pillow_inputs(samples: Sequence[Sample], loaded: LoadedModel) -> torch.Tensor:
    """The Pillow path's uint8 (N, H, W, 3) model inputs: decode, then ``Preprocessor.to_pixels``."""
    pre = loaded.preprocessor
    pixels = [pre.to_pixels(decode(s.data).image)[0] for s in samples]
    return torch.from_numpy(np.stack(pixels))


def device_inputs(
    samples: Sequence[Sample], loaded: LoadedModel, device: str | torch.device, counts: Counter[str]
) -> torch.Tensor:
    """The tensor path's uint8 (N, 3, H, W) model inputs on ``device``."""
    decoded = decode_batch([s.data for s in samples], device, preprocessor=loaded.preprocessor)
    images = []
    for item in decoded:
        if not isinstance(item, DeviceImage):
            raise item
        counts[item.decoder] += 1
        images.append(item)
    return preprocess_batch(images, loaded.preprocessor, device).pixels


def compare(
    samples: Sequence[Sample], loaded: LoadedModel, *, device: str | torch.device = "cpu", chunk: int = 100
) -> ParityReport:
    """Both paths on every sample, the engine (with its own device) on both inputs, maps of the
    Pillow path's top-1 class compared by Pearson correlation over the patch grid."""
    pre = loaded.preprocessor
    counts: Counter[str] = Counter()
    agree, correct_p, correct_d, labelled = 0, 0, 0, 0
    correlations: list[float] = []
    pixel_max, pixel_sum, input_max, logit_max, logit_sum, count = 0, 0.0, 0.0, 0.0, 0.0, 0
    for start in range(0, len(samples), chunk):
        part = samples[start : start + chunk]
        ref = pillow_inputs(part, loaded)
        dev = device_inputs(part, loaded, device, counts).cpu().permute(0, 2, 3, 1)
        diff = (ref.int() - dev.int()).abs()
        pixel_max = max(pixel_max, int(diff.max()))
        pixel_sum += float(diff.double().mean()) * len(part)
        ref_in, dev_in = pre.normalize(ref), pre.normalize(dev)
        input_max = max(input_max, float((ref_in - dev_in).abs().max()))
        ref_out = loaded.engine.explain(ref_in, CamOptions(), top_k=1)
        targets = [[int(r.logits.argmax())] for r in ref_out]
        dev_out = loaded.engine.explain(dev_in, CamOptions(), targets=targets)
        for sample, r, d in zip(part, ref_out, dev_out, strict=True):
            gap = (r.logits - d.logits).abs()
            logit_max = max(logit_max, float(gap.max()))
            logit_sum += float(gap.double().mean())
            top_r, top_d = int(r.logits.argmax()), int(d.logits.argmax())
            agree += top_r == top_d
            if sample.label >= 0:
                labelled += 1
                correct_p += top_r == sample.label
                correct_d += top_d == sample.label
            assert r.score_maps is not None and d.score_maps is not None
            correlations.append(pearson(r.score_maps[0], d.score_maps[0]))
        count += len(part)
    return ParityReport(
        images=count,
        top1_agreement=agree / count,
        map_pearson_mean=float(np.mean(correlations)),
        map_pearson_min=float(np.min(correlations)),
        pixel_max_abs=pixel_max,
        pixel_mean_abs=pixel_sum / count,
        input_max_abs=input_max,
        logit_max_abs=logit_max,
        logit_mean_abs=logit_sum / count,
        accuracy_pillow=correct_p / labelled if labelled else None,
        accuracy_device=correct_d / labelled if labelled else None,
        decoders=counts,
    )
