"""The analyses live in the core: ``sparsifx.analysis`` (``shapes``, ``macs`` and the ``COST_RULES`` table);
the channel-coupling analysis is ``sparsifx.passes.channels.coupling``. This package re-exports them."""
