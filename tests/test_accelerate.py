"""timm's pretrained halo models on our kernels: ``TimmHaloAttn`` and ``timm_halo.accelerate`` against timm's own
``HaloAttn`` (the reference is always timm's stock model or layer, with the same weights)."""
import copy
import hashlib
import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import timm
import torch
from timm.layers.halo_attn import HaloAttn

import timm_halo
import timm_halo.layers.fused_cpu as fused_module
import timm_halo.layers.kernels as kernels_module
from timm_halo.accelerate import ACCELERATE_ENV
from timm_halo.layers import ATTN_IMPL_ENV
from timm_halo.layers.timm_halo_attn import TimmHaloAttn

IMPLS = ['auto', 'tiled', 'sdpa', 'broadcast']

# ---- the layer ---------------------------------------------------------------------------------------------------

# HaloAttn kwargs (dim 32) covering every branch of its constructor.
LAYER_CFGS = {
    'stride1': dict(num_heads=4, block_size=4, halo_size=1),
    'stride2': dict(num_heads=4, block_size=4, halo_size=2, stride=2),
    'stride2-odd-block': dict(num_heads=2, block_size=3, halo_size=1, stride=2),  # pools after attention
    'avg_down': dict(num_heads=2, block_size=4, halo_size=1, stride=2, avg_down=True),
    'qk_ratio-scale_pos-bias': dict(num_heads=4, block_size=4, halo_size=2, qk_ratio=0.5, scale_pos_embed=True,
                                    qkv_bias=True),
    'dim_head-dim_out': dict(dim_out=48, num_heads=4, dim_head=4, block_size=4, halo_size=3),
    'halo-wider-than-block': dict(num_heads=2, block_size=2, halo_size=3, stride=2, scale_pos_embed=True),
}


def _layer_pair(cfg: dict, attn_impl: str = 'auto', dtype=torch.float64, seed: int = 0):
    """timm's layer with random weights (bias included) and ours with its state dict."""
    torch.manual_seed(seed)
    stock = HaloAttn(32, **cfg).to(dtype)
    with torch.no_grad():
        for p in stock.parameters():
            p.normal_(0, 0.5)
    ours = TimmHaloAttn(32, **cfg, attn_impl=attn_impl).to(dtype)
    ours.load_state_dict(stock.state_dict())
    return stock, ours


def _layer_input(cfg: dict, batch: int = 2, dtype=torch.float64) -> torch.Tensor:
    b = cfg['block_size']
    return torch.randn(batch, 32, 3 * b, 2 * b, dtype=dtype)  # several blocks, not square


@pytest.mark.parametrize('impl', IMPLS)
@pytest.mark.parametrize('cfg', LAYER_CFGS.values(), ids=LAYER_CFGS.keys())
def test_layer_matches_timm(cfg, impl):
    stock, ours = _layer_pair(cfg, impl)
    x = _layer_input(cfg).requires_grad_()
    expected, got = stock(x), ours(x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    grad = torch.randn_like(expected)
    expected_grads = torch.autograd.grad(expected, [x, *stock.parameters()], grad)
    got_grads = torch.autograd.grad(got, [x, *ours.parameters()], grad)
    for e, g in zip(expected_grads, got_grads):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize('impl', IMPLS)
def test_channels_last_matches_timm(impl):
    cfg = LAYER_CFGS['stride2-odd-block']
    stock, ours = _layer_pair(cfg, impl)
    stock, ours = stock.to(memory_format=torch.channels_last), ours.to(memory_format=torch.channels_last)
    x = _layer_input(cfg).contiguous(memory_format=torch.channels_last).requires_grad_()
    expected, got = stock(x), ours(x)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(torch.autograd.grad(got.sum(), x)[0], torch.autograd.grad(expected.sum(), x)[0],
                               rtol=1e-10, atol=1e-10)


def test_layer_keeps_timm_constructor_state_dict_and_isinstance():
    ours = TimmHaloAttn(64, dim_out=128, stride=2, num_heads=4, block_size=8, halo_size=3, qk_ratio=0.5)
    stock = HaloAttn(64, dim_out=128, stride=2, num_heads=4, block_size=8, halo_size=3, qk_ratio=0.5)
    assert isinstance(ours, HaloAttn)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in stock.state_dict().items()}
    assert set(ours.state_dict()) == {'q.weight', 'kv.weight', 'pos_embed.height_rel', 'pos_embed.width_rel'}
    stock.load_state_dict(ours.state_dict())  # both ways
    assert "attn_impl='auto'" in repr(ours)


def _count_tiled_calls(monkeypatch) -> list:
    """Calls of the tiled kernel, as the kernel registry makes them."""
    calls = []
    real = kernels_module.attend_tiled

    def spy(*args):
        calls.append(args[0].shape)
        return real(*args)

    monkeypatch.setattr(kernels_module, 'attend_tiled', spy)
    return calls


def test_auto_runs_the_fused_kernel_or_tiled_for_large_calls_and_broadcast_for_small(monkeypatch):
    """'auto' on CPU: the fused C kernel for every call where it builds; else tiled for calls larger than a tile
    and the whole-tensor path for the rest."""
    calls = _count_tiled_calls(monkeypatch)
    fused_calls = []
    real_fused = fused_module.attend_fused
    monkeypatch.setattr(fused_module, 'attend_fused', lambda *a: fused_calls.append(a[0].shape) or real_fused(*a))
    cfg = dict(num_heads=8, block_size=8, halo_size=3)
    stock, ours = _layer_pair(cfg)  # fp64: every kernel is exact there (fp32 kernels round in different orders)
    small = torch.randn(1, 32, 8, 8, dtype=torch.float64)  # 8 heads x 64 queries x 196 keys: one tile
    torch.testing.assert_close(ours(small), stock(small))
    large = torch.randn(2, 32, 32, 32, dtype=torch.float64)  # 16x the logits of a tile
    torch.testing.assert_close(ours(large), stock(large))
    if fused_module.preferred():
        assert (len(fused_calls), calls) == (2, [])
    else:
        assert (fused_calls, len(calls)) == ([], 1)


@pytest.mark.filterwarnings('ignore::FutureWarning')  # torch.func scripts a helper on first use
def test_forward_ad_and_torch_func_run_the_plain_path(monkeypatch):
    calls = _count_tiled_calls(monkeypatch)
    cfg = LAYER_CFGS['stride2']
    stock, ours = _layer_pair(cfg)
    x = torch.randn(4, 32, 32, 32, dtype=torch.float64)  # large enough for 'auto' to pick the tiled kernel
    tangent = torch.randn_like(x)
    expected = torch.func.jvp(stock, (x,), (tangent,))
    got = torch.func.jvp(ours, (x,), (tangent,))
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e)
    assert calls == []
    ours.attn_impl = 'tiled'  # the spy sees the kernel when it does run
    torch.testing.assert_close(ours(x), stock(x))
    assert len(calls) == 1
    ours.attn_impl = 'tiled'
    with pytest.raises(RuntimeError, match='forward-mode AD'):
        torch.func.jvp(ours, (x,), (tangent,))


@pytest.mark.filterwarnings('ignore::FutureWarning', 'ignore::torch.jit.TracerWarning')
def test_torchscript_and_tracing_give_timm_answers():
    cfg = LAYER_CFGS['qk_ratio-scale_pos-bias']
    stock, ours = _layer_pair(cfg)
    x = _layer_input(cfg)
    scripted = torch.jit.script(ours)
    torch.testing.assert_close(scripted(x), stock(x))
    traced = torch.jit.trace(ours, (x,))
    torch.testing.assert_close(traced(x), stock(x))


def test_torch_compile_gives_timm_answers():
    cfg = LAYER_CFGS['stride2']
    stock, ours = _layer_pair(cfg, dtype=torch.float32)
    x = torch.randn(2, 32, 16, 16)
    compiled = torch.compile(ours, backend='aot_eager', fullgraph=True)
    torch.testing.assert_close(compiled(x), stock(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('impl', ['tiled', 'sdpa', 'broadcast'])
def test_bf16_autocast_is_as_accurate_as_timm(impl):
    stock, ours = _layer_pair(LAYER_CFGS['stride2'], impl, dtype=torch.float32)
    x = torch.randn(4, 32, 32, 32, requires_grad=True)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        expected, got = stock(x), ours(x)
    assert got.dtype == expected.dtype == torch.bfloat16
    exact = stock(x)  # fp32: ours in bf16 is about as far from it as timm's own layer in bf16
    assert _rel_err(got.float(), exact) < 2 * _rel_err(expected.float(), exact) + 1e-3
    got.float().sum().backward()
    assert x.grad is not None and x.grad.isfinite().all()


def test_attn_impl_from_argument_and_environment(monkeypatch):
    monkeypatch.setenv(ATTN_IMPL_ENV, 'sdpa')
    assert TimmHaloAttn(32, num_heads=4, block_size=4).attn_impl == 'sdpa'
    assert TimmHaloAttn(32, num_heads=4, block_size=4, attn_impl='broadcast').attn_impl == 'broadcast'
    with pytest.raises(ValueError, match='unknown attn_impl'):
        TimmHaloAttn(32, num_heads=4, block_size=4, attn_impl='fast')
    monkeypatch.setenv(ATTN_IMPL_ENV, 'nope')
    with pytest.raises(ValueError, match=ATTN_IMPL_ENV):
        TimmHaloAttn(32, num_heads=4, block_size=4)


def test_bad_input_raises_clear_errors():
    stock, ours = _layer_pair(LAYER_CFGS['stride1'], dtype=torch.float32)
    x = torch.randn(1, 32, 8, 6)  # width not a multiple of the block size 4
    with pytest.raises(AssertionError):
        stock(x)  # timm's
    with pytest.raises(ValueError, match=r'divisible by block_size 4, got 8 x 6'):
        ours(x)
    with pytest.raises(ValueError, match='32 input channels'):
        ours(torch.randn(1, 16, 8, 8))
    with pytest.raises(ValueError, match='4-D'):
        ours(torch.randn(32, 8, 8))


# ---- accelerate() --------------------------------------------------------------------------------------------------

def test_accelerate_swaps_in_place_and_reports_the_count(caplog):
    model = timm.create_model('halonet26t')
    layers = [m for m in model.modules() if isinstance(m, HaloAttn)]
    params_before = {name: p for name, p in model.named_parameters()}
    keys_before = list(model.state_dict())
    fired = []
    layers[0].register_forward_hook(lambda *_: fired.append(True))
    with caplog.at_level(logging.INFO, logger='timm_halo.accelerate'):
        assert timm_halo.accelerate(model) is model
    assert '3 HaloAttn layer(s) of halonet26t.a1h_in1k (ByobNet) now run on timm-halo kernels' in caplog.text
    assert model.timm_halo_accelerated == 3  # what a script that does not configure logging reads
    assert [type(m) for m in layers] == [TimmHaloAttn] * 3
    assert [m for m in model.modules() if isinstance(m, HaloAttn)] == layers  # the same objects
    assert list(model.state_dict()) == keys_before
    assert all(p is params_before[name] for name, p in model.named_parameters())
    model.eval()
    with torch.no_grad():
        model(torch.randn(1, 3, 256, 256))
    assert fired == [True]  # hooks kept
    timm.create_model('halonet26t').load_state_dict(model.state_dict())  # a stock model loads its checkpoint

    caplog.clear()
    with caplog.at_level(logging.INFO, logger='timm_halo.accelerate'):
        timm_halo.accelerate(model, attn_impl='sdpa')
    assert '0 HaloAttn layer(s) of halonet26t.a1h_in1k (ByobNet) now run on timm-halo kernels (3 already did)' in (
        caplog.text)
    assert {m.attn_impl for m in layers} == {'sdpa'} and model.timm_halo_accelerated == 3


def test_accelerate_warns_when_there_is_nothing_to_accelerate():
    with pytest.warns(UserWarning, match=r'halonet_h1\.untrained \(HaloNet\) has no timm HaloAttn layer'):
        model = timm_halo.accelerate(timm.create_model('halonet_h1', device='meta'))
    assert model.timm_halo_accelerated == 0


def test_accelerate_leaves_other_modules_and_subclasses_alone(monkeypatch):
    class MyHalo(HaloAttn):
        pass

    model = torch.nn.Sequential(torch.nn.Conv2d(32, 32, 1), MyHalo(32, num_heads=4, block_size=4),
                                HaloAttn(32, num_heads=4, block_size=4))
    monkeypatch.setenv(ATTN_IMPL_ENV, 'broadcast')
    timm_halo.accelerate(model)
    assert [type(m) for m in model] == [torch.nn.Conv2d, MyHalo, TimmHaloAttn]
    assert model[2].attn_impl == 'broadcast'
    layer = HaloAttn(32, num_heads=4, block_size=4)
    assert type(timm_halo.accelerate(layer)) is TimmHaloAttn  # a bare layer too
    with pytest.raises(TypeError, match='nn.Module'):
        timm_halo.accelerate('halonet26t')


# ---- timm's seven pretrained halo models -----------------------------------------------------------------------------

# (model, input size, create_model kwargs, train-mode check): the native resolution, and one other size timm
# accepts. The models with a halo stage at stride 32 need multiples of 256 (224 for block 7); the *bot* models fix
# their BottleneckAttn size at construction (img_size), so they take a smaller one. Eval logits are compared at
# both sizes; the float64 train step (gradients, BatchNorm statistics), which costs several times a forward, at
# the smaller one, where each model still has halo layers on maps of several blocks (the larger size adds blocks,
# not branches: gradients on non-square multi-block maps are test_layer_matches_timm's, for every constructor
# branch of timm's layer).
MODEL_CASES = [
    ('halonet26t', (256, 256), {}, True),
    ('halonet26t', (256, 512), {}, False),
    ('sehalonet33ts', (256, 256), {}, True),
    ('sehalonet33ts', (512, 256), {}, False),
    ('halonet50ts', (256, 256), {}, True),
    ('halonet50ts', (256, 512), {}, False),
    ('eca_halonext26ts', (256, 256), {}, True),
    ('eca_halonext26ts', (256, 512), {}, False),
    ('haloregnetz_b', (224, 224), {}, True),
    ('haloregnetz_b', (224, 448), {}, False),
    ('lamhalobotnet50ts_256', (256, 256), {}, False),
    ('lamhalobotnet50ts_256', (128, 256), {'img_size': (128, 256)}, True),
    ('halo2botnet50ts_256', (256, 256), {}, False),
    ('halo2botnet50ts_256', (128, 128), {'img_size': 128}, True),
]


def randomize_norms(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random BatchNorm statistics and affine parameters, and noise in any other parameter the init left all-zero,
    so that no branch of the network is silenced.

    The gammas timm initialises to zero (the last BN of each residual branch) get small values: with gammas near 1
    there the residual stream grows by orders of magnitude through the network, the attention logits saturate,
    and timm's own fp32 logits differ from its float64 ones by up to 3%, too much for any comparison to mean
    anything. With small ones, every branch still shows in the logits and fp32 stays accurate to about 1e-6."""
    g = torch.Generator().manual_seed(seed)

    def uniform(t, lo, hi):
        t.copy_(torch.rand(t.shape, generator=g) * (hi - lo) + lo)

    with torch.no_grad():
        for bn in model.modules():
            if isinstance(bn, torch.nn.modules.batchnorm._BatchNorm):
                uniform(bn.weight, *((0.5, 1.5) if bn.weight.any() else (0.1, 0.3)))
                bn.bias.copy_(torch.randn(bn.bias.shape, generator=g) * 0.1)
                bn.running_mean.copy_(torch.randn(bn.running_mean.shape, generator=g) * 0.5)
                uniform(bn.running_var, 0.5, 1.5)
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model


def _rel_err(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


@pytest.mark.heavy
@pytest.mark.parametrize('name,size,kwargs,train', MODEL_CASES,
                         ids=[f'{n}-{h}x{w}{"-train" if t else ""}' for n, (h, w), _, t in MODEL_CASES])
def test_model_matches_timm(name, size, kwargs, train):
    torch.manual_seed(0)
    stock = randomize_norms(timm.create_model(name, **kwargs))
    num_layers = sum(type(m) is HaloAttn for m in stock.modules())
    fast = timm_halo.accelerate(copy.deepcopy(stock))
    assert sum(type(m) is TimmHaloAttn for m in fast.modules()) == num_layers > 0
    assert list(fast.state_dict()) == list(stock.state_dict())

    # Eval logits in fp32, the dtype these models run in.
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        expected, got = stock.eval()(x), fast.eval()(x)
    assert _rel_err(got, expected) < 1e-5
    if not train:
        return

    # Train-mode gradients in float64: in fp32, timm's own gradients differ from its float64 ones by up to 1e-4
    # (more with one sample, where train-mode BatchNorm nearly cancels SE gates), so an fp32 comparison would test
    # rounding, not the maths. A few parameters have gradients that are zero in exact arithmetic (a BN bias just
    # before another train-mode BN): they are compared against the largest gradient of the model instead.
    stock, fast, x = stock.double().train(), fast.double().train(), x.double()
    weights = torch.randn(expected.shape, dtype=torch.float64)
    (stock(x) * weights).sum().backward()
    (fast(x) * weights).sum().backward()
    floor = 1e-8 * max(p.grad.abs().max() for p in stock.parameters())
    fast_params = dict(fast.named_parameters())
    for pname, p in stock.named_parameters():
        err = ((fast_params[pname].grad - p.grad).abs().max() / p.grad.abs().max().clamp_min(floor)).item()
        assert err < 1e-4, f'{pname}: {err:.2e}'
    fast_buffers = dict(fast.named_buffers())
    for bname, b in stock.named_buffers():  # BatchNorm statistics of the train step
        if b.is_floating_point():
            assert _rel_err(fast_buffers[bname], b) < 1e-4, bname


def test_model_sizes_timm_rejects_are_value_errors():
    stock = timm.create_model('halonet26t').eval()
    fast = timm_halo.accelerate(copy.deepcopy(stock))
    x = torch.randn(1, 3, 224, 224)  # 14x14 at the halo stages: not a multiple of the block size 8
    with torch.no_grad():
        with pytest.raises(AssertionError):
            stock(x)
        with pytest.raises(ValueError, match='divisible by block_size 8, got 14 x 14'):
            fast(x)


# ---- unmodified timm scripts: the environment variable, and pretrained weights from the Hub cache ---------------

def test_environment_variable_patches_timm_factory_only_when_set(monkeypatch):
    from timm.layers import get_attn

    from timm_halo.accelerate import _honour_env

    factory_module = sys.modules['timm.layers.create_attn']
    monkeypatch.setattr(factory_module, 'HaloAttn', HaloAttn)  # restored after the test, as are:
    monkeypatch.setattr(timm, 'create_model', timm.create_model)
    monkeypatch.setattr(timm.models, 'create_model', timm.models.create_model)
    for value in ('', '0', 'off'):
        monkeypatch.setenv(ACCELERATE_ENV, value)
        _honour_env()
        assert get_attn('halo') is HaloAttn
    monkeypatch.setenv(ACCELERATE_ENV, 'maybe')
    with pytest.warns(RuntimeWarning, match='not understood'):
        _honour_env()
    assert get_attn('halo') is HaloAttn
    assert not hasattr(timm.create_model, '__wrapped_by_timm_halo__')
    monkeypatch.setenv(ACCELERATE_ENV, '1')
    _honour_env()
    _honour_env()  # once is enough: create_model is wrapped once
    assert get_attn('halo') is TimmHaloAttn
    assert timm.create_model.__wrapped__ is timm.models._factory.create_model
    model = timm.create_model('halonet26t', device='meta')
    layer = model.stages[2][1].self_attn
    assert type(layer) is TimmHaloAttn and layer.attn_impl == 'auto' and model.timm_halo_accelerated == 3


def _child_env(**env) -> dict:
    """This environment for a child interpreter, with the plugin autoload on and ``env`` as given."""
    child_env = {k: v for k, v in os.environ.items() if k not in (ACCELERATE_ENV, 'TIMM_HALO_DISABLE_AUTOLOAD')}
    return {**child_env, **env}


def _run_child(code: str, tmp_path: Path, **env) -> str:
    result = subprocess.run([sys.executable, '-c', textwrap.dedent(code)], capture_output=True, text=True,
                            cwd=tmp_path, env=_child_env(**env), timeout=600)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.heavy
def test_environment_variable_says_so_in_timms_train_script(tmp_path):
    """What train.py does (``from timm import utils``, which loads the plugin; ``utils.setup_default_logging()``,
    INFO on the console; ``from timm.models import create_model``): one line names the model and the count, and
    models without halo layers say nothing."""
    code = '''
        from timm import utils
        utils.setup_default_logging()
        from timm.models import create_model
        model = create_model('halonet26t', device='meta')
        create_model('resnet18', device='meta')
        print('attribute', model.timm_halo_accelerated)
    '''
    result = subprocess.run([sys.executable, '-c', textwrap.dedent(code)], capture_output=True, text=True,
                            cwd=tmp_path, env=_child_env(**{ACCELERATE_ENV: '1'}), timeout=300)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if 'timm_halo' in line]
    assert lines == ['timm_halo: 3 HaloAttn layer(s) of halonet26t.a1h_in1k (ByobNet) run on timm-halo kernels '
                     f'({ACCELERATE_ENV}=1)'], result.stderr
    assert 'attribute 3' in result.stdout


def _seed_hf_cache(cache: Path, repo_id: str, folder: Path) -> None:
    """The files of ``folder`` as revision ``main`` of ``repo_id`` in huggingface_hub's cache layout: blobs named
    by their etag (sha256 for LFS files, git blob sha1 otherwise), snapshots/<commit>/<name> symlinks, refs/main."""
    repo = cache / ('models--' + repo_id.replace('/', '--'))
    (repo / 'blobs').mkdir(parents=True)
    (repo / 'refs').mkdir()
    files = {}
    for f in sorted(folder.iterdir()):
        data = f.read_bytes()
        lfs = f.suffix == '.safetensors'
        files[f.name] = hashlib.sha256(data).hexdigest() if lfs else hashlib.sha1(
            b'blob %d\0' % len(data) + data).hexdigest()
        (repo / 'blobs' / files[f.name]).write_bytes(data)
    commit = hashlib.sha1(json.dumps(files, sort_keys=True).encode()).hexdigest()
    snapshot = repo / 'snapshots' / commit
    snapshot.mkdir(parents=True)
    for fname, etag in files.items():
        (snapshot / fname).symlink_to(Path('..', '..', 'blobs', etag))
    (repo / 'refs' / 'main').write_text(commit)


# An unmodified timm script run with TIMM_HALO_ACCELERATE=1: it imports timm only (the plugin autoload imports
# timm_halo, which reads the variable).
HUB_CHILD = '''
    import torch, timm
    from timm.layers import get_attn
    from timm.layers.halo_attn import HaloAttn
    x = torch.load('input.pt')
    model = timm.create_model('halonet26t.a1h_in1k', pretrained=True).eval()
    types = sorted({type(m).__name__ for m in model.modules() if isinstance(m, HaloAttn)})
    h1_types = sorted({type(m).__name__ for m in timm.create_model('halonet_h1', device='meta').modules()
                       if type(m).__name__.endswith(('Attn', 'Attention'))})
    with torch.no_grad():
        logits = model(x)
    torch.save(dict(types=types, h1_types=h1_types, factory=get_attn('halo').__name__, logits=logits), 'out.pt')
'''


def _offline_hub(monkeypatch, hf_home: Path) -> dict:
    """HF_HUB_OFFLINE and a cache at ``hf_home``: the environment for children, huggingface_hub's constants (read
    at import, looked up at call time) for this process."""
    from huggingface_hub import constants

    env = dict(HF_HOME=str(hf_home), HF_HUB_CACHE=str(hf_home / 'hub'), HF_HUB_OFFLINE='1')
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setattr(constants, 'HF_HUB_CACHE', env['HF_HUB_CACHE'])
    return env


@pytest.mark.heavy
def test_pretrained_from_offline_hub_cache(tmp_path, monkeypatch):
    """A hand-made Hugging Face cache holding timm/halonet26t.a1h_in1k (timm's own files, random values):
    timm.create_model(..., pretrained=True) loads it with timm's own layers, accelerate gives the stock logits, a
    fine-tuning step matches the stock one. With TIMM_HALO_ACCELERATE=1, an unmodified timm script (a fresh
    interpreter) builds the accelerated model directly, with the same logits. (That timm's own layers are the
    default in an unmodified script too: test_autoload.py's probe.)"""
    torch.manual_seed(0)
    reference = randomize_norms(timm.create_model('halonet26t')).eval()
    with torch.no_grad():  # random weights everywhere, nothing like timm's init
        for p in reference.parameters():
            p.mul_(1.0 + 0.1 * torch.randn(p.shape))
    export = tmp_path / 'export'
    timm.models.save_for_hf(reference, export, safe_serialization=True)
    assert sorted(f.name for f in export.iterdir()) == ['config.json', 'model.safetensors']
    hf_home = tmp_path / 'hf-home'
    _seed_hf_cache(hf_home / 'hub', 'timm/halonet26t.a1h_in1k', export)
    x = torch.randn(1, 3, 256, 256)
    torch.save(x, tmp_path / 'input.pt')
    with torch.no_grad():
        expected = reference(x)
    env = _offline_hub(monkeypatch, hf_home)

    # Without the variable (as in this process, where timm's factory is kept stock), timm's own layers.
    monkeypatch.setattr(sys.modules['timm.layers.create_attn'], 'HaloAttn', HaloAttn)
    model = timm.create_model('halonet26t.a1h_in1k', pretrained=True).eval()
    assert {type(m) for m in model.modules() if isinstance(m, HaloAttn)} == {HaloAttn}
    with torch.no_grad():
        assert _rel_err(model(x), expected) < 1e-5
        timm_halo.accelerate(model)
        assert _rel_err(model(x), expected) < 1e-5

    # A fine-tuning step, stock vs accelerated: layer-wise lr decay, no weight decay on 1-d parameters (timm's
    # no_weight_decay rules). In float64: a step of this random network at batch 1 (train-mode BN) turns fp32
    # rounding anywhere into differences of up to 1e-3 (timm's own step moves by 5e-4 when its input moves by 1e-6),
    # so two fp32 kernels cannot be compared closely; in float64 they agree to about 1e-12.
    from timm.optim import create_optimizer_v2
    stock = timm.create_model('halonet26t')
    stock.load_state_dict(model.state_dict())
    stepped = []
    for net in (stock, model):
        net.double().train()
        opt = create_optimizer_v2(net, 'sgd', lr=0.1, weight_decay=0.05, layer_decay=0.75, momentum=0.9)
        groups = sorted((g['lr_scale'], g['weight_decay'], len(g['params'])) for g in opt.param_groups)
        loss = torch.nn.functional.cross_entropy(net(x.double()), torch.tensor([3]))
        loss.backward()
        opt.step()
        opt.zero_grad()
        stepped.append((groups, loss.detach(), {k: v.detach().clone() for k, v in net.state_dict().items()}))
    (groups, loss, after), (fast_groups, fast_loss, fast_after) = stepped
    assert fast_groups == groups and len(groups) > 2  # layer-decay groups, with and without weight decay
    torch.testing.assert_close(fast_loss, loss, rtol=1e-10, atol=1e-12)
    assert list(fast_after) == list(after)
    for key in after:
        if after[key].is_floating_point():
            assert _rel_err(fast_after[key], after[key]) < 1e-9, key

    # With TIMM_HALO_ACCELERATE=1, in a fresh interpreter: the variable is read when timm_halo is imported.
    _run_child(HUB_CHILD, tmp_path, **env, **{ACCELERATE_ENV: '1'})
    out = torch.load(tmp_path / 'out.pt')
    assert out['types'] == ['TimmHaloAttn'] and out['factory'] == 'TimmHaloAttn'
    assert out['h1_types'] == ['HaloAttention']  # our halonet_h1 either way
    assert _rel_err(out['logits'], expected) < 1e-5
