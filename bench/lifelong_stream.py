"""Lifelong editing on SmolLM2: one method over the stream of `invented_facts(200)` in turns of 20, as in the lifelong notebook.

After every turn `sequential_edit` records perplexity on 16 offline paragraphs, efficacy over all facts edited so far and
retention of the first turn's 20 facts; at the end this script adds locality (the share of `neighbor_pool` facts that
SmolLM2 answered correctly before editing and still answers correctly) and, for WISE, where the prompts are routed.
Every edit is reverted at the end and the weights checked bit for bit.

    nice -n 10 python bench/lifelong_stream.py --method wise [--n 200] [--turn 20] [--kw '{"edit_lr": 0.1}'] [--json out.json]

`--kw` goes to the editor; for WISE its `batch_size` (requests per optimisation, e.g. `{"batch_size": 20, "save_freq": 20}`:
one optimisation and one shard per turn) is passed to `wise` itself, not taken as the turn size.
WISE's irrelevant inputs default to `loc_texts='mixed'` (session 10); the runs recorded before used `{"loc_texts": "prose"}`.
`{"batch_size": 20, "save_freq": 20, "shard_negatives": true}` also trains each shard against the earlier shards' edits.

`--method alphaedit` uses the settings of the notebook's recorded AlphaEdit run (layers 4-8, statistics from 8,192 tokens,
3 context templates, 15 value steps).
"""
import argparse, json, os, time, warnings


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", default="wise"); ap.add_argument("--n", type=int, default=200); ap.add_argument("--turn", type=int, default=20)
    ap.add_argument("--kw", default="{}"); ap.add_argument("--json", default=None); ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    import torch
    warnings.filterwarnings("ignore"); torch.set_num_threads(a.threads)
    from model_ops.nn import load_model
    from model_ops.eval import default_texts
    from model_ops.edit.evaluate import invented_facts, neighbor_pool, greedy
    from model_ops.edit.core import as_qa
    from model_ops.edit.lifelong import sequential_edit
    from model_ops.edit.wise import wise_routes
    sm, stok = load_model("smollm2"); s0 = {n: p.clone() for n, p in sm.named_parameters()}
    kw = json.loads(a.kw)
    if a.method == "alphaedit":
        from model_ops.edit.core import layer_stats
        from model_ops.edit.locate import context_templates
        kw = dict(stats=layer_stats(sm, stok, [4, 5, 6, 7, 8], n_tokens=8192, max_length=128, progress=False),
                  templates=context_templates(sm, stok, n=3), steps=15, **kw)
    pool = neighbor_pool(sm, stok)
    def locality():
        gens = greedy(sm, stok, [f["prompt"] for f in pool], 4)
        return sum(g.strip().startswith(f["answer"].strip()) for f, g in zip(pool, gens)) / len(pool)
    facts = invented_facts(200)[:a.n]; out = dict(method=a.method, n=a.n, turn=a.turn, kw=a.kw, pool=len(pool))
    turns = []; t_last = [time.time()]; start = time.time()
    def log(msg):
        print(f"[{time.time() - start:.0f} s] {msg}", flush=True)
        if "edits: perplexity" in msg: turns.append(round(time.time() - t_last[0], 1)); t_last[0] = time.time()
    t0, c0 = time.time(), time.process_time()
    method = a.method
    if a.method == "wise" and "batch_size" in kw:   # WISE's own batch (requests per optimisation), not the turn size
        import functools
        from model_ops.edit.wise import wise
        method = functools.partial(wise, batch_size=kw.pop("batch_size")); method.__name__ = "wise"
    res = sequential_edit(sm, stok, facts, method, batch_size=a.turn, every=a.turn, ppl_texts=default_texts(n=16), log=log, **kw)
    out.update(wall_s=round(time.time() - t0, 1), cpu_s=round(time.process_time() - c0, 1), turn_wall_s=turns,
               base_ppl=res.base_ppl, history=res.history, locality=locality(), load1=os.getloadavg()[0])
    if a.method == "wise":
        ad = res.records[0].info["adapter"]
        out["routed_to_side"] = sum(r >= 0 for r in wise_routes(sm, stok, [as_qa(f).prompt for f in facts])) / len(facts)
        out["pool_routed_to_side"] = sum(r >= 0 for r in wise_routes(sm, stok, [f["prompt"] for f in pool])) / len(pool)
        out["steps_per_edit"] = [len(l) for r in res.records for l in r.info["loss"]]
        out.update(shards=len(ad.memories), merges=ad.merges)
    res.revert(); out["revert_exact"] = all(torch.equal(s0[n], p) for n, p in sm.named_parameters())
    print(json.dumps({k: v for k, v in out.items() if k != "steps_per_edit"}), flush=True)
    if a.json: json.dump(out, open(a.json, "w"), indent=1)
    return out

if __name__ == "__main__": main()
