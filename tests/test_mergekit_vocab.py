"""Vocabularies and LoRA inputs as mergekit 0.1.5 does them, bit for bit: `tokenizer_source: union | base | <model>` and the
`tokenizer:` block (per-token sources, `force`, `pad_to_multiple_of`) on tiny float32 and bfloat16 models whose tokenizers
differ (inputs add two ChatML tokens, one of them in the other order), and `model+adapter` inputs (a PEFT LoRA
adapter built offline). Each recipe runs through mergekit (one `mergekit-multi` run) and through `merge_config`; the
tensors, the config's vocab_size and the output tokenizer's vocabulary must agree exactly.

Where several inputs bring new tokens, mergekit appends them in the iteration order of a Python set of model references
(which changes with PYTHONHASHSEED); model_ops appends them in recipe order (base first). The recipes here have one such
order only: every input that brings new tokens brings them in the same order, or one input alone does."""
import json
import pytest, torch
from mergekit_runs import load, mergekit_multi
from model_ops.io import save_model
from model_ops.nn import tiny_model, tiny_tokenizer
from model_ops.merge.api import merge_config

pytest.importorskip("mergekit")
peft = pytest.importorskip("peft")

CHATML = ["<|im_start|>", "<|im_end|>"]

def _tokenizer(extra=()):
    "The tiny byte-level tokenizer (261 tokens), with `extra` special tokens appended."
    tok = tiny_tokenizer()
    if extra: tok.add_special_tokens({"additional_special_tokens": list(extra)})
    return tok

def _adapter(root, base_dir, target_modules, seed, **kw):
    "A PEFT LoRA adapter for the model at `base_dir`, with random (non-zero) A and B, saved in `root`."
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    pm = peft.get_peft_model(m, peft.LoraConfig(target_modules=target_modules, **kw))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n: p.copy_(0.05 * torch.randn(p.shape, generator=g))
    pm.save_pretrained(root)
    return str(root)

@pytest.fixture(scope="module")
def vocab_models(tmp_path_factory):
    """A tiny Llama base with the tiny tokenizer; fine-tune `a` (same vocabulary), `b` (+ ChatML tokens 261, 262) and
    `c` (+ the same tokens in the other order), `d` (+ the tokens as in `b`), each in float32 and bfloat16; LoRA adapters on the base."""
    root = tmp_path_factory.mktemp("vocab")
    m = tiny_model("llama", num_hidden_layers=2)
    cfg = m.config.to_dict() | {"architectures": ["LlamaForCausalLM"]}
    sd = {k: v.detach().clone() for k, v in m.state_dict().items()}
    def tuned(seed, extra):
        g = torch.Generator().manual_seed(seed)
        t = {k: v + 0.02 * torch.randn(v.shape, generator=g) for k, v in sd.items()}
        for k in ("model.embed_tokens.weight", "lm_head.weight"):
            t[k] = torch.cat([t[k], 0.02 * torch.randn(len(extra), t[k].shape[1], generator=g)])
        return t
    P = {}
    for tag, dt in (("f32", torch.float32), ("bf16", torch.bfloat16)):
        for name, w, extra in (("base", sd, ()), ("a", tuned(1, ()), ()), ("b", tuned(2, CHATML), CHATML),
                               ("c", tuned(3, CHATML[::-1]), CHATML[::-1]), ("d", tuned(4, CHATML), CHATML)):
            d = save_model(w, root / f"{name}_{tag}", config=cfg | {"vocab_size": 261 + len(extra)}, dtype=dt)
            _tokenizer(extra).save_pretrained(d)
            P[tag, name] = str(d)
        P[tag, "lora1"] = _adapter(root / f"lora1_{tag}", P[tag, "base"], ["q_proj", "v_proj", "down_proj"], 7, r=4, lora_alpha=8)
        P[tag, "lora2"] = _adapter(root / f"lora2_{tag}", P[tag, "base"], ["k_proj", "up_proj", "embed_tokens"], 8, r=2,
                                   lora_alpha=3, use_rslora=True)
    return root, P

RECIPES = {
    "union_ties": """
merge_method: ties
base_model: {base}
tokenizer_source: union
models:
  - model: {a}
    parameters: {{weight: 0.5, density: 0.6}}
  - model: {b}
    parameters: {{weight: 0.4, density: 0.5}}
""",
    "union_mean": """
merge_method: task_arithmetic
base_model: {base}
tokenizer_source: union
models:
  - model: {b}
    parameters: {{weight: 0.7}}
  - model: {d}
    parameters: {{weight: 0.4}}
""",
    "base_ta": """
merge_method: task_arithmetic
base_model: {base}
tokenizer_source: base
models:
  - model: {a}
    parameters: {{weight: 0.5}}
  - model: {b}
    parameters: {{weight: 0.5}}
""",
    "donor_c": """
merge_method: ties
base_model: {base}
tokenizer_source: {c}
models:
  - model: {b}
    parameters: {{weight: 0.6, density: 0.7}}
  - model: {c}
    parameters: {{weight: 0.6, density: 0.7}}
""",
    "block": """
merge_method: task_arithmetic
base_model: {base}
tokenizer:
  source: union
  pad_to_multiple_of: 8
  tokens:
    "<|im_start|>":
      source: {b}
    "<|im_end|>":
      source: {{kind: zero}}
    "<|eos|>":
      source: {{kind: model_token, model: {b}, token: "<|im_end|>"}}
      force: true
    "<|tool|>":
      source: {{kind: model_token, model: {a}, token_id: 5}}
models:
  - model: {a}
    parameters: {{weight: 0.5}}
  - model: {b}
    parameters: {{weight: 0.5}}
""",
    "lora_linear": """
merge_method: linear
models:
  - model: {base}+{lora1}
    parameters: {{weight: 0.6}}
  - model: {a}
    parameters: {{weight: 0.4}}
""",
    "lora_ta": """
merge_method: task_arithmetic
base_model: {base}
models:
  - model: {base}+{lora2}
    parameters: {{weight: 1.0}}
  - model: {base}+{lora1}
    parameters: {{weight: 0.5}}
""",
}

@pytest.fixture(scope="module")
def both(vocab_models):
    "Every recipe merged by mergekit and by model_ops, for float32 and bfloat16 inputs: {(tag, recipe): (mk folder, ours)}."
    root, P = vocab_models
    texts = {f"{tag}_{n}": r.format(**{k: P[tag, k] for k in ("base", "a", "b", "c", "d", "lora1", "lora2")})
             for tag in ("f32", "bf16") for n, r in RECIPES.items()}
    mergekit_multi(root, texts, "--lora-merge-cache", str(root / "lora_cache"))
    out = {}
    for name, text in texts.items():
        merge_config(text, root / "ours" / name, workers=1)
        out[name] = (root / "mk" / name, root / "ours" / name)
    return out

@pytest.mark.parametrize("tag", ["f32", "bf16"])
@pytest.mark.parametrize("recipe", list(RECIPES))
def test_same_tensors_as_mergekit(both, tag, recipe):
    mk, ours = both[f"{tag}_{recipe}"]
    a, b = load(mk), load(ours)
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), (k, (a[k].float() - b[k].float()).abs().max())
    ca, cb = (json.loads((d / "config.json").read_text()) for d in (mk, ours))
    assert ca["vocab_size"] == cb["vocab_size"]

@pytest.mark.parametrize("recipe", [r for r in RECIPES if not r.startswith("lora")])
def test_same_tokenizer_as_mergekit(both, recipe):
    from transformers import AutoTokenizer
    mk, ours = both[f"f32_{recipe}"]
    ta, tb = AutoTokenizer.from_pretrained(str(mk)), AutoTokenizer.from_pretrained(str(ours))
    assert ta.get_vocab() == tb.get_vocab()
    assert {i: str(t) for i, t in ta.added_tokens_decoder.items()} == {i: str(t) for i, t in tb.added_tokens_decoder.items()}
    text = "<|im_start|>user hi<|im_end|>"
    assert ta(text)["input_ids"] == tb(text)["input_ids"]
