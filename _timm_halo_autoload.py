"""Start-up bootstrap (run by ``timm_halo_autoload.pth``): load timm plugins right after ``timm`` is imported.

timm only knows models whose modules were imported. Installing timm-halo ships a ``.pth`` line that imports
this module at interpreter start-up; it adds one finder to ``sys.meta_path`` and nothing else (no torch,
no timm, no importlib.metadata). When some code imports ``timm``, the finder lets the normal machinery find
it, and once ``timm/__init__`` has run it loads every entry point in the ``timm.plugins`` group (ours
registers ``halonet_*``). A failing plugin leaves ``import timm`` working and produces one warning.
Set ``TIMM_HALO_DISABLE_AUTOLOAD=1`` to turn the hook off.
"""
import os
import sys

ENTRY_POINT_GROUP = 'timm.plugins'
DISABLE_ENV = 'TIMM_HALO_DISABLE_AUTOLOAD'


def load_timm_plugins() -> list:
    """Import every ``timm.plugins`` entry point once; returns the names that loaded."""
    import warnings
    from importlib.metadata import entry_points

    eps = entry_points()
    group = eps.select(group=ENTRY_POINT_GROUP) if hasattr(eps, 'select') else eps.get(ENTRY_POINT_GROUP, [])
    loaded, seen = [], set()
    for ep in group:
        if ep.value in seen:  # the same distribution can be visible twice (e.g. wheel + editable)
            continue
        seen.add(ep.value)
        if _being_imported(ep.value.split(':')[0]):
            # `import timm_halo` imports timm, which lands here mid-way through timm_halo's own import:
            # loading the entry point now would be a circular import, and that import registers it anyway.
            continue
        try:
            ep.load()
        except Exception as exc:  # a broken plugin must not break `import timm`
            warnings.warn(
                f'timm plugin {ep.name!r} ({ep.value}) failed to load and was skipped: {exc!r}. '
                f'Set {DISABLE_ENV}=1 to disable timm plugin autoloading.',
                RuntimeWarning, stacklevel=2)
        else:
            loaded.append(ep.name)
    return loaded


def _being_imported(module: str) -> bool:
    """True if the module or one of its parent packages is partway through its first import."""
    parts = module.split('.')
    for i in range(1, len(parts) + 1):
        spec = getattr(sys.modules.get('.'.join(parts[:i])), '__spec__', None)
        if getattr(spec, '_initializing', False):
            return True
    return False


class _TimmImportHook:
    """A one-shot meta path finder: wraps timm's loader so plugins load after ``timm`` finishes importing."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != 'timm':
            return None
        sys.meta_path.remove(self)  # one shot; also keeps the lookup below from finding us again
        for finder in sys.meta_path:
            find_spec = getattr(finder, 'find_spec', None)
            spec = find_spec(fullname, path, target) if find_spec else None
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, 'exec_module'):
            return spec
        exec_timm = loader.exec_module

        def exec_module(module):
            exec_timm(module)
            load_timm_plugins()

        loader.exec_module = exec_module  # patch this loader instance only; its type stays as it was
        return spec


def install() -> None:
    if os.environ.get(DISABLE_ENV, '').strip().lower() in ('1', 'true', 'yes', 'on'):
        return
    if 'timm' in sys.modules:  # imported before us: load now
        load_timm_plugins()
    elif not any(isinstance(f, _TimmImportHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _TimmImportHook())


install()
