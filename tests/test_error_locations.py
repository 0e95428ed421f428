"""Every typed error lives in sparsifx.errors; the modules that raise them re-export the same classes."""

import sparsifx.cli
import sparsifx.errors as errors
import sparsifx.serialization


def test_cli_and_serialization_errors_live_in_errors_and_are_re_exported():
    for name, module in (("CliError", sparsifx.cli), ("SerializationError", sparsifx.serialization)):
        cls = getattr(errors, name)
        assert cls.__module__ == "sparsifx.errors" and issubclass(cls, errors.SparsifxError)
        assert getattr(module, name) is cls  # old imports keep working
