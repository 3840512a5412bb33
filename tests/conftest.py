"""Fixtures shared by several test files (one copy per pytest-xdist worker)."""
import pytest

from timm_halo.bench import summarize
from timm_halo.models.halonet import FAMILY


@pytest.fixture(scope='session')
def family_summary() -> dict:
    """``timm_halo.bench.summarize`` of every family member at its own input size (params and GMACs, measured)."""
    return {name: summarize(name) for name in FAMILY}


# Module-scoped fixtures that build something expensive (a wheel in a fresh venv, a pushed model loaded back in a
# fresh interpreter): under pytest-xdist (`--dist loadgroup`, pyproject's addopts) every test using one runs on the
# same worker, so that each is built once.
SHARED_FIXTURES = ('wheel_venv', 'published')


def pytest_collection_modifyitems(items):
    for item in items:
        for name in SHARED_FIXTURES:
            if name in item.fixturenames:
                item.add_marker(pytest.mark.xdist_group(name))
