"""Start-up hook (run by ``timm_halo_autoload.pth``): load the ``timm.plugins`` entry points once ``import timm``
has finished (docs/contract.md). Imports neither torch nor timm; ``TIMM_HALO_DISABLE_AUTOLOAD=1`` turns it off."""
import _thread
import _weakref
import os
import sys

ENTRY_POINT_GROUP = 'timm.plugins'
DISABLE_ENV = 'TIMM_HALO_DISABLE_AUTOLOAD'


def _warn(message: str) -> None:
    import warnings

    warnings.warn(f'{message}. Set {DISABLE_ENV}=1 to disable timm plugin autoloading.', RuntimeWarning, stacklevel=3)


def load_timm_plugins() -> list:
    """Import every ``timm.plugins`` entry point once; returns the names that loaded."""
    from importlib.metadata import entry_points

    loaded, seen = [], set()
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        # The same distribution can be visible twice (wheel + editable). A module partway through its first import
        # (`import timm_halo` imports timm, which lands here) would be a circular import, and registers itself.
        if ep.value in seen or _being_imported(ep.value.split(':')[0]):
            continue
        seen.add(ep.value)
        try:
            ep.load()
        except Exception as exc:  # a broken plugin must not break `import timm`
            _warn(f'timm plugin {ep.name!r} ({ep.value}) failed to load and was skipped: {exc!r}')
        else:
            loaded.append(ep.name)
    return loaded


def _being_imported(module: str) -> bool:
    """True if the module or one of its parent packages is partway through its first import."""
    parts = module.split('.')
    return any(getattr(getattr(sys.modules.get('.'.join(parts[:i])), '__spec__', None), '_initializing', False)
               for i in range(1, len(parts) + 1))


class _RunPluginsAfter:
    """Stands in for one timm loader's ``exec_module`` (an instance attribute): runs it, then tells the hook once
    ``timm`` ran to completion; an exception propagates and leaves the hook in place for a retry."""

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
    """A meta path finder that patches the loader of every spec the other finders give for ``timm`` (so probes and
    failed imports do not use it up) until an ``exec_module`` of ``timm`` succeeds; then it leaves, restores every
    loader it patched, and loads the plugins."""

    def __init__(self):
        self._busy = set()  # threads inside find_spec: our own lookup must not find us again
        self._patched = []  # weak references to the _RunPluginsAfter objects handed out
        self._lock = _thread.allocate_lock()
        self._done = False

    def find_spec(self, fullname, path=None, target=None):
        me = _thread.get_ident()
        if fullname != 'timm' or self._done or me in self._busy:
            return None
        self._busy.add(me)
        try:
            finders = [f for f in sys.meta_path if f is not self and hasattr(f, 'find_spec')]
            spec = next(filter(None, (f.find_spec(fullname, path, target) for f in finders)), None)
        finally:
            self._busy.discard(me)
        loader = getattr(spec, 'loader', None)
        if (hasattr(loader, 'exec_module') and hasattr(loader, '__dict__')
                and not isinstance(vars(loader).get('exec_module'), _RunPluginsAfter)):  # a loader shared by lookups
            wrapper = _RunPluginsAfter(loader, self)
            loader.exec_module = wrapper
            self._patched = [ref for ref in self._patched if ref() is not None] + [_weakref.ref(wrapper)]
        return spec

    def timm_imported(self):
        """``timm/__init__`` ran to the end: leave, unpatch every loader handed out, load the plugins (once)."""
        with self._lock:
            if self._done:
                return
            self._done = True
            patched, self._patched = self._patched, []
        while self in sys.meta_path:
            sys.meta_path.remove(self)
        for wrapper in filter(None, (ref() for ref in patched)):
            wrapper.restore()
        try:
            load_timm_plugins()
        except Exception as exc:  # e.g. unreadable package metadata: `import timm` must still work
            _warn(f'timm plugins were not loaded: {exc!r}')


def install() -> None:
    if os.environ.get(DISABLE_ENV, '').strip().lower() in ('1', 'true', 'yes', 'on'):
        return
    if 'timm' in sys.modules:  # imported before us: load now
        load_timm_plugins()
    elif not any(isinstance(f, _TimmImportHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _TimmImportHook())


install()
