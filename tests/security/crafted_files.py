"""Hostile save files: each builder turns a good payload into one attack that would touch ``canary`` if run.

``ROUTES`` maps a route name to ``builder(payload, canary) -> payload | bytes``. Shell code uses no dots, since
fx splits module paths on dots before pasting them. Used by tests/security and benchmarks/save_file_fuzz.py.
"""

from __future__ import annotations

import copy
import functools
import io
import pickle
import zipfile
from typing import Any, Callable

import torch
import torch.nn as nn

import sparsifx
from sparsifx.serialization import to_payload


class Probe(nn.Module):
    """Linear + a buffer + a keyword call + getattr: every record kind a route needs."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.register_buffer("scale", torch.ones(4))

    def forward(self, x):
        return torch.relu(self.lin(x)).softmax(dim=-1) * self.scale + x.shape[0]


@functools.lru_cache(maxsize=1)
def _pristine() -> dict:
    torch.manual_seed(0)
    return to_payload(sparsifx.trace(Probe()))


def base_payload() -> dict:
    return copy.deepcopy(_pristine())


def _shell(canary: str) -> str:
    return f"getattr(__import__('os'), 'system')('touch {canary}')"


def _node(p: dict, name: str) -> dict:
    return next(r for r in p["graph"] if r["name"] == name)


def _ref(name: str) -> dict:
    return {"$": "node", "v": name}


def _call(name: str, target: str, *args: Any, op: str = "call_function", **kwargs: Any) -> dict:
    return {
        "op": op,
        "name": name,
        "target": target,
        "args": {"$": "tuple", "v": list(args)},
        "kwargs": {"$": "dict", "v": [[k, v] for k, v in kwargs.items()]},
    }


def _insert_before_output(p: dict, *records: dict, result: str) -> dict:
    out = p["graph"].pop()
    p["graph"].extend(records)
    out["args"] = {"$": "tuple", "v": [_ref(result)]}
    p["graph"].append(out)
    return p


def placeholder_target(p, canary):  # pasted into `def forward(self, <target>)`: runs at load time
    rec = _node(p, "x")
    rec["target"] = f"x={_shell(canary)}"
    return p


def _rename_owned(p, canary, old, table):
    evil = f'{old}") if {_shell(canary)} else getattr(self, "{old}'  # the condition runs first
    for rec in p["graph"]:
        if rec["target"] == old and rec["op"] in ("call_module", "get_attr"):
            rec["target"] = evil
    p[table][evil] = p[table].pop(old)
    return p


def call_module_target(p, canary):
    return _rename_owned(p, canary, "lin", "modules")


def get_attr_target(p, canary):
    return _rename_owned(p, canary, "scale", "attrs")


def kwargs_key(p, canary):  # pasted as `softmax(<key> = -1)`
    _node(p, "softmax")["kwargs"]["v"] = [[f"dim={_shell(canary)} and -1 or -1, _x", -1]]
    return p


def operator_attrgetter_chain(p, canary):  # x.__class__.__deepcopy__.__globals__['__builtins__']['exec'](...)
    code = f"import os; os.system('touch {canary}')"
    return _insert_before_output(
        p,
        _call("ag", "operator.attrgetter", "__class__.__deepcopy__.__globals__"),
        _call("glb", "operator.call", _ref("ag"), _ref("x")),
        _call("bi", "operator.getitem", _ref("glb"), "__builtins__"),
        _call("ex", "operator.getitem", _ref("bi"), "exec"),
        _call("run", "operator.call", _ref("ex"), code),
        result="add",
    )


def operator_methodcaller(p, canary):
    return _insert_before_output(
        p,
        _call("mc", "operator.methodcaller", "__reduce_ex__", 2),
        _call("red", "operator.call", _ref("mc"), _ref("x")),
        result="add",
    )


def builtins_getattr_dunder(p, canary):
    return _insert_before_output(p, _call("cls", "builtins.getattr", _ref("x"), "__class__"), result="add")


def builtins_getattr_method(p, canary):  # a bound method is a callable value
    return _insert_before_output(p, _call("hook", "builtins.getattr", _ref("x"), "register_hook"), result="add")


def builtins_getattr_grad_fn(p, canary):
    return _insert_before_output(p, _call("gf", "builtins.getattr", _ref("x"), "grad_fn"), result="add")


def max_with_key(p, canary):
    return _insert_before_output(p, _call("m", "builtins.max", [1, 2], key=_ref("x")), result="add")


def _function(target):
    def build(p, canary):
        _node(p, "relu")["target"] = target
        return p

    build.__name__ = f"function_{target}"
    return build


def _method(target):
    def build(p, canary):
        _node(p, "softmax")["target"] = target
        return p

    build.__name__ = f"method_{target}"
    return build


def module_class(p, canary):
    p["modules"]["lin"]["class"] = "subprocess.Popen"
    return p


def module_attr_shadows_method(p, canary):
    p["modules"]["lin"]["attrs"]["forward"] = "x"
    return p


def module_attr_dunder(p, canary):
    p["modules"]["lin"]["attrs"]["__class__"] = "x"
    return p


def module_attr_bookkeeping(p, canary):
    p["modules"]["lin"]["attrs"]["_forward_hooks"] = {"$": "dict", "v": []}
    return p


def child_key(p, canary):
    p["modules"]["lin"]["children"][f'a"); {_shell(canary)}; ("'.replace(".", "")] = copy.deepcopy(
        p["modules"]["lin"] | {"children": {}}
    )
    return p


def parameter_key(p, canary):
    params = p["modules"]["lin"]["params"]
    params["__dict__"] = params.pop("bias")
    return p


def node_name(p, canary):
    rec = _node(p, "relu")
    rec["name"] = f"relu = {_shell(canary)}; r"
    _node(p, "softmax")["args"]["v"][0]["v"] = rec["name"]
    return p


def class_name(p, canary):
    p["class_name"] = f"M({_shell(canary)})"
    return p


def output_target(p, canary):
    p["graph"][-1]["target"] = _shell(canary)
    return p


def pickle_reduce(p, canary) -> bytes:  # a classic pickle payload inside a torch.save archive
    class Evil:
        def __reduce__(self):
            import os

            return os.system, (f"touch {canary}",)

    buf = io.BytesIO()
    torch.save({"format": "sparsifx.graphmodule", "evil": Evil()}, buf, pickle_protocol=2)
    return buf.getvalue()


def legacy_pickle(p, canary) -> bytes:
    class Evil:
        def __reduce__(self):
            import os

            return os.system, (f"touch {canary}",)

    return pickle.dumps(Evil())


def zip_bomb(p, canary) -> bytes:
    raw = _bytes(p)
    buf = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(raw)) as src, zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
        dst.writestr(f"{src.namelist()[0].split('/')[0]}/data/99", b"\0" * (64 << 20))
    return buf.getvalue()


def nesting_bomb(p, canary):
    value: Any = 0
    for _ in range(400):  # torch.save's pickler recurses: deeper cannot be written this way
        value = [value]
    _node(p, "softmax")["kwargs"]["v"] = [["dim", value]]
    return p


def sharing_bomb(p, canary):  # 2**60 values after expansion, a few hundred bytes in the pickle
    value: Any = [0]
    for _ in range(60):
        value = [value, value]
    p["meta"]["bomb"] = value
    return p


def unknown_tag(p, canary):
    _node(p, "softmax")["kwargs"]["v"] = [["dim", {"$": "object", "v": "os.system"}]]
    return p


def getattr_path_dunder(p, canary):
    for rec in p["graph"]:
        if rec["op"] == "get_attr":
            rec["target"] = "lin.__class__.__init__"
    return p


ROUTES: dict[str, Callable[[dict, str], Any]] = {
    f.__name__: f
    for f in (
        placeholder_target,
        call_module_target,
        get_attr_target,
        kwargs_key,
        operator_attrgetter_chain,
        operator_methodcaller,
        builtins_getattr_dunder,
        builtins_getattr_method,
        builtins_getattr_grad_fn,
        max_with_key,
        module_class,
        module_attr_shadows_method,
        module_attr_dunder,
        module_attr_bookkeeping,
        child_key,
        parameter_key,
        node_name,
        class_name,
        output_target,
        pickle_reduce,
        legacy_pickle,
        zip_bomb,
        nesting_bomb,
        sharing_bomb,
        unknown_tag,
        getattr_path_dunder,
        _function("builtins.eval"),
        _function("os.system"),
        _function("torch.load"),
        _function("importlib.import_module"),
        _function("torch.Tensor.register_hook"),
        _function("torch.nn.functional.triplet_margin_with_distance_loss"),
        _function("operator.call"),
        _function("torch.hub.load"),
        _function("torch._dynamo.optimize"),
        _method("__call__"),
        _method("__reduce_ex__"),
        _method("register_hook"),
        _method("apply_"),
    )
}

# The four routes the issue reports as running code on the unhardened loader, plus the load-time one.
REPORTED_ROUTES = (
    "placeholder_target",
    "call_module_target",
    "get_attr_target",
    "kwargs_key",
    "operator_attrgetter_chain",
)


def _bytes(payload: dict) -> bytes:
    buf = io.BytesIO()
    torch.save(payload, buf)
    return buf.getvalue()


def crafted_file(route: str, path, canary: str) -> None:
    """Write the file of ``route`` to ``path``."""
    made = ROUTES[route](base_payload(), canary)
    path.write_bytes(made if isinstance(made, bytes) else _bytes(made))
