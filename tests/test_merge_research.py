"""Fast tests of the expert bench (model_ops.merge.bench) and the research merging methods (model_ops.merge.research):
each method's defining property on tiny tensors or a tiny random Llama."""
import pytest, torch
from model_ops.nn import tiny_model, tiny_tokenizer
from model_ops.merge.research import (task_vectors, protected_rank, project_out, opcm, opcm_step, sequential_task_arithmetic,
                                      frank_wolfe_merge, lowrank, rmm_merge, rmm_reconstruct, adapters_nbytes, lock_model,
                                      unlock_by_matching, magnitude_masks, sparse_soup, evolve_recipe, recipe_config,
                                      layer_groups, layer_gradient, recipe_params)
from model_ops.merge.bench import (TASKS, task_items, encode_items, prefix_states, suffix_logits, BenchSettings, build_zoo,
                                   bench_rows, format_table, cli_bench_merge, evolve_merge, distill_merge, soup_experiment)

def _pool(n=5, seed=0, shape=(12, 10)):
    g = torch.Generator().manual_seed(seed)
    base = {"w": torch.randn(*shape, generator=g), "b": torch.randn(shape[1], generator=g)}
    return base, [{k: t + 0.1 * torch.randn(t.shape, generator=g) for k, t in base.items()} for _ in range(n)]

# ---- OPCM
def test_opcm_single_expert_is_the_expert():
    base, ex = _pool(1)
    m = opcm(base, ex)
    for k in base: torch.testing.assert_close(m[k], ex[0][k])

def test_opcm_memory_constant_and_projection_orthogonal():
    base, ex = _pool(8)
    sizes = []
    opcm(base, ex, on_step=lambda t, st: sizes.append(st.nbytes()))
    assert len(set(sizes)) == 1 and sizes[0] == sum(t.numel() * 4 for t in base.values())
    S, tau = (ex[0]["w"] - base["w"]).double(), (ex[1]["w"] - base["w"]).double()
    U, s, Vh = torch.linalg.svd(S, full_matrices=False); r = protected_rank(s, 0.7)
    P = project_out(tau, S, 0.7)
    assert (U[:, :r].T @ P).abs().max() < 1e-10 and (P @ Vh[:r].T).abs().max() < 1e-10

def test_opcm_order_matters_sequential_ta_does_not():
    base, ex = _pool(4)
    a, b = opcm(base, ex), opcm(base, ex[::-1])
    assert (a["w"] - b["w"]).abs().max() > 1e-4
    c, d = sequential_task_arithmetic(base, ex), sequential_task_arithmetic(base, ex[::-1])
    torch.testing.assert_close(c["w"], d["w"])

# ---- Frank-Wolfe
def test_frank_wolfe_ignores_irrelevant_and_is_convex():
    g = torch.Generator().manual_seed(1)
    base = {"w": torch.zeros(8, 8)}
    dirs = [torch.randn(8, 8, generator=g) for _ in range(4)]
    target = 0.5 * dirs[0] + 0.5 * dirs[1]
    def lg(t):
        x = t["w"].clone().requires_grad_(True); L = ((x - target) ** 2).sum(); L.backward()
        return L.detach(), {"w": x.grad}
    for step in ("line", "classic"):
        r = frank_wolfe_merge(base, [{"w": d} for d in dirs], lg, steps=15, step_size=step)
        assert abs(sum(r.weights) - 1) < 1e-9 and min(r.weights) >= 0
        assert r.losses[-1] < r.losses[0]
    r = frank_wolfe_merge(base, [{"w": d} for d in dirs], lg, steps=15)
    assert r.weights[3] == 0 and r.weights[4] == 0 and 3 not in r.picks and 4 not in r.picks
    # task arithmetic over the whole pool is hurt by the irrelevant members
    ta = sum(0.5 * d for d in dirs)
    assert ((ta - target) ** 2).sum() > 5 * r.losses[-1]

# ---- RMM
def test_rmm_exact_at_full_basis_and_monotone():
    g = torch.Generator().manual_seed(2)
    ads = [{"w": (torch.randn(20, 4, generator=g), torch.randn(4, 16, generator=g)),
            "v": (torch.randn(6, 2, generator=g), torch.randn(2, 9, generator=g))} for _ in range(5)]
    for i in range(5):
        rec = rmm_reconstruct(rmm_merge(ads, 5), i)
        for n in ("w", "v"): torch.testing.assert_close(rec[n], ads[i][n][0] @ ads[i][n][1], atol=1e-4, rtol=1e-4)
    err = [sum(float((rmm_reconstruct(rmm_merge(ads, k), i)["w"] - ads[i]["w"][0] @ ads[i]["w"][1]).norm()) for i in range(5)) for k in range(1, 6)]
    assert all(a >= b - 1e-4 for a, b in zip(err, err[1:])) and err[0] > 10 * err[-1]
    assert rmm_merge(ads, 2).nbytes() < adapters_nbytes(ads)
    with pytest.raises(ValueError, match="between 1 and"): rmm_merge(ads, 0)
    B, A = lowrank(ads[0]["w"][0] @ ads[0]["w"][1], 4)
    torch.testing.assert_close(B @ A, ads[0]["w"][0] @ ads[0]["w"][1], atol=1e-4, rtol=1e-4)

# ---- sparse soups and the evolution strategy
def test_sparse_soup_keeps_mask_bit_for_bit():
    g = torch.Generator().manual_seed(4)
    w = {"w": torch.randn(16, 12, generator=g)}
    masks = magnitude_masks(w, 0.75)
    assert int(masks["w"].sum()) == 48
    copies = [{"w": (w["w"] + 0.1 * torch.randn(16, 12, generator=g)) * masks["w"]} for _ in range(4)]
    assert torch.equal(sparse_soup(copies, masks)["w"] != 0, masks["w"])
    with pytest.raises(ValueError, match="outside the shared mask"): sparse_soup(copies + [w], masks)

def test_evolve_recipe_reproducible_and_resumable(tmp_path):
    f = lambda x: -sum((a - b) ** 2 for a, b in zip(x, [0.2, 0.9]))
    full = evolve_recipe(f, [0.5, 0.5], budget=81, seed=3)                 # CMA-ES, popsize 6: 13 generations
    assert full.score > -1e-2 and full.evals <= 81 and full.generation == 13
    evolve_recipe(f, [0.5, 0.5], budget=41, seed=3, state_file=tmp_path/"s.pkl")
    resumed = evolve_recipe(f, [0.5, 0.5], budget=81, seed=3, state_file=tmp_path/"s.pkl")
    assert resumed.x == full.x and resumed.history == full.history
    assert evolve_recipe(f, [0.5, 0.5], budget=81, seed=4).x != full.x

def test_layer_groups_and_gradients():
    assert layer_groups(30, 2, layers=range(26, 30)) == [[26, 27], [28, 29]]
    assert layer_groups(5, 2) == [[0, 1], [2, 3, 4]]
    assert layer_gradient([0.1, 0.2], [[2], [4]], 6) == [0.1, 0.1, 0.1, 0.1, 0.2, 0.2]     # block 3: nearest group (2) first on ties
    p = recipe_params([1, 2, 3, 4, 5, 6, 7, 8], 2, [[0], [1]], 2)
    assert p == {"weight": [[1.0, 2.0], [3.0, 4.0]], "density": [[5.0, 6.0], [7.0, 8.0]]}
    assert recipe_params([0.3, 0.4], 2, densities=False) == {"weight": [0.3, 0.4]}
    with pytest.raises(ValueError, match="between 1 and"): layer_groups(4, 5)
    with pytest.raises(ValueError, match="need 8"): recipe_params([1] * 7, 2, [[0], [1]], 2)

# ---- MergeLock
def _logits(sd, ids, **kw):
    m = tiny_model("llama", seed=0, **kw); m.load_state_dict(sd)
    with torch.no_grad(): return m(ids).logits

@pytest.mark.parametrize("kw", [{}, {"num_key_value_heads": 4}])
def test_lock_preserves_function_breaks_merge_and_is_undone(kw):
    m0 = tiny_model("llama", seed=0, **kw)
    sd0 = {n: t.detach().clone() for n, t in m0.state_dict().items()}
    ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(0))
    ft = lambda s: {n: t + 0.02 * t.std() * torch.randn(t.shape, generator=torch.Generator().manual_seed(s)) for n, t in sd0.items()}
    A, B = ft(1), ft(2)
    LA, _ = lock_model(A, m0.config, seed=5)
    torch.testing.assert_close(_logits(LA, ids, **kw), _logits(A, ids, **kw), atol=1e-4, rtol=1e-4)
    avg = lambda a, b: {n: (a[n] + b[n]) / 2 for n in a}
    want = (_logits(A, ids, **kw) + _logits(B, ids, **kw)) / 2
    rel = lambda x: float((x - want).norm() / want.norm())
    plain, locked = rel(_logits(avg(A, B), ids, **kw)), rel(_logits(avg(LA, B), ids, **kw))
    undone = rel(_logits(avg(unlock_by_matching(LA, sd0, m0.config), B), ids, **kw))
    assert locked > 20 * plain and undone < 2 * plain

def test_lock_subset_of_layers_leaves_others():
    m0 = tiny_model("llama", seed=0)
    sd0 = {n: t.detach().clone() for n, t in m0.state_dict().items()}
    L, _ = lock_model(sd0, m0.config, layers=[1])
    for n in sd0:
        same = torch.equal(L[n], sd0[n])
        assert same == (not n.startswith("model.layers.1.") or "norm" in n), n

# ---- the bench
def test_tasks_disjoint_and_deterministic():
    for t in TASKS:
        hi, ho = task_items(t, "held_in"), task_items(t, "held_out")
        assert hi and ho and task_items(t, n=3) == task_items(t, n=3)
        if t != "facts": assert not set(hi) & set(ho)
    with pytest.raises(ValueError, match="unknown task"): task_items("poetry")
    with pytest.raises(ValueError, match="split"): task_items("arith", "test")

def test_suffix_forward_equals_full():
    m, tok = tiny_model("llama", num_hidden_layers=3), tiny_tokenizer()
    enc = encode_items(tok, task_items("shout", n=6))
    with torch.no_grad():
        full = m(input_ids=enc.ids, attention_mask=enc.mask).logits[enc.rows, enc.pos]
        for k in (1, 3): torch.testing.assert_close(suffix_logits(m, enc, prefix_states(m, enc, k), k), full, atol=1e-5, rtol=1e-5)

def test_tiny_zoo_cached_scored(tmp_path):
    kw = dict(tasks=("arith", "classify"), settings=BenchSettings(k=2, steps=30, lr=3e-3, n_train=32),
              margin=0.1, check_metric="tok_acc", n_eval=16, log=None)
    z = build_zoo("tiny", cache=tmp_path, **kw)
    assert len(list(tmp_path.iterdir())) == 3 and all((p/"config.json").exists() for p in tmp_path.iterdir())   # two experts and the base
    z2 = build_zoo((tiny_model("llama", num_hidden_layers=3), tiny_tokenizer()), cache=tmp_path, **kw)
    for t in z.tasks:
        for n in z.names: assert torch.equal(z.experts[t][n], z2.experts[t][n])
    r = z.score(z.experts["arith"], metric="tok_acc")
    assert r["per_task_normalized"]["arith"] == pytest.approx(1.0)
    rows = bench_rows(z, ["task_arithmetic", "opcm", "frank_wolfe"], metric="tok_acc")
    assert [x["method"] for x in rows] == ["base", "experts", "task_arithmetic", "opcm", "frank_wolfe"]
    assert "| method |" in format_table(rows)
    with pytest.raises(ValueError, match="not in the last 2 blocks"): z.score({"model.embed_tokens.weight": None})
    # the evolved recipe, as YAML, reproduces the searched merge bit for bit
    import yaml
    from model_ops.merge.api import merge, merge_config
    from model_ops.io import WeightStore
    st, cfg = evolve_merge(z, groups=2, budget=9, popsize=4, seed=0, metric="tok_acc")
    assert st.evals == 9 and len(st.x) == 2 * 2 * 2 and len(cfg["models"][0]["parameters"]["weight"]) == 3
    # a per-layer recipe with distinct values per block: the YAML reproduces the in-memory merge bit for bit
    gr = layer_groups(3, 2, layers=(1, 2))
    x = [0.9, 0.2, 0.3, 0.8, 0.6, 0.3, 0.4, 0.9]
    cfg2 = recipe_config([z.paths[t] for t in z.tasks], x, z.base_path, "ties", groups=gr, num_layers=3)
    for c, name in ((cfg, "r"), (cfg2, "r2")):
        (tmp_path/f"{name}.yml").write_text(yaml.safe_dump(c))
        ws = WeightStore.open(merge_config(str(tmp_path/f"{name}.yml"), tmp_path/f"out-{name}"))
        mem = merge([z.experts[t] for t in z.tasks], method="ties", base=z.base_tensors,
                    weight=[m["parameters"]["weight"] for m in c["models"]], density=[m["parameters"]["density"] for m in c["models"]])
        for n in z.names: assert torch.equal(ws[n], mem[n])
    flat = merge([z.experts[t] for t in z.tasks], method="ties", base=z.base_tensors, weight=[0.9, 0.3], density=[0.6, 0.4])
    blk = lambda i: [n for n in z.names if f"layers.{i}." in n]
    assert all(torch.equal(mem[n], flat[n]) for n in blk(1)) and not any(torch.equal(mem[n], flat[n]) for n in blk(2))   # per block
    ws = WeightStore.open(tmp_path/"out-r")
    assert z.score({n: ws[n] for n in z.names}, metric="tok_acc")["normalized"] == pytest.approx(st.score)
    # DMM: the distilled student learns from its teachers
    d = distill_merge(z, rounds=1, steps=6)
    assert z.score(d, metric="tok_acc")["normalized"] > z.score(None, metric="tok_acc")["normalized"]
    # sparse soups on the bench keep the mask
    assert soup_experiment(z, "classify", 0.5, seeds=(0, 1), metric="tok_acc")["mask_kept"]

def test_cli_errors():
    with pytest.raises(ValueError, match="--methods"): cli_bench_merge.__wrapped__(methods="magic")
    with pytest.raises(ValueError, match="--metric"): cli_bench_merge.__wrapped__(metric="f1")
