"Defining properties of model_ops.compress.elastic (elastic nested models) on tiny models (fast)."
import copy, json, tempfile
import pytest
import torch
from transformers import AutoModelForCausalLM

from model_ops.nn import tiny_model
from model_ops.prune import prune_width, prune_depth, importance, depth_importance, count_params
from model_ops.compress import (Budget, budget_sizes, budget_params, make_elastic, slice_budget, save_elastic,
                                ElasticModel, elastic_kl, elastic_distill)

IDS = torch.randint(0, 256, (16, 24), generator=torch.Generator().manual_seed(0))
BUDGETS = {"full": {}, "mid": Budget(hidden=0.75, ffn=0.5, blocks=3), "small": Budget(hidden=0.5, ffn=0.25, heads=0.5, blocks=2)}
ARCHS = {"llama": {}, "qwen2": {}, "phi3": {}, "gemma": {}}     # separate/fused q,k,v and gate/up, q/k/v biases, tied heads


def _model(arch): return tiny_model(arch, num_hidden_layers=4, **ARCHS[arch])


@pytest.mark.parametrize("arch", list(ARCHS))
def test_sorting_keeps_the_function_and_moves_every_number(arch):
    m = _model(arch)
    el = make_elastic(m, BUDGETS, calib=IDS[:4])
    with torch.no_grad(): assert torch.allclose(el(input_ids=IDS).logits, m(input_ids=IDS).logits, atol=1e-5)
    for (n, a), (n2, b) in zip(m.state_dict().items(), el.state_dict().items()):
        assert n == n2 and torch.equal(a.flatten().sort().values, b.flatten().sort().values), n


@pytest.mark.parametrize("arch", list(ARCHS))
def test_the_trainer_runs_exactly_the_slice_and_slices_nest(arch):
    el = make_elastic(_model(arch), BUDGETS, calib=IDS[:4])
    em = ElasticModel(el)
    sl = {k: slice_budget(el, k) for k in BUDGETS}
    with torch.no_grad():
        for k, s in sl.items(): assert torch.equal(em(input_ids=IDS[:2], budget=k).logits, s(input_ids=IDS[:2]).logits), k
    # the MLP of a block kept by both: the small slice's up/down weights are the corner of the mid slice's
    small_b, mid_b = (sl[k].config.model_ops_elastic_budget["blocks_kept"] for k in ("small", "mid"))
    assert set(small_b) <= set(mid_b)
    j, J = 0, mid_b.index(small_b[0])
    def down(s, i): return s.model.layers[i].mlp.down_proj.weight
    a, b = down(sl["small"], j), down(sl["mid"], J)
    assert torch.equal(a, b[: a.shape[0], : a.shape[1]])
    for (n, a), b in zip(el.state_dict().items(), sl["full"].state_dict().values()): assert torch.equal(a, b), n


def test_untrained_slice_is_minitron_pruning():
    m = _model("llama")
    sc = importance(m, calib=IDS[:4]); sc["depth"] = depth_importance(m, calib=IDS[:4], metric="mse")
    el = make_elastic(m, BUDGETS, scores=sc)
    small = slice_budget(el, "small")
    mini = prune_width(m, scores=sc, hidden=32, intermediate=32, heads=2)
    mini = prune_depth(mini, drop=sorted(set(range(4)) - set(small.config.model_ops_elastic_budget["blocks_kept"])))
    with torch.no_grad(): assert torch.allclose(small(input_ids=IDS).logits, mini(input_ids=IDS).logits, atol=1e-5)
    assert count_params(small) == count_params(mini) == budget_params(m, BUDGETS["small"])


@pytest.mark.parametrize("arch", list(ARCHS))
def test_budget_params_counts_the_slice(arch):
    el = make_elastic(_model(arch), BUDGETS, calib=IDS[:4])
    for k, b in BUDGETS.items(): assert budget_params(el, b) == count_params(slice_budget(el, k)), (arch, k)


def test_gradient_of_a_budget_stays_in_its_prefix():
    el = make_elastic(_model("llama"), BUDGETS, calib=IDS[:4])
    em = ElasticModel(el, ["small"])
    em(input_ids=IDS[:2], budget="small").logits.sum().backward()
    order = el.config.model_ops_elastic["block_order"]
    g = el.model.layers[order[0]].mlp.gate_proj.weight.grad       # small: 32 neurons, 32 hidden channels
    assert g[:32, :32].abs().sum() > 0 and g[32:].abs().sum() == 0 and g[:, 32:].abs().sum() == 0
    assert all(el.model.layers[i].mlp.gate_proj.weight.grad is None for i in order[2:])


def test_joint_distillation_lowers_kl_of_every_smaller_budget():
    m = _model("llama")
    el = make_elastic(m, BUDGETS, calib=IDS[:4])
    before = elastic_kl(el, m, IDS)
    assert abs(before["full"]) < 1e-6
    res = elastic_distill(el, m, IDS, steps=25, lr=3e-3, batch_size=8, progress=False)
    after = elastic_kl(el, m, IDS)
    assert len(res.losses) == 25
    for k in ("mid", "small"): assert after[k] < 0.6 * before[k], (k, before, after)


def test_saved_checkpoint_and_slice_reload():
    m = _model("qwen2")
    el = make_elastic(m, BUDGETS, calib=IDS[:4])
    small = slice_budget(el, "small")
    with tempfile.TemporaryDirectory() as d:
        save_elastic(el, f"{d}/el")
        back = AutoModelForCausalLM.from_pretrained(f"{d}/el")
        s2 = slice_budget(back, "small", f"{d}/small")
        for a, b in zip(s2.state_dict().values(), small.state_dict().values()): assert torch.equal(a, b)
        again = AutoModelForCausalLM.from_pretrained(f"{d}/small")
        with torch.no_grad(): assert torch.equal(again(input_ids=IDS).logits, s2(input_ids=IDS).logits)
        assert json.load(open(f"{d}/small/lineage.json"))["op"] == "elastic_slice"


@pytest.mark.parametrize("budget,msg", [(dict(ffn=0), "in (0, 1]"), (dict(heads=1.2), "in (0, 1]"), (dict(blocks=7), "the model has 4 blocks"),
                                        (dict(heads=0.75), "not a multiple of the 2 key/value heads"), (dict(depth=2), "unknown budget field")])
def test_impossible_budgets_are_refused_before_any_work(budget, msg):
    m = _model("llama")
    with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace(")", r"\)").replace("]", r"\]")):
        make_elastic(m, {"bad": budget}, calib=IDS[:4])


def test_slicing_needs_an_elastic_checkpoint_and_a_known_budget():
    m = _model("llama")
    with pytest.raises(ValueError, match="not an elastic checkpoint"): slice_budget(m, {})
    el = make_elastic(m, BUDGETS, calib=IDS[:4])
    with pytest.raises(ValueError, match="no budget named 'huge'"): slice_budget(el, "huge")
    with pytest.raises(ValueError, match="'sum' or 'sample'"): elastic_distill(el, m, IDS, mode="each")


@pytest.mark.parametrize("arch", list(ARCHS))
def test_prune_width_and_elastic_slice_give_the_same_tensors(arch):
    "Scores decreasing with the index: sorting is the identity, so the elastic slice and prune_width + prune_depth keep the same units in the same order."
    m = _model(arch)
    from model_ops.nn import arch_spec
    s = arch_spec(m)
    H, L = s.heads[0], s.n_layers
    down = lambda n: -torch.arange(n, dtype=torch.float32)
    sc = dict(hidden=down(s.hidden), ffn=[down(s.intermediate)] * L, heads=[down(H)] * L, depth=down(L))
    el = make_elastic(m, BUDGETS, scores=sc)
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), el.state_dict().values()))
    for k, b in BUDGETS.items():
        if k == "full": continue
        z = budget_sizes(m, b)
        mini = prune_width(m, scores=sc, hidden=z["hidden"], intermediate=z["ffn"], heads=z["heads"])
        mini = prune_depth(mini, drop=list(range(z["blocks"], L)))
        small, ref = slice_budget(el, k).state_dict(), mini.state_dict()
        assert list(small) == list(ref), (arch, k)
        for n in ref: assert torch.equal(small[n], ref[n]), (arch, k, n)
