"""mode='reduce-overhead': a traced graph's replay captured in a CUDA graph with static input buffers."""

from __future__ import annotations

from typing import Any, Callable

import torch



class _CudaGraphRunner:
    """Replays a traced graph through ``torch.cuda.CUDAGraph``.

    The first replay copies the inputs into static buffers, runs the graph once for real
    on a side stream (warm-up: allocator, cuBLAS workspaces; its outputs are that call's
    result) and captures a second run into a CUDA graph. Every later call copies the
    inputs into the static buffers, replays the CUDA graph (one launch instead of one per
    op), copies inputs the graph updates in place back to the caller's tensors and returns
    *clones* of the static outputs (the next replay overwrites them). Random ops draw fresh
    numbers on every replay (torch registers the generator's offsets with the graph). If
    capture fails, the plain replay is used from then on (one-time warning).
    """

    def __init__(self, owner: Any, replay: Callable, mutated: tuple):
        self.owner = owner
        self.replay = replay
        self.mutated = mutated  # positions of graph inputs the graph updates in place
        self.graph = None
        self.static_in: list = []
        self.static_out: list = []
        self.run = self._first

    @staticmethod
    def unsupported(inputs: list, outputs: list) -> str | None:
        """Why this signature cannot use a CUDA graph, or None."""
        tensors = list(inputs) + list(outputs)
        if not torch.cuda.is_available() or not tensors or any(t.device.type != "cuda" for t in tensors):
            return "CUDA graphs need CUDA tensors (inputs and outputs on a CUDA device; running on CPU)"
        if any(t.requires_grad for t in tensors):
            return ("an input or output requires grad (a CUDA graph replay records no autograd graph); "
                    "call it under torch.no_grad() or with inputs that do not require grad")
        return None

    def __call__(self, *tensors):
        return self.run(*tensors)

    def _replay(self, *tensors):
        for s, t in zip(self.static_in, tensors):
            s.copy_(t)
        self.graph.replay()
        for j in self.mutated:
            tensors[j].copy_(self.static_in[j])
        return [o.clone() for o in self.static_out]

    def _first(self, *tensors):
        static_in = [torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device) for t in tensors]
        for s, t in zip(static_in, tensors):
            s.copy_(t)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            outs = self.replay(*static_in)  # the warm-up run is this call's real run
        main = torch.cuda.current_stream()
        main.wait_stream(side)
        for o in outs:
            o.record_stream(main)  # allocated on the side stream, used (and freed) on this one
        # an output that is (a view of) a static input would be overwritten by the next call
        buffers = {s.untyped_storage().data_ptr() for s in static_in}
        outs = [o.clone() if o.untyped_storage().data_ptr() in buffers else o for o in outs]
        for j in self.mutated:
            tensors[j].copy_(static_in[j])
        # capture (records the kernels, runs nothing): later replays read the static inputs
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                static_out = self.replay(*static_in)
        except Exception as exc:  # noqa: BLE001 - an op that cannot be captured (a sync, a CPU scalar ...)
            if self.owner._strict:
                raise
            self.run = self.replay
            self.owner._warn_once(
                ("cudagraph-capture", type(exc).__name__),
                f"pyfunctorch.compile(mode='reduce-overhead'): capturing the CUDA graph failed "
                f"({type(exc).__name__}: {' '.join(str(exc).split())[:300]}); replaying without it.",
            )
            return outs
        self.graph, self.static_in, self.static_out = graph, static_in, list(static_out)
        self.run = self._replay
        return outs
