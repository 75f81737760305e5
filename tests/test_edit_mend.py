"Tests for MEND (model_ops.edit.mend) and WISE (model_ops.edit.wise) on tiny models."
import warnings
import pytest, torch
from model_ops.nn import tiny_model, tiny_tokenizer, weight_2d
from model_ops.edit.core import score_targets, as_request
from model_ops.edit.mend import (mend_modules, grad_factors, MendEditor, train_mend, mend, make_cases, split_facts,
                                 MEND_RELATIONS, mend_losses)
from model_ops.edit.wise import wise, wise_routes, WiseAdapter, ties_merge
from model_ops.edit.lifelong import get_editor

torch.set_num_threads(1)
warnings.filterwarnings("ignore", message="target_new")
TOK = tiny_tokenizer()
REQS = [{"prompt": "Where is the Eiffel Tower", "subject": "Eiffel Tower", "target_new": "R"},
        {"prompt": "Who wrote Hamlet", "subject": "Hamlet", "target_new": "Q"}]

def state(m): return {n: p.detach().clone() for n, p in m.named_parameters()}
def same(m, s): return all(torch.equal(s[n], p) for n, p in m.named_parameters())
def synth(i): return {"prompt": f"Fact number {i} is", "subject": f"number {i}", "target_new": " " + "ABCDEFGHJK"[(7 * i) % 10],
                      "paraphrases": [f"Number {i} fact is"], "neighbors": [[f"Fact number {i + 1000} is", " Z"]]}

@pytest.mark.parametrize("arch,layers", [("llama", "num_hidden_layers"), ("qwen2", "num_hidden_layers"), ("gpt2", "n_layer")])
def test_decomposition_is_the_gradient(arch, layers):
    m = tiny_model(arch, **{layers: 3}); names = mend_modules(m)
    fac = grad_factors(m, TOK, REQS, names, keep_grad=True)
    for n in names:
        mod = m.get_submodule(n); U, D = fac[n]
        g = mod.weight.grad if arch != "gpt2" else mod.weight.grad.T       # (out, in)
        assert g.abs().max() > 0
        torch.testing.assert_close(D.T @ U, g, rtol=1e-5, atol=1e-6 * g.abs().max().item())
    assert all(m.get_submodule(n).weight.requires_grad for n in names)     # flags given back

@pytest.fixture(scope="module")
def trained():
    tm = tiny_model("llama", num_hidden_layers=3, initializer_range=0.1)
    ed = train_mend(tm, TOK, [synth(i) for i in range(40)], steps=150, lr=1e-3, lr_lr=1e-3, rank=32, log=None)
    return tm, ed

def test_trained_editor_moves_held_out_targets(trained):
    tm, ed = trained; s0 = state(tm); held = [synth(i) for i in range(200, 212)]
    def lp(): return torch.tensor([s["logprob"] for s in score_targets(tm, TOK, [as_request(c).prompt for c in held], [c["target_new"] for c in held])])
    base, gains, gains0 = lp(), [], []
    for editor, out in ((ed, gains), (MendEditor.for_model(tm, rank=32), gains0)):
        for i, c in enumerate(held):
            rec = mend(tm, TOK, c, editor=editor); out.append((lp()[i] - base[i]).item()); rec.revert()
    assert same(tm, s0)
    assert sum(gains) / len(gains) > 1.0 and sum(gains) / len(gains) > sum(gains0) / len(gains0) + 1.0, (gains, gains0)

def test_save_load_round_trip_and_revert(trained, tmp_path):
    tm, ed = trained; s0 = state(tm)
    p = ed.save(tmp_path / "ed.pt"); ed2 = MendEditor.load(p)
    a, b = ed.state_dict(), ed2.state_dict()
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert (ed2.modules_, ed2.shapes, ed2.mode) == (ed.modules_, ed.shapes, ed.mode)
    r1 = mend(tm, TOK, REQS, editor=ed); s1 = state(tm); r1.revert(); assert same(tm, s0)
    r2 = get_editor("mend")(tm, TOK, REQS, editor=p); assert same(tm, s1)
    r2.revert(); assert same(tm, s0)

def test_mend_errors(trained, tmp_path):
    tm, ed = trained
    with pytest.raises(FileNotFoundError, match="no MEND editor"): mend(tm, TOK, REQS, editor=tmp_path / "x.pt")
    with pytest.raises(ValueError, match="train an editor"): mend(tiny_model("llama", num_hidden_layers=3, intermediate_size=96), TOK, REQS, editor=ed)
    with pytest.raises(ValueError, match="no training cases"): train_mend(tm, TOK, [])

def test_losses_reach_the_editor():
    tm = tiny_model("llama", num_hidden_layers=2); ed = MendEditor.for_model(tm, rank=8)
    loss, le, ll = mend_losses(tm, TOK, ed, synth(1)); loss.backward()
    assert ed.lrs.grad is not None and ed.lrs.grad.abs().sum() > 0 and le > 0 and ll >= 0

def test_cases_split_by_subject():
    facts = [dict(relation="capital", subject=s, answer=a, prob=0.9, templates=list(MEND_RELATIONS["capital"][0]))
             for s, a in [("France", " Paris"), ("Japan", " Tokyo"), ("Egypt", " Cairo"), ("Spain", " Madrid"), ("Peru", " Lima"), ("Kenya", " Nairobi"), ("Cuba", " Havana"), ("Chile", " Santiago")]]
    tr, ho = split_facts(facts, held_out=0.25)
    assert len(ho) == 2 and not {f["subject"] for f in tr} & {f["subject"] for f in ho}
    for part in (tr, ho):
        subs = {f["subject"] for f in part}
        for c in make_cases(part):
            assert c["target_new"] != c["target_true"] and c["subject"] in c["paraphrases"][0]
            assert all(any(s in p for s in subs - {c["subject"]}) for p, _ in c["neighbors"])

# --- WISE ---
OTHER = ["The weather today is fine", "A cat sat on the mat", "Numbers go up and down", "She opened the window slowly"]
REQS4 = [{"prompt": "Where is the Eiffel Tower", "target_new": "R"}, {"prompt": "Who wrote Hamlet", "target_new": "Q"},
         {"prompt": "What is the colour of the sky", "target_new": "Z"}, {"prompt": "The best fruit is the", "target_new": "K"}]

def test_wise_routes_edits_to_side_memory_and_reverts():
    m = tiny_model("llama", initializer_range=0.1, hidden_size=256, intermediate_size=512, num_hidden_layers=4); s0 = state(m)
    rec = wise(m, TOK, REQS4)
    ad = rec.info["adapter"]; assert isinstance(ad, WiseAdapter) and ad.count == 4 and not ad.memories
    nll = [s["nll"] for s in score_targets(m, TOK, [r["prompt"] for r in REQS4], [r["target_new"] for r in REQS4])]
    assert max(nll) < 0.1, nll
    assert wise_routes(m, TOK, [r["prompt"] for r in REQS4]) == [0] * 4
    assert wise_routes(m, TOK, OTHER) == [-1] * 4
    assert all(torch.equal(s0[n.replace(".base.", ".")], p) for n, p in m.named_parameters())   # main memory untouched
    rec.revert(); assert same(m, s0) and not any(isinstance(x, WiseAdapter) for x in m.modules())

def test_ties_merge():
    t0 = torch.zeros(3); a, b = torch.tensor([3., -1., 2.]), torch.tensor([1., 2., -2.])
    assert torch.equal(ties_merge(t0, [a, b], [0.5, 0.5], density=2 / 3), torch.tensor([3., 2., 0.]))
    base = torch.randn(4, 5); x = base + torch.randn(4, 5)
    torch.testing.assert_close(ties_merge(base, [x], [1.0], density=1.0), x)

@pytest.mark.parametrize("arch,layers", [("llama", "num_hidden_layers"), ("qwen2", "num_hidden_layers"), ("gpt2", "n_layer")])
def test_replay_below_is_exact(arch, layers):
    from model_ops.edit.wise import replay_below
    from model_ops.edit.core import _batch, _ids
    m = tiny_model(arch, **{layers: 4}); ids, mask = _batch(TOK, [_ids(TOK, p) for p in OTHER], "cpu")
    with torch.no_grad():
        full = m(input_ids=ids, attention_mask=mask).logits
        with replay_below(m, 2, input_ids=ids, attention_mask=mask): assert torch.equal(m(input_ids=ids, attention_mask=mask).logits, full)
        assert torch.equal(m(input_ids=ids, attention_mask=mask).logits, full)    # computed again outside the block

def test_wise_batch_of_requests():
    m = tiny_model("llama", initializer_range=0.1, hidden_size=256, intermediate_size=512, num_hidden_layers=4); s0 = state(m)
    rec = wise(m, TOK, REQS4, batch_size=4)
    nll = [s["nll"] for s in score_targets(m, TOK, [r["prompt"] for r in REQS4], [r["target_new"] for r in REQS4])]
    assert max(nll) < 0.1, nll
    assert rec.info["adapter"].count == 4 and len({id(l) for l in rec.info["loss"]}) == 1     # one optimisation
    assert wise_routes(m, TOK, [r["prompt"] for r in REQS4]) == [0] * 4 and wise_routes(m, TOK, OTHER) == [-1] * 4
    rec.revert(); assert same(m, s0)

SREQS = [{"prompt": "Where is the Eiffel Tower", "target_new": " R"}, {"prompt": "Who wrote Hamlet", "target_new": " Q"}]
SAME_FORM = ["Where is the Big Ben", "Who wrote Faust"]

def test_wise_fact_shaped_irrelevant_inputs_keep_other_subjects_on_the_main_memory():
    negs = ["Where is the Louvre? Paris", "Who wrote Ulysses? Joyce", "Where is the Prado? Madrid", "Who wrote Emma? Austen"]
    routes = {}
    for name, loc in (("prose", "prose"), ("facts", negs)):
        m = tiny_model("llama", initializer_range=0.1, hidden_size=256, intermediate_size=512, num_hidden_layers=4); s0 = state(m)
        rec = wise(m, TOK, SREQS, loc_texts=loc)
        assert max(s["nll"] for s in score_targets(m, TOK, [r["prompt"] for r in SREQS], [" R", " Q"])) < 0.1
        routes[name] = (wise_routes(m, TOK, [r["prompt"] for r in SREQS]), wise_routes(m, TOK, SAME_FORM))
        rec.revert(); assert same(m, s0)
    assert routes["prose"] == ([0, 0], [0, 0]), routes     # against prose, the edits' form about other subjects reaches the side
    assert routes["facts"] == ([0, 0], [-1, -1]), routes   # against same-form facts it does not; the edits still do
    with pytest.raises(ValueError, match="loc_texts"): wise(m, TOK, SREQS, loc_texts="news")

def test_wise_loc_texts_disjoint_from_locality_pool_and_stream():
    import re
    from model_ops.edit.wise import WISE_FACTS, wise_loc_texts
    from model_ops.edit.evaluate import neighbor_pool, invented_facts
    inv, pool = invented_facts(200), neighbor_pool()
    words = {f["subject"] for f in pool} | {f["answer"].strip() for f in pool} | {f["target_new"].strip() for f in inv} | {w for f in inv for w in f["subject"].split()}
    assert not [(t, w) for t in WISE_FACTS for w in words if re.search(rf"\b{re.escape(w)}\b", t)]
    assert wise_loc_texts(TOK, "facts") == WISE_FACTS and wise_loc_texts(TOK)[1::2][:5] == WISE_FACTS[:5]

def test_wise_shard_negatives_keep_a_new_shard_off_earlier_edits():
    from model_ops.edit.core import _batch, _ids
    reqs = SREQS + [{"prompt": p, "target_new": t} for p, t in zip(SAME_FORM, (" S", " T"))]
    texts = [r["prompt"] + r["target_new"] for r in reqs]; res = {}
    for sn in (False, True):
        m = tiny_model("llama", initializer_range=0.1, hidden_size=256, intermediate_size=512, num_hidden_layers=4); s0 = state(m)
        rec = wise(m, TOK, reqs, save_freq=2, batch_size=2, shard_negatives=sn); ad = rec.info["adapter"]
        assert ad.past == texts and len(ad.memories) == 2
        box = {}; h = ad.register_forward_pre_hook(lambda mod, a: box.update(x=a[0]))
        with torch.no_grad():
            ids, mask = _batch(TOK, [_ids(TOK, t) for t in texts], "cpu"); m(input_ids=ids, attention_mask=mask)
        h.remove(); y0 = ad.base(box["x"])
        res[sn] = [ad.dist(y0, ad._out(box["x"], W), mask.float()).tolist() for W in ad.memories], [a * ad.act_ratio for a in ad.mem_acts]
        rec.revert(); assert same(m, s0)
    (d0, t0), (d1, t1) = res[False], res[True]
    assert max(d1[1][:2]) < 0.5 * t1[1] < min(d1[1][2:]), res   # shard 2 stays far below its threshold on shard 1's edits
    assert min(d0[1][:2]) > 0.8 * t0[1], res                    # which it does not without the option
