"""Running a traced graph: straight-line replay of its aten calls, or a torch.compile backend."""

from __future__ import annotations

import builtins
import keyword
from typing import Any, Callable

import torch

builtins_compile = builtins.compile

class _NotStraight(Exception):
    pass


def _replay_fn(gm):
    try:
        return _straight_line(gm)
    except (_NotStraight, SyntaxError):  # pragma: no cover - make_fx graphs are straight-line aten calls
        return gm.forward


class _BackendRunner:
    """``torch.compile(graph_module, backend=...)``, compiled on its first call. If the
    backend fails there (no C++ compiler, an unsupported op ...) and the plain replay
    works, warn once and replay the graph instead (``strict=True`` re-raises)."""

    def __init__(self, owner: Any, gm):  # owner: the CompiledFunction (a layer above)
        self.owner = owner
        self.gm = gm
        self.compiled = None
        if not _direct_inductor(owner._backend, owner._mode):
            options = {"mode": owner._mode} if owner._mode is not None else {}
            self.compiled = torch.compile(gm, backend=owner._backend, dynamic=False, fullgraph=True, **options)
        self.run = self._first

    def __call__(self, *tensors):
        return self.run(*tensors)

    def _first(self, *tensors):
        try:
            if self.compiled is None:
                # Speed: inductor compiles the traced aten graph directly. Through torch.compile,
                # every call would also pass dynamo's frame evaluation and guards (~25 us on
                # CPU): the graph has no Python to guard, and pyfunctorch's own guards decide
                # when it is stale.
                import torch._inductor

                mode = self.owner._mode
                options = torch._inductor.list_mode_options(mode) if mode not in (None, "default") else None
                self.compiled = _tuple_call(torch._inductor.compile(self.gm, list(tensors), options=options), self.gm)
            out = self.compiled(*tensors)
        except Exception as exc:  # noqa: BLE001
            if self.owner._strict:
                raise
            replay = _replay_fn(self.gm)
            out = replay(*tensors)  # raises too if the graph itself fails on these inputs
            self.run = replay
            self.owner._warn_once(
                ("backend", type(exc).__name__),
                f"pyfunctorch.compile: backend {self.owner._backend!r} failed ({type(exc).__name__}: "
                f"{' '.join(str(exc).split())[:300]}); replaying the traced graph without it.",
            )
            return out
        self.run = self.compiled
        return out


def _direct_inductor(backend, mode) -> bool:
    """Whether inductor compiles the graph itself (no dynamo in front): for backend='inductor'
    without CUDA graphs (its CUDA-graph trees take their static inputs from dynamo)."""
    return backend == "inductor" and mode in (None, "default", "max-autotune-no-cudagraphs")


def _tuple_call(compiled: Callable, gm) -> Callable:
    """The compiled graph returning what the graph module returns (inductor may give a list
    where the graph returns a tuple)."""
    want_tuple = isinstance(gm.graph.output_node().args[0], tuple)

    def run(*tensors):
        out = compiled(*tensors)
        return tuple(out) if want_tuple and type(out) is list else out

    return run if want_tuple else compiled


_LITERALS = (int, bool, str, type(None))


def _straight_line(gm: torch.fx.GraphModule) -> Callable:
    """The graph as one straight-line Python function that calls each aten op's C++
    entry point (``OpOverload._op``) directly: the FX-generated ``forward`` goes through
    ``OpOverload.__call__``, a Python frame per op (~0.3-0.5 us). Intermediates are
    deleted after their last use, as FX's own code does."""
    nodes = list(gm.graph.nodes)
    names: dict = {}
    glb: dict = {}
    lines: list = []
    params: list = []
    last_use: dict = {}
    for i, n in enumerate(nodes):
        for m in n.all_input_nodes:
            last_use[m] = i

    def const(obj) -> str:
        if type(obj) in _LITERALS or (type(obj) is float and obj == obj and obj not in (float("inf"), float("-inf"))):
            return repr(obj)
        g = f"_k{len(glb)}"
        glb[g] = obj
        return g

    def render(a) -> str:
        if isinstance(a, torch.fx.Node):
            return names[a]
        if isinstance(a, list) or (isinstance(a, tuple) and not hasattr(a, "_fields")):
            inner = ", ".join(render(b) for b in a)
            return f"[{inner}]" if isinstance(a, list) else f"({inner}{',' if len(a) == 1 else ''})"
        if isinstance(a, (list, tuple, dict, slice, torch.fx.Node)):
            raise _NotStraight(type(a))
        return const(a)

    out_expr = None
    for i, n in enumerate(nodes):
        v = f"v{i}"
        if n.op == "placeholder":
            names[n] = v
            params.append(v)
            continue
        if n.op == "get_attr":
            obj = gm
            for part in n.target.split("."):
                obj = getattr(obj, part)
            names[n] = const(obj)
            continue
        if n.op == "call_function":
            fn = n.target
            if isinstance(fn, torch._ops.OpOverload):
                fn = getattr(fn, "_op", fn)
            g = f"_f{len(glb)}"
            glb[g] = fn
            if any(keyword.iskeyword(k) or not k.isidentifier() for k in n.kwargs):
                raise _NotStraight(f"keyword argument names {list(n.kwargs)}")
            args = [render(a) for a in n.args] + [f"{k}={render(a)}" for k, a in n.kwargs.items()]
            lines.append(f"    {v} = {g}({', '.join(args)})")
            names[n] = v
        elif n.op == "output":
            out_expr = render(n.args[0])
            continue
        else:
            raise _NotStraight(n.op)
        dead = [names[m] for m in n.all_input_nodes if last_use.get(m) == i and names[m].startswith("v")]
        if n.users == {} and n.op == "call_function":
            dead.append(v)
        if dead:
            lines.append(f"    del {', '.join(sorted(set(dead)))}")
    src = f"def replay({', '.join(params)}):\n" + "\n".join(lines + [f"    return {out_expr}"]) + "\n"
    code = builtins_compile(src, f"<pyfunctorch.compile replay {id(gm):x}>", "exec")
    ns = dict(glb)
    exec(code, ns)
    fn = ns["replay"]
    fn._pyfunctorch_source = src
    return fn

