"""Test-process settings and fixtures shared by several test files (one copy per pytest-xdist worker)."""
import json
import os

import pytest

# The suite runs one pytest-xdist worker per core (pyproject's addopts), each with torch's intra-op threads, plus
# child interpreters: more threads than cores. OpenMP threads that spin-wait at a barrier while another process
# holds the core burn it for nothing; passive waiting keeps the same code paths and thread counts (measured on
# 2 cores, test_accelerate.py on 2 workers: 112 s -> 43 s). libgomp reads it once, when torch is first imported,
# which is after this file; children inherit it. A value set by the caller wins.
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')

# Fixtures that build something expensive (a wheel in a fresh venv, a pushed model loaded back in a fresh
# interpreter, an ONNX export, the family's GMACs): under `--dist loadgroup` every test using one runs on the same
# worker, so each is built once, and no worker waits for another's (family_summary). The marker must be there
# before pytest-xdist's own collection hook turns it into the group (a suffix of the node id), hence tryfirst:
# without it, each worker built the module-scoped ones again.
SHARED_FIXTURES = ('wheel_venv', 'published', 'static_layer', 'cli_export', 'family_summary')


def pytest_generate_tests(metafunc):
    """A test that takes ``kernel`` runs once per kernel of the registry (timm_halo.layers.kernels.KERNELS), so a new
    kernel is held to every such test; 'fused' is skipped where its C kernel cannot be built."""
    if 'kernel' in metafunc.fixturenames:
        from timm_halo.layers import ATTN_IMPLS, fused_cpu

        no_c_kernel = pytest.mark.skipif(not fused_cpu.available(), reason='no C kernel here')
        metafunc.parametrize('kernel', [pytest.param(name, marks=[no_c_kernel] if name == 'fused' else [])
                                        for name in ATTN_IMPLS])


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
    for item in items:
        for name in SHARED_FIXTURES:
            if name in item.fixturenames:
                item.add_marker(pytest.mark.xdist_group(name))
    # pytest-xdist hands tests out in this order (after the groups): the heavy ones (seconds each: a child
    # interpreter, a compile, an export) first, so that the run ends on short tests, not one worker alone with a
    # long one while the others idle. Otherwise the order stays the files'.
    items.sort(key=lambda item: item.get_closest_marker('heavy') is None)


@pytest.fixture(scope='session')
def family_summary(tmp_path_factory) -> dict:
    """``timm_halo.bench.summarize`` of every family member at its own input size (params and GMACs, measured),
    once per run. Its users run on one worker (SHARED_FIXTURES); should they not (another --dist mode), the first
    worker to need it leaves it in the run's temp folder for the others (pytest-xdist's recipe; without xdist that
    folder's parent outlives the run, so it is not used)."""
    from filelock import FileLock

    from timm_halo.bench import summarize
    from timm_halo.models.halonet import FAMILY

    if 'PYTEST_XDIST_WORKER' not in os.environ:
        return {name: summarize(name) for name in FAMILY}
    path = tmp_path_factory.getbasetemp().parent / 'family_summary.json'
    with FileLock(f'{path}.lock'):
        if not path.is_file():
            path.write_text(json.dumps({name: summarize(name) for name in FAMILY}))
        return json.loads(path.read_text())
