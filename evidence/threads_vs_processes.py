"""One-off measurement behind BENCHMARKS.md, "Two processes of one thread, or one of two": the training
step of the embedded EfficientNet-Lite0 (batch 32, 96 px, channels-last, SGD) timed in one process with
two threads, in one with one thread, and in two concurrent processes of one thread each; the machine's
throughput is steps per second summed over the processes.
Run on a quiet machine: .venv/bin/python evidence/threads_vs_processes.py"""
import subprocess
import sys
import time

STEPS = 30


def step_seconds(threads: int, steps: int) -> float:
    """Median seconds of one training step over ``steps`` steps, after 3 warm-up steps."""
    import statistics

    import torch

    from deltatl.models import create_model

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = create_model("tf_efficientnet_lite0", 10).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    images = torch.randn(32, 3, 96, 96).to(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (32,))
    times = []
    for i in range(steps + 3):
        start = time.perf_counter()
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()
        if i >= 3:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def in_processes(threads: int, processes: int) -> list[float]:
    command = [sys.executable, __file__, "--one", str(threads)]
    running = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True) for _ in range(processes)]
    return [float(p.communicate()[0]) for p in running]


if __name__ == "__main__":
    if sys.argv[1:2] == ["--one"]:
        print(step_seconds(int(sys.argv[2]), STEPS))
        sys.exit(0)
    for threads, processes in ((2, 1), (1, 1), (1, 2), (2, 1)):
        seconds = in_processes(threads, processes)
        rate = sum(1 / s for s in seconds)
        print(f"{processes} process(es) x {threads} thread(s): "
              f"{', '.join(f'{s * 1000:.0f}' for s in seconds)} ms per step; {rate:.2f} steps/s in all")
