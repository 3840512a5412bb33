"""Start-up bootstrap (run by ``timm_halo_autoload.pth``): load timm plugins right after ``timm`` is imported.

timm only knows models whose modules were imported. Installing timm-halo ships a ``.pth`` line that imports
this module at interpreter start-up; it adds one finder to ``sys.meta_path`` and nothing else (no torch,
no timm, no importlib.metadata). When some code imports ``timm``, the finder lets the normal machinery find
it, and once ``timm/__init__`` has run to the end it loads every entry point in the ``timm.plugins`` group
(ours registers ``halonet_*``), once. Until then it stays: lookups such as ``importlib.util.find_spec('timm')``
and imports of timm that fail do not use it up. A failing plugin leaves ``import timm`` working and produces
one warning.
Set ``TIMM_HALO_DISABLE_AUTOLOAD=1`` to turn the hook off.
"""
import _thread
import _weakref
import os
import sys

ENTRY_POINT_GROUP = 'timm.plugins'
DISABLE_ENV = 'TIMM_HALO_DISABLE_AUTOLOAD'


def load_timm_plugins() -> list:
    """Import every ``timm.plugins`` entry point once; returns the names that loaded."""
    import warnings
    from importlib.metadata import entry_points

    loaded, seen = [], set()
    for ep in entry_points(group=ENTRY_POINT_GROUP):
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


class _RunPluginsAfter:
    """Stands in for one timm loader's ``exec_module``, as an instance attribute (the loader's type is unchanged).

    Calls the loader's own ``exec_module``; if that ran the top-level ``timm`` package to completion, the hook
    finishes (plugins load). An exception propagates untouched and leaves the hook in place for a retry.
    """

    __slots__ = ('loader', 'exec_module', 'own_attr', 'hook', '__weakref__')

    def __init__(self, loader, hook):
        self.loader, self.exec_module, self.hook = loader, loader.exec_module, hook
        self.own_attr = 'exec_module' in vars(loader)  # someone else's patch, to put back as it was

    def __call__(self, module):
        self.exec_module(module)
        if getattr(module, '__name__', None) == 'timm':  # not some other module of a loader shared with timm
            self.hook.timm_imported()

    def restore(self):
        if vars(self.loader).get('exec_module') is self:
            if self.own_attr:
                self.loader.exec_module = self.exec_module
            else:
                del self.loader.exec_module  # back to the class's method

    # Loaders compare by __dict__: two probes' specs for timm still compare equal while they carry this.
    def __eq__(self, other):
        return type(other) is type(self)

    def __hash__(self):
        return hash(type(self))


class _TimmImportHook:
    """A meta path finder that stays until ``timm`` has finished importing once, then loads the plugins.

    On every lookup of ``timm`` it asks the other finders, patches the found loader's ``exec_module`` and returns
    their spec as found (same origin, search locations, loader type). So probes such as
    ``importlib.util.find_spec('timm')`` and failed imports do not use it up; it leaves ``sys.meta_path`` and
    restores every loader it patched (executed or not) only once an ``exec_module`` of ``timm`` succeeds.
    """

    def __init__(self):
        self._busy = set()  # threads inside find_spec: our own lookup must not find us again
        self._patched = []  # weak references to the _RunPluginsAfter objects handed out
        self._lock = _thread.allocate_lock()
        self._done = False

    def find_spec(self, fullname, path=None, target=None):
        if fullname != 'timm' or self._done:
            return None
        me = _thread.get_ident()
        if me in self._busy:
            return None
        self._busy.add(me)
        try:
            spec = self._find_elsewhere(fullname, path, target)
        finally:
            self._busy.discard(me)
        loader = getattr(spec, 'loader', None)
        if loader is None or not hasattr(loader, 'exec_module') or not hasattr(loader, '__dict__'):
            return spec
        if not isinstance(vars(loader).get('exec_module'), _RunPluginsAfter):  # a loader shared across lookups
            wrapper = _RunPluginsAfter(loader, self)
            loader.exec_module = wrapper
            self._patched = [ref for ref in self._patched if ref() is not None]
            self._patched.append(_weakref.ref(wrapper))
        return spec

    def _find_elsewhere(self, fullname, path, target):
        for finder in list(sys.meta_path):
            if finder is self:
                continue
            find_spec = getattr(finder, 'find_spec', None)
            spec = find_spec(fullname, path, target) if find_spec else None
            if spec is not None:
                return spec
        return None

    def timm_imported(self):
        """``timm/__init__`` ran to the end: leave, unpatch every loader handed out, load the plugins (once)."""
        with self._lock:
            if self._done:
                return
            self._done = True
            patched, self._patched = self._patched, []
        while self in sys.meta_path:
            sys.meta_path.remove(self)
        for ref in patched:
            wrapper = ref()
            if wrapper is not None:
                wrapper.restore()
        try:
            load_timm_plugins()
        except Exception as exc:  # e.g. unreadable package metadata: `import timm` must still work
            import warnings
            warnings.warn(f'timm plugins were not loaded: {exc!r}. Set {DISABLE_ENV}=1 to disable timm plugin '
                          f'autoloading.', RuntimeWarning, stacklevel=2)


def install() -> None:
    if os.environ.get(DISABLE_ENV, '').strip().lower() in ('1', 'true', 'yes', 'on'):
        return
    if 'timm' in sys.modules:  # imported before us: load now
        load_timm_plugins()
    elif not any(isinstance(f, _TimmImportHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _TimmImportHook())


install()
