"""The floor of any Python ``__torch_dispatch__`` design: µs per op for a wrapper subclass whose
dispatch only unwraps the inner tensor, runs the op and rewraps (no rules, no levels), next to
plain torch, torch.func.vmap and pyfunctorch.vmap on the same 20-op chain.

    OMP_NUM_THREADS=1 python benchmarks/dispatch_floor.py

pyfunctorch's eager per-op cost can approach this floor but not go below it; beating
torch.func on tiny ops takes the compiled path (pyfunctorch.compile).
"""

import statistics
import time

import torch

torch.set_num_threads(1)


class Minimal(torch.Tensor):
    @staticmethod
    def __new__(cls, v):
        r = torch.Tensor._make_wrapper_subclass(cls, v.shape[1:], strides=v.stride()[1:], dtype=v.dtype, device=v.device)
        r.v = v
        return r

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return Minimal(func(*[a.v if type(a) is Minimal else a for a in args]))


def chain(x):
    for _ in range(10):
        x = (x * 1.01).sin()
    return x


def per_op_us(fn, x, calls=300, rounds=9):
    fn(x)
    samples = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(calls):
            fn(x)
        samples.append((time.perf_counter() - t) / calls / 20 * 1e6)
    return statistics.median(samples)


def main():
    import torch.func as tf

    import pyfunctorch as pf

    x = torch.randn(64, 8)
    rows = [
        ("plain batched torch", chain, x),
        ("minimal Python wrapper (the floor)", chain, Minimal(x)),
        ("torch.func.vmap", tf.vmap(chain), x),
        ("pyfunctorch.vmap", pf.vmap(chain), x),
        ("pyfunctorch.compile(vmap)", pf.compile(pf.vmap(chain)), x),
    ]
    print("20 pointwise ops on [64, 8], 1 thread, µs per op (median of rounds)")
    for name, fn, arg in rows:
        print(f"  {name:36s} {per_op_us(fn, arg):7.2f}")


if __name__ == "__main__":
    main()
