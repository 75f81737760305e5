"Tests for model_ops.edit (core, locate, lifelong, evaluate). Slow SmolLM2 runs: MODEL_OPS_SLOW=1 pytest tests/test_edit.py -k smollm2"
import math, os, warnings
import pytest, torch
from model_ops.nn import tiny_model, tiny_tokenizer, weight_2d, smollm2_available
from model_ops.delta import Delta
import model_ops.edit as E
from model_ops.edit import locate as EL, evaluate as EV
from model_ops.edit import (rome, memit, emmet, alphaedit, ft, ultraedit, grace, evaluate_edits, layer_stats, rome_solve,
                            memit_solve, emmet_solve, alphaedit_solve, nullspace_projector, as_request, sequential_edit)

torch.set_num_threads(1)
warnings.filterwarnings("ignore", message="target_new")
TOK = tiny_tokenizer()
REQS = [{"prompt": "Where is the Eiffel Tower", "subject": "Eiffel Tower", "target_new": "R"},
        {"prompt": "Who wrote Hamlet", "subject": "Hamlet", "target_new": "Q"}]
LAYERS = {"gpt2": "n_layer", "llama": "num_hidden_layers", "qwen2": "num_hidden_layers", "mistral": "num_hidden_layers"}

def model(arch="llama", **kw):
    return tiny_model(arch, initializer_range=0.3, **{LAYERS[arch]: 4}, **kw)

def top1(m, prompt):
    ids = torch.tensor([TOK(prompt)["input_ids"]], device=next(m.parameters()).device)
    return TOK.decode(m(ids).logits[0, -1].argmax())

def state(m): return {n: p.detach().clone() for n, p in m.named_parameters()}
def same(m, s): return all(torch.equal(s[n], p) for n, p in m.named_parameters())

@pytest.fixture(scope="module")
def cache(tmp_path_factory): return str(tmp_path_factory.mktemp("stats"))

def kw_for(fn, cache):
    "Settings for tiny random models: their keys are not outliers, so MEMIT/EMMET need a small λ, and 40 value steps."
    if fn in (ft,): return dict(norm_constraint=None, lr=5e-2, steps=40)
    if fn in (ultraedit,): return dict(lr=0.3)
    if fn in (grace,): return {}
    kw = dict(cache_dir=cache, n_tokens=3000, max_length=64, progress=False, steps=40)
    if fn in (memit, emmet): kw.update(mom2_weight=1.0)
    if fn is alphaedit: kw.update(nullspace_threshold=0.3, relative=True)
    return kw

def logps(m, reqs=REQS):
    return torch.tensor([-s["nll"] for s in E.score_targets(m, TOK, [r["prompt"] for r in reqs], [r["target_new"] for r in reqs])])

@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gpt2"])
@pytest.mark.parametrize("fn", [rome, memit, emmet, alphaedit, ft, ultraedit, grace], ids=lambda f: f.__name__)
def test_edits_and_reverts(arch, fn, cache):
    m = model(arch); s0 = state(m)
    before, lp0 = [top1(m, r["prompt"]) for r in REQS], logps(m)
    reqs = REQS + [{"prompt": "The best fruit is the", "target_new": "K"}] if fn is ultraedit else REQS
    rec = fn(m, TOK, reqs, **kw_for(fn, cache))
    after, lp1 = [top1(m, r["prompt"]) for r in REQS], logps(m)
    flipped = sum(a == r["target_new"] for a, r in zip(after, REQS))
    assert (lp1 - lp0).min() > 1.0, (lp0, lp1)            # every target became much more likely
    hard = fn is ft or (arch == "qwen2" and fn in (memit, emmet, alphaedit))   # tiny random qwen2: gain, but no flip
    assert flipped >= (0 if hard else 1), (before, after)
    if fn is not grace: assert len(rec.delta.names) >= 1 and not same(m, s0)
    rec.revert()
    assert same(m, s0) and [top1(m, r["prompt"]) for r in REQS] == before

def test_bfloat16_rome_and_ultraedit(cache):
    m = model("llama").to(torch.bfloat16); s0 = state(m)
    rec = rome(m, TOK, REQS, **kw_for(rome, cache))
    assert m.model.layers[1].mlp.down_proj.weight.dtype == torch.bfloat16
    assert [top1(m, r["prompt"]) for r in REQS] == ["R", "Q"]
    rec.revert(); assert same(m, s0)
    rec = ultraedit(m, TOK, REQS + [{"prompt": "The best fruit is the", "target_new": "K"}], lr=0.3)
    assert top1(m, REQS[0]["prompt"]) == "R"; rec.revert(); assert same(m, s0)

def test_stats_are_float64_sums_and_cached(tmp_path):
    m = model("llama")
    a = layer_stats(m, TOK, [1], texts=["alpha beta gamma " * 10], n_tokens=10, max_length=32, cache_dir=False, progress=False)[1]
    b = layer_stats(m, TOK, [1], texts=["delta epsilon " * 10], n_tokens=10, max_length=32, cache_dir=False, progress=False)[1]
    ab = layer_stats(m, TOK, [1], texts=["alpha beta gamma " * 10, "delta epsilon " * 10], n_tokens=10 ** 6, max_length=32,
                     cache_dir=False, batch_size=1, progress=False)[1]
    assert a.mom2.dtype == torch.float64 and (a + b).count == ab.count
    torch.testing.assert_close((a + b).mom2, ab.mom2, rtol=1e-6, atol=1e-6)
    s1 = layer_stats(m, TOK, [1, 2], n_tokens=500, max_length=32, cache_dir=tmp_path, progress=False)
    assert len(list(tmp_path.glob("*.safetensors"))) == 2
    s2 = layer_stats(m, TOK, [2], n_tokens=500, max_length=32, cache_dir=tmp_path, progress=False)
    assert torch.equal(s1[2].mom2, s2[2].mom2) and s1[2].all_reduce() is s1[2]

def test_validation_happens_before_any_change(cache):
    m = model("llama"); s0 = state(m)
    with pytest.raises(ValueError, match="does not occur"): rome(m, TOK, [{"prompt": "Where is Rome", "subject": "Paris", "target_new": "R"}])
    with pytest.raises(ValueError, match="empty target_new"): memit(m, TOK, [REQS[0], dict(REQS[1], target_new="")])
    other = model("llama", seed=3)
    st = layer_stats(other, TOK, [1], n_tokens=500, max_length=32, cache_dir=False, progress=False)
    with pytest.raises(ValueError, match="another model"): rome(m, TOK, REQS, stats=st)
    with pytest.raises(ValueError, match="out of range"): rome(m, TOK, REQS, layer=9)
    with pytest.raises(ValueError, match="locate|layers"): rome(torch.nn.Sequential(torch.nn.Linear(2, 2)), TOK, REQS)
    with pytest.raises(ValueError, match="cannot locate module"): ultraedit(m, TOK, REQS, modules=["model.nope"])
    with pytest.raises(ValueError, match="causal language model"): rome(tiny_model("bert"), TOK, REQS)
    assert same(m, s0)

def test_delta_saves_and_reapplies(tmp_path, cache):
    m = model("qwen2"); s0 = state(m)
    rec = rome(m, TOK, REQS, **kw_for(rome, cache)); edited = state(m)
    rec.delta.save(tmp_path / "edit.safetensors"); rec.revert()
    fresh = model("qwen2"); Delta.load(tmp_path / "edit.safetensors").apply(fresh)
    for n, p in fresh.named_parameters(): torch.testing.assert_close(p, edited[n], rtol=0, atol=1e-6)
    assert top1(fresh, REQS[0]["prompt"]) == "R" and same(m, s0)

def test_solvers_match_definitions():
    torch.manual_seed(0); dk, d, B = 10, 4, 3
    X = torch.randn(300, dk, dtype=torch.float64); C = X.T @ X / 300
    K, R = torch.randn(dk, B, dtype=torch.float64), torch.randn(d, B, dtype=torch.float64)
    Ci = torch.linalg.inv(C)
    k = K[:, 0]; delta = R[:, 0]
    torch.testing.assert_close(rome_solve(k, delta, C), torch.outer(delta, Ci @ k) / (k @ Ci @ k))
    torch.testing.assert_close(memit_solve(K, R, C, lam=7.0), R @ K.T @ torch.linalg.inv(7.0 * C + K @ K.T))
    Cl = 5.0 * C; Cli = torch.linalg.inv(Cl)
    ref = R @ torch.linalg.inv(K.T @ Cli @ K + 0.1 * torch.eye(B, dtype=torch.float64)) @ K.T @ Cli
    torch.testing.assert_close(emmet_solve(K, R, C, lam=5.0, ridge=0.1), ref)
    # AlphaEdit: closed form from the paper, and preserved directions untouched
    P, r = nullspace_projector(C, 0.6, relative=True); assert 0 < r < dk
    Kp = torch.randn(dk, 2, dtype=torch.float64); Kp = Kp @ Kp.T
    ref = R @ K.T @ P @ torch.linalg.inv(Kp @ P + K @ K.T @ P + 2.0 * torch.eye(dk, dtype=torch.float64))
    D = alphaedit_solve(K, R, P, Kp, alpha=2.0)
    torch.testing.assert_close(D, ref)
    ev, U = torch.linalg.eigh(C); big = U[:, ev >= 0.6 * ev.max()]
    torch.testing.assert_close(D @ big, torch.zeros(d, big.shape[1], dtype=torch.float64))

def test_rome_uses_the_averaged_key_consistently(cache):
    m = model("llama"); r = as_request(REQS[0]); tp = E.context_templates(m, TOK, n=2)
    k = EL._mean_keys(m, TOK, m.model.layers[1].mlp.down_proj, [r], tp)[0]
    W = weight_2d(m.model.layers[1].mlp.down_proj).detach().clone()
    rec = rome(m, TOK, REQS[:1], templates=tp, **kw_for(rome, cache))
    dW = rec.delta["model.layers.1.mlp.down_proj.weight"].double(); delta = rec.info["deltas"][0].double()
    # rank one, and it maps the prefix-averaged key k̄ (not the unprefixed key) exactly onto the optimised shift δ
    assert torch.linalg.matrix_rank(dW, rtol=1e-6) == 1
    torch.testing.assert_close(dW @ k.double(), delta, rtol=1e-3, atol=1e-3 * delta.norm().item())
    ku = EL._mean_keys(m, TOK, m.model.layers[1].mlp.down_proj, [r], ["{}"])[0]
    assert (dW @ ku.double() - delta).norm() > 1e-2 * delta.norm()
    assert dW.norm() < 10 * W.norm()

def test_evaluate_edits_scores():
    m = model("gpt2")
    before = [top1(m, r["prompt"]) for r in REQS]
    case = dict(REQS[0], target_true=before[0], paraphrases=["Tell me where the Eiffel Tower"], neighbors=[[REQS[1]["prompt"], before[1]]])
    pre = evaluate_edits(m, TOK, [case], fluency=True)
    assert pre["efficacy"] == 0 and pre["generation"] == 0 and pre["neighborhood"] == 1 and pre["fluency"] >= 0
    rec = rome(m, TOK, REQS[0], n_tokens=2000, max_length=32, progress=False, cache_dir=False)
    post = evaluate_edits(m, TOK, [case]); rec.revert()
    assert post["efficacy"] == 1 and post["rewrite_acc"] == 1 and post["generation"] == 1 and post["neighborhood"] == 1
    with pytest.raises(ValueError, match="target_true"): evaluate_edits(m, TOK, [REQS[0]])

def test_outside_neighbors_avoid_edited_subjects():
    cands = E.counterfact_candidates(); batch = cands[:30]; edited = {c["subject"] for c in batch}
    oc = E.outside_neighbors(batch)
    assert [c["subject"] for c in oc] == [c["subject"] for c in batch] and all(len(c["neighbors"]) == 3 for c in oc)
    assert not any(EV._mentions(p, s) for c in oc for p, _ in c["neighbors"] for s in edited)
    assert all(a not in (c["target_new"], c["target_true"]) for c in oc for _, a in c["neighbors"])
    assert sum(any(EV._mentions(p, s) for s in edited) for c in batch for p, _ in c["neighbors"]) > 30  # the original ones mostly were
    pool = [f for f in E.neighbor_pool() if f["relation"] != "capital"]  # a restricted pool: capitals refill from other relations
    oc = E.outside_neighbors(batch[:20], pool)
    assert all(len(c["neighbors"]) == 3 and all(list(n) in [[f["prompt"], f["answer"]] for f in pool] for n in c["neighbors"]) for c in oc)
    assert not EV._mentions("The capital of Francevile is", "France") and EV._mentions("France's capital is", "France")

def test_alphaedit_cache_accumulates_and_sequential_monitor():
    m = model("llama"); s0 = state(m)
    kw = dict(n_tokens=2000, max_length=32, progress=False, cache_dir=False, nullspace_threshold=0.3, relative=True)
    r1 = alphaedit(m, TOK, REQS[:1], **kw); c = r1.info["cache"]
    k1 = {l: v.clone() for l, v in c.Kp.items()}
    r2 = alphaedit(m, TOK, REQS[1:], cache=c, **kw)
    assert all(not torch.equal(k1[l], c.Kp[l]) for l in k1)
    r2.revert(); r1.revert(); assert same(m, s0)
    res = sequential_edit(m, TOK, REQS * 2, "grace", every=2, ppl_texts=["a short sentence to score."], log=None)
    assert [h["edits"] for h in res.history] == [0, 2, 4] and res.history[-1]["efficacy"] > 0.9
    res.revert(); assert same(m, s0) and not isinstance(m.model.layers[3].mlp.down_proj, E.GraceAdapter)

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_rome_memit():
    m = model("llama").cuda(); s0 = state(m)
    rec = rome(m, TOK, REQS, n_tokens=2000, max_length=32, progress=False, cache_dir=False)
    assert [top1(m, r["prompt"]) for r in REQS] == ["R", "Q"]; rec.revert(); assert same(m, s0)
    rec = memit(m, TOK, REQS, n_tokens=2000, max_length=32, progress=False, cache_dir=False); rec.revert(); assert same(m, s0)

SLOW = pytest.mark.skipif(not (os.environ.get("MODEL_OPS_SLOW") and smollm2_available()), reason="set MODEL_OPS_SLOW=1 (needs SmolLM2)")

@pytest.fixture(scope="module")
def smol():
    from model_ops.nn import load_model
    return load_model("smollm2")

@SLOW
def test_smollm2_counterfact_rome_and_batch(smol):
    "ROME on 10 known facts (one at a time) and EMMET on 30 as one batch; batch neighbours are about subjects outside the batch."
    m, tok = smol
    cases = E.known_cases(m, tok, E.counterfact_candidates())
    assert len(cases) >= 30, len(cases)
    cases = cases[:30]; s0 = state(m)
    st = layer_stats(m, tok, [4, 5, 6, 7, 8], n_tokens=8192, max_length=128, progress=False)
    tp = E.context_templates(m, tok, n=3)
    rows = []
    for c in cases[::3]:
        rec = rome(m, tok, c, stats=st, templates=tp); rows.append(evaluate_edits(m, tok, [c], generation=False)); rec.revert()
    r = {k: sum(x[k] for x in rows) / len(rows) for k in ("efficacy", "paraphrase", "neighborhood")}
    print("ROME on 10:", r)
    assert r["efficacy"] >= 0.95 and r["paraphrase"] >= 0.6 and r["neighborhood"] >= 0.8 and same(m, s0)
    ocases = E.outside_neighbors(cases, E.neighbor_pool(m, tok))
    rec = emmet(m, tok, cases, stats=st, templates=tp)
    ev, evo = evaluate_edits(m, tok, cases, generation=False), evaluate_edits(m, tok, ocases, generation=False); rec.revert()
    print("EMMET batch 30:", {k: v for k, v in ev.items() if k != "cases"}, "outside-batch neighbourhood", evo["neighborhood"])
    assert ev["efficacy"] >= 0.9 and evo["neighborhood"] >= 0.9 and same(m, s0)  # measured 1.00 and 0.94 (in-batch 0.63)

def test_rrome_keys_share_delta_and_differ_by_denominator():
    "keys='prefix' (r-ROME) maps k̄ to δ, 'original' (ROME's released code) maps the bare key k_u to δ with u = C⁻¹k̄."
    m = model("llama"); r = {"prompt": "Eiffel Tower is in", "subject": "Eiffel Tower", "target_new": "R"}
    tp = E.context_templates(m, TOK, n=2); mod = m.model.layers[1].mlp.down_proj; s0 = state(m)
    kw = dict(cache_dir=False, n_tokens=2000, max_length=64, progress=False, templates=tp, shrink=0)
    out = {}
    for keys in ("prefix", "original"):
        rec = rome(m, TOK, r, keys=keys, **kw); out[keys] = (rec.delta["model.layers.1.mlp.down_proj.weight"].double(), rec.info["deltas"][0].double()); rec.revert()
    assert same(m, s0)
    rq = as_request(r); kb = EL._mean_keys(m, TOK, mod, [rq], tp)[0].double(); ku = EL._mean_keys(m, TOK, mod, [rq], ["{}"])[0].double()
    C = layer_stats(m, TOK, [1], cache_dir=False, n_tokens=2000, max_length=64, progress=False)[1].C.double(); u = torch.linalg.solve(C, kb)
    (dP, d), (dO, d2) = out["prefix"], out["original"]
    torch.testing.assert_close(d, d2)
    torch.testing.assert_close(dP @ kb, d, rtol=1e-3, atol=1e-3 * d.norm().item())
    torch.testing.assert_close(dO @ ku, d, rtol=1e-3, atol=1e-3 * d.norm().item())
    assert abs(dO.norm() / dP.norm() - abs((u @ kb) / (u @ ku))) < 1e-3 * dO.norm() / dP.norm()
    with pytest.raises(ValueError, match="r-ROME"): rome(m, TOK, r, keys="mixed", **kw)

@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_logits_at_scored_positions_equal_full_logits(arch):
    m = model(arch); ids = torch.tensor([TOK("Where is the Eiffel Tower")["input_ids"], TOK("Who wrote Hamlet and then")["input_ids"]])
    rows, pos = torch.tensor([0, 1, 1, 0]), torch.tensor([2, 0, 4, 24])
    with torch.no_grad(): torch.testing.assert_close(EL._logits_at(m, ids, torch.ones_like(ids), rows, pos), m(ids).logits[rows, pos], rtol=1e-5, atol=1e-5)

def test_general_abilities_and_drop():
    m = model("gpt2"); before = top1(m, REQS[0]["prompt"])
    facts = [{"prompt": REQS[0]["prompt"], "answer": before}]
    a0 = EV.general_abilities(m, TOK, facts, n_arith=4, n_texts=3, max_new_tokens=4)
    assert a0["recall"] == 1 and a0["perplexity"] > 1 and set(a0) >= {"arithmetic", "format", "perplexity", "recall"}
    rec = rome(m, TOK, REQS[0], n_tokens=2000, max_length=32, progress=False, cache_dir=False)
    a1 = EV.general_abilities(m, TOK, facts, n_arith=4, n_texts=3, max_new_tokens=4); ev = evaluate_edits(m, TOK, [dict(REQS[0], target_true=before)])
    rec.revert()
    dr = EV.ability_drop(a0, a1)
    assert dr["recall"] == 1 and abs(dr["perplexity"] - (a1["perplexity"] / a0["perplexity"] - 1)) < 1e-9
    assert ev["generation"] == 1 and ev["generation_free"] == 1 and ev["efficacy"] == 1

@SLOW
def test_smollm2_original_rome_disables_and_rrome_does_not(smol):
    "The Butterfly-Effect case: the subject opens the prompt (no BOS), so ROME's released key mix blows up ΔW; r-ROME's does not."
    from model_ops.eval import perplexity, default_texts
    m, tok = smol; s0 = state(m); texts = default_texts(n=None)[-8:]
    r = {"prompt": "Paris is the capital of", "subject": "Paris", "target_new": " Italy"}   # one-token subject, first token
    kw = dict(n_tokens=4096, max_length=64, progress=False, templates=E.context_templates(m, tok, n=5), steps=10, shrink=0)
    p0 = perplexity(m, tok, texts, max_length=64); res = {}
    for keys in ("original", "prefix"):
        rec = rome(m, tok, r, keys=keys, **kw); res[keys] = (rec.info["norms"][0], perplexity(m, tok, texts, max_length=64)); rec.revert()
    print("perplexity", p0, res)
    assert same(m, s0)
    assert res["original"][1] > 2 * p0 and res["original"][0] > 10 * res["prefix"][0]   # disabled
    assert res["prefix"][1] < 1.1 * p0                                                   # r-ROME: fine

def test_batch_values_equal_single_runs_with_per_request_early_stop():
    "A request that converges leaves the batch with its δ frozen: each δ of a batch equals the δ of its own run."
    m = model("llama"); tp = E.context_templates(m, TOK, n=2); mod = m.model.layers[1].mlp.down_proj
    reqs = E.as_requests(REQS + [{"prompt": "The best fruit is the", "subject": "fruit", "target_new": "K"}])
    D, info = EL.optimize_values(m, TOK, reqs, mod, tp, steps=40, early_stop=1.0)
    assert len(set(info["req_steps"])) > 1, info["req_steps"]                 # they converge at different steps
    for j, r in enumerate(reqs):
        d1, i1 = EL.optimize_values(m, TOK, [r], mod, tp, steps=40, early_stop=1.0)
        assert i1["steps"] == info["req_steps"][j]
        torch.testing.assert_close(d1[0], D[j], rtol=1e-4, atol=1e-5)

def test_shrinkage_keeps_the_edit_and_is_the_default():
    m = model("llama"); st = layer_stats(m, TOK, [1], cache_dir=False, n_tokens=500, max_length=64, progress=False)
    a = E.shrink_alpha(st[1].mom2.shape[0], st[1].count); assert 0 < a <= 0.3
    torch.testing.assert_close(torch.trace(st[1].shrunk(a)), torch.trace(st[1].C))
    tp = E.context_templates(m, TOK, n=2); k = EL._mean_keys(m, TOK, m.model.layers[1].mlp.down_proj, [as_request(REQS[0])], tp)[0].double()
    d = {}
    for s in ("auto", a, 0):
        rec = rome(m, TOK, REQS[0], stats=st, templates=tp, shrink=s, steps=10); d[s] = rec.delta["model.layers.1.mlp.down_proj.weight"].double(); rec.revert()
    torch.testing.assert_close(d["auto"], d[a])                                   # 'auto' is shrink_alpha
    assert (d["auto"] - d[0]).norm() > 1e-3 * d[0].norm()                          # and it changes the update ...
    for s in ("auto", 0): torch.testing.assert_close(d[s] @ k, d[0] @ k, rtol=1e-3, atol=1e-3 * (d[0] @ k).norm().item())   # ... not ΔW k̄ = δ

def test_demo_step_one_thread_when_busy_and_restores(monkeypatch):
    seen = []
    monkeypatch.setattr(EV, "_busy", lambda: True)
    monkeypatch.setattr(EV, "_demo_step", lambda *a: seen.append(torch.get_num_threads()) or {"reverted": True})
    torch.set_num_threads(2)
    try:
        assert EV.demo_step(model("llama"), TOK, log=None)["reverted"] and seen == [1] and torch.get_num_threads() == 2
    finally: torch.set_num_threads(1)
