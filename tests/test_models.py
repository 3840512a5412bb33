"""HaloNet H0-H7 through timm's factory and model API (mirrors the checks of timm's own tests/test_models.py)."""
import pytest
import timm
import torch
from timm.models import byoanet, get_pretrained_cfg, group_parameters
from timm.models.byobnet import ByobNet
from timm.optim import create_optimizer_v2

from timm_halo.models import HaloNet
from timm_halo.models.halonet import FAMILY

NAMES = [f'halonet_h{i}' for i in range(8)]
# Small versions of each paper model (their b, h, rv, rb; one block per stage) for real forward/backward.
SMALL = dict(depths=(1, 1, 1, 1))
# Smaller still, for the feature-level tests: narrow stages and 4x4 blocks.
TINY = dict(depths=(1, 1, 1, 1), widths=(16, 32, 64, 64), stem_chs=16, block_size=4)


def _small(name: str, **kwargs) -> HaloNet:
    return timm.create_model(name, **{**SMALL, **kwargs})


def _tiny(name: str, seed: int = 0, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(name, **{**TINY, **kwargs}).eval()


def test_family_is_registered():
    """(That timm.create_model builds each as a HaloNet: test_default_cfg_contract_at_full_size.)"""
    assert timm.list_models('halonet_h*') == NAMES
    assert list(FAMILY) == NAMES
    for name in NAMES:
        assert timm.is_model(name)


def test_only_halonet_h1_is_replaced():
    """timm's own halo models stay timm's (that registering is quiet, in a fresh interpreter: test_autoload)."""
    assert type(timm.create_model('halonet_h1', device='meta')) is HaloNet
    assert isinstance(timm.create_model('halonet26t', device='meta'), ByobNet)
    assert isinstance(byoanet.halonet_h1(device='meta'), ByobNet)
    listed = timm.list_models('*halo*')
    assert set(NAMES) <= set(listed) and 'halonet26t' in listed and 'halonet50ts' in listed


@pytest.mark.parametrize('name', NAMES)
def test_params_match_paper_table(name, family_summary):
    """README claims every paper parameter count within 0.3%."""
    summary = family_summary[name]
    assert abs(summary['params_m'] / FAMILY[name]['params_m'] - 1) < 0.003, summary
    assert summary['gmacs'] > 0


@pytest.mark.parametrize('name', NAMES)
def test_default_cfg_contract_at_full_size(name):
    """timm's test_model_default_cfgs, run on the meta device so H7 at 600px costs nothing."""
    model = timm.create_model(name, device='meta')
    assert isinstance(model, HaloNet)
    cfg = model.pretrained_cfg
    expected_size = {0: 256, 1: 256, 2: 256, 3: 320, 4: 384, 5: 448, 6: 512, 7: 600}[int(name[-1])]
    assert cfg['input_size'] == (3, expected_size, expected_size) and model.in_chans == 3
    assert cfg['tag'] == 'untrained' and get_pretrained_cfg(name).architecture == name
    assert cfg['mean'] == timm.data.IMAGENET_DEFAULT_MEAN and cfg['std'] == timm.data.IMAGENET_DEFAULT_STD
    modules = dict(model.named_modules())
    assert modules[cfg['first_conv']].in_channels == 3
    assert modules[cfg['classifier']].out_features == cfg['num_classes'] == 1000

    x = torch.empty(2, *cfg['input_size'], device='meta')
    feat = model.forward_features(x)
    assert feat.shape == (2, model.num_features, *cfg['pool_size'])
    assert model.forward_head(feat, pre_logits=True).shape == (2, model.num_features)
    assert model(x).shape == (2, 1000)
    model.reset_classifier(0)  # the head after a reset: forward(x) is forward_head(forward_features(x))
    assert model.forward_head(feat).shape == (2, model.num_features)
    model.reset_classifier(0, '')
    assert model.forward_head(feat).shape == feat.shape
    model.to(dtype=torch.float64)
    model.reset_classifier(3)
    assert model.get_classifier().weight.dtype == torch.float64 and model.get_classifier().weight.is_meta


def test_real_forward_halonet_h0_full_size():
    model = timm.create_model('halonet_h0').eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 256, 256))
    assert out.shape == (1, 1000) and torch.isfinite(out).all()


@pytest.mark.parametrize('name', NAMES)
def test_forward_backward_every_variant(name):
    """Every parameter of every variant's block design receives a gradient (timm's test_model_backward)."""
    torch.manual_seed(0)
    model = _small(name, num_classes=7).train()
    out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 7)
    out.mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_any_input_size():
    model = _small('halonet_h1', num_classes=5).eval()
    with torch.no_grad():
        for size in [(64, 64), (70, 90), (33, 47)]:
            assert model(torch.randn(1, 3, *size)).shape == (1, 5)
            assert model.forward_features(torch.randn(1, 3, *size)).shape[-2:] == tuple(-(-s // 32) for s in size)


@pytest.mark.parametrize('name', ['halonet_h0', 'halonet_h3'])
def test_features_only(name):
    torch.manual_seed(0)
    model = _small(name, features_only=True).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        feats = model(x)
    assert len(feats) == 5 and model.feature_info.out_indices == (0, 1, 2, 3, 4)
    assert [f.shape[1] for f in feats] == model.feature_info.channels()

    torch.manual_seed(0)
    partial = _small(name, features_only=True, out_indices=(2, 4)).eval()
    with torch.no_grad():
        picked = partial(x)
    torch.testing.assert_close(picked, [feats[2], feats[4]])
    assert partial.feature_info.channels() == [model.feature_info.channels()[i] for i in (2, 4)]


# -- feature levels follow timm's convention: level 0 is the stem (reduction 2), levels 1-4 the stages.
# Compared against timm's own models rather than constants. timm's ByobNet halonet_h1 needs H and W divisible
# by 8 blocks at stride 32, so it runs on the meta device at 256 px (shapes only).

def test_feature_levels_match_timm_halonet_h1_and_resnet():
    ours = timm.create_model('halonet_h1', features_only=True, device='meta')
    theirs = byoanet.halonet_h1(features_only=True, device='meta')
    resnet = timm.create_model('resnet50', features_only=True, device='meta')
    assert ours.feature_info.out_indices == theirs.feature_info.out_indices == resnet.feature_info.out_indices
    # the same architecture (rb = 1, df = 0) as timm's reference: the same widths at every level
    assert ours.feature_info.channels() == theirs.feature_info.channels()
    # the stem level is the stem conv + BN + ReLU before the max pool, as ByobNet's stem.conv1 / ResNet's act1
    assert ours.feature_info.module_name()[0] == 'stem.0'
    assert theirs.feature_info.module_name()[0] == 'stem.conv1'
    unwrapped = timm.create_model('halonet_h1', device='meta')
    assert len(unwrapped.feature_info) == len(byoanet.halonet_h1(device='meta').feature_info) == 5


@pytest.mark.parametrize('out_indices', [(0, 1, 2, 3, 4), (2, 3, 4), (1, 2, 3), (0, 4), (-1,), 3])
def test_out_indices_give_the_strides_of_timm_halonet_h1(out_indices):
    size = 256
    ours = _tiny('halonet_h1', features_only=True, out_indices=out_indices)
    theirs = byoanet.halonet_h1(features_only=True, out_indices=out_indices, device='meta')
    with torch.no_grad():
        got = [f.shape[-2:] for f in ours(torch.randn(1, 3, size, size))]
    expected = [f.shape[-2:] for f in theirs(torch.empty(1, 3, size, size, device='meta'))]
    assert got == expected
    assert ours.feature_info.reduction() == theirs.feature_info.reduction() == [size // h for h, _ in got]


@pytest.mark.parametrize('name, kwargs, channels, last_module', [
    # level 0: stem_chs; level i: round(widths[i - 1] * out_ratio); the last: num_features when df > 0
    ('halonet_h0', {}, [16, 8, 16, 32, 32], 'stages.3'),  # rb = 0.5
    ('halonet_h1', {}, [16, 16, 32, 64, 64], 'stages.3'),  # rb = 1
    ('halonet_h3', {}, [16, 24, 48, 96, 1024], 'final_conv'),  # rb = 1.5, df = 1024
    ('halonet_h1', dict(num_features=40, out_ratio=2.0), [16, 32, 64, 128, 40], 'final_conv'),
])
def test_channels_per_level(name, kwargs, channels, last_module):
    model = _tiny(name, features_only=True, **kwargs)
    assert model.feature_info.channels() == channels
    with torch.no_grad():
        assert [f.shape[1] for f in model(torch.randn(1, 3, 32, 32))] == channels
    plain = _tiny(name, **kwargs)
    assert [info['num_chs'] for info in plain.feature_info] == channels
    assert plain.feature_info[0] == dict(num_chs=16, reduction=2, module='stem.0')
    assert plain.feature_info[-1]['module'] == last_module


@pytest.mark.parametrize('indices', [None, (0,), (0, 2), (1, 2, 3), (2, 3, 4), (-2, -1), 2, 5])
def test_forward_intermediates_and_features_only_take_the_same_levels(indices):
    x = torch.randn(1, 3, 48, 40)
    model = _tiny('halonet_h3')
    kwargs = {} if indices is None else dict(out_indices=indices)
    features = _tiny('halonet_h3', features_only=True, **kwargs)  # same seed: same weights
    getter = _tiny('halonet_h3', features_only=True, feature_cls='getter', **kwargs)  # timm's pruning wrapper
    with torch.no_grad():
        inters = model.forward_intermediates(x, indices=indices, intermediates_only=True)
        early = model.forward_intermediates(x, indices=indices, intermediates_only=True, stop_early=True)
        for maps in (features(x), getter(x), early):
            assert len(maps) == len(inters)
            for a, b in zip(maps, inters):
                torch.testing.assert_close(a, b)
    assert features.feature_info.reduction() == getter.feature_info.reduction()
    assert [t.shape[1] for t in inters] == features.feature_info.channels() == getter.feature_info.channels()


@pytest.mark.parametrize('indices, kept_stages', [([0], 0), ([0, 1], 1), ([1, 3], 3), (2, 4), ([4], 4)])
def test_prune_intermediate_layers(indices, kept_stages):
    x = torch.randn(1, 3, 64, 64)
    model = _tiny('halonet_h3')
    with torch.no_grad():
        full = model.forward_intermediates(x, intermediates_only=True)
        kept = model.prune_intermediate_layers(indices)
        assert len(model.stages) == kept_stages
        assert kept == ([3, 4] if indices == 2 else list(indices))
        pruned = model.forward_intermediates(x, indices=indices, intermediates_only=True)
        for a, b in zip(pruned, [full[i] for i in kept]):
            torch.testing.assert_close(a, b)
        # no classifier and no pooling: forward ends at the last kept level
        out = model(x)
    torch.testing.assert_close(out, full[max(kept)])
    assert model.num_features == full[max(kept)].shape[1]
    assert (model.stem[1].__class__ is torch.nn.Identity) == (kept_stages == 0)  # the max pool follows level 0


def test_feature_levels_leave_the_state_dict_layout_alone():
    model = _tiny('halonet_h3')
    prefixes = {k.split('.')[0] for k in model.state_dict()}
    assert prefixes == {'stem', 'stages', 'final_conv', 'head'}
    assert 'stem.0.conv.weight' in model.state_dict() and 'stages.0.blocks.0.conv1.conv.weight' in model.state_dict()


def test_fx_feature_extraction():
    """timm's torch.fx feature path treats HaloAttention as a leaf and gives the same maps."""
    torch.manual_seed(0)
    hooks = _small('halonet_h1', features_only=True).eval()
    torch.manual_seed(0)
    fx = _small('halonet_h1', features_only=True, feature_cls='fx').eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(list(fx(x)), hooks(x))


def test_forward_intermediates_agree_with_features_and_forward():
    torch.manual_seed(0)
    model = _small('halonet_h3').eval()  # has a final 1x1 conv (df)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        final, inters = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x))
        assert [t.shape[1] for t in inters] == [info['num_chs'] for info in model.feature_info]
        last2 = model.forward_intermediates(x, indices=2, intermediates_only=True)
        assert len(last2) == 2
        torch.testing.assert_close(last2[-1], inters[-1])
        early = model.forward_intermediates(x, indices=[1], stop_early=True, intermediates_only=True)
        torch.testing.assert_close(early[0], inters[1])
        torch.manual_seed(0)  # same seed, same init: the feature wrapper holds the same weights
        features = timm.create_model('halonet_h3', features_only=True, **SMALL).eval()
        for a, b in zip(features(x), inters):
            torch.testing.assert_close(a, b)
        with pytest.raises(ValueError, match='NCHW'):
            model.forward_intermediates(x, output_fmt='NHWC')

        kept = model.prune_intermediate_layers(indices=[0, 1, 2])
        assert kept == [0, 1, 2] and len(model.stages) == 2  # level 0 is the stem, level i stage i
        pruned = model.forward_intermediates(x, intermediates_only=True, indices=[0, 1, 2])
        for a, b in zip(pruned, inters[:3]):
            torch.testing.assert_close(a, b)
        # as timm's models do after pruning: no classifier, no pooling, forward ends at the last kept stage
        torch.testing.assert_close(model(x), inters[2])


def test_classifier_options():
    x = torch.randn(2, 3, 64, 64)
    model = _small('halonet_h0', num_classes=0).eval()
    assert model(x).shape == (2, model.num_features)
    model.reset_classifier(11, 'max')
    assert model(x).shape == (2, 11)
    assert model.get_classifier().out_features == 11
    catpool = _small('halonet_h0', num_classes=3, global_pool='catavgmax').eval()
    assert catpool(x).shape == (2, 3)
    gray = _small('halonet_h0', in_chans=1, num_classes=4).eval()
    assert gray(torch.randn(2, 1, 64, 64)).shape == (2, 4)


def test_drop_rate_and_drop_path():
    torch.manual_seed(0)
    model = _small('halonet_h0', drop_rate=0.5, drop_path_rate=0.3, depths=(2, 2, 2, 2))
    rates = [m.drop_prob for m in model.modules() if m.__class__.__name__ == 'DropPath']
    assert len(rates) == 7 and rates == sorted(rates) and rates[-1] == pytest.approx(0.3)
    assert model.head.drop.p == 0.5
    x = torch.randn(2, 3, 64, 64)
    model.train()
    assert not torch.equal(model(x), model(x))
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


def test_group_matcher_and_layer_decay_cover_every_parameter():
    model = _small('halonet_h3')
    for coarse in (True, False):
        groups = group_parameters(model, model.group_matcher(coarse=coarse))
        grouped = {n for names in groups.values() for n in names}
        assert grouped == {n for n, _ in model.named_parameters()}
    optimizer = create_optimizer_v2(model, 'adamw', lr=1e-3, weight_decay=0.05, layer_decay=0.75)
    assert sum(len(g['params']) for g in optimizer.param_groups) == len(list(model.parameters()))


def test_relative_tables_are_excluded_from_weight_decay():
    model = _small('halonet_h1')
    nwd = model.no_weight_decay()
    assert nwd and all(n.endswith(('rel_pos_h', 'rel_pos_w')) for n in nwd)
    optimizer = create_optimizer_v2(model, 'sgd', lr=0.1, weight_decay=1e-4)
    no_decay = {id(p) for g in optimizer.param_groups if g['weight_decay'] == 0 for p in g['params']}
    params = dict(model.named_parameters())
    assert all(id(params[n]) in no_decay for n in nwd)
    assert id(params['stages.0.blocks.0.attn.q.weight']) not in no_decay


def test_grad_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    model = _small('halonet_h1', depths=(2, 1, 2, 1)).eval()
    x = torch.randn(2, 3, 64, 64)
    model(x).sum().backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, plain[n], rtol=1e-4, atol=1e-6, msg=n)


def test_torchscript_model():
    model = _small('halonet_h2', num_classes=10).eval()
    scripted = torch.jit.script(model)
    x = torch.randn(1, 3, 64, 48)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x), rtol=1e-5, atol=1e-5)


def test_stem_runs_channels_last_on_cpu_and_hands_back_the_inputs_layout():
    """The stem's conv and max pool run NHWC on CPU (a faster max pool); maps leave it in the input's layout."""
    model = _small('halonet_h0', num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    seen = []
    model.stem[1].register_forward_hook(lambda m, args, out: seen.append(args[0]))
    with torch.no_grad():
        stem = model.stem[1](model.stem[0](x))  # the plain NCHW stem, module by module
        for inp in (x, x.contiguous(memory_format=torch.channels_last)):
            cl = inp.is_contiguous(memory_format=torch.channels_last)
            pooled, feature = model._stem_forward(inp, keep_feature=True)
            assert seen[-1].is_contiguous(memory_format=torch.channels_last)  # the pool ran NHWC
            assert pooled.is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
            assert feature.is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
            torch.testing.assert_close(pooled, stem, rtol=1e-5, atol=1e-5)
            level0 = model.forward_intermediates(inp, indices=[0], intermediates_only=True)[0]
            assert level0.stride() == feature.stride()
            torch.testing.assert_close(level0, model.stem[0](x), rtol=1e-5, atol=1e-5)


def test_channels_last_and_bf16_autocast():
    model = _small('halonet_h0', num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        cl = model.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
        torch.testing.assert_close(cl, ref, rtol=1e-4, atol=1e-4)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            amp = model(x)
    assert torch.isfinite(amp).all()
    torch.testing.assert_close(amp.float(), ref, rtol=0, atol=0.15 * ref.abs().max().item())

