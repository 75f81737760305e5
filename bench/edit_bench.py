"""Benchmark: where an edit's time goes, cold and warm, for model_ops.edit methods on SmolLM2-135M-Instruct (or a tiny model).

Per edit for ROME (one request per call) and per batch (8 and 30 requests) for MEMIT / EMMET / AlphaEdit, each
measured twice:
- cold: a fresh statistics cache folder (a temporary `cache_dir`, so the key statistics are computed inside the call)
  and no cached context templates (they are generated inside the call), as on a fresh machine;
- warm: statistics read from that cache, templates cached in memory, as for every later edit.
Each call is split into phases by wrapping the library functions it calls: statistics (`layer_stats`: computed
when cold, read from disk when warm), context templates (generation), value optimisation (`optimize_values`,
with its step count) and the rest (keys at the edited layers, closed-form solve, snapshot). Wall seconds and
process CPU seconds are both printed, with the 1-minute load average when the call ended: on the shared 2-core
machine wall time depends on the load, CPU time much less. Every edit is reverted before the next.
Optionally UltraEdit / GRACE (`--methods`).

    nice -n 10 python bench/edit_bench.py [--quick] [--model smollm2|tiny] [--batches 8,30] [--steps 20] [--templates 5]
                                          [--n-tokens 4096] [--methods rome,memit,emmet,alphaedit] [--json out.json]

`--quick`: ROME and MEMIT only, batch 8, 3 templates, statistics from 2,048 tokens.

Recorded 2026-12-07, `nice -n 10 python bench/edit_bench.py --quick --threads 1` on SmolLM2, the shared 2-core machine
under a load average of 11-18 from other jobs (wall seconds 10-25x the CPU seconds, so CPU seconds are the figures):

| call | cache | CPU s | statistics | templates | values (steps per request) | rest | wall s (load) |
|---|---|---|---|---|---|---|---|
| ROME, 1 | cold | 12.8 | 2.5 | 2.1 | 7.8 (13) | 0.4 | 311 (17.9) |
| ROME, 1 | warm | 8.4 | 0.0 | 0 | 8.0 (13) | 0.4 | 141 (16.4) |
| MEMIT, 8 | cold | 78.4 | 3.8 | 2.2 | 51.5 (12,12,20,17,10,11,14,20) | 20.9 | 597 (11.1) |
| MEMIT, 8 | warm | 72.1 | 0.0 | 0 | 51.2 (the same) | 20.8 | 277 (8.8) |

MEMIT's per-request early stop ran 116 request-steps where stopping the batch only when all converge runs 160.
Batches of 30 and EMMET / AlphaEdit were not run in that window (they would have taken hours of wall time).
"""
import argparse, json, os, shutil, tempfile, time, warnings
from contextlib import contextmanager


class Phases:
    "Wall/CPU seconds spent inside wrapped functions of a module, by phase name."
    def __init__(self): self.t, self.steps = {}, []
    @contextmanager
    def patch(self, mod, fname, phase):
        f = getattr(mod, fname)
        def wrapped(*a, **k):
            t0, c0 = time.time(), time.process_time()
            try:
                r = f(*a, **k)
                if fname == "optimize_values": self.steps.append(r[1].get("req_steps", r[1]["steps"]))
                return r
            finally:
                w, c = self.t.get(phase, (0.0, 0.0)); self.t[phase] = (w + time.time() - t0, c + time.process_time() - c0)
        setattr(mod, fname, wrapped)
        try: yield
        finally: setattr(mod, fname, f)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2"); ap.add_argument("--batches", default="8,30")
    ap.add_argument("--steps", type=int, default=20); ap.add_argument("--templates", type=int, default=5)
    ap.add_argument("--n-tokens", type=int, default=4096); ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2); ap.add_argument("--device", default="cpu")
    ap.add_argument("--methods", default="rome,memit,emmet,alphaedit"); ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    if a.quick: a.methods, a.batches, a.templates, a.n_tokens = "rome,memit", "8", 3, 2048
    import torch
    warnings.filterwarnings("ignore"); torch.set_num_threads(a.threads)
    from model_ops.nn import load_model, tiny_model, tiny_tokenizer
    from model_ops.edit import rome, memit, emmet, alphaedit, counterfact_candidates
    from model_ops.edit import locate as EL
    from model_ops.edit.lifelong import ultraedit, grace
    if a.model == "tiny": m, tok = tiny_model("llama", initializer_range=0.3, num_hidden_layers=8), tiny_tokenizer()
    else: m, tok = load_model(a.model)
    m = m.to(a.device)
    batches = [int(b) for b in a.batches.split(",")]
    facts = counterfact_candidates()[:max(batches)]
    cache = tempfile.mkdtemp(prefix="edit_bench_stats_")
    kw = dict(steps=a.steps, n_tokens=a.n_tokens, max_length=a.max_length, cache_dir=cache, progress=False)
    ak = dict(nullspace_threshold=0.3, relative=True) if a.model == "tiny" else {}   # a random model has no near-null key space
    fns = {"rome": lambda r, t: rome(m, tok, r, templates=t, **kw), "memit": lambda r, t: memit(m, tok, r, templates=t, **kw),
           "emmet": lambda r, t: emmet(m, tok, r, templates=t, **kw),
           "alphaedit": lambda r, t: alphaedit(m, tok, r, templates=t, **kw, **ak),
           "ultraedit": lambda r, t: ultraedit(m, tok, r, **({"lr": 0.3} if a.model == "tiny" else {})),
           "grace": lambda r, t: grace(m, tok, r, steps=30)}
    runs = []
    def one(name, B, cold):
        if cold:   # a fresh machine: empty statistics cache, no templates in memory
            shutil.rmtree(cache, ignore_errors=True); os.makedirs(cache); EL._TEMPLATE_CACHE.clear()
        ph = Phases()
        def templates():   # generated inside the timed call when cold (what `rome(templates=None)` does), cached when warm
            return EL.context_templates(m, tok, n=a.templates)
        with ph.patch(EL, "layer_stats", "statistics"), ph.patch(EL, "optimize_values", "values"), ph.patch(EL, "context_templates", "templates"):
            t0, c0 = time.time(), time.process_time()
            rec = fns[name](facts[:B], templates() if name not in ("ultraedit", "grace") else None)
            wall, cpu = time.time() - t0, time.process_time() - c0
        rec.revert()
        row = dict(method=name, batch=B, cache="cold" if cold else "warm", wall_s=round(wall, 2), cpu_s=round(cpu, 2),
                   per_edit_wall_s=round(wall / B, 2), load1=round(os.getloadavg()[0], 1), value_steps=ph.steps,
                   **{f"{k}_wall_s": round(v[0], 2) for k, v in ph.t.items()}, **{f"{k}_cpu_s": round(v[1], 2) for k, v in ph.t.items()})
        row["other_wall_s"] = round(wall - sum(v[0] for v in ph.t.values()), 2)
        runs.append(row); print(json.dumps(row), flush=True)
        if a.json: json.dump(dict(model=a.model, args=vars(a), runs=runs), open(a.json, "w"), indent=1)
    print(f"# {a.model}, {a.threads} threads, {a.templates} templates, {a.steps} value steps max, statistics {a.n_tokens} tokens x {a.max_length}; "
          f"load at start {os.getloadavg()}", flush=True)
    for name in a.methods.split(","):
        for B in ([1] if name in ("rome", "grace") else batches):
            one(name, B, cold=True); one(name, B, cold=False)
    shutil.rmtree(cache, ignore_errors=True)
    return runs

if __name__ == "__main__": main()
