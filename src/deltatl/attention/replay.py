"""Forward a network again on the same images without recomputing what comes before a point.

The exact channel attention runs the network once per group of zeroed channels, on the same batch;
everything before the point where the batch is replicated (the scored layer's output, or the input of
an enclosing block) gives the same values every time. Recomputing it cost most of the time on the deep
layers (97 % of a forward for EfficientNet-Lite0's last preset layer: BENCHMARKS.md, "Channel
attention"). Here the modules that finish before that point answer with the outputs they gave on the
first forward, so each further forward costs only what comes after it.

Which modules may answer from a recording (:func:`plan_replay`): those that run exactly once in a forward
and finish before the point, taking the outermost of them (``blocks.3`` rather than its layers). A
module called several times in a forward (torchvision's ResNet calls one ReLU module three times per
block) is never replaced, since a later call would get the early output. Replayed outputs are copies,
so an in-place operation later in the forward (``out += identity``) cannot change the recording; a
model that changes one module's output in place through another module's view would see the copies
diverge, so callers check one replayed forward against a plain one (:mod:`deltatl.attention.scores`
does, once per layer, and replays nothing where it differs).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map


@dataclass(frozen=True)
class CallOrder:
    """When each module of one forward starts and finishes (event numbers), and its output size."""

    calls: dict[str, list[tuple[int, int]]]  # module name -> (start, finish) of each call
    sample_numel: dict[str, int]  # module name -> largest output elements per sample over its calls


def call_order(model: nn.Module, images: Tensor) -> CallOrder:
    """One forward of ``model`` on ``images`` (no gradients), recording every submodule's calls."""
    counter = [0]
    open_calls: dict[str, list[int]] = {}
    calls: dict[str, list[tuple[int, int]]] = {}
    numel: dict[str, int] = {}
    batch = images.shape[0]

    def before(name: str) -> Callable[[nn.Module, Any], None]:
        def hook(_module: nn.Module, _args: Any) -> None:
            counter[0] += 1
            open_calls.setdefault(name, []).append(counter[0])
        return hook

    def after(name: str) -> Callable[[nn.Module, Any, Any], None]:
        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            counter[0] += 1
            calls.setdefault(name, []).append((open_calls[name].pop(), counter[0]))
            if isinstance(output, Tensor) and output.dim() > 0 and output.shape[0] == batch:
                numel[name] = max(numel.get(name, 0), output[0].numel())
        return hook

    handles = []
    for name, module in model.named_modules():
        if name:
            handles += [module.register_forward_pre_hook(before(name)), module.register_forward_hook(after(name))]
    try:
        with torch.no_grad():
            model(images)
    finally:
        for handle in handles:
            handle.remove()
    return CallOrder(calls, numel)


@dataclass(frozen=True)
class ReplayPlan:
    """The modules that answer from a recording, and the largest per-sample output after the point."""

    modules: tuple[str, ...]
    boundary: str  # the module at which the recording stops
    at_exit: bool  # stop after the boundary module's forward (True) or before it (False)
    suffix_sample_numel: int
    skips_prefix: bool  # False: the point runs more than once per forward, nothing is replayed


def plan_replay(order: CallOrder, boundary: str, at_exit: bool) -> ReplayPlan:
    """Which modules finish before the point: the input of ``boundary`` (``at_exit=False``) or its output
    (``at_exit=True``). ``boundary`` "" (the model itself) leaves nothing to replay."""
    everything = max(order.sample_numel.values(), default=0)
    if not boundary:  # the model input: nothing comes before it
        return ReplayPlan((), boundary, at_exit, everything, True)
    if len(order.calls.get(boundary, ())) != 1:  # a point met twice: recompute everything
        return ReplayPlan((), boundary, at_exit, everything, False)
    (start, finish), = order.calls[boundary]
    point = finish if at_exit else start
    once = {name for name, calls in order.calls.items() if len(calls) == 1}
    done = {name for name in once if order.calls[name][0][1] <= point}

    def parent(name: str) -> str:
        return name.rsplit(".", 1)[0] if "." in name else ""

    def covered(name: str) -> bool:  # some ancestor is replayed already
        p = parent(name)
        while p:
            if p in done:
                return True
            p = parent(p)
        return False

    outermost = tuple(name for name in order.calls if name in done and not covered(name))
    # everything that finishes after the point runs on the replicated batch (the enclosing blocks too)
    after = [order.sample_numel.get(name, 0) for name, calls in order.calls.items() if calls[-1][1] > point]
    return ReplayPlan(outermost, boundary, at_exit, max(after, default=0), True)


class _Stop(Exception):
    """Raised at the boundary: the recording needs nothing after it."""


def _copy(value: Any) -> Any:
    return tree_map(lambda v: v.clone() if isinstance(v, Tensor) else v, value)


@contextmanager
def replayed_prefix(model: nn.Module, plan: ReplayPlan, images: Tensor) -> Iterator[None]:
    """Within the block, forwards of ``model`` on ``images`` skip the planned modules: each returns a copy
    of its output from one recording forward on ``images`` (stopped at the boundary). Only valid for
    forwards on these same images, in eval mode, with no hooks on the replayed modules' insides."""
    if not plan.modules:
        yield
        return
    modules = dict(model.named_modules())
    recorded: dict[str, Any] = {}

    def record(name: str) -> Callable[[nn.Module, Any, Any], None]:
        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            recorded[name] = _copy(output)
        return hook

    def stop(*_args: Any) -> None:
        raise _Stop

    handles = [modules[name].register_forward_hook(record(name)) for name in plan.modules]
    boundary = modules[plan.boundary]
    handles.append(boundary.register_forward_hook(stop) if plan.at_exit else boundary.register_forward_pre_hook(stop))
    try:
        with torch.no_grad():
            model(images)
    except _Stop:
        pass
    finally:
        for handle in handles:
            handle.remove()
    saved = {name: modules[name].__dict__.get("forward") for name in plan.modules}
    try:
        for name in plan.modules:
            # an instance attribute shadows the class's forward; __call__ and its hooks run as usual
            modules[name].forward = (lambda value: lambda *args, **kwargs: _copy(value))(recorded[name])
        yield
    finally:
        for name, previous in saved.items():
            if previous is None:
                del modules[name].forward
            else:
                modules[name].forward = previous
