"""Guards of a traced graph: the globals, closure cells, module state and constant tensors it baked in.

A traced graph freezes everything the traced run read from outside its arguments: the
value of a global flag (the branch taken), a closed-over Python number, the identity of a
global tensor, a module's parameters and ``training`` flag. :func:`build_guard` walks
the function the way its calls can be seen statically (code objects and the globals they
load, closure cells, nested functions, ``functools.partial``, bound methods,
``nn.Module`` state and the methods of user-defined module classes) and compiles one
straight-line check of all of them; a replay is used only while it returns True.
"""

from __future__ import annotations

import builtins
import dis
import functools
import os
import sysconfig
import types
from typing import Any, Callable

import torch

_MISSING = object()
_VALUE_TYPES = (int, float, bool, str, complex, type(None))
_MAX_OBJECTS = 2000  # objects walked per trace (a bound on pathological object graphs)
_MAX_ITEMS = 64  # items of a container whose tensors / callables are followed

_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep
_PKG_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
_STDLIB_DIR = os.path.abspath(sysconfig.get_paths()["stdlib"]) + os.sep


def _is_library_file(fname: str) -> bool:
    """torch, pyfunctorch and the standard library: not rebound by user code, so their
    globals and cells are not guarded (their closures are still followed)."""
    return (fname.startswith((_TORCH_DIR, _PKG_DIR)) or
            (fname.startswith(_STDLIB_DIR) and "site-packages" not in fname) or fname.startswith("<frozen"))


@functools.lru_cache(maxsize=4096)
def _code_names(code: types.CodeType) -> tuple:
    """(global names loaded, attribute names read) by ``code`` and the code objects nested in it."""
    globs: set = set()
    attrs: set = set()
    stack = [code]
    while stack:
        c = stack.pop()
        for ins in dis.get_instructions(c):
            if ins.opname in ("LOAD_GLOBAL", "LOAD_NAME"):
                globs.add(ins.argval)
            elif ins.opname in ("LOAD_ATTR", "LOAD_METHOD"):
                attrs.add(ins.argval)
        stack.extend(k for k in c.co_consts if isinstance(k, types.CodeType))
    return frozenset(globs), frozenset(attrs)


class _Collector:
    """Walks a function and records guard specs ``(holder, how, key)``: the value at
    ``holder.cell_contents`` (how='cell') or ``holder.get(key)`` (how='dict')."""

    def __init__(self):
        self.specs: list = []
        self.spec_keys: set = set()
        self.seen: set = set()
        self.tensors: dict = {}  # id -> tensor whose version is guarded
        self.identity_only: set = set()  # ids of module parameters / buffers (identity, no version)
        self.budget = _MAX_OBJECTS

    # -- recording ------------------------------------------------------------------
    def _spec(self, holder, how: str, key: Any, value: Any) -> None:
        k = (id(holder), how, key)
        if k in self.spec_keys:
            return
        self.spec_keys.add(k)
        self.specs.append((holder, how, key, value))

    def _dict_entry(self, d: dict, name: str) -> None:
        value = d.get(name, _MISSING)
        self._spec(d, "dict", name, value)
        if value is not _MISSING:
            self.value(value)

    # -- walking --------------------------------------------------------------------
    def value(self, v: Any) -> None:
        """Follow a value the traced run may have read (its own binding is guarded already)."""
        if isinstance(v, torch.Tensor):
            if type(v) is not torch.nn.Parameter:
                self.tensors.setdefault(id(v), v)
            return
        if isinstance(v, _VALUE_TYPES) or isinstance(v, type):
            return
        if id(v) in self.seen or self.budget <= 0:
            return
        self.seen.add(id(v))
        self.budget -= 1
        try:
            self._follow(v)
        except Exception:  # noqa: BLE001 - an exotic object (a failing __getattr__ ...): not followed
            pass

    def _follow(self, v: Any) -> None:
        if isinstance(v, torch.nn.Module):
            self.module(v)
        elif isinstance(v, types.FunctionType):
            self.function(v)
        elif isinstance(v, functools.partial):
            self.value(v.func)
            for a in v.args:
                self.value(a)
            for a in (v.keywords or {}).values():
                self.value(a)
        elif isinstance(v, types.MethodType):
            self.value(v.__self__)
            self.value(v.__func__)
        elif isinstance(v, (tuple, list)) and len(v) <= _MAX_ITEMS:
            for a in v:
                self.value(a)
        elif isinstance(v, dict) and len(v) <= _MAX_ITEMS:
            for a in v.values():
                self.value(a)
        elif isinstance(v, types.ModuleType):
            pass  # attributes read through a module: see function()
        elif callable(v) and isinstance(getattr(type(v), "__call__", None), types.FunctionType):
            self.value(type(v).__call__)  # a callable object: its __call__ (attributes are not guarded)
            wrapped = getattr(v, "__dict__", {}).get("__wrapped__")
            if wrapped is not None:  # e.g. another pyfunctorch.compile'd function: what it wraps
                self.value(wrapped)

    def function(self, fn: types.FunctionType) -> None:
        code = fn.__code__
        library = _is_library_file(code.co_filename)
        for cell in fn.__closure__ or ():
            if library:
                try:
                    self.value(cell.cell_contents)
                except ValueError:  # an empty cell
                    pass
                continue
            try:
                contents = cell.cell_contents
            except ValueError:
                contents = _MISSING
            self._spec(cell, "cell", None, contents)
            if contents is not _MISSING:
                self.value(contents)
        for d in (fn.__defaults__ or ()):
            self.value(d)
        for d in (fn.__kwdefaults__ or {}).values():
            self.value(d)
        wrapped = getattr(fn, "__wrapped__", None)
        if wrapped is not None:
            self.value(wrapped)
        if library:
            return
        glb = fn.__globals__
        names, attrs = _code_names(code)
        for name in names:
            if name in glb:
                self._dict_entry(glb, name)
                mod = glb[name]
                if isinstance(mod, types.ModuleType) and not _is_library_file(getattr(mod, "__file__", None) or "<"):
                    # `config.scale` of a user module: guard the attributes this code reads
                    md = vars(mod)
                    for a in attrs:
                        if a in md:
                            self._dict_entry(md, a)

    def module(self, root: torch.nn.Module) -> None:
        for m in root.modules():
            d = m.__dict__
            self._spec(d, "dict", "training", d.get("training", _MISSING))
            for store in ("_parameters", "_buffers", "_modules"):
                sd = d.get(store)
                if not sd:
                    continue
                for name, t in sd.items():
                    self._spec(sd, "dict", name, t)
                    if isinstance(t, torch.Tensor):
                        self.identity_only.add(id(t))
            for name, v in d.items():
                if name.startswith("_") or name == "training":
                    continue
                if isinstance(v, _VALUE_TYPES) or isinstance(v, torch.Tensor):
                    self._spec(d, "dict", name, v)  # hyper-parameters (p, eps, ...), plain tensor attributes
                    self.value(v)
            cls = type(m)
            for klass in cls.__mro__:
                mod = getattr(klass, "__module__", "") or ""
                if klass is torch.nn.Module or mod.startswith("torch."):
                    break
                for attr in vars(klass).values():
                    if isinstance(attr, (types.FunctionType, staticmethod, classmethod)):
                        self.value(getattr(attr, "__func__", attr))


def build_guard(fn: Callable, gm: torch.fx.GraphModule | None, arguments: tuple = ()) -> tuple:
    """``(check, refresh, n_guards)`` for a function traced into ``gm`` (``arguments``: the
    non-tensor arguments of the call, e.g. a module passed in, whose state the graph may
    also have baked in; they are part of the signature by identity/value): ``check()`` is
    True while every value the trace may have baked in is unchanged; ``refresh()`` (or
    None) re-reads the versions of guarded tensors that the graph itself updates in
    place, after each replay. ``check`` is None when there is nothing to guard."""
    col = _Collector()
    col.value(fn)
    for a in arguments:
        col.value(a)
    mutating = False
    if gm is not None:
        for node in gm.graph.nodes:
            if node.op == "get_attr":
                obj = gm
                for part in node.target.split("."):
                    obj = getattr(obj, part, None)
                if isinstance(obj, torch.Tensor) and type(obj) is not torch.nn.Parameter:
                    col.tensors.setdefault(id(obj), obj)  # a constant reached some other way
            elif node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
                mutating = mutating or node.target._schema.is_mutable
    tensors = [t for i, t in col.tensors.items() if i not in col.identity_only]
    return _compile_check(col.specs, tensors, mutating)


def _compile_check(specs: list, tensors: list, mutating: bool) -> tuple:
    if not specs and not tensors:
        return None, None, 0
    ns: dict = {"_M": _MISSING}
    lines = ["def check():", "    try:"]
    for i, (holder, how, key, value) in enumerate(specs):
        ns[f"_h{i}"] = holder
        ns[f"_e{i}"] = value
        read = f"_h{i}.cell_contents" if how == "cell" else f"_h{i}.get({key!r}, _M)"
        if type(value) in _VALUE_TYPES and value is not None and type(value) is not bool:
            # numbers and strings by value (a rebound 3.0 is another object); NaN by identity
            ns[f"_t{i}"] = type(value)
            lines.append(f"        x = {read}")
            lines.append(f"        if x is not _e{i} and (type(x) is not _t{i} or x != _e{i}): return False")
        else:
            lines.append(f"        if {read} is not _e{i}: return False")
    versions = [t._version for t in tensors]
    ns["_v"] = versions
    for j, t in enumerate(tensors):
        ns[f"_T{j}"] = t
        lines.append(f"        if _T{j}._version != _v[{j}]: return False")
    lines += ["    except ValueError:", "        return False  # an emptied closure cell", "    return True"]
    if tensors and mutating:
        lines.append("def refresh():")
        lines += [f"    _v[{j}] = _T{j}._version" for j in range(len(tensors))]
    src = "\n".join(lines) + "\n"
    exec(builtins.compile(src, "<pyfunctorch.compile guards>", "exec"), ns)  # noqa: S102
    check = ns["check"]
    check._pyfunctorch_source = src
    return check, ns.get("refresh"), len(specs) + len(tensors)
