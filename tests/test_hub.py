"""Pretrained weights in and out through timm's own code: Hub cache, local folders, files, push, CLI, errors.

Nothing here touches the network: HF_HUB_OFFLINE=1, and the Hugging Face cache is a temp folder that the tests
fill themselves in huggingface_hub's real layout. Round trips load in a fresh interpreter.
"""
import argparse
import contextlib
import hashlib
import io
import json
import os
import pickle
import re
import shutil
import stat
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Dict, List

import huggingface_hub
import pytest
import timm
import torch
from huggingface_hub import RepoUrl, scan_cache_dir
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import LocalEntryNotFoundError
from safetensors.torch import load_file, save_file
from timm.models import byoanet, get_pretrained_cfg, is_model_pretrained

from timm_halo import hub
from timm_halo.cli import main as cli_main
from timm_halo.hub import (
    PAPER_TITLE,
    PAPER_URL,
    PretrainedWeightsError,
    export_for_hub,
    model_card,
    read_checkpoint,
)
from timm_halo.models import HaloNet
from timm_halo.models._pretrained import checkpoint_problem, warn_if_classifier_dropped

NAMES = [f'halonet_h{i}' for i in range(8)]
# A small HaloNet-H1 (the paper's b, h, rv, rb; one narrow block per stage): every code path, little compute.
TINY = dict(depths=[1, 1, 1, 1], widths=[16, 32, 64, 64], stem_chs=16)
REPO = 'me/halonet_h1-mydata'
REPO_OURS = 'me/halonet_h1-ours'  # pushed with timm_halo.hub.push_to_hf_hub
LABELS = ['cat', 'dog', 'owl', 'fox', 'emu']

MODEL_ARGS = [f'{k}={v}' for k, v in TINY.items()]  # the CLI's --model-args key=value pairs


def child_command(code: str) -> List[str]:
    """A fresh interpreter running `code` after `import timm` (the plugin autoloads)."""
    return [sys.executable, '-c', f'import timm\n{code}']


def offline_env(hf_home: Path) -> Dict[str, str]:
    return {
        **os.environ,
        'HF_HUB_OFFLINE': '1',
        'HF_HOME': str(hf_home),
        'HF_HUB_CACHE': str(hf_home / 'hub'),
    }


@pytest.fixture(autouse=True)
def offline_hub(tmp_path, monkeypatch) -> Path:
    """Every test runs offline against an empty temp cache (env for children, constants for this process)."""
    home = tmp_path / 'hf-home'
    for key, value in offline_env(home).items():
        if key.startswith('HF_'):
            monkeypatch.setenv(key, value)
    # huggingface_hub read the env at import; it looks these up on its constants module at call time
    monkeypatch.setattr(hf_constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setattr(hf_constants, 'HF_HUB_CACHE', str(home / 'hub'))
    return home / 'hub'


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random values in every float tensor, so that zero-init BN gammas hide nothing from a logits comparison."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=g) * 0.2)
                if name.endswith('running_var'):
                    t.abs_().add_(0.5)
    return model.eval()


def tiny(seed: int = 0, **kwargs) -> HaloNet:
    return randomize(timm.create_model('halonet_h1', **{**TINY, **kwargs}), seed)


def seed_hf_cache(cache: Path, repo_id: str, folder: Path) -> str:
    """Put the files of `folder` into a huggingface_hub cache as `repo_id` at `main`, in the cache's own layout.

    models--org--name/blobs/<etag> holds the bytes (LFS files are named by their sha256, others by their git blob
    id), snapshots/<commit>/<file> are relative symlinks to the blobs, refs/main holds the commit hash.
    """
    repo_dir = cache / f"models--{repo_id.replace('/', '--')}"
    blobs = repo_dir / 'blobs'
    blobs.mkdir(parents=True, exist_ok=True)
    entries = []
    for f in sorted(folder.iterdir()):
        data = f.read_bytes()
        if f.suffix in ('.safetensors', '.bin', '.pth'):
            etag = hashlib.sha256(data).hexdigest()
        else:
            etag = hashlib.sha1(b'blob %d\0' % len(data) + data).hexdigest()
        (blobs / etag).write_bytes(data)
        entries.append((f.name, etag))
    commit = hashlib.sha1(json.dumps(entries).encode()).hexdigest()
    snapshot = repo_dir / 'snapshots' / commit
    snapshot.mkdir(parents=True)
    for name, etag in entries:
        (snapshot / name).symlink_to(Path('..', '..', 'blobs', etag))
    (repo_dir / 'refs').mkdir(exist_ok=True)
    (repo_dir / 'refs' / 'main').write_text(commit)
    return commit


class FakeHubApi:
    """Stands in for the three huggingface_hub calls timm's push_to_hf_hub makes over the network."""

    def __init__(self, remote: Path):
        self.remote = remote
        self.calls: List[tuple] = []

    def install(self, mp: pytest.MonkeyPatch) -> None:
        fake = self

        def create_repo(self, repo_id, **kwargs):
            fake.calls.append(('create_repo', repo_id, kwargs))
            return RepoUrl(f'https://huggingface.co/{repo_id}')

        def file_exists(self, repo_id, filename, **kwargs):
            fake.calls.append(('file_exists', repo_id, filename))
            return (fake.remote / repo_id / filename).exists()

        def upload_folder(self, *, repo_id, folder_path, **kwargs):
            fake.calls.append(('upload_folder', repo_id, sorted(os.listdir(folder_path)), kwargs))
            shutil.copytree(folder_path, fake.remote / repo_id, dirs_exist_ok=True)
            return f'https://huggingface.co/{repo_id}/commit/0'

        mp.setattr(huggingface_hub.HfApi, 'create_repo', create_repo)
        mp.setattr(huggingface_hub.HfApi, 'file_exists', file_exists)
        mp.setattr(huggingface_hub.HfApi, 'upload_folder', upload_folder)


# The round trips: loads in a fresh interpreter, logits back in a safetensors file, metadata as JSON on stdout.
_LOADER = '''
import json, sys
import torch
from safetensors.torch import load_file, save_file
specs = json.loads(sys.argv[1])
x = load_file(sys.argv[2])['x']
logits, meta = {}, {}
for key, name, kwargs in specs:
    model = timm.create_model(name, pretrained=True, **kwargs).eval()
    with torch.no_grad():
        logits[key] = model(x).contiguous()
    cfg = model.pretrained_cfg
    meta[key] = dict(cls=type(model).__name__, architecture=cfg.get('architecture'), source=cfg.get('source'),
                     hf_hub_id=cfg.get('hf_hub_id'), num_classes=model.num_classes, labels=cfg.get('label_names'))
save_file(logits, sys.argv[3])
print(json.dumps(meta))
'''


@pytest.fixture(scope='module')
def published(tmp_path_factory):
    """User story: train (here: randomize) a small HaloNet, push it (upload mocked), save it every other way,
    put the pushed folder into an offline Hub cache, then load everything back in one fresh interpreter."""
    root = tmp_path_factory.mktemp('published')
    home = root / 'hf-home'
    model = tiny(seed=1, num_classes=5)
    x = torch.randn(2, 3, 64, 48, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(x)

    fake, fake_ours = FakeHubApi(root / 'remote'), FakeHubApi(root / 'remote')
    with pytest.MonkeyPatch.context() as mp:
        fake.install(mp)
        card = model_card(model, repo_id=REPO, dataset='mydata')
        timm.models.push_to_hf_hub(model, REPO, model_card=card, model_config={'label_names': LABELS})
    with pytest.MonkeyPatch.context() as mp:  # the same, through timm_halo.hub's push (default card)
        fake_ours.install(mp)
        hub.push_to_hf_hub(model, REPO_OURS, model_config={'label_names': LABELS})
    pushed = root / 'remote' / REPO
    commit = seed_hf_cache(home / 'hub', REPO, pushed)
    seed_hf_cache(home / 'hub', REPO_OURS, root / 'remote' / REPO_OURS)

    local_dir = root / 'local-dir'
    timm.models.save_for_hf(model, str(local_dir), safe_serialization=True)
    sd = model.state_dict()
    save_file(sd, str(root / 'model.safetensors'))
    torch.save(sd, root / 'model.pth')
    # what timm's train.py writes: wrapped, DDP-prefixed, with an argparse.Namespace (allowed by weights_only)
    torch.save({'epoch': 3, 'arch': 'halonet_h1', 'state_dict': {f'module.{k}': v for k, v in sd.items()},
                'args': argparse.Namespace(model='halonet_h1', lr=0.1), 'version': 2}, root / 'checkpoint.pth.tar')

    def from_file(path: Path) -> dict:
        return dict(pretrained_cfg_overlay=dict(file=str(path), num_classes=5), num_classes=5, **TINY)

    specs = [
        ('hf_hub', f'hf-hub:{REPO}', {}),
        ('hf_hub_ours', f'hf-hub:{REPO_OURS}', {}),
        ('local_dir', f'local-dir:{local_dir}', {}),
        ('safetensors', 'halonet_h1', from_file(root / 'model.safetensors')),
        ('pth', 'halonet_h1', from_file(root / 'model.pth')),
        ('train_checkpoint', 'halonet_h1', from_file(root / 'checkpoint.pth.tar')),
    ]
    save_file({'x': x}, str(root / 'x.safetensors'))
    result = subprocess.run(
        child_command(_LOADER) + [json.dumps(specs), str(root / 'x.safetensors'), str(root / 'logits.safetensors')],
        capture_output=True, text=True, env=offline_env(home), timeout=300)
    assert result.returncode == 0, result.stderr
    return dict(
        root=root, home=home, model=model, x=x, expected=expected, pushed=pushed, commit=commit, fake=fake,
        fake_ours=fake_ours, pushed_ours=root / 'remote' / REPO_OURS, local_dir=local_dir,
        logits=load_file(str(root / 'logits.safetensors')), meta=json.loads(result.stdout.strip().splitlines()[-1]),
    )


# ------------------------------------------------------------------------------------------------------------
# Default cfgs: an honest registry, clear errors without weights
# ------------------------------------------------------------------------------------------------------------

def test_cfgs_claim_no_weights():
    assert not [m for m in timm.list_models(pretrained=True) if m.startswith('halonet_h')]
    for name in NAMES:
        assert timm.list_models(name, include_tags=True) == [f'{name}.untrained']
        assert get_pretrained_cfg(name).tag == 'untrained' and not is_model_pretrained(name)


def test_pretrained_without_weights_says_how_to_load_a_file():
    with pytest.raises(PretrainedWeightsError) as info:
        timm.create_model('halonet_h1', pretrained=True, **TINY)
    msg = str(info.value)
    assert "'halonet_h1.untrained' names no weight file" in msg
    assert "pretrained_cfg_overlay=dict(file='/path/to/model.safetensors')" in msg and 'local-dir:' in msg


def test_hub_weights_not_downloadable_offline(offline_hub):
    overlay = dict(hf_hub_id='timm-halo/halonet_h1.in1k', hf_hub_filename='model.safetensors')
    with pytest.raises(PretrainedWeightsError) as info:
        timm.create_model('halonet_h1', pretrained=True, pretrained_cfg_overlay=overlay, **TINY)
    msg = str(info.value)
    assert "Hugging Face Hub repo 'timm-halo/halonet_h1.in1k' (looked for model.safetensors)" in msg
    assert 'HF_HUB_OFFLINE is set' in msg and str(offline_hub) in msg
    assert 'pretrained_cfg_overlay=dict(file=' in msg
    assert isinstance(info.value.__cause__, LocalEntryNotFoundError)  # it did ask huggingface_hub


# ------------------------------------------------------------------------------------------------------------
# Round trips (fresh interpreter) and push_to_hf_hub
# ------------------------------------------------------------------------------------------------------------

def test_push_to_hf_hub_writes_timm_folder_and_model_card(published):
    fake, pushed = published['fake'], published['pushed']
    assert [c[0] for c in fake.calls] == ['create_repo', 'file_exists', 'upload_folder']
    assert fake.calls[0][1] == REPO and fake.calls[2][1] == REPO
    assert fake.calls[2][2] == ['README.md', 'config.json', 'model.safetensors', 'pytorch_model.bin']
    config = json.loads((pushed / 'config.json').read_text())
    assert config['architecture'] == 'halonet_h1' and config['num_classes'] == 5
    assert config['label_names'] == LABELS
    assert config['model_args']['depths'] == TINY['depths'] and config['model_args']['widths'] == TINY['widths']
    card = (pushed / 'README.md').read_text()
    params = sum(p.numel() for p in published['model'].parameters())
    assert 'datasets:' not in card  # 'mydata' is free text, not a Hub dataset id: stated, not linked
    for needle in ('# Model card for halonet_h1-mydata', 'library_name: timm', 'license: apache-2.0',
                   '**Training data:** mydata', 'HaloNet-H1', 'halonet_h1 (block size b=8, halo h=3',
                   'depths 1-1-1-1', f'Params (M): {params / 1e6:.2f}', 'Image size: 256 x 256',
                   'Classes: 5', f'{PAPER_TITLE}: {PAPER_URL}', f"timm.create_model('hf-hub:{REPO}'",
                   '@inproceedings{vaswani2021halonet'):
        assert needle in card, needle


def test_our_push_writes_the_same_files_for_transformers_too(published):
    """timm_halo.hub.push_to_hf_hub: timm's steps and files, with the default card; config.json differs from timm's
    push only by model_args.num_classes (which transformers would pass twice)."""
    fake = published['fake_ours']
    assert [c[0] for c in fake.calls] == ['create_repo', 'file_exists', 'upload_folder']
    assert fake.calls[2][1] == REPO_OURS
    assert fake.calls[2][2] == ['README.md', 'config.json', 'model.safetensors', 'pytorch_model.bin']
    ours = json.loads((published['pushed_ours'] / 'config.json').read_text())
    theirs = json.loads((published['pushed'] / 'config.json').read_text())
    assert theirs['model_args'].pop('num_classes') == 5 and 'num_classes' not in ours['model_args']
    assert ours == theirs
    card = (published['pushed_ours'] / 'README.md').read_text()
    assert f"timm.create_model('hf-hub:{REPO_OURS}'" in card and f"model='{REPO_OURS}'" in card
    assert 'Training data: not stated by the publisher.' in card and '<' not in card.split('## Citation')[0]
    meta = published['meta']['hf_hub_ours']
    assert meta['source'] == 'hf-hub' and meta['num_classes'] == 5 and meta['labels'] == LABELS
    assert torch.equal(published['logits']['hf_hub_ours'], published['expected'])


def test_seeded_cache_is_what_huggingface_hub_itself_reads(published):
    report = scan_cache_dir(published['home'] / 'hub')
    assert not report.warnings
    repo = next(r for r in report.repos if r.repo_id == REPO)
    assert repo.nb_files == 4
    (revision,) = repo.revisions
    assert revision.commit_hash == published['commit'] and revision.refs == frozenset({'main'})
    path = huggingface_hub.hf_hub_download(REPO, 'model.safetensors', cache_dir=published['home'] / 'hub')
    assert Path(path).parent.name == published['commit']


def test_hf_hub_round_trip_of_the_pushed_repo(published):
    meta = published['meta']['hf_hub']
    assert meta == dict(cls='HaloNet', architecture='halonet_h1', source='hf-hub', hf_hub_id=REPO,
                        num_classes=5, labels=LABELS)
    assert torch.equal(published['logits']['hf_hub'], published['expected'])


@pytest.mark.parametrize('key', ['local_dir', 'safetensors', 'pth', 'train_checkpoint'])
def test_local_round_trips(published, key):
    meta = published['meta'][key]
    assert meta['cls'] == 'HaloNet' and meta['architecture'] == 'halonet_h1' and meta['num_classes'] == 5
    assert meta['source'] == ('local-dir' if key == 'local_dir' else None)
    assert torch.equal(published['logits'][key], published['expected'])


def test_new_num_classes_and_in_chans_follow_timm(published):
    folder, saved = published['local_dir'], published['model'].state_dict()
    x = published['x']

    head3 = timm.create_model(f'local-dir:{folder}', pretrained=True, num_classes=3).eval()
    assert head3.get_classifier().out_features == 3
    for k, v in head3.state_dict().items():
        if not k.startswith('head.fc.'):
            assert torch.equal(v, saved[k]), k
    with torch.no_grad():
        assert torch.equal(head3.forward_features(x), published['model'].forward_features(x))

    gray = timm.create_model(f'local-dir:{folder}', pretrained=True, in_chans=1).eval()
    assert torch.equal(gray.stem[0].conv.weight, saved['stem.0.conv.weight'].sum(dim=1, keepdim=True))
    g = x[:, :1]
    with torch.no_grad():  # a gray image in 1 channel == the same image in 3 equal channels
        torch.testing.assert_close(gray(g), published['model'](g.expand(-1, 3, -1, -1)), rtol=1e-5, atol=1e-5)

    features = timm.create_model(f'local-dir:{folder}', pretrained=True, features_only=True).eval()
    with torch.no_grad():
        expected = published['model'].forward_intermediates(x, intermediates_only=True)
        for a, b in zip(features(x), expected):
            assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------------------
# timm's ByobNet halonet_h1 weights
# ------------------------------------------------------------------------------------------------------------

def test_timm_byobnet_halonet_h1_weights_load_into_ours(tmp_path):
    """timm.models.byoanet.halonet_h1 maps onto ours tensor for tensor; stride-1 stages compute the same
    function away from the border (timm attends zero-padded border keys, we mask them)."""
    theirs = randomize(byoanet.halonet_h1(), seed=3)
    path = tmp_path / 'byobnet_halonet_h1.safetensors'
    save_file(theirs.state_dict(), str(path))
    ours = timm.create_model('halonet_h1', pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()

    t = theirs.state_dict()
    o = ours.state_dict()
    assert len(o) == len(t) == 425
    assert torch.equal(o['stem.0.conv.weight'], t['stem.conv1.conv.weight'])
    assert torch.equal(o['stages.2.blocks.9.attn.kv.weight'], t['stages.2.9.self_attn.kv.weight'])
    assert torch.equal(o['stages.1.blocks.0.shortcut.conv.weight'], t['stages.1.0.shortcut.conv.weight'])
    assert torch.equal(o['stages.3.blocks.2.conv3.bn.running_var'], t['stages.3.2.conv3_1x1.bn.running_var'])
    assert torch.equal(o['stages.0.blocks.1.attn.rel_pos_h'], t['stages.0.1.self_attn.pos_embed.height_rel'][6:])
    assert torch.equal(o['head.fc.weight'], t['head.fc.weight'])

    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        a = ours.stages[0](ours.stem(x))
        b = theirs.stages[0](theirs.stem(x))
    # 64x64 maps, 8x8 blocks, 3 stride-1 blocks: border effects reach 3 blocks in, blocks 3-4 are untouched
    inner = (slice(None), slice(None), slice(24, 40), slice(24, 40))
    torch.testing.assert_close(a[inner], b[inner], rtol=1e-4, atol=1e-4)
    assert (a - b).abs()[..., :8, :8].max() > 1e-2  # the border differs, so the comparison can fail


# ------------------------------------------------------------------------------------------------------------
# Bad files and unknown sources
# ------------------------------------------------------------------------------------------------------------

class _RunsCode:
    """Unpickling this creates a directory: stands for any code a pickle can carry."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


class _Custom:
    """A harmless class of the user's: weights_only refuses it as well (torch's message differs)."""

    def __init__(self):
        self.lr = 0.1


# What we explain whenever torch.load(weights_only=True) refuses a pickle, however torch words the refusal
REFUSAL = ('references Python objects other than tensors', 'torch.load(weights_only=True)',
           'safetensors.torch.save_file(', "torch.save(sd, 'model.pth')")


@pytest.mark.parametrize('payload, global_name', [('runs-code', 'posix.mkdir'), ('custom-class', '_Custom')])
def test_pickle_carrying_objects_is_refused_and_explained(tmp_path, capsys, payload, global_name):
    marker = tmp_path / 'code-ran'
    evil = tmp_path / 'evil.pth'
    obj = _RunsCode(marker) if payload == 'runs-code' else _Custom()
    torch.save({'state_dict': tiny().state_dict(), 'payload': obj}, evil)
    # what the detection rests on: torch refuses with pickle.UnpicklingError (message wording varies by version)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(evil, weights_only=True)

    with pytest.raises(PretrainedWeightsError) as info:
        timm.create_model('halonet_h1', pretrained=True, pretrained_cfg_overlay=dict(file=str(evil)), **TINY)
    msg = str(info.value)
    assert f"from file '{evil}'" in msg and global_name in msg
    for needle in REFUSAL:
        assert needle in msg, needle
    with pytest.raises(PretrainedWeightsError) as info:
        read_checkpoint(evil)
    assert global_name in str(info.value) and all(needle in str(info.value) for needle in REFUSAL)
    capsys.readouterr()
    assert cli_main(['hub-export', '--model', 'halonet_h1', '--checkpoint', str(evil),
                     '--output', str(tmp_path / 'out')]) == 1
    err = capsys.readouterr().err
    assert err.startswith('timm-halo hub-export: error: ') and err.count('\n') == 1
    assert 'references Python objects other than tensors' in err and global_name in err
    assert not marker.exists()
    if payload == 'runs-code':
        torch.load(evil, weights_only=False)  # what the refusal prevented
        assert marker.exists()


def test_old_format_pickle_refusal_is_explained(tmp_path):
    """torch cannot list the globals of a pre-1.6 (non-zip) checkpoint: the one its refusal names is named."""
    old = tmp_path / 'old.pth'
    with open(old, 'wb') as f:
        torch.save({'state_dict': tiny().state_dict(), 'payload': _Custom()}, f, _use_new_zipfile_serialization=False)
    with pytest.raises(PretrainedWeightsError) as info:
        read_checkpoint(old)
    msg = str(info.value)
    assert re.search(r'refused [\w.]*_Custom', msg) and all(needle in msg for needle in REFUSAL)


@pytest.mark.parametrize('damage', ['truncated', 'garbage'])
@pytest.mark.parametrize('suffix', ['.safetensors', '.pth'])
def test_corrupt_checkpoint_names_the_file(tmp_path, damage, suffix):
    good = tmp_path / f'good{suffix}'
    sd = tiny().state_dict()
    save_file(sd, str(good)) if suffix == '.safetensors' else torch.save(sd, good)
    bad = tmp_path / f'bad{suffix}'
    data = good.read_bytes()
    bad.write_bytes(data[: len(data) // 2] if damage == 'truncated' else b'\x00not a checkpoint' * 64)
    with pytest.raises(PretrainedWeightsError) as info:
        timm.create_model('halonet_h1', pretrained=True, pretrained_cfg_overlay=dict(file=str(bad)), **TINY)
    msg = str(info.value)
    assert f"for halonet_h1 from file '{bad}'" in msg
    assert ('not a valid safetensors file' if suffix == '.safetensors' else 'truncated or corrupt') in msg
    assert 'references Python objects' not in msg and 'non-allowlisted' not in msg  # not taken for a refusal


def test_checkpoint_of_another_architecture_is_not_loaded_partially(tmp_path):
    resnet = tmp_path / 'resnet18.safetensors'
    save_file(timm.create_model('resnet18', num_classes=10).state_dict(), str(resnet))
    # num_classes differs from the cfg's 1000, so timm itself would load non-strictly here
    with pytest.raises(PretrainedWeightsError) as info:
        timm.create_model('halonet_h1', pretrained=True, num_classes=10,
                          pretrained_cfg_overlay=dict(file=str(resnet)), **TINY)
    msg = str(info.value)
    assert f"from file '{resnet}'" in msg and 'refusing a partial load' in msg
    assert '108 missing keys: stem.0.conv.weight, stem.0.bn.weight' in msg
    assert re.search(r'122 unexpected keys: [^\n]* conv1\.weight, ', msg)

    other_depth = tmp_path / 'h1-depth2.safetensors'
    save_file(tiny(depths=[1, 2, 1, 1]).state_dict(), str(other_depth))
    with pytest.raises(PretrainedWeightsError) as info:  # one extra block: its 21 tensors, nothing missing
        timm.create_model('halonet_h1', pretrained=True, pretrained_cfg_overlay=dict(file=str(other_depth)), **TINY)
    assert re.search(r'\n  21 unexpected keys: stages\.1\.blocks\.1\.attn', str(info.value))
    assert 'missing keys' not in str(info.value)

    # asking for a non-strict load explicitly is the user's call, as in timm
    model = timm.create_model('halonet_h1', pretrained=True, pretrained_strict=False,
                              pretrained_cfg_overlay=dict(file=str(other_depth)), **TINY)
    assert isinstance(model, HaloNet)


def test_hub_repo_missing_from_offline_cache(offline_hub, tmp_path):
    # config.json cached but not the weights: our loader names the repo and the file
    folder = tmp_path / 'config-only'
    timm.models.save_for_hf(tiny(), str(folder), safe_serialization=True)
    (folder / 'model.safetensors').unlink()
    seed_hf_cache(offline_hub, 'me/config-only', folder)
    with pytest.raises(PretrainedWeightsError) as info:
        timm.create_model('hf-hub:me/config-only', pretrained=True)
    msg = str(info.value)
    assert "Hugging Face Hub repo 'me/config-only' (looked for model.safetensors, then pytorch_model.bin)" in msg
    assert 'HF_HUB_OFFLINE is set' in msg

    # an unknown repo fails in timm before any plugin code runs (huggingface_hub's own message);
    # `timm-halo hub-inspect` gives the clear one
    with pytest.raises(LocalEntryNotFoundError):
        timm.create_model('hf-hub:me/nothing', pretrained=True)


# ------------------------------------------------------------------------------------------------------------
# Model card and CLI
# ------------------------------------------------------------------------------------------------------------

def test_model_card_of_a_paper_model_renders_through_timm():
    model = timm.create_model('halonet_h1')
    card = model_card(model, repo_id=REPO, dataset='ImageNet-1k', details={'Top-1': '79.0'})
    assert card['details']['Model Stats'] == {
        'Params (M)': '8.09', 'GMACs': '2.82', 'Image size': '256 x 256', 'Classes': 1000}
    readme = timm.models._hub.generate_readme(card, REPO.split('/')[1])
    assert '- imagenet-1k' in readme and '**Top-1:** 79.0' in readme and 'Trained on ImageNet-1k.' in readme
    assert 'depths 3-3-10-3' in readme
    with pytest.raises(TypeError, match='HaloNet'):
        model_card(timm.create_model('resnet18'))


def test_cli_hub_export_and_inspect(tmp_path, capsys):
    model = tiny(seed=5, num_classes=5)
    ckpt = tmp_path / 'checkpoint.pth.tar'
    torch.save({'epoch': 1, 'state_dict': model.state_dict()}, ckpt)
    labels = tmp_path / 'labels.txt'
    labels.write_text('\n'.join(LABELS) + '\n')
    out = tmp_path / 'export'
    rc = cli_main(['hub-export', '--model', 'halonet_h1', '--checkpoint', str(ckpt), '--output', str(out),
                   '--model-args', *MODEL_ARGS, '--labels', str(labels), '--dataset', 'mydata',
                   '--repo-id', REPO])
    printed = capsys.readouterr().out
    assert rc == 0
    assert 'max |logit diff| 0' in printed and f'hf upload {REPO} {out}' in printed
    assert sorted(os.listdir(out)) == ['README.md', 'config.json', 'model.safetensors']
    config = json.loads((out / 'config.json').read_text())
    assert config['label_names'] == LABELS and config['pretrained_cfg']['tag'] is None
    assert 'Trained on mydata.' in (out / 'README.md').read_text()
    reloaded = timm.create_model(f'local-dir:{out}', pretrained=True).eval()
    x = torch.randn(1, 3, 40, 56)
    with torch.no_grad():
        assert torch.equal(reloaded(x), model(x))

    assert cli_main(['hub-inspect', str(out)]) == 0
    printed = capsys.readouterr().out
    params = sum(p.numel() for p in model.parameters())
    assert 'architecture  halonet_h1' in printed and f'({params:,}), loaded strictly' in printed
    assert 'num_classes   5 (5 label names)' in printed and '"depths": [1, 1, 1, 1]' in printed
    assert 'model.safetensors' in printed

    # --num-classes 0 publishes the backbone alone; a count that disagrees with the checkpoint is refused
    assert cli_main(['hub-export', '--model', 'halonet_h1', '--checkpoint', str(ckpt), '--output',
                     str(tmp_path / 'backbone'), '--model-args', *MODEL_ARGS, '--num-classes', '0']) == 0
    assert json.loads((tmp_path / 'backbone' / 'config.json').read_text())['num_classes'] == 0
    capsys.readouterr()
    assert cli_main(['hub-export', '--model', 'halonet_h1', '--checkpoint', str(ckpt), '--output',
                     str(tmp_path / 'x'), '--model-args', *MODEL_ARGS, '--num-classes', '7']) == 1
    assert 'classifier has 5 classes but num_classes=7' in capsys.readouterr().err
    assert cli_main(['hub-export', '--model', 'halonet_h1', '--checkpoint', str(ckpt), '--output', str(out),
                     '--model-args', *MODEL_ARGS]) == 1
    err = capsys.readouterr().err
    assert 'a folder that is not empty' in err and 'pass --overwrite' in err
    with pytest.raises(ValueError, match=r'pass --overwrite \(overwrite=True\)'):
        export_for_hub(ckpt, out, 'halonet_h1', model_args=TINY)
    assert cli_main(['hub-export', '--model', 'halonet_h1', '--checkpoint', str(tmp_path / 'none.pth'),
                     '--output', str(tmp_path / 'y')]) == 1
    assert 'none.pth' in capsys.readouterr().err


def test_cli_hub_inspect_of_hub_repos_offline(published, monkeypatch, capsys):
    monkeypatch.setattr(hf_constants, 'HF_HUB_CACHE', str(published['home'] / 'hub'))
    assert cli_main(['hub-inspect', REPO]) == 0
    printed = capsys.readouterr().out
    assert f'source        hf-hub:{REPO}' in printed and 'architecture  halonet_h1' in printed
    assert 'num_classes   5 (5 label names)' in printed and 'model.safetensors (0.' in printed

    assert cli_main(['hub-inspect', 'me/nothing']) == 1
    err = capsys.readouterr().err
    assert "Could not get config.json of Hugging Face Hub repo 'me/nothing'" in err and 'HF_HUB_OFFLINE is set' in err


def test_cli_hub_export_writes_the_trained_input_size(tmp_path, capsys):
    model = tiny(seed=6, num_classes=5)
    ckpt = tmp_path / 'model.safetensors'
    save_file(model.state_dict(), str(ckpt))
    common = ['hub-export', '--model', 'halonet_h1', '--checkpoint', str(ckpt), '--model-args', *MODEL_ARGS]

    assert cli_main(common + ['--output', str(tmp_path / 'default')]) == 0
    cfg = json.loads((tmp_path / 'default' / 'config.json').read_text())['pretrained_cfg']
    assert cfg['input_size'] == [3, 256, 256] and cfg['pool_size'] == [8, 8]  # halonet_h1's default cfg

    out = tmp_path / 'at224'
    assert cli_main(common + ['--output', str(out), '--img-size', '224']) == 0
    assert 'input size (3, 224, 224)' in capsys.readouterr().out
    cfg = json.loads((out / 'config.json').read_text())['pretrained_cfg']
    assert cfg['input_size'] == [3, 224, 224] and cfg['pool_size'] == [7, 7]
    assert 'Image size: 224 x 224' in (out / 'README.md').read_text()
    reloaded = timm.create_model(f'local-dir:{out}', pretrained=True)
    assert timm.data.resolve_data_config({}, model=reloaded)['input_size'] == (3, 224, 224)

    with pytest.raises(SystemExit) as info:  # a bad argument: argparse's exit code 2
        cli_main(common + ['--output', str(tmp_path / 'tiny-size'), '--img-size', '16'])
    assert info.value.code == 2
    assert '--img-size / img_size must be an integer >= 32' in capsys.readouterr().err


@pytest.fixture
def saved_folder(tmp_path) -> Path:
    """A tiny 5-class HaloNet written by timm's save_for_hf."""
    folder = tmp_path / 'saved'
    timm.models.save_for_hf(tiny(seed=7, num_classes=5), str(folder), safe_serialization=True)
    return folder


def edit_config(folder: Path, edit) -> dict:
    path = folder / 'config.json'
    config = json.loads(path.read_text())
    config = edit(config) or config
    path.write_text(json.dumps(config))
    return config


BAD_CONFIGS = {
    'no-architecture': (lambda c: c.pop('architecture') and None, 'has no "architecture"'),
    'model_args-list': (lambda c: c.update(model_args=[1, 1, 1, 1]), '"model_args" must be a JSON object'),
    'model_args-unknown-key': (lambda c: c['model_args'].update(depthz=[1, 1, 1, 1]),
                               'does not take: depthz (did you mean depths?)'),
    'not-halonet': (lambda c: c.update(architecture='resnet18'),
                    "architecture 'resnet18', which is a timm model but not a timm-halo HaloNet"),
    'unregistered': (lambda c: c.update(architecture='halonet_h9'), "'halonet_h9', which is not a registered"),
    'not-an-object': (lambda c: [c], 'must hold a JSON object'),
    'bad-num_classes': (lambda c: c.update(num_classes='five'), 'num_classes must be an integer >= 0'),
    'bad-model_args-value': (lambda c: c['model_args'].update(depths='abc'),
                             "Could not build halonet_h1 from config.json of local folder"),
}


@pytest.mark.parametrize('case', sorted(BAD_CONFIGS))
def test_cli_hub_inspect_refuses_bad_configs_in_one_line(saved_folder, capsys, case):
    edit, expected = BAD_CONFIGS[case]
    edit_config(saved_folder, edit)
    for extra in ([], ['--no-load']):
        if case == 'bad-model_args-value' and extra:
            continue  # only building the model finds a bad value
        assert cli_main(['hub-inspect', str(saved_folder), *extra]) == 1
        err = capsys.readouterr().err
        assert err.startswith('timm-halo hub-inspect: error: ') and err.count('\n') == 1, err
        assert expected in err and 'config.json' in err


def test_cli_hub_export_refuses_a_model_that_is_not_a_halonet(tmp_path, capsys):
    ckpt = tmp_path / 'model.safetensors'
    save_file(tiny().state_dict(), str(ckpt))
    for model, expected in (('resnet18', "unknown model 'resnet18'"), ('halonet_h9', "unknown model 'halonet_h9'")):
        with pytest.raises(SystemExit) as info:
            cli_main(['hub-export', '--model', model, '--checkpoint', str(ckpt), '--output', str(tmp_path / 'o')])
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert f'timm-halo hub-export: error: {expected}' in err and 'halonet_h0, halonet_h1' in err
    with pytest.raises(ValueError, match="unknown model 'resnet18'"):
        export_for_hub(ckpt, tmp_path / 'o', 'resnet18')
    assert not (tmp_path / 'o').exists()


@pytest.mark.parametrize('source', ['local-dir', 'hf-hub'])
def test_num_classes_disagreement_in_config_warns_through_timm(saved_folder, offline_hub, source):
    """A config.json whose top-level num_classes (10) disagrees with pretrained_cfg / model_args (5): timm builds
    a 5-class model, takes 10 as the weights' count and so discards the weights' 5-way classifier."""
    saved = load_file(str(saved_folder / 'model.safetensors'))
    edit_config(saved_folder, lambda c: c.update(num_classes=10))
    name = f'local-dir:{saved_folder}'
    if source == 'hf-hub':
        seed_hf_cache(offline_hub, 'me/disagrees', saved_folder)
        name = 'hf-hub:me/disagrees'
    with pytest.warns(UserWarning) as record:
        model = timm.create_model(name, pretrained=True)
    (msg,) = [str(w.message) for w in record if 'number of classes' in str(w.message)]
    assert 'num_classes=10, pretrained_cfg.num_classes=5, model_args.num_classes=5' in msg
    assert 'timm uses the top-level num_classes=10' in msg and 'new random 5-way one' in msg
    assert ('local folder' if source == 'local-dir' else "Hub repo 'me/disagrees'") in msg
    # what the warning is about: the head is not the saved one, everything else is
    assert model.num_classes == 5 and not torch.equal(model.head.fc.weight, saved['head.fc.weight'])
    assert torch.equal(model.stem[0].conv.weight, saved['stem.0.conv.weight'])


def test_stale_pretrained_cfg_num_classes_warns_and_the_top_level_wins(saved_folder):
    edit_config(saved_folder, lambda c: c['pretrained_cfg'].update(num_classes=1000))
    with pytest.warns(UserWarning, match=r'top-level num_classes=5 .* ignores pretrained_cfg.num_classes=1000'):
        model = timm.create_model(f'local-dir:{saved_folder}', pretrained=True)
    saved = load_file(str(saved_folder / 'model.safetensors'))
    assert model.num_classes == 5 and torch.equal(model.head.fc.weight, saved['head.fc.weight'])


def test_consistent_config_loads_without_warnings(saved_folder):
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        assert timm.create_model(f'local-dir:{saved_folder}', pretrained=True).num_classes == 5


def test_cli_hub_inspect_shows_the_num_classes_disagreement(saved_folder, capsys):
    edit_config(saved_folder, lambda c: c.update(num_classes=10))
    assert cli_main(['hub-inspect', str(saved_folder)]) == 0
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert lines and all(line.startswith(('timm-halo hub-inspect: warning: ', 'timm-halo hub-inspect: note: '))
                         for line in lines)
    assert 'num_classes=10, pretrained_cfg.num_classes=5' in lines[0]
    # timm's own save_for_hf folder: transformers cannot load it, and the note says how to fix that
    assert 'note: transformers (AutoModel, pipeline) cannot load it' in lines[-1]
    assert 'timm_halo.hub.fix_hub_config(folder)' in lines[-1]
    assert 'timm re-initialised its classifier at random' in captured.out
    assert 'num_classes   10; the model was built with 5' in captured.out


def test_classifier_that_fits_but_is_dropped_warns(tmp_path):
    """A 5-class checkpoint loaded with num_classes=5 but no num_classes in the overlay: the cfg says 1000, so
    timm drops a classifier that fits. warn_if_classifier_dropped (for checkpoint filters) says so."""
    weights = tiny(seed=8, num_classes=5).state_dict()
    model = timm.create_model('halonet_h1', num_classes=5, **TINY)  # pretrained cfg: 1000 classes
    with pytest.warns(UserWarning, match=r"classifier \(head.fc\) has 5 classes.*num_classes=1000.*num_classes=5\)"):
        warn_if_classifier_dropped(weights, model)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        warn_if_classifier_dropped(tiny(num_classes=1000).state_dict(), model)  # a new head on purpose: quiet
        warn_if_classifier_dropped(weights, timm.create_model('halonet_h1', num_classes=1000, **TINY))


def test_classifier_that_fits_but_is_dropped_warns_through_timm(tmp_path):
    ckpt = tmp_path / 'five.safetensors'
    save_file(tiny(seed=8, num_classes=5).state_dict(), str(ckpt))
    with pytest.warns(UserWarning, match=r"classifier \(head.fc\) has 5 classes"):
        timm.create_model('halonet_h1', pretrained=True, num_classes=5, pretrained_cfg_overlay=dict(file=str(ckpt)),
                          **TINY)


# ------------------------------------------------------------------------------------------------------------
# A timm train.py checkpoint's own settings, and the export loading in transformers as in timm
# ------------------------------------------------------------------------------------------------------------

LABELS3 = ['cat', 'dog', 'owl']
H0_TINY = dict(depths=[1, 1, 1, 1], widths=[16, 32, 64, 64], stem_chs=16)


def train_checkpoint(path: Path, net: torch.nn.Module, **args) -> Path:
    """What timm's train.py saves: the state dict (DDP-prefixed) with its argparse.Namespace of settings."""
    torch.save({'epoch': 9, 'arch': args.get('model'), 'version': 2,
                'state_dict': {f'module.{k}': v for k, v in net.state_dict().items()},
                'args': argparse.Namespace(**{**dict(lr=0.1, img_size=None, input_size=None, num_classes=None, gp=None,
                                                     model_kwargs={}), **args})}, path)
    return path


@pytest.fixture(scope='module')
def trained_export(tmp_path_factory):
    """A user's story: a halonet_h0 trained by train.py at 64 px on 3 classes, with --model-kwargs, exported
    with `timm-halo hub-export --model halonet_h0 --checkpoint ... --output DIR` (and --labels), no size flag."""
    root = tmp_path_factory.mktemp('trained-export')
    model = randomize(timm.create_model('halonet_h0', num_classes=3, **H0_TINY), seed=11)
    ckpt = train_checkpoint(root / 'model_best.pth.tar', model, model='halonet_h0', input_size=[3, 64, 64],
                            num_classes=3, model_kwargs=dict(H0_TINY))
    (root / 'labels.txt').write_text('\n'.join(LABELS3) + '\n')
    out = root / 'halonet_h0-tiny'
    stdout, stderr = io.StringIO(), io.StringIO()  # capsys is function-scoped
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = cli_main(['hub-export', '--model', 'halonet_h0', '--checkpoint', str(ckpt), '--output', str(out),
                       '--labels', str(root / 'labels.txt'), '--dataset', 'tiny'])
    assert rc == 0, stderr.getvalue()
    return dict(root=root, model=model, ckpt=ckpt, out=out, stdout=stdout.getvalue(), stderr=stderr.getvalue())


def test_hub_export_takes_input_size_classes_and_kwargs_from_the_training_args(trained_export):
    out, printed = trained_export['out'], trained_export['stdout']
    config = json.loads((out / 'config.json').read_text())
    assert config['pretrained_cfg']['input_size'] == [3, 64, 64] and config['pretrained_cfg']['pool_size'] == [2, 2]
    assert config['num_classes'] == 3 and config['label_names'] == LABELS3
    assert config['model_args']['depths'] == H0_TINY['depths'] and 'num_classes' not in config['model_args']
    # it says what it took, and from where; nothing disagreed
    line = next(line for line in printed.splitlines() if line.startswith("from the checkpoint's training args: "))
    assert 'input size 64 (args.input_size [3, 64, 64])' in line and '3 classes (args.num_classes' in line
    assert "model arg depths=[1, 1, 1, 1] (args.model_kwargs)" in line and 'model halonet_h0' not in line
    assert 'input size (3, 64, 64)' in printed and 'note:' not in trained_export['stderr']
    # the timm reference: the folder loads, builds the trained architecture, and gives the model's logits
    reloaded = timm.create_model(f'local-dir:{out}', pretrained=True).eval()
    assert timm.data.resolve_data_config({}, model=reloaded)['input_size'] == (3, 64, 64)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        assert torch.equal(reloaded(x), trained_export['model'](x))


def test_hub_export_card_and_files(trained_export):
    out = trained_export['out']
    readme = (out / 'README.md').read_text()
    assert '<user>' not in readme and '<repo>' not in readme
    assert '# Model card for halonet_h0-tiny' in readme and "timm.create_model('local-dir:halonet_h0-tiny'" in readme
    assert "pipeline('image-classification', model='halonet_h0-tiny')" in readme
    assert 'Image size: 64 x 64' in readme and 'Trained on tiny.' in readme
    assert 'datasets:' not in readme and '**Training data:** tiny' in readme  # free text is not a dataset id
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert sorted(modes) == ['README.md', 'config.json', 'model.safetensors']
    umask = os.umask(0o022)
    os.umask(umask)
    assert set(modes.values()) == {0o666 & ~umask}, modes  # safetensors alone wrote 0600
    assert 'hf upload <repo id>' in trained_export['stdout'] and 'your-name/halonet_h0-tiny' in trained_export['stdout']


def test_model_card_links_only_hub_dataset_ids():
    model = tiny()
    for dataset, linked, stated in (('tiny', [], 'tiny'), ('me/tiny-set', ['me/tiny-set'], None),
                                    (['ImageNet-1k', 'our photos'], ['imagenet-1k'], 'our photos'),
                                    ('not an id/at all', [], 'not an id/at all')):
        readme = timm.models._hub.generate_readme(model_card(model, repo_id=REPO, dataset=dataset), 'x')
        meta = readme.split('---')[1]
        assert re.findall(r'^- (.+)$', meta.split('datasets:')[1], re.M) == linked if linked else (
            'datasets:' not in meta), (dataset, meta)
        assert (f'**Training data:** {stated}' in readme) == bool(stated)
    card = model_card(model)  # neither repo id nor folder: the folder it sits in, no placeholder
    assert "create_model('local-dir:.'" in card['usage'] and '<' not in card['usage']


def test_hub_export_flags_override_the_training_args_with_a_note(trained_export, tmp_path, capsys):
    ckpt = trained_export['ckpt']
    out = tmp_path / 'at96'
    assert cli_main(['hub-export', '--model', 'halonet_h0', '--checkpoint', str(ckpt), '--output', str(out),
                     '--img-size', '96']) == 0
    captured = capsys.readouterr()
    assert json.loads((out / 'config.json').read_text())['pretrained_cfg']['input_size'] == [3, 96, 96]
    assert ('timm-halo hub-export: note: input size 96 (given) overrides 64 from the checkpoint\'s '
            'args.input_size [3, 64, 64]') in captured.err
    assert 'input size 64' not in captured.out and 'model arg depths' in captured.out

    # --model left out: the checkpoint names it; a model arg that differs from its model_kwargs is noted
    out = tmp_path / 'named'
    assert cli_main(['hub-export', '--checkpoint', str(ckpt), '--output', str(out), '--model-args',
                     'stem_chs=16']) == 0
    captured = capsys.readouterr()
    assert 'model halonet_h0 (args.model)' in captured.out and 'note:' not in captured.err  # the same value
    assert json.loads((out / 'config.json').read_text())['architecture'] == 'halonet_h0'

    other = train_checkpoint(tmp_path / 'other.pth.tar', trained_export['model'], model='halonet_h1',
                             img_size=80, model_kwargs=dict(H0_TINY, stem_chs=8), gp='max')
    with pytest.raises(PretrainedWeightsError, match='refusing a partial load'):  # stem_chs=8 does not fit it
        export_for_hub(other, tmp_path / 'a', 'halonet_h0')
    summary = export_for_hub(other, tmp_path / 'b', 'halonet_h0', model_args={'stem_chs': 16})
    assert summary['input_size'] == (3, 80, 80) and 'input size 80 (args.img_size)' in summary['from_checkpoint']
    assert "model arg global_pool='max' (args.gp)" in summary['from_checkpoint']  # train.py's --gp
    assert json.loads((tmp_path / 'b' / 'config.json').read_text())['model_args']['global_pool'] == 'max'
    assert summary['notes'] == [
        "model halonet_h0 (given) overrides halonet_h1 from the checkpoint's args.model",
        "model arg stem_chs=16 (given) overrides 8 from the checkpoint's args.model_kwargs"]


def test_hub_export_of_a_bare_state_dict_keeps_the_model_defaults(tmp_path, capsys):
    model = tiny(seed=13, num_classes=5)
    torch.save(model.state_dict(), tmp_path / 'bare.pth')
    out = tmp_path / 'bare'
    assert cli_main(['hub-export', '--model', 'halonet_h1', '--checkpoint', str(tmp_path / 'bare.pth'),
                     '--output', str(out), '--model-args', *MODEL_ARGS]) == 0
    captured = capsys.readouterr()
    assert "training args" not in captured.out and captured.err == ''
    assert json.loads((out / 'config.json').read_text())['pretrained_cfg']['input_size'] == [3, 256, 256]
    # without --model, a bare state dict names no model: one line, exit 1
    assert cli_main(['hub-export', '--checkpoint', str(tmp_path / 'bare.pth'), '--output', str(tmp_path / 'x')]) == 1
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and "No model name given, and the checkpoint's training args name none" in err


@pytest.mark.parametrize('args, expected', [
    (dict(model='resnet50'), "unknown model 'resnet50'; choose from halonet_h0, halonet_h1, halonet_h2, halonet_h3, "
     "halonet_h4, halonet_h5, halonet_h6, halonet_h7; taken from the checkpoint's training args: model resnet50 "
     "(args.model)"),
    (dict(model='halonet_h0', input_size=[64, 64]), 'input_size=[64, 64], not [channels, height, width]'),
    (dict(model='halonet_h0', model_kwargs=['depths']), "model_kwargs=['depths'], not a dict"),
    (dict(model='halonet_h0', model_kwargs={'depthz': [1, 1, 1, 1]}),
     "takes no --model-args / model_args depthz (did you mean depths?)"),
])
def test_hub_export_refuses_training_args_it_cannot_use(tmp_path, args, expected):
    ckpt = train_checkpoint(tmp_path / 'ckpt.pth.tar', tiny(), **args)
    with pytest.raises(ValueError) as info:
        export_for_hub(ckpt, tmp_path / 'out', None if 'model_kwargs' not in args else 'halonet_h0')
    assert expected in str(info.value)
    assert not (tmp_path / 'out').exists()


def _transformers():
    return pytest.importorskip('transformers', reason='transformers is in the test extra')


def _timm_and_transformers_agree(folder: Path, x: torch.Tensor, labels: List[str]) -> None:
    """AutoModelForImageClassification and AutoModel on ``folder`` against timm's local-dir: load of it."""
    transformers = _transformers()
    reference = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
    classifier = transformers.AutoModelForImageClassification.from_pretrained(str(folder)).eval()
    backbone = transformers.AutoModel.from_pretrained(str(folder)).eval()
    assert type(classifier.timm_model) is HaloNet
    assert classifier.config.architecture == reference.pretrained_cfg['architecture']
    with torch.no_grad():
        features = reference.forward_features(x)
        assert torch.equal(classifier(pixel_values=x).logits, reference(x))
        out = backbone(pixel_values=x)
        assert torch.equal(out.last_hidden_state, features)
        assert torch.equal(out.pooler_output, reference.forward_head(features, pre_logits=True))
    assert classifier.config.id2label == dict(enumerate(labels))
    assert classifier.config.label2id == {name: i for i, name in enumerate(labels)}


def test_transformers_loads_the_export_with_timms_logits_and_labels(trained_export, monkeypatch):
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(14))
    _timm_and_transformers_agree(trained_export['out'], x, LABELS3)


def test_transformers_pipeline_classifies_as_timm(trained_export):
    """pipeline('image-classification') with its image processor (from config.json) vs timm's own data config,
    transform and softmax, on a PIL image."""
    transformers = _transformers()
    from PIL import Image

    folder = trained_export['out']
    pixels = torch.randint(0, 256, (90, 75, 3), generator=torch.Generator().manual_seed(15), dtype=torch.uint8)
    image = Image.fromarray(pixels.numpy())
    reference = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=reference))
    with torch.no_grad():
        probs = reference(transform(image).unsqueeze(0)).softmax(-1)[0]
    classify = transformers.pipeline('image-classification', model=str(folder))
    assert classify.image_processor.data_config['input_size'] == (3, 64, 64)
    result = classify(image)
    assert [r['label'] for r in result] == [LABELS3[i] for i in probs.argsort(descending=True)]
    for r in result:
        assert r['score'] == pytest.approx(probs[LABELS3.index(r['label'])].item(), abs=1e-6)


@pytest.mark.parametrize('how', ['save_for_hf', 'push_to_hf_hub', 'timm save_for_hf + fix_hub_config'])
def test_transformers_loads_what_users_save_and_push(published, tmp_path, monkeypatch, how):
    """A user's own save / push of a HaloNet: through timm_halo.hub's save_for_hf / push_to_hf_hub (timm's, same
    arguments), or timm's own save_for_hf folder fixed afterwards."""
    model, folder = published['model'], tmp_path / 'saved'
    if how == 'save_for_hf':
        hub.save_for_hf(model, folder, model_config={'label_names': LABELS}, safe_serialization=True)
        assert sorted(os.listdir(folder)) == ['config.json', 'model.safetensors']
        assert len({stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()}) == 1
    elif how == 'push_to_hf_hub':
        folder = published['pushed_ours']
    else:
        timm.models.save_for_hf(model, str(folder), model_config={'label_names': LABELS}, safe_serialization=True)
        before = json.loads((folder / 'config.json').read_text())
        assert hub.fix_hub_config(folder) is True and hub.fix_hub_config(folder) is False  # once
        after = json.loads((folder / 'config.json').read_text())
        assert before['model_args'].pop('num_classes') == 5 and after == before
    assert 'num_classes' not in json.loads((folder / 'config.json').read_text())['model_args']
    _timm_and_transformers_agree(folder, published['x'], LABELS)


def test_save_for_hf_refuses_label_names_transformers_would_misread(tmp_path):
    model = tiny(num_classes=5)
    with pytest.raises(ValueError, match='4 label_names for a model with 5 classes'):
        hub.save_for_hf(model, tmp_path / 'a', model_config={'label_names': LABELS[:4]})
    with pytest.raises(ValueError, match='must be a list of class names, one per class'):
        hub.save_for_hf(model, tmp_path / 'b', model_config={'label_names': {0: 'cat', 3: 'dog'}})
    assert not (tmp_path / 'a').exists() and not (tmp_path / 'b').exists()
    with pytest.raises(PretrainedWeightsError, match="Could not read '.*config.json'"):
        hub.fix_hub_config(tmp_path)


def test_fix_hub_config_refuses_a_config_that_disagrees_with_itself(saved_folder):
    edit_config(saved_folder, lambda c: c.update(num_classes=10))
    with pytest.raises(PretrainedWeightsError, match='num_classes=10, pretrained_cfg.num_classes=5'):
        hub.fix_hub_config(saved_folder)


# ------------------------------------------------------------------------------------------------------------
# Older torch: no get_unsafe_globals_in_checkpoint (torch < 2.6), and errors reported as torch gives them
# ------------------------------------------------------------------------------------------------------------

def test_checkpoints_load_without_torchs_globals_lister(tmp_path, monkeypatch):
    monkeypatch.delattr(torch.serialization, 'get_unsafe_globals_in_checkpoint')
    model = tiny(seed=16, num_classes=5)
    torch.save(model.state_dict(), tmp_path / 'sd.pth')
    train_checkpoint(tmp_path / 'train.pth.tar', model, model='halonet_h1')
    x = torch.randn(1, 3, 32, 32)
    for name in ('sd.pth', 'train.pth.tar'):
        loaded = timm.create_model('halonet_h1', pretrained=True, num_classes=5, **TINY,
                                   pretrained_cfg_overlay=dict(file=str(tmp_path / name), num_classes=5)).eval()
        with torch.no_grad():
            assert torch.equal(loaded(x), model(x)), name
    evil = tmp_path / 'evil.pth'
    torch.save({'state_dict': model.state_dict(), 'payload': _RunsCode(tmp_path / 'ran')}, evil)
    with pytest.raises(PretrainedWeightsError) as info:
        read_checkpoint(evil)
    msg = str(info.value)
    assert 'posix.mkdir' in msg and all(needle in msg for needle in REFUSAL)
    assert 'refused posix.mkdir' in msg and 'Please use' not in msg  # the global, not torch's advice to allowlist
    assert not (tmp_path / 'ran').exists()


def test_unexpected_read_errors_keep_their_message(tmp_path, monkeypatch):
    path = tmp_path / 'sd.pth'
    torch.save(tiny().state_dict(), path)

    def failing_lister(_):
        raise RuntimeError('lister broke')

    monkeypatch.setattr(torch.serialization, 'get_unsafe_globals_in_checkpoint', failing_lister)
    assert checkpoint_problem(str(path)) is None  # the listing only explains; the load decides

    def failing_load(*args, **kwargs):
        raise RuntimeError('NFS went away')

    monkeypatch.setattr(torch, 'load', failing_load)
    problem = checkpoint_problem(str(path))
    assert 'RuntimeError: NFS went away' in problem and 'corrupt' not in problem
