"""Every crafted save file is refused with SerializationError before anything of it runs (canary stays absent)."""

from __future__ import annotations

import pytest
import torch
from crafted_files import REPORTED_ROUTES, ROUTES, Probe, base_payload, crafted_file

from sparsifx import cli
from sparsifx.errors import SparsifxError
from sparsifx.serialization import LoadLimits, SerializationError, from_payload, load


@pytest.mark.parametrize("route", sorted(ROUTES))
def test_crafted_file_refused_without_running_code(route, tmp_path):
    canary = tmp_path / "canary"
    path = tmp_path / f"{route}.sfx"
    crafted_file(route, path, str(canary))
    with pytest.raises(SerializationError):
        gm = load(path)
        gm(torch.randn(2, 4))  # not reached: if it were, the payload would run here
    assert not canary.exists()


@pytest.mark.parametrize("route", sorted(ROUTES))
def test_inspect_exits_non_zero_with_one_line(route, tmp_path, capsys):
    canary = tmp_path / "canary"
    path = tmp_path / f"{route}.sfx"
    crafted_file(route, path, str(canary))
    code = cli.main(["inspect", str(path), "--input-shape", "2,4"])
    err = capsys.readouterr().err
    assert code != 0
    assert len(err.strip().splitlines()) == 1 and err.startswith("sparsifx: error:")
    assert not canary.exists()


def test_reported_routes_are_covered():
    assert set(REPORTED_ROUTES) <= set(ROUTES)
    assert len(ROUTES) - len(REPORTED_ROUTES) >= 10


def test_good_file_still_loads_and_runs(tmp_path):
    import sparsifx
    from sparsifx.serialization import save

    model = Probe().eval()
    gm = sparsifx.trace(model)
    save(gm, tmp_path / "good.sfx")
    x = torch.randn(2, 4)
    torch.testing.assert_close(load(tmp_path / "good.sfx")(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("bad", [None, 3, b"bytes", ["a"]])
def test_load_of_a_non_path_is_typed(bad):
    with pytest.raises(SerializationError):
        load(bad)


def test_missing_truncated_and_empty_files(tmp_path):
    with pytest.raises(SerializationError):
        load(tmp_path / "missing.sfx")
    (tmp_path / "empty.sfx").write_bytes(b"")
    with pytest.raises(SerializationError):
        load(tmp_path / "empty.sfx")
    import io

    buf = io.BytesIO()
    torch.save(base_payload(), buf)
    raw = buf.getvalue()
    for cut in (10, len(raw) // 3, len(raw) - 30):
        (tmp_path / "cut.sfx").write_bytes(raw[:cut])
        with pytest.raises(SerializationError):
            load(tmp_path / "cut.sfx")


def test_limits_are_enforced_before_building(tmp_path):
    payload = base_payload()
    with pytest.raises(SerializationError, match="nodes"):
        from_payload(payload, LoadLimits(max_nodes=3))
    with pytest.raises(SerializationError, match="submodules"):
        from_payload(base_payload(), LoadLimits(max_modules=0))
    with pytest.raises(SerializationError, match="values"):
        from_payload(base_payload(), LoadLimits(max_values=5))
    torch.save(base_payload(), tmp_path / "f.sfx")
    with pytest.raises(SerializationError, match="bytes"):
        load(tmp_path / "f.sfx", limits=LoadLimits(max_file_bytes=100))


@pytest.mark.parametrize(
    "mutate",
    [
        lambda p: p.pop("graph"),
        lambda p: p.update(graph={"a": 1}),
        lambda p: p["graph"].append("node"),
        lambda p: p["graph"].insert(0, p["graph"][-1]),  # output first
        lambda p: p["graph"][1].update(args=[1, 2]),
        lambda p: p["graph"][1].update(name=7),
        lambda p: p["graph"][1]["args"]["v"].append({"$": "node", "v": "nowhere"}),
        lambda p: p["modules"]["lin"].update(params={"weight": {"key": 5}}),
        lambda p: p["modules"]["lin"].update(attrs=[]),
        lambda p: p["tensors"].clear(),
        lambda p: p.update(meta={"k": {"$": "size", "v": [-1]}}),
        lambda p: p.update(version=2),
        lambda p: p.update(class_name=None),
    ],
)
def test_structural_mutations_are_typed(mutate):
    payload = base_payload()
    mutate(payload)
    with pytest.raises(SerializationError):
        from_payload(payload)
    assert issubclass(SerializationError, SparsifxError)


def test_unsupported_zip_version_is_typed(tmp_path):
    """Found by benchmarks/save_file_fuzz.py: zipfile raised NotImplementedError ('zip file version 6.4')."""
    import io

    buf = io.BytesIO()
    torch.save(base_payload(), buf)
    raw = bytearray(buf.getvalue())
    at = raw.find(b"PK\x01\x02")
    raw[at + 6] = 64  # central directory: version needed to extract
    (tmp_path / "v64.sfx").write_bytes(bytes(raw))
    with pytest.raises(SerializationError):
        load(tmp_path / "v64.sfx")
