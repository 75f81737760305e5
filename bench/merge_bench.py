"""Benchmark: model_ops.merge vs `mergekit-yaml` (same YAML, same run) and the plain-safetensors I/O floor.

Three Llama-shaped float32 models (hidden 1024, intermediate 2816, 12 layers, 16 heads, 32k vocabulary, untied
embeddings; 219.7M parameters, 0.88 GB each) are generated once under --root. For each method, every tool runs as a
fresh process (ours as `model-ops merge CONFIG OUT`, mergekit as `mergekit-yaml CONFIG OUT`); we report whole-process wall time, peak RSS (VmHWM of the child; with worker processes, the whole tree's
pages counted once, see `run`) and the peak RssAnon / RssFile split of the main process sampled from /proc (mergekit's RSS
includes the memory-mapped input pages).

    flock /tmp/heavy.lock python bench/merge_bench.py [--methods ties,dare_ties,linear,task_arithmetic] [--root /tmp/merge_bench]
    python bench/merge_bench.py --dtype bfloat16          # the same models stored in bfloat16 (0.44 GB each), recipes in bfloat16

With `--dtype bfloat16` the inputs are the float32 models rounded to bfloat16 (under ROOT/bf16) and every recipe says
`dtype: bfloat16`, so both tools compute in bfloat16 as mergekit does (ties at the density cut are common there).
"""
import argparse, json, os, resource, shutil, subprocess, sys, threading, time
from pathlib import Path

ARCH = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=12, num_attention_heads=16, num_key_value_heads=16,
            vocab_size=32000, tie_word_embeddings=False, max_position_embeddings=2048, rms_norm_eps=1e-5)

DTYPE = "float32"     # the recipes' dtype and the stored inputs' (--dtype)

def make_models(root:Path):
    import torch
    from safetensors.torch import save_file
    names = ["base", "ft1", "ft2"]
    if all((root / n / "model.safetensors").is_file() for n in names): return [root / n for n in names]
    from transformers import LlamaConfig
    cfg = LlamaConfig(**ARCH, architectures=["LlamaForCausalLM"]).to_dict()
    h, f, v, L = ARCH["hidden_size"], ARCH["intermediate_size"], ARCH["vocab_size"], ARCH["num_hidden_layers"]
    shapes = {"model.embed_tokens.weight": (v, h)}
    for i in range(L):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (h, h), p + "self_attn.v_proj.weight": (h, h),
                       p + "self_attn.o_proj.weight": (h, h), p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
                       p + "mlp.down_proj.weight": (h, f), p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,)})
    shapes.update({"model.norm.weight": (h,), "lm_head.weight": (v, h)})
    g = torch.Generator().manual_seed(0)
    base = {k: (torch.ones(s) if len(s) == 1 else 0.02 * torch.randn(s, generator=g)) for k, s in shapes.items()}
    dt = getattr(torch, DTYPE)
    for n in names:
        d = root / n; d.mkdir(parents=True, exist_ok=True)
        sd = base if n == "base" else {k: t + 0.002 * torch.randn(t.shape, generator=g) for k, t in base.items()}
        save_file({k: t.to(dt) for k, t in sd.items()}, str(d / "model.safetensors"), metadata={"format": "pt"})
        (d / "config.json").write_text(json.dumps(cfg))
        del sd
    return [root / n for n in names]

NO_BASE = ("linear", "nuslerp")          # methods without a base model (slerp's base is the first fine-tune)
SPARSE = ("ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear")
MERGEKIT = NO_BASE + SPARSE + ("task_arithmetic", "slerp", "model_stock")   # (pcb is ours alone)

def yaml_for(method, base, ft1, ft2):
    "The bench's config for `method`: weights 0.5 (and density 0.5 for the sparsifying methods), float32."
    if method == "slerp":
        return f"merge_method: slerp\nbase_model: {ft1}\nmodels:\n  - model: {ft1}\n  - model: {ft2}\nparameters:\n  t: 0.4\ndtype: {DTYPE}\n"
    p = "" if method == "model_stock" else "\n    parameters: {weight: 0.5" + (", density: 0.5" if method in SPARSE else "") + "}"
    head = f"merge_method: {method}\n" + ("" if method in NO_BASE else f"base_model: {base}\n")
    return head + f"models:\n  - model: {ft1}{p}\n  - model: {ft2}{p}\ndtype: {DTYPE}\n"

def inputs_of(method, base, ft1, ft2):
    return [ft1, ft2] if method in NO_BASE + ("slerp",) else [base, ft1, ft2]

FLOOR = r'''
import sys, time
from safetensors.torch import load_file, save_file
ins, out = sys.argv[1:-1], sys.argv[-1]
res = None
for p in ins:
    sd = load_file(p)
    res = {k: v.clone() for k, v in sd.items()} if res is None else res
    del sd
save_file(res, out)
'''


def _tree(pid):
    "pid and its descendants (from /proc/PID/task/*/children)."
    out, todo = [], [pid]
    while todo:
        q = todo.pop(); out.append(q)
        try:
            for t in os.listdir(f"/proc/{q}/task"):
                todo += [int(c) for c in open(f"/proc/{q}/task/{t}/children").read().split()]
        except OSError: pass
    return out

def _status(pid, keys=("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem")):
    r = dict.fromkeys(keys, 0)
    for line in open(f"/proc/{pid}/status"):
        k = line.split(":")[0]
        if k in r: r[k] = int(line.split()[1]) // 1024
    return r

def _pss_mb(pid):
    "Proportional set size: each page shared by k processes counts 1/k in each, so a tree's sum counts it once."
    for line in open(f"/proc/{pid}/smaps_rollup"):
        if line.startswith("Pss:"): return int(line.split()[1]) // 1024
    return 0

def run(cmd, label):
    """Run `cmd` as a child; return wall seconds and memory peaks (MB) sampled from /proc every 50 ms.
    peak_rss_mb: the memory of the whole process tree, every page counted once: the main process's VmHWM, or, when it
    has worker processes, max(VmHWM, the sum of every process's Pss (smaps_rollup, sampled every 0.25 s)), since the
    workers share the main process's libraries and memory (fork) and the shared output slots.
    peak_rss_sum_mb: the sum of every process's VmRSS (counts shared pages once per process: an upper bound)."""
    os.sync()   # every tool starts with no dirty pages left by the previous one (write throttling otherwise lands on whoever runs next)
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peaks = {"RssAnon": 0, "RssFile": 0, "VmHWM": 0, "sum": 0, "tree": 0, "procs": 1}
    def sample():
        last_smaps = 0.0
        while True:
            try:
                st = _status(p.pid)
                for k in ("RssAnon", "RssFile", "VmHWM"): peaks[k] = max(peaks[k], st[k])
                kids = _tree(p.pid)[1:]
                tot = st["VmRSS"]
                for q in kids:
                    try: tot += _status(q)["VmRSS"]
                    except OSError: pass
                peaks["sum"] = max(peaks["sum"], tot); peaks["procs"] = max(peaks["procs"], 1 + len(kids))
                if kids and time.perf_counter() - last_smaps >= 0.25:
                    last_smaps = time.perf_counter()
                    pss = 0
                    for q in [p.pid, *kids]:
                        try: pss += _pss_mb(q)
                        except OSError: pass
                    peaks["tree"] = max(peaks["tree"], pss)
            except OSError: return
            if p.poll() is not None: return
            time.sleep(0.05)
    th = threading.Thread(target=sample, daemon=True); th.start()
    th.join()
    status = p.wait()
    wall = time.perf_counter() - t0
    err = p.stderr.read().decode()
    if status != 0: raise RuntimeError(f"{label} failed ({status}): {err[-2000:]}")
    return {"wall_s": round(wall, 2), "peak_rss_mb": max(peaks["VmHWM"], peaks["tree"]), "peak_rss_sum_mb": max(peaks["VmHWM"], peaks["sum"]),
            "processes": peaks["procs"], "peak_anon_mb": peaks["RssAnon"], "peak_file_mb": peaks["RssFile"]}

def _tool(name):
    "A console script of this interpreter's environment (beside sys.executable, not a shell shim that re-dispatches)."
    p = Path(sys.executable).parent / name
    return str(p) if p.is_file() else shutil.which(name)

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default="/tmp/merge_bench")
    ap.add_argument("--methods", default="ties,dare_ties,linear,task_arithmetic",
                    help="comma-separated; also: dare_linear, breadcrumbs, breadcrumbs_ties, della, della_linear, slerp, nuslerp, model_stock, pcb")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="where model_ops runs the math (cuda: the GPU; the floor and mergekit stay on CPU)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per tool (the fastest is compared)")
    ap.add_argument("--skip-mergekit", action="store_true")
    ap.add_argument("--precise", action="store_true", help="run model-ops with --precise (float32 math, lowest-index ties: the fast path) instead of mergekit parity")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="stored inputs and the recipes' dtype")
    ap.add_argument("--make-only", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    global DTYPE
    DTYPE = a.dtype
    root = Path(a.root) / ("bf16" if a.dtype == "bfloat16" else "")
    if a.make_only: make_models(root); return
    root.mkdir(parents=True, exist_ok=True)
    t = time.time()
    # generate in a child process, so that this process stays small
    subprocess.run([sys.executable, __file__, "--make-only", "--root", a.root, "--dtype", a.dtype], check=True)
    base, ft1, ft2 = make_models(root); print(f"models ready in {time.time() - t:.1f}s under {root}", flush=True)
    mk = _tool("mergekit-yaml")
    # our command-line tool against mergekit's (`model-ops merge CONFIG OUT`, as a user runs it), from this environment
    me = Path(sys.executable).parent / "model-ops"
    ours = [str(me)] if me.is_file() else [sys.executable, "-c", "import sys; from model_ops.cli import main; sys.exit(main())"]
    print(f"model_ops: {' '.join(ours)}; mergekit: {mk}", flush=True)
    results = {}
    for method in a.methods.split(","):
        cfgp = root / f"{method}.yml"; cfgp.write_text(yaml_for(method, base, ft1, ft2))
        ins = [str(x / "model.safetensors") for x in inputs_of(method, base, ft1, ft2)]
        r = {}
        outs = {"model_ops": root / "out_model_ops", "mergekit": root / "out_mergekit"}
        for label, cmd in [("io_floor", [sys.executable, "-c", FLOOR, *ins, str(root / "floor.safetensors")]),
                           ("model_ops", [*ours, "merge", str(cfgp), str(outs["model_ops"]), "--workers", str(a.workers),
                                          "--device", a.device, "--seed", "42"] + (["--precise"] if a.precise else [])),
                           ("mergekit", [mk, str(cfgp), str(outs["mergekit"]), "--no-copy-tokenizer", "--quiet", "--random-seed", "42"])]:
            if label == "mergekit" and (a.skip_mergekit or mk is None or method not in MERGEKIT): continue
            for o in outs.values():
                if label in outs and o == outs[label]: shutil.rmtree(o, ignore_errors=True)
            (root / "floor.safetensors").unlink(missing_ok=True)
            runs = []
            for rep in range(a.repeat):
                if label in outs: shutil.rmtree(outs[label], ignore_errors=True)
                (root / "floor.safetensors").unlink(missing_ok=True)
                runs.append(run(cmd, f"{method}/{label}"))
                x = runs[-1]
                print(f"{method:16s} {label:10s} wall {x['wall_s']:7.2f} s   peak RSS {x['peak_rss_mb']:5d} MB "
                      f"(main process: anon {x['peak_anon_mb']} MB, file-backed {x['peak_file_mb']} MB"
                      + (f"; {x['processes']} processes, sum of their RSS {x['peak_rss_sum_mb']} MB" if x["processes"] > 1 else "") + ")", flush=True)
            r[label] = dict(min(runs, key=lambda x: x["wall_s"]), runs=runs)
        if "mergekit" in r:   # how close are the two outputs? (random methods draw different masks)
            from model_ops.io import WeightStore
            x, y = WeightStore.open(outs["model_ops"]), WeightStore.open(outs["mergekit"])
            diffs = {k: (x[k].float() - y[k].float()).abs() for k in y.keys()}
            r["max_abs_diff"] = max(float(d.max()) for d in diffs.values())
            r["entries_differing"] = sum(int((d > 1e-6).sum()) for d in diffs.values())
            del diffs
            print(f"{method:16s} max |model_ops - mergekit| = {r['max_abs_diff']:.3g}; entries differing by > 1e-6: "
                  f"{r['entries_differing']} of {sum(x.shape(k).numel() for k in y.keys())}", flush=True)
        for o in outs.values(): shutil.rmtree(o, ignore_errors=True)
        (root / "floor.safetensors").unlink(missing_ok=True)
        o, f = r["model_ops"], r["io_floor"]
        line = f"{method:16s} model_ops/floor wall {o['wall_s'] / f['wall_s']:.2f}x"
        if "mergekit" in r:
            m = r["mergekit"]
            line += (f" | speed-up vs mergekit {m['wall_s'] / o['wall_s']:.2f}x | peak RSS model_ops/mergekit {o['peak_rss_mb'] / m['peak_rss_mb']:.2f}"
                     + (f" (sum-of-RSS bound {o['peak_rss_sum_mb'] / m['peak_rss_mb']:.2f})" if o.get("processes", 1) > 1 else "")
                     + f" | mergekit/floor {m['wall_s'] / f['wall_s']:.2f}x")
        print(line, flush=True)
        results[method] = r
    if a.json: Path(a.json).write_text(json.dumps(results, indent=2))
    return results

if __name__ == "__main__": main()
