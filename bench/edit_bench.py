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

Recorded 2026-12-07 (session 8), one thread, each method its own run through `/work/heavy` (a slot of the shared
2-core machine; load average 2.2-3.3, so wall seconds run 5-40 % above CPU seconds), default settings (5 templates,
at most 20 value steps, statistics from 4,096 tokens x 64), `MODEL_OPS_CACHE` pointed at a fresh folder:

    /work/heavy env MODEL_OPS_CACHE=$(mktemp -d) python bench/edit_bench.py --threads 1 --methods rome,memit   # then emmet, then alphaedit

MEMIT "after" rows: rerun 2026-12-07 (session 9) on the code that stops `module_io_at` at the module it reads, one
thread, each batch its own run through `/work/heavy` (load average 2.2-2.8), cold then warm:

    /work/heavy env MODEL_OPS_CACHE=$(mktemp -d) python bench/edit_bench.py --threads 1 --methods memit --batches 8   # then --batches 30

Phases in CPU seconds except `rest` (wall); value steps are the same for every method (the same 30 facts, the same v*):
8 facts take 12,12,20,15,10,11,15,20 steps (115 request-steps), the 30 facts 451 request-steps (429 in the MEMIT "after"
runs).

| call | cache | wall s | CPU s | statistics | templates | values | rest (wall) |
|---|---|---|---|---|---|---|---|
| ROME, 1 (before) | cold | 16.3 | 15.7 | 3.9 | 2.7 | 8.6 (13 steps) | 0.8 |
| ROME, 1 (before) | warm | 11.3 | 9.3 | 0 | 0 | 8.8 | 0.5 |
| MEMIT, 8 (before) | cold | 131.1 | 102.9 | 6.9 | 2.8 | 63.7 | 50.8 |
| MEMIT, 8 (before) | warm | 132.7 | 92.9 | 0 | 0 | 64.0 | 34.2 |
| MEMIT, 30 (before) | cold | 542.0 | 455.8 | 6.8 | 2.8 | 323.2 | 142.3 |
| MEMIT, 30 (before) | warm | 486.9 | 426.3 | 0 | 0 | 306.4 | 147.4 |
| MEMIT, 8 (after) | cold | 85.5 | 81.3 | 7.2 | 2.9 | 64.5 | 6.8 |
| MEMIT, 8 (after) | warm | 74.4 | 72.4 | 0 | 0 | 65.6 | 7.2 |
| MEMIT, 30 (after) | cold | 378.7 | 371.2 | 7.8 | 3.2 | 333.3 | 27.4 |
| MEMIT, 30 (after) | warm | 365.2 | 340.0 | 0 | 0 | 313.0 | 28.3 |
| EMMET, 8 | cold | 115.2 | 90.7 | 8.4 | 3.4 | 71.3 | 10.6 |
| EMMET, 8 | warm | 113.2 | 81.0 | 0 | 0 | 73.4 | 8.0 |
| EMMET, 30 | cold | 389.5 | 361.3 | 8.0 | 4.3 | 321.6 | 28.3 |
| EMMET, 30 | warm | 370.8 | 345.8 | 0 | 0 | 318.7 | 28.1 |
| AlphaEdit, 8 | cold | 93.7 | 91.0 | 7.3 | 2.8 | 66.2 | 15.2 |
| AlphaEdit, 8 | warm | 84.2 | 81.6 | 0 | 0 | 66.5 | 15.6 |
| AlphaEdit, 30 | cold | 390.0 | 376.8 | 7.3 | 3.3 | 323.9 | 43.6 |
| AlphaEdit, 30 | warm | 365.4 | 353.6 | 0 | 0 | 312.1 | 42.5 |

Where a batch's time goes: **value optimisation** (v* for every request, each step a forward and backward pass of
SmolLM2 over the request's 6 templated prompts and its KL prompt) costs about 0.55-0.7 CPU s per request-step and grows
linearly with the batch: 64 s for 8 facts, 306-323 s for 30. Statistics (computed when cold: 7-8 s for 5 layers from
4,096 tokens) and templates (3-4 s) are small, and the closed-form solves are under a second. The other large item was
**reading keys and values at the edited layers** ("rest"): `module_io_at` ran the whole model, including the
49,152-word output layer at every position, twice per edited layer, for every templated prompt of the batch. It now
stops the forward pass at the module it reads (rows "before" ran the code without that stop, EMMET, AlphaEdit and
MEMIT "after" with it; the values are bit-identical, only the pass is shorter): the rest fell from 34-51 s to 7-11 s for
8 facts and from 142-147 s to 27-28 s for 30, and a MEMIT batch from 131/133 s (cold/warm wall) to 85/74 s for 8 facts
and from 542/487 s to 379/365 s for 30 (AlphaEdit's rest, 15 s and 43 s, also holds the eigendecomposition of C for each
edited layer's null-space projector and a second read of the keys for its cache). Per fact, a batch of 30 now costs about 12-13 s of CPU (16-18 s wall before), of which
about 11 s are its value optimisation; fewer value steps (`steps`) or templates (`templates=context_templates(m, tok, n=3)`)
are the remaining levers, and both change the edit.
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
