"""One-off measurement behind BENCHMARKS.md, "torch.compile for evaluation": the compile time and the
inference speed-up of torch.compile on the embedded EfficientNet-Lite0 (batch 64, 96 px, channels-last,
inference mode), 5 interleaved rounds. Run: .venv/bin/python evidence/compile_eval.py"""
import time, torch, statistics
from deltatl.models import create_model
torch.manual_seed(0)
model = create_model("tf_efficientnet_lite0", 10).eval().to(memory_format=torch.channels_last)
x = torch.randn(64, 3, 96, 96).to(memory_format=torch.channels_last)
with torch.inference_mode():
    model(x)
    t = time.perf_counter(); compiled = torch.compile(model); compiled(x); compile_s = time.perf_counter() - t
    times = {"eager": [], "compiled": []}
    for r in range(5):
        for name, m in (("eager", model), ("compiled", compiled)):
            t = time.perf_counter(); m(x); times[name].append(time.perf_counter() - t)
    ratio = statistics.median(e / c for e, c in zip(times["eager"], times["compiled"]))
    print(f"compile + first call {compile_s:.1f} s; eager {statistics.median(times['eager'])*1000:.0f} ms, compiled {statistics.median(times['compiled'])*1000:.0f} ms per 64 images; speed-up {ratio:.2f}")
    diff = (model(x) - compiled(x)).abs().max().item(); print("max |diff|", diff)
