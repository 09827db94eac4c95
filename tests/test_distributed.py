"""DDP on the CPU: 2 processes (torchrun --standalone, gloo) against one process on the same global batch.

One torchrun launch runs every distributed job of this file in sequence (process start-up dominates
the cost); the jobs are ``deltatl train`` command lines run in-process by each rank. Each rank writes
what it observed to ``rank<r>.json``; the tests below compare that and the run directories with
single-process runs made in the pytest process.

Run as a script (what torchrun does): ``python tests/test_distributed.py SPEC.json``.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORLD = 2
PER_RANK_BATCH = 2  # global batch 4 = the single-process batch of the reference runs
STEPS_PER_EPOCH = 4  # 18 training images (6 of 24 held out for validation) in global batches of 4
INTERRUPT_AT = 6  # mid-epoch 2
TORCHRUN = Path(sys.executable).with_name("torchrun")
COMMON = ["--model", "test_resnet", "--pretrained", "none", "--image-size", "32", "--device", "cpu", "--quiet",
          "--lr", "0.05"]
DELTA = ["--method", "delta"]
WISE_FT = ["--method", "wise-ft", "--val-fraction", "0.25", "--iters", "2"]


# --- the worker: runs in every torchrun process --------------------------------------------------------

def _worker(spec_path: str) -> None:
    import torch.distributed as tdist

    import deltatl.engine.fit as fit_module
    import deltatl.run as run_module
    from deltatl.cli import main
    from deltatl.distributed import DistEnv
    from deltatl.engine import checkpoint as ckpt
    from deltatl.engine.evaluate import evaluate
    from deltatl.engine.objective import Objective
    from deltatl.engine.rifle import Rifle

    torch.set_num_threads(1)
    spec = json.loads(Path(spec_path).read_text())
    rank = int(os.environ["RANK"])
    seen: dict[str, object] = {"codes": {}, "writes": 0, "attention_estimates": 0, "rifle_heads": [],
                               "steps": {}}

    def counting(fn, key):
        def wrapped(*args, **kwargs):
            seen[key] += 1
            return fn(*args, **kwargs)
        return wrapped

    # Every file a run writes goes through one of these.
    ckpt.save_atomic = counting(ckpt.save_atomic, "writes")
    fit_module._append_metrics = counting(fit_module._append_metrics, "writes")
    run_module.dump_yaml = counting(run_module.dump_yaml, "writes")
    run_module.write_scores = counting(run_module.write_scores, "writes")
    run_module.estimate_channel_attention = counting(run_module.estimate_channel_attention,
                                                     "attention_estimates")
    reinitialise = Rifle.reinitialise

    def recording_reinitialise(self, step, optimizer):
        fired = reinitialise(self, step, optimizer)
        if fired:
            seen["rifle_heads"].append([self.head.weight.flatten().tolist(), self.head.bias.tolist()])
        return fired

    Rifle.reinitialise = recording_reinitialise
    forward = Objective.forward

    for job in spec["jobs"]:
        calls = {"n": 0}

        def counting_forward(self, images, labels, _calls=calls, _job=job):
            if self.method.name != "l2-fe":  # not the L2-FE fit of the channel attention
                _calls["n"] += 1
                if _job.get("interrupt_rank") == rank and _calls["n"] == _job.get("interrupt_at"):
                    os.kill(os.getpid(), signal.SIGTERM)  # this process only: the other must follow
            return forward(self, images, labels)

        Objective.forward = counting_forward
        seen["codes"][job["name"]] = main(job["argv"])
        seen["steps"][job["name"]] = calls["n"]
    Objective.forward = forward

    # Exact evaluation: an odd number of images, each scored once.
    class Recording(torch.utils.data.Dataset):
        def __init__(self, n):
            g = torch.Generator().manual_seed(0)
            self.images = torch.randn(n, 3, 16, 16, generator=g)
            self.labels = torch.randint(0, 3, (n,), generator=g)
            self.indices = []

        def __len__(self):
            return len(self.labels)

        def __getitem__(self, i):
            self.indices.append(i)
            return self.images[i], self.labels[i]

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3))
    data = Recording(spec["eval_size"])
    env = DistEnv(rank=rank, world_size=tdist.get_world_size())
    seen["eval"] = evaluate(model, data, batch_size=2, device=torch.device("cpu"), progress=False, dist=env)
    seen["eval_indices"] = data.indices
    Path(spec["out"], f"rank{rank}.json").write_text(json.dumps(seen))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    _worker(sys.argv[1])
    sys.exit(0)


# --- the tests ------------------------------------------------------------------------------------------

def state(run: Path) -> dict:
    return torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=False)


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], keys=None) -> float:
    assert list(a) == list(b)  # the same unprefixed names, in the same order
    return max(((a[k].double() - b[k].double()).abs().max().item() for k in (a if keys is None else keys)),
               default=0.0)  # no tensors (a method without regularizer state): nothing differs


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    """Write data and an attention file, run every 2-process job in one torchrun launch."""
    from conftest import CLASS_COLOURS, make_image, write_png
    from deltatl.attention import write_scores
    from deltatl.attention import layer_channels
    from deltatl.features import layer_preset
    from deltatl.models import create_model

    base = tmp_path_factory.mktemp("ddp")
    data = base / "data"
    for label, cls in enumerate(("red", "green", "blue")):
        for split, count, offset in (("train", 8, 0), ("test", 3, 1000)):
            for i in range(count):
                write_png(data / split / cls / f"{cls}_{i}.png", make_image(label, offset + i, CLASS_COLOURS[cls]))
    model = create_model("test_resnet", 3, pretrained="none")
    layers = layer_preset(model, "test_resnet")
    channels = layer_channels(model, layers, 32)
    generator = torch.Generator().manual_seed(1)
    attention = base / "attention.json"
    write_scores(attention, {name: torch.rand(c, generator=generator) for name, c in channels.items()},
                 {"layers": layers})
    tiny_attention = ["--attention-epochs", "1", "--attention-batches", "1", "--attention-batch-size", "4",
                      "--attention-cache", str(base / "cache")]

    def argv(out: str, *flags: object) -> list[str]:
        return ["train", "--data", str(data), *COMMON, *map(str, flags), "--out", str(base / out)]

    ddp = ["--batch-size", PER_RANK_BATCH]
    spec = {"out": str(base), "eval_size": 7, "jobs": [
        # two steps: the L2-SP gradient is zero in the first (the weights are at their starting point)
        {"name": "l2sp", "argv": argv("l2sp", "--method", "l2-sp", "--iters", 2, "--sync-bn", *ddp)},
        {"name": "l2sp-no-sync-bn", "argv": argv("l2sp-no-sync-bn", "--method", "l2-sp", "--iters", 2, *ddp)},
        {"name": "delta", "argv": argv("delta", *DELTA, "--attention-file", attention, "--iters", 1, "--sync-bn",
                                       *ddp)},
        {"name": "delta-rifle", "argv": argv("delta-rifle", *DELTA, "--attention-file", attention, "--iters", 2,
                                             "--rifle", 1, "--sync-bn", *ddp)},
        # BSS with a weight that makes its term matter: the singular values of the global batch's features
        {"name": "bss", "argv": argv("bss", "--method", "bss", "--alpha", 0.01, "--iters", 2, "--sync-bn", *ddp)},
        # LwF's source head is trained outside the DDP-wrapped network: its gradient is averaged by a hook
        {"name": "lwf", "argv": argv("lwf", "--method", "lwf", "--alpha", 10, "--iters", 2, "--sync-bn", *ddp)},
        {"name": "co-tuning", "argv": argv("co-tuning", "--method", "co-tuning", "--iters", 2, "--sync-bn", *ddp)},
        # WiSE-FT: its LP-FT run trains on both processes, rank 0 alone chooses the mixing
        {"name": "wise-ft", "argv": argv("wise-ft", *WISE_FT, *tiny_attention, "--sync-bn", *ddp)},
        {"name": "interrupted", "argv": argv("resumed", *DELTA, *tiny_attention, "--epochs", 2, *ddp),
         "interrupt_rank": 1, "interrupt_at": INTERRUPT_AT},
        {"name": "resumed", "argv": argv("resumed", *DELTA, *tiny_attention, "--epochs", 2, "--resume", *ddp)},
        {"name": "uninterrupted", "argv": argv("uninterrupted", *DELTA, *tiny_attention, "--epochs", 2, *ddp)},
    ]}
    spec_path = base / "spec.json"
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}
    proc = subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node", str(WORLD), __file__, str(spec_path)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    ranks = [json.loads((base / f"rank{r}.json").read_text()) for r in range(WORLD)]
    return {"base": base, "data": data, "attention": attention, "ranks": ranks, "stderr": proc.stderr}


@pytest.fixture(scope="module")
def reference(jobs):
    """``reference(name, *flags)``: the single-process run with the global batch (4), made once."""
    from deltatl.cli import main

    made: dict[str, Path] = {}

    def run(name: str, *flags: object) -> Path:
        if name not in made:
            out = jobs["base"] / f"single-{name}"
            previous = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                code = main(["train", "--data", str(jobs["data"]), *COMMON, *map(str, flags),
                             "--batch-size", str(WORLD * PER_RANK_BATCH), "--out", str(out)])
            finally:
                torch.set_num_threads(previous)
            assert code == 0
            made[name] = out
        return made[name]

    return run


def initial_source_head(prefix: str) -> dict[str, torch.Tensor]:
    """The trained source head before training (the pretrained network's own classifier), keys prefixed."""
    from deltatl.models import create_model

    torch.manual_seed(0)
    head = create_model("test_resnet", None, pretrained="none").fc
    return {f"{prefix}{k}": v for k, v in head.state_dict().items()}


def initial_network() -> torch.nn.Module:
    """The starting point every run above draws from its --seed (0)."""
    from deltatl.config import TrainConfig
    from deltatl.run import seeded_model

    return seeded_model(TrainConfig(model="test_resnet", pretrained="none"), 3)


@pytest.mark.parametrize("name, flags", [
    ("l2sp", ["--method", "l2-sp", "--iters", 2]),
    ("delta", [*DELTA, "--iters", 1]),
    ("delta-rifle", [*DELTA, "--iters", 2, "--rifle", 1]),  # the head is re-drawn after step 1
    ("bss", ["--method", "bss", "--alpha", 0.01, "--iters", 2]),
    ("lwf", ["--method", "lwf", "--alpha", 10, "--iters", 2]),
    ("co-tuning", ["--method", "co-tuning", "--iters", 2]),
], ids=["l2-sp", "delta", "delta-rifle", "bss", "lwf", "co-tuning"])
# two steps with a re-init after the first, after the step decay: warned about, and meant here
@pytest.mark.filterwarnings("ignore::deltatl.engine.rifle.RifleWarning")
def test_two_processes_with_sync_bn_take_the_single_process_step_on_the_global_batch(jobs, reference, name, flags):
    if name not in ("l2sp", "bss", "lwf", "co-tuning"):
        flags = [*flags, "--attention-file", jobs["attention"]]
    single = state(reference(name, *flags))
    ddp = state(jobs["base"] / name)
    assert [r["codes"][name] for r in jobs["ranks"]] == [0, 0]
    assert ddp["world_size"] == 2 and ddp["step"] == single["step"]
    start = initial_network()
    params = [key for key, _ in start.named_parameters()]
    moved = max_difference(single["model"], start.state_dict(), params)
    assert moved > 1e-2  # the step is large enough for the comparison to mean something
    assert max_difference(ddp["model"], single["model"], params) < 1e-5
    # BatchNorm running statistics (of 4 samples in layer4) agree to float32 noise as well
    for key in set(single["model"]) - set(params):
        scale = max(1.0, single["model"][key].double().abs().max().item())
        assert max_difference(ddp["model"], single["model"], [key]) < 1e-4 * scale, key
    if name in ("lwf", "co-tuning"):  # the trained source head: the same step as well
        prefix = {"lwf": "lwf.old_head.", "co-tuning": "co-tuning.source_head."}[name]
        head = {k: v for k, v in single["regularizer"].items() if k.startswith(prefix)}
        moved_head = max_difference(head, initial_source_head(prefix))
        assert moved_head > 1e-4
        assert max_difference(ddp["regularizer"], single["regularizer"]) < 1e-3 * moved_head
    else:
        assert max_difference(ddp["regularizer"], single["regularizer"]) == 0  # L2-SP start, attention
    summary = json.loads((jobs["base"] / name / "summary.json").read_text())
    expected = json.loads((reference(name, *flags) / "summary.json").read_text())
    assert summary["test_top1"] == expected["test_top1"]
    assert summary["test_loss"] == pytest.approx(expected["test_loss"], abs=1e-4)


def test_wise_ft_under_two_processes_interpolates_the_single_process_fine_tuning(jobs, reference):
    flags = [*WISE_FT, "--attention-epochs", "1", "--attention-batch-size", "4"]
    assert [r["codes"]["wise-ft"] for r in jobs["ranks"]] == [0, 0]
    single, ddp = reference("wise-ft", *flags), jobs["base"] / "wise-ft"
    params = [key for key, _ in initial_network().named_parameters()]
    fine_tuned = state(ddp / "fine_tuned")
    assert fine_tuned["world_size"] == 2
    assert max_difference(fine_tuned["model"], state(single / "fine_tuned")["model"], params) < 1e-5
    summary, expected = (json.loads((run / "summary.json").read_text()) for run in (ddp, single))
    assert summary["wise_ft"]["val_top1"] == expected["wise_ft"]["val_top1"]
    assert summary["test_top1"] == expected["test_top1"]


def test_without_sync_bn_batchnorm_uses_each_process_slice_and_the_step_differs(jobs, reference):
    single = state(reference("l2sp", "--method", "l2-sp", "--iters", 2))
    assert max_difference(state(jobs["base"] / "l2sp-no-sync-bn")["model"], single["model"]) > 1e-4


def test_rifle_draws_the_same_head_on_every_process(jobs):
    heads = [r["rifle_heads"] for r in jobs["ranks"]]
    assert len(heads[0]) == 1  # delta-rifle: one re-initialisation (the other jobs have none)
    assert heads[0] == heads[1]


def test_only_rank_zero_writes_files_and_computes_the_channel_attention(jobs):
    first, second = jobs["ranks"]
    assert first["writes"] > 0 and second["writes"] == 0
    # interrupted, resumed and uninterrupted share one cache: one L2-FE fit and scoring, on rank 0
    assert first["attention_estimates"] == 1 and second["attention_estimates"] == 0
    assert (jobs["base"] / "resumed" / "attention_fe").is_dir()
    assert len(list((jobs["base"] / "cache").iterdir())) == 1


def test_a_signal_to_one_process_stops_both_at_the_same_step_and_the_resumed_run_equals_the_uninterrupted(jobs):
    first, second = jobs["ranks"]
    assert first["codes"]["interrupted"] == second["codes"]["interrupted"] == 130
    assert first["steps"]["interrupted"] == second["steps"]["interrupted"] == INTERRUPT_AT
    assert first["codes"]["resumed"] == second["codes"]["resumed"] == 0
    total = 2 * STEPS_PER_EPOCH
    assert first["steps"]["resumed"] == second["steps"]["resumed"] == total - INTERRUPT_AT
    resumed, uninterrupted = state(jobs["base"] / "resumed"), state(jobs["base"] / "uninterrupted")
    assert resumed["done"] and resumed["step"] == total and len(resumed["rng_per_rank"]) == 2
    assert max_difference(resumed["model"], uninterrupted["model"]) < 1e-6

    def rows(run: str) -> list[dict]:
        lines = (jobs["base"] / run / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in lines]

    assert rows("resumed") == rows("uninterrupted")
    assert [r["epoch"] for r in rows("resumed")] == [1, 2]


def test_exact_evaluation_scores_each_image_of_an_odd_sized_set_once(jobs):
    first, second = jobs["ranks"]
    assert sorted(first["eval_indices"] + second["eval_indices"]) == list(range(7))
    assert first["eval"] == second["eval"]
    assert first["eval"]["n"] == 7


def test_exact_evaluation_equals_the_single_process_evaluation(jobs):
    from deltatl.engine.evaluate import evaluate

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3))
    g = torch.Generator().manual_seed(0)
    images = torch.randn(7, 3, 16, 16, generator=g)
    labels = torch.randint(0, 3, (7,), generator=g)
    single = evaluate(model, torch.utils.data.TensorDataset(images, labels), batch_size=2,
                      device=torch.device("cpu"), progress=False)
    ddp = jobs["ranks"][0]["eval"]
    assert ddp["n"] == single["n"] == 7
    assert ddp["top1"] == pytest.approx(single["top1"])
    assert ddp["loss"] == pytest.approx(single["loss"], rel=1e-6)


def test_the_sampler_gives_each_rank_a_disjoint_slice_of_every_single_process_batch():
    from deltatl.engine.fit import EpochSampler

    n, b, world, start = 23, 3, 2, 6
    single = list(EpochSampler(n, seed=5, epoch=1, start=start))
    shards = [list(EpochSampler(n, seed=5, epoch=1, start=start, batch_size=b, rank=r, world_size=world))
              for r in range(world)]
    steps = (n - start) // (b * world)
    assert all(len(s) == steps * b for s in shards)
    for step in range(steps):
        global_batch = single[step * b * world:(step + 1) * b * world]
        assert shards[0][step * b:(step + 1) * b] + shards[1][step * b:(step + 1) * b] == global_batch
