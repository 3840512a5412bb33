"""A small HaloNet learns a generated task: the loss falls clearly within a few dozen steps."""
import timm
import torch
import torch.nn.functional as F

import timm_halo  # noqa: F401  (registers the halonet_* models with timm)


def _quadrant_batch(batch_size: int, generator: torch.Generator, size: int = 32):
    """Noise images with a bright square in one quadrant; the label is the quadrant (needs spatial attention)."""
    labels = torch.randint(0, 4, (batch_size,), generator=generator)
    images = torch.randn(batch_size, 3, size, size, generator=generator) * 0.5
    half, sq = size // 2, size // 4
    for i, label in enumerate(labels.tolist()):
        top = (label // 2) * half + torch.randint(0, half - sq + 1, (1,), generator=generator).item()
        left = (label % 2) * half + torch.randint(0, half - sq + 1, (1,), generator=generator).item()
        images[i, :, top:top + sq, left:left + sq] += 2.0
    return images, labels


def test_small_halonet_learns():
    torch.manual_seed(0)
    model = timm.create_model(
        'halonet_h0', num_classes=4, depths=(1, 1, 1, 1), widths=(16, 32, 64, 64), stem_chs=16,
        block_size=4, halo_size=1, heads=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    losses = []
    model.train()
    for _ in range(60):
        images, labels = _quadrant_batch(32, gen)
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.5 * first, (first, last)

    model.eval()
    images, labels = _quadrant_batch(128, torch.Generator().manual_seed(1))
    with torch.no_grad():
        accuracy = (model(images).argmax(-1) == labels).float().mean().item()
    assert accuracy > 0.6, accuracy  # chance is 0.25
