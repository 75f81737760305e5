"Defining properties of model_ops.compress on tiny models (fast)."
import copy, tempfile
import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from model_ops.nn import tiny_model, tiny_tokenizer
from model_ops.prune import prune_depth, count_params
from model_ops.distill import kl_loss
from model_ops.compress import (depth_contributions, token_kl, LowRankLinear, low_rank, rank_for, pela, weight_perturbation,
                                feature_loss, save_low_rank, load_low_rank, merge_low_rank, share_parameters, HashedLinear,
                                save_shared, load_shared, materialize_shared, compare_pruning, pruning_widget, BLOCK_LINEARS)
from model_ops.compress.lowrank import _targets

IDS = torch.randint(0, 256, (4, 24), generator=torch.Generator().manual_seed(0))


def test_skip_kl_is_the_kl_to_the_model_without_the_block():
    m = tiny_model("llama", num_hidden_layers=3)
    dc = depth_contributions(m, calib=IDS, batch_size=2)
    with torch.no_grad():
        full = m(input_ids=IDS).logits
        for s in range(3):
            ref = token_kl(full, prune_depth(m, drop=[s])(input_ids=IDS).logits)
            assert torch.isclose(dc["kl_skip"][s], ref.mean(), atol=1e-5)
            top1 = (full.argmax(-1) != prune_depth(m, drop=[s])(input_ids=IDS).logits.argmax(-1)).float().mean()
            assert torch.isclose(dc["top1_skip"][s], top1)
    assert dc["lens_kl"][-1].abs() < 1e-5          # the logit lens after the last block is the output
    assert (dc["effect"].tril() == 0).all()


def test_a_silent_block_contributes_nothing():
    m = tiny_model("llama", num_hidden_layers=3)
    with torch.no_grad():
        m.model.layers[0].self_attn.o_proj.weight.zero_(); m.model.layers[0].mlp.down_proj.weight.zero_()
    dc = depth_contributions(m, calib=IDS, batch_size=4)
    assert dc["rel_norm"][0] == 0 and dc["kl_skip"][0].abs() < 1e-6 and dc["top1_skip"][0] == 0
    assert dc["effect"][0].abs().max() < 1e-5 and dc["rel_norm"][1:].min() > 0


@pytest.mark.parametrize("r", [1, 5, 24])
def test_truncated_svd_is_eckart_young(r):
    lin = nn.Linear(40, 24); nn.init.normal_(lin.weight, generator=torch.Generator().manual_seed(r))
    S = torch.linalg.svdvals(lin.weight.double())
    err = ((LowRankLinear.from_linear(lin, r).dense_weight() - lin.weight) ** 2).sum()
    assert torch.isclose(err.double(), (S[r:] ** 2).sum(), rtol=1e-3, atol=1e-5)


def test_low_rank_budget_and_errors():
    assert rank_for(576, 1536, 0.5) == 209
    m = tiny_model("llama", num_hidden_layers=2)
    n0 = count_params(m)
    ranks = low_rank(m, keep=0.5, targets=r"\.mlp\.")
    assert len(ranks) == 6 and all(isinstance(mod, LowRankLinear) for n, mod in m.named_modules() if n in ranks)
    dense = sum(64 * 128 for _ in range(6))
    assert n0 - count_params(m) == dense - sum(r * (64 + 128) for r in ranks.values())
    with pytest.raises(ValueError, match="matches targets"): low_rank(m, targets="nothing_matches")
    with pytest.raises(ValueError, match="rank 999"): low_rank(tiny_model("llama"), rank=999)


def test_pela_brings_the_student_closer_and_the_regulariser_limits_drift():
    teach = tiny_model("llama", num_hidden_layers=2)
    data = torch.randint(0, 256, (16, 24), generator=torch.Generator().manual_seed(1))
    a = copy.deepcopy(teach); ranks = low_rank(a, keep=0.25)
    b = copy.deepcopy(a)
    def gap(m):
        with torch.no_grad():
            s, t = m(input_ids=data, output_hidden_states=True), teach(input_ids=data, output_hidden_states=True)
            return float(kl_loss(s.logits, t.logits)), float(feature_loss(s.hidden_states, t.hidden_states))
    g0 = gap(a)
    pela(a, teach, data, steps=25, lr=3e-3, batch_size=8, wp_weight=1.0)
    pela(b, teach, data, steps=25, lr=3e-3, batch_size=8, wp_weight=0.0)
    g1 = gap(a)
    assert g1[0] < g0[0] and g1[1] < g0[1]
    ref = {n: teach.get_submodule(n).weight for n in ranks}
    assert weight_perturbation(a, ref) < weight_perturbation(b, ref)
    assert all(p.requires_grad for p in a.parameters())     # flags restored


def test_low_rank_and_shared_round_trips():
    m, tok = tiny_model("llama", num_hidden_layers=2), tiny_tokenizer()
    lr_, sh = copy.deepcopy(m), copy.deepcopy(m)
    low_rank(lr_, keep=0.3); share_parameters(sh, budget=0.2)
    with tempfile.TemporaryDirectory() as d, torch.no_grad():
        for model, save, load in ((lr_, save_low_rank, load_low_rank), (sh, save_shared, load_shared)):
            out = save(model, f"{d}/{save.__name__}", tok)
            back = load(out)
            assert count_params(back) == count_params(model)
            assert torch.allclose(back(input_ids=IDS).logits, model(input_ids=IDS).logits, atol=1e-5)
        for model, flat in ((lr_, merge_low_rank), (sh, materialize_shared)):
            f = flat(copy.deepcopy(model)); f.save_pretrained(f"{d}/{flat.__name__}")
            again = AutoModelForCausalLM.from_pretrained(f"{d}/{flat.__name__}")
            assert torch.allclose(again(input_ids=IDS).logits, model(input_ids=IDS).logits, atol=1e-4)
        with pytest.raises(ValueError, match="no model_ops_low_rank"): load_low_rank(f"{d}/merge_low_rank")
        with pytest.raises(ValueError, match="no model_ops_shared"): load_shared(f"{d}/merge_low_rank")


def test_random_sharing_budget_and_least_squares():
    m = tiny_model("llama", num_hidden_layers=2)
    orig = {n: mod.weight.detach().clone() for n, mod in _targets(m, BLOCK_LINEARS).items()}
    N = sum(w.numel() for w in orig.values())
    bank = share_parameters(m, budget=0.3, seed=1)
    assert bank.weight.numel() == int(0.3 * N) and m.rps_bank is bank
    hl = {n: mod for n, mod in m.named_modules() if isinstance(mod, HashedLinear)}
    assert set(hl) == set(orig)
    # least squares in float64: the normal equations hold at the initialisation
    w = bank.weight.detach().double().requires_grad_(True)
    err = 0
    for n, mod in hl.items():
        idx, sg = mod.index()
        err = err + ((mod.scale.detach().double() * sg * w[idx]).reshape(orig[n].shape) - orig[n].double()).pow(2).sum()
    err.backward()
    assert w.grad.abs().max() < 1e-5 * w.detach().abs().max()
    # the hashes are functions of the stored integers only
    mod = hl["model.layers.1.self_attn.q_proj"]
    i1, s1 = mod.index(); i2, s2 = mod.index()
    assert torch.equal(i1, i2) and torch.equal(s1, s2) and set(s1.unique().tolist()) == {-1, 1}
    with pytest.raises(ValueError, match="already shares"): share_parameters(m)


def test_compare_pruning_properties():
    g = torch.Generator().manual_seed(2)
    W, X = torch.randn(32, 64, generator=g), torch.randn(256, 64, generator=g) * torch.linspace(0.1, 3, 64)
    res = compare_pruning(W, X, 0.5)
    for n in ("magnitude", "wanda", "sparsegpt"):
        assert int((~res[n]["keep"]).sum()) == 32 * 32 and res[n]["weight"][~res[n]["keep"]].abs().sum() == 0
    assert res["sparsegpt"]["error"] < res["wanda"]["error"] < res["magnitude"]["error"]
    assert (res["wanda"]["row_sparsity"] == 0.5).all()
    assert set(res["overlap"]) == {"magnitude/wanda", "magnitude/sparsegpt", "wanda/sparsegpt"}


def test_pruning_widget_drives_the_comparison():
    w = pruning_widget(tiny_model("llama", num_hidden_layers=2), calib=IDS)
    w.update()
    assert w.result["sparsity"]["sparsegpt"] == 0.5
    w.children[2].value = "2:4"
    assert w.result["sparsity"]["magnitude"] == 0.5 and w.result["errors"]["sparsegpt"] <= w.result["errors"]["magnitude"]


def test_fold_shares_parent_weights_trains_only_scalers_and_unfolds():
    from model_ops.compress import fold_blocks, fold_recover, unfold, ScaledLinear
    from model_ops.nn import decoder_layers
    t6 = tiny_model("llama", num_hidden_layers=6)
    data = torch.randint(0, 256, (16, 24), generator=torch.Generator().manual_seed(1))
    fd = fold_blocks(t6, drop=1, group=2, calib=IDS)             # 5 blocks left: groups [0,1], [2,3], [4]
    ly = decoder_layers(fd)
    assert fd.fold_groups == [[0, 1], [2, 3], [4]] and isinstance(ly[4].mlp.up_proj, nn.Linear)
    assert ly[1].mlp.down_proj.lin.weight is ly[0].mlp.down_proj.lin.weight
    w0 = ly[0].self_attn.o_proj.lin.weight.detach().clone()
    with torch.no_grad(): k0 = float(kl_loss(fd(input_ids=data).logits, t6(input_ids=data).logits))
    fold_recover(fd, t6, data, steps=20, lr=1e-2, batch_size=8, progress=False)
    with torch.no_grad(): k1 = float(kl_loss(fd(input_ids=data).logits, t6(input_ids=data).logits))
    assert k1 < k0 and torch.equal(ly[0].self_attn.o_proj.lin.weight.detach(), w0)
    with torch.no_grad():
        ref = fd(input_ids=IDS).logits
        flat = unfold(copy.deepcopy(fd))
        assert not any(isinstance(m, ScaledLinear) for m in flat.modules())
        assert flat.model.layers[1].mlp.up_proj.weight is not flat.model.layers[0].mlp.up_proj.weight
        assert torch.allclose(flat(input_ids=IDS).logits, ref, atol=1e-5)


def test_fold_is_exact_where_it_should_be_and_lsq_scalers_start_closest():
    from model_ops.compress import fold_blocks
    from model_ops.compress.depth import lsq_scale
    from model_ops.nn import decoder_layers
    t4 = tiny_model("llama", num_hidden_layers=4)
    with torch.no_grad():
        ref = t4(input_ids=IDS).logits
        assert torch.equal(fold_blocks(t4, group=1)(input_ids=IDS).logits, ref)              # groups of one: nothing folded
        tw = copy.deepcopy(t4)
        for i in (1, 3): decoder_layers(tw)[i].load_state_dict(decoder_layers(tw)[i - 1].state_dict())
        for init in ("lsq", "ones"):                                                          # identical pairs fold without loss
            assert torch.allclose(fold_blocks(tw, group=2, init=init)(input_ids=IDS).logits, tw(input_ids=IDS).logits, atol=1e-6)
    fd = fold_blocks(t4, group=2)
    child, own = decoder_layers(fd)[1].mlp.down_proj, decoder_layers(t4)[1].mlp.down_proj.weight
    assert torch.equal(decoder_layers(fd)[0].mlp.down_proj.scale, torch.ones(64))            # the parent: exactly as it was
    err = lambda s: float(((s[:, None] * child.lin.weight - own) ** 2).sum())
    s = child.scale.detach()
    assert err(s) < err(torch.ones_like(s)) and all(err(s + d * torch.eye(64)[c]) > err(s) for c in (0, 7) for d in (-1e-2, 1e-2))
    assert torch.allclose(s, lsq_scale(child.lin, own))
    with pytest.raises(ValueError, match="'lsq' or 'ones'"): fold_blocks(t4, init="zero")
