"""``Report.plot`` / ``sparsifx.plot`` and ``sparsifx run/inspect --plot``: a real, non-blank image, written
atomically; clear errors without matplotlib or for an unusable path."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch
import torch.nn as nn

import sparsifx
from sparsifx.cli import main
from sparsifx.errors import ArtefactError, SparsifxError
from sparsifx.plot import PlotError, draw, plot_reports

mpimg = pytest.importorskip("matplotlib.image")


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    ).eval()


@pytest.fixture(scope="module")
def reports():
    x = torch.randn(1, 3, 16, 16)
    net = _net()
    recipe = {
        "stages": [{"pass": "magnitude", "sparsity": 0.8}, {"pass": "channel_prune", "ratio": 0.5}, {"pass": "shrink"}]
    }
    gm = sparsifx.sparsify(net, recipe, example_inputs=(x,))
    return sparsifx.report(net, (x,)), sparsifx.report(gm, (x,))


def _assert_image(path, min_width=400, min_height=300):
    image = mpimg.imread(str(path))
    height, width = image.shape[:2]
    assert width >= min_width and height >= min_height
    assert float(image[..., :3].var()) > 0  # not blank
    return image


def test_report_plot_before_and_after(reports, tmp_path):
    before, after = reports
    path = after.plot(tmp_path / "layers.png", before=before)
    assert path == tmp_path / "layers.png"
    image = _assert_image(path)
    assert image.shape[0] == 750 and image.shape[1] >= 600  # 7.5 in at 100 dpi; width grows with the layers
    assert [p.name for p in tmp_path.iterdir()] == ["layers.png"]  # no temporary file left behind


def test_figure_content(reports):
    before, after = reports
    fig = draw(after, before)
    top, bottom = fig.axes[0], fig.axes[1]
    assert [t.get_text() for t in bottom.get_xticklabels()] == [r.name for r in after.layers]
    assert "MACs" in bottom.get_ylabel() and "parameters" in top.get_ylabel()
    title = fig._suptitle.get_text()
    assert "before:" in title and "after:" in title
    # bars: (outline + filled) per report for params and for MACs
    assert len(top.patches) == len(bottom.patches) == 2 * 2 * len(after.layers)


def test_plot_without_shapes_or_before_and_other_formats(reports, tmp_path):
    bare = sparsifx.report(_net())  # no example inputs: no MACs
    assert bare.total_macs is None
    _assert_image(bare.plot(tmp_path / "bare.png"))
    svg = reports[1].plot(tmp_path / "after.svg")
    assert svg.read_text().lstrip().startswith("<?xml")


def test_many_layers_keep_the_largest(tmp_path):
    net = nn.Sequential(*[nn.Linear(4 + i, 5 + i) for i in range(12)])
    rep = sparsifx.report(net, (torch.randn(1, 4),))
    fig = draw(rep, max_layers=5)
    names = [t.get_text() for t in fig.axes[1].get_xticklabels()]
    assert names == [str(i) for i in range(7, 12)]  # the five largest, in model order
    assert "7 smaller layers not drawn" in fig._suptitle.get_text()


def test_errors(reports, tmp_path, monkeypatch):
    _, after = reports
    with pytest.raises(PlotError, match=r"suffix must be one of .*\.png"):
        after.plot(tmp_path / "layers.txt")
    with pytest.raises(ArtefactError, match="does not exist"):
        after.plot(tmp_path / "missing" / "layers.png")
    with pytest.raises(PlotError, match="max_layers"):
        after.plot(tmp_path / "x.png", max_layers=0)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # `from matplotlib.figure import ...` fails
    with pytest.raises(PlotError, match=r"pip install sparsifx\[plot\]") as info:
        after.plot(tmp_path / "layers.png")
    assert isinstance(info.value, SparsifxError)


def test_failed_draw_leaves_existing_file(reports, tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    path = tmp_path / "layers.png"
    path.write_bytes(b"old")

    def broken(self, *args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(Figure, "savefig", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        plot_reports(reports[1], path)
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["layers.png"]


# --- the command line ---------------------------------------------------------------------------------------------
@pytest.fixture()
def tiny_source(tmp_path, monkeypatch):
    (tmp_path / "plot_tiny_model.py").write_text(
        textwrap.dedent("""
        import torch.nn as nn
        def make():
            return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))
    """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("stages:\n  - pass: magnitude\n    sparsity: 0.6\n")
    return recipe


def test_cli_run_and_inspect_plot(tiny_source, tmp_path, capsys):
    png, saved = tmp_path / "run.png", tmp_path / "model.pt"
    assert (
        main(
            [
                "run",
                str(tiny_source),
                "--model",
                "python:plot_tiny_model:make",
                "--input-shape",
                "1,3,8,8",
                "--plot",
                str(png),
                "--save",
                str(saved),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert f"wrote {png}" in out
    _assert_image(png)
    png2 = tmp_path / "inspect.png"
    assert main(["inspect", str(saved), "--input-shape", "1,3,8,8", "--plot", str(png2)]) == 0
    assert f"wrote {png2}" in capsys.readouterr().out
    _assert_image(png2)


def test_cli_plot_errors_are_one_line(tiny_source, tmp_path, capsys, monkeypatch):
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"not really")
    assert main(["inspect", str(onnx), "--plot", str(tmp_path / "x.png")]) == 2
    assert "an .onnx file has no layers" in capsys.readouterr().err
    assert (
        main(
            [
                "run",
                str(tiny_source),
                "--model",
                "python:plot_tiny_model:make",
                "--input-shape",
                "1,3,8,8",
                "--plot",
                str(tmp_path / "nodir" / "x.png"),
            ]
        )
        == 2
    )
    assert "--plot: directory" in capsys.readouterr().err
    assert (
        main(["run", str(tiny_source), "--model", "python:plot_tiny_model:make", "--plot", str(tmp_path / "x.txt")])
        == 2
    )  # refused before the model is built
    assert "suffix must be one of" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    assert (
        main(
            [
                "run",
                str(tiny_source),
                "--model",
                "python:plot_tiny_model:make",
                "--input-shape",
                "1,3,8,8",
                "--plot",
                str(tmp_path / "x.png"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "pip install sparsifx[plot]" in err
