"""Benchmark: time per edit and peak memory of model_ops.edit methods on SmolLM2-135M-Instruct (or a tiny model).

In one run: ROME (batch 1), MEMIT / EMMET / AlphaEdit / UltraEdit at batch 1 and batch B (default 30), UltraEdit per
100 edits, GRACE per edit; then the ratio of MEMIT's to UltraEdit's time per edit at the same batch size (target >= 5x). Key statistics are computed once up front and cached on disk (not timed). Every edit is
reverted before the next. Peak memory: on CUDA `torch.cuda.max_memory_allocated` above the level before the call
(`peak_mb`) and in total (`peak_total_mb`); on CPU the process RSS sampled every 10 ms, likewise. On CPU `peak_mb`
undercounts memory the allocator reuses from earlier calls; `peak_total_mb` is the whole process (model included).

    flock /tmp/bench.lock python bench/edit_bench.py [--model smollm2|tiny] [--batch 30] [--steps 20] [--json out.json]
"""
import argparse, json, os, threading, time, warnings

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2"); ap.add_argument("--batch", type=int, default=30)
    ap.add_argument("--steps", type=int, default=20); ap.add_argument("--templates", type=int, default=3)
    ap.add_argument("--n-tokens", type=int, default=8192); ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--methods", default="memit,ultraedit,rome,grace,emmet,alphaedit"); ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    import torch, psutil
    warnings.filterwarnings("ignore"); torch.set_num_threads(a.threads)
    from model_ops.nn import load_model, tiny_model, tiny_tokenizer
    from model_ops.edit import (rome, memit, emmet, alphaedit, layer_stats, context_templates, counterfact_candidates,
                                invented_facts, default_layers)
    from model_ops.edit.lifelong import ultraedit, grace
    if a.model == "tiny": m, tok = tiny_model("llama", initializer_range=0.3, num_hidden_layers=8), tiny_tokenizer()
    else: m, tok = load_model(a.model)
    m = m.to(a.device); cuda = a.device.startswith("cuda")
    facts = counterfact_candidates()[:max(a.batch, 1)]
    many = invented_facts(100)
    layers = sorted(set(default_layers(m, "rome") + default_layers(m, "memit")))
    t = time.time(); st = layer_stats(m, tok, layers, n_tokens=a.n_tokens, max_length=128, progress=False)
    print(f"statistics for layers {layers}: {time.time() - t:.1f}s (cached after the first run)")
    tp = context_templates(m, tok, n=a.templates)
    proc = psutil.Process()

    def measure(fn):
        if cuda: torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated()
        else: base = proc.memory_info().rss
        peak = [base]; stop = threading.Event()
        def sample():
            while not stop.is_set(): peak[0] = max(peak[0], proc.memory_info().rss); time.sleep(0.01)
        th = None if cuda else threading.Thread(target=sample, daemon=True)
        if th: th.start()
        t0 = time.time(); rec = fn()
        if cuda: torch.cuda.synchronize()
        dt = time.time() - t0
        if th: stop.set(); th.join()
        mem = (torch.cuda.max_memory_allocated() - base) if cuda else (peak[0] - base)
        top = torch.cuda.max_memory_allocated() if cuda else peak[0]
        rec.revert()
        return dt, mem / 2 ** 20, top / 2 ** 20

    kw = dict(stats=st, templates=tp, steps=a.steps)
    # UltraEdit's step size: the library default (2e-3, tuned on SmolLM2) unless ULR is set; tiny random models need 0.3
    uk = {"lr": float(os.environ["ULR"])} if "ULR" in os.environ else ({"lr": 0.3} if a.model == "tiny" else {})
    ak = dict(nullspace_threshold=0.3, relative=True) if a.model == "tiny" else {}   # a random model has no near-null key space
    runs, ratios = [], {}
    todo = a.methods.split(",")
    def ratio(B):
        by = {(r["method"], r["batch"]): r for r in runs}
        if ("memit", B) in by and ("ultraedit", B) in by and B not in ratios:
            ratios[B] = by[("memit", B)]["per_edit"] / by[("ultraedit", B)]["per_edit"]
            print(f"UltraEdit vs MEMIT per edit at batch {B}: {ratios[B]:.1f}x faster (target >= 5x)", flush=True)
        if a.json: json.dump(dict(model=a.model, device=a.device, threads=a.threads, steps=a.steps, templates=len(tp), runs=runs,
                                  ultraedit_vs_memit=ratios), open(a.json, "w"), indent=1)
    for name in todo:
        for B in ([1] if name in ("rome", "grace") else [1, a.batch]):
            reqs = facts[:B]
            fn = {"rome": lambda: rome(m, tok, reqs, **kw), "memit": lambda: memit(m, tok, reqs, **kw),
                  "emmet": lambda: emmet(m, tok, reqs, **kw),
                  "alphaedit": lambda: alphaedit(m, tok, reqs, **kw, **ak), "ultraedit": lambda: ultraedit(m, tok, reqs, **uk),
                  "grace": lambda: grace(m, tok, reqs, steps=30)}[name]
            dt, mem, top = measure(fn)
            runs.append(dict(method=name, batch=B, seconds=round(dt, 2), per_edit=round(dt / B, 3), peak_mb=round(mem, 1), peak_total_mb=round(top)))
            print(runs[-1], flush=True)
            ratio(B)
        if name == "ultraedit":  # per 100 edits, one call
            dt, mem, top = measure(lambda: ultraedit(m, tok, many, **uk))
            runs.append(dict(method="ultraedit", batch=100, seconds=round(dt, 2), per_edit=round(dt / 100, 4), peak_mb=round(mem, 1), peak_total_mb=round(top)))
            print(runs[-1], flush=True); ratio(100)
    res = dict(model=a.model, device=a.device, threads=a.threads, steps=a.steps, templates=len(tp), runs=runs,
               ultraedit_vs_memit=ratios)
    if a.json: json.dump(res, open(a.json, "w"), indent=1)
    return res

if __name__ == "__main__": main()
