"""timm's training stack (the pieces train.py uses) driving HaloNet, on CPU; the loop also shows that it learns."""
import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data import create_dataset, create_loader, resolve_data_config
from timm.layers import convert_sync_batchnorm
from timm.models import resume_checkpoint
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import CheckpointSaver, ModelEmaV3

from timm_halo.models import HaloNet

TINY = dict(depths=(1, 1, 1, 1), widths=(16, 32, 64, 64), stem_chs=16, block_size=4, halo_size=1, heads=2)
HERE = Path(__file__).resolve().parent


def test_create_model_with_train_py_arguments(tmp_path):
    """The exact keyword set timm's train.py passes to create_model, including --initial-checkpoint."""
    torch.manual_seed(0)
    source = timm.create_model('halonet_h0', num_classes=5, in_chans=1, **TINY)
    ckpt = tmp_path / 'init.pth'
    torch.save(source.state_dict(), ckpt)
    model = timm.create_model(
        'halonet_h0', pretrained=False, in_chans=1, num_classes=5, drop_rate=0.1, drop_path_rate=0.05,
        drop_block_rate=None, global_pool='avg', bn_momentum=0.05, bn_eps=1e-4, scriptable=False,
        checkpoint_path=str(ckpt), **TINY)
    assert isinstance(model, HaloNet)
    for (name, a), b in zip(source.state_dict().items(), model.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(m.momentum == 0.05 and m.eps == 1e-4 for m in bns)
    with pytest.raises(ValueError, match='DropBlock'):
        timm.create_model('halonet_h0', drop_block_rate=0.1, **TINY)


def test_data_config_follows_pretrained_cfg():
    model = timm.create_model('halonet_h3', device='meta')
    cfg = resolve_data_config(model=model)
    assert cfg['input_size'] == (3, 320, 320) and cfg['crop_pct'] == model.pretrained_cfg['crop_pct']
    assert cfg['mean'] == model.pretrained_cfg['mean'] and cfg['interpolation'] == 'bicubic'


@pytest.mark.heavy
def test_compile_inductor_fullgraph():
    """The real backend users get: inductor generates C++ for the broadcast path on CPU; no graph breaks in
    inference, on a map that is not square (block 4: 10x9 in the first stage, padded). The training step through
    a fullgraph compile, at changing sizes: test_contracts.py::test_compile_model_training_with_changing_sizes."""
    torch.manual_seed(0)
    model = timm.create_model('halonet_h0', num_classes=4, **TINY).eval()
    x = torch.randn(2, 3, 40, 36)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)
    torch._dynamo.reset()


def test_amp_channels_last_ema_sync_bn_step():
    torch.manual_seed(0)
    model = timm.create_model('halonet_h0', num_classes=3, drop_path_rate=0.1, **TINY)
    model = convert_sync_batchnorm(model)  # what train.py does with --sync-bn; on one process it acts as BN
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())
    model = model.to(memory_format=torch.channels_last)
    model.set_grad_checkpointing(True)
    optimizer = create_optimizer_v2(model, 'adamw', lr=1e-3, weight_decay=0.05, layer_decay=0.8)
    scheduler, num_epochs = create_scheduler_v2(optimizer, sched='cosine', num_epochs=2, warmup_epochs=1)
    ema = ModelEmaV3(model, decay=0.9)
    x = torch.randn(4, 3, 32, 32).to(memory_format=torch.channels_last)
    y = torch.tensor([0, 1, 2, 0])
    before = [p.detach().clone() for p in ema.module.parameters()]
    with torch.autocast('cpu', dtype=torch.bfloat16):
        loss = F.cross_entropy(model(x), y)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    optimizer.step()
    scheduler.step(1)
    ema.update(model, step=1)
    assert any(not torch.equal(a, b) for a, b in zip(before, ema.module.parameters()))
    assert num_epochs == 2


def _write_image_folder(root: Path, per_class: int, seed: int) -> None:
    """Four classes of 32x32 noise images with a bright square in one quadrant, the class: only a model that
    relates positions (attention with its relative terms) tells them apart; a colour or mean does not."""
    gen = torch.Generator().manual_seed(seed)
    for label in range(4):
        (root / f'class_{label}').mkdir(parents=True)
        for i in range(per_class):
            image = torch.randn(32, 32, 3, generator=gen) * 30 + 100
            top, left = (torch.tensor([label // 2, label % 2]) * 16 + torch.randint(0, 9, (2,), generator=gen)).tolist()
            image[top:top + 8, left:left + 8] += 100
            Image.fromarray(image.clamp(0, 255).to(torch.uint8).numpy()).save(root / f'class_{label}' / f'{i}.png')


def _loader(root: Path, model: torch.nn.Module, training: bool):
    data_cfg = resolve_data_config(dict(input_size=(3, 32, 32), crop_pct=1.0), model=model)
    dataset = create_dataset('', root=str(root), split='', is_training=training)
    return create_loader(
        dataset, input_size=data_cfg['input_size'], batch_size=32, is_training=training, no_aug=True,
        mean=data_cfg['mean'], std=data_cfg['std'], num_workers=0, use_prefetcher=False, device=torch.device('cpu'),
        persistent_workers=False)


@pytest.mark.heavy
def test_train_loop_learns_with_timm_data_checkpoint_and_resume(tmp_path):
    """train.py's loop in small: timm's dataset, loader, optimizer and CheckpointSaver on a task that needs
    spatial attention; the loss falls, held-out accuracy is far above chance, and resume_checkpoint restores it."""
    _write_image_folder(tmp_path / 'train', per_class=64, seed=0)
    _write_image_folder(tmp_path / 'val', per_class=32, seed=1)
    torch.manual_seed(0)
    model = timm.create_model('halonet_h0', num_classes=4, **TINY)
    loader = _loader(tmp_path / 'train', model, training=True)
    assert len(loader.dataset) == 256
    optimizer = create_optimizer_v2(model, 'adamw', lr=1e-2, weight_decay=0.01)
    (tmp_path / 'ckpt').mkdir()  # train.py creates its output folder before the saver
    saver = CheckpointSaver(model, optimizer, checkpoint_dir=str(tmp_path / 'ckpt'),
                            recovery_dir=str(tmp_path / 'ckpt'), decreasing=True, max_history=2)
    epoch_losses = []
    for epoch in range(4):
        model.train()
        losses = []
        for images, labels in loader:
            loss = F.cross_entropy(model(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        epoch_losses.append(sum(losses) / len(losses))
        saver.save_checkpoint(epoch, metric=epoch_losses[-1])
    assert epoch_losses[-1] < 0.5 * epoch_losses[0], epoch_losses
    model.eval()
    with torch.no_grad():
        hits = [(model(x).argmax(-1) == y).float() for x, y in _loader(tmp_path / 'val', model, training=False)]
    accuracy = torch.cat(hits).mean().item()
    assert accuracy > 0.6, accuracy  # chance is 0.25

    assert (tmp_path / 'ckpt' / 'model_best.pth.tar').exists()
    resumed = timm.create_model('halonet_h0', num_classes=4, **TINY)
    resumed_opt = create_optimizer_v2(resumed, 'adamw', lr=1e-2, weight_decay=0.01)
    resume_epoch = resume_checkpoint(resumed, str(tmp_path / 'ckpt' / 'last.pth.tar'), optimizer=resumed_opt,
                                     log_info=False)
    assert resume_epoch == 4  # train.py continues at the epoch after the saved one
    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    assert resumed_opt.state_dict()['state'].keys() == optimizer.state_dict()['state'].keys()


@pytest.mark.heavy
def test_ddp_two_processes_match_single_process(tmp_path):
    """torchrun --nproc_per_node=2 (gloo, CPU): ranks stay identical and match one process on the global batch."""
    env = dict(os.environ, OMP_NUM_THREADS='1')
    out = tmp_path / 'ddp.json'
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', '--master_port=0',
           '--rdzv_backend=c10d', '--rdzv_endpoint=localhost:0', str(HERE / 'ddp_worker.py'), str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    ddp = json.loads(out.read_text())
    # the same script as one plain process (no RANK: no process group), run in this one
    runpy.run_path(str(HERE / 'ddp_worker.py'), run_name='ddp_worker')['main'](str(tmp_path / 'single.json'))
    ref = json.loads((tmp_path / 'single.json').read_text())

    assert ddp['world_size'] == 2 and ref['world_size'] == 1
    assert ddp['max_param_diff_across_ranks'] == 0.0
    assert len(ddp['losses']) == len(ref['losses']) == 3
    for a, b in zip(ddp['losses'], ref['losses']):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-5)
    assert ddp['param_checksum'] == pytest.approx(ref['param_checksum'], rel=1e-4)
