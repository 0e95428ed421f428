"""``TransientState``: caches a lowered layer rebuilds on use (plans, bound kernels, onnxruntime sessions).

The attributes a class names in ``TRANSIENT_ATTRS`` are never pickled nor written by ``sparsifx.save``, and are
dropped whenever they could go stale: when the module moves or changes dtype (``_apply``) and when it is given a
state dict. The class reads them with ``self.__dict__.get(...)`` and rebuilds them when absent.
"""

from __future__ import annotations


class TransientState:
    TRANSIENT_ATTRS: tuple[str, ...] = ()

    def drop_transient(self) -> None:
        for key in self.TRANSIENT_ATTRS:
            self.__dict__.pop(key, None)

    def __getstate__(self):
        state = self.__dict__.copy()
        for key in self.TRANSIENT_ATTRS:
            state.pop(key, None)
        return state

    def _apply(self, fn, recurse=True):
        self.drop_transient()
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        self.drop_transient()
        return super()._load_from_state_dict(*args, **kwargs)
