"""Size and cost of the HaloNet family, measured on the meta device (no memory, no weights)."""
from dataclasses import dataclass
from typing import List, Optional

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

from timm_halo.models.halonet import PAPER_PARAMS_M, PAPER_TOP1


@dataclass
class ModelSummary:
    name: str
    img_size: int
    params_m: float
    paper_params_m: float
    paper_top1: float
    gmacs: float

    @property
    def params_diff_pct(self) -> float:
        return 100.0 * (self.params_m / self.paper_params_m - 1.0)


def count_gmacs(model: torch.nn.Module, img_size: int, in_chans: int = 3) -> float:
    """Multiply-accumulates (1e9) of one forward at ``img_size``; the model may live on the meta device."""
    device = next(model.parameters()).device
    x = torch.empty(1, in_chans, img_size, img_size, device=device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() / 2e9


def summarize(name: str, img_size: Optional[int] = None) -> ModelSummary:
    """Params and GMACs of one registered ``halonet_h*`` model at its default (or the given) input size."""
    model = timm.create_model(name, device='meta')
    size = img_size or model.pretrained_cfg['input_size'][-1]
    return ModelSummary(
        name=name,
        img_size=size,
        params_m=sum(p.numel() for p in model.parameters()) / 1e6,
        paper_params_m=PAPER_PARAMS_M[name],
        paper_top1=PAPER_TOP1[name],
        gmacs=count_gmacs(model, size),
    )


def family() -> List[str]:
    """The paper's models, H0..H7."""
    return sorted(PAPER_PARAMS_M)
