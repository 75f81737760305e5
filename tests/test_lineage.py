"Lineage (#21): every wired operation records itself, revert is exact where promised, reproduce catches a tampered parent, a chain resumes."
import json, subprocess, shutil
import pytest, torch
from model_ops.nn import tiny_model, tiny_tokenizer
from model_ops.io import save_pretrained_atomic, WeightStore
from model_ops.lineage import (read_lineage, weights_hash, history, revert, revert_plan, save_pretrained, LineageError, log_text)
from model_ops.chain import run_chain, reproduce, chain_dir, OPS

@pytest.fixture(scope='module')
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp('lin')
    torch.manual_seed(0)
    tok, base = tiny_tokenizer(), tiny_model('llama')
    save_pretrained_atomic(base, root/'base', tok=tok)
    for i in (1, 2):
        ft = tiny_model('llama'); ft.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in ft.parameters(): p.add_(0.02 * torch.randn_like(p))
        save_pretrained_atomic(ft, root/f'ft{i}', tok=tok)
    return root

def check_record(out, op, n_parents):
    "The record is in lineage.json and in the headers, names the parents, and its fingerprint is the weights' (from the bytes)."
    rec = read_lineage(out)
    assert rec['op'] == op and len(rec['parents']) == n_parents and rec['format'] == 'model_ops.lineage/1'
    assert rec['fingerprint'] == weights_hash(out)
    for meta in WeightStore.open(out).metadata.values():
        hdr = json.loads(meta['model_ops'])['lineage']
        assert hdr['op'] == op and hdr['params'] == rec['params']
    assert (out/'README.md').read_text().count('## Lineage') == 1
    return rec

def test_merge_config_and_merge_record(models, tmp_path):
    from model_ops.merge import merge_config, merge
    cfg = {'merge_method': 'ties', 'base_model': str(models/'base'), 'dtype': 'float32', 'parameters': {'density': 0.5},
           'models': [{'model': str(models/'ft1'), 'parameters': {'weight': 0.5}}, {'model': str(models/'ft2'), 'parameters': {'weight': 0.5}}]}
    merge_config(cfg, tmp_path/'m')
    rec = check_record(tmp_path/'m', 'merge', 3)
    assert [p['role'] for p in rec['parents']].count('base') == 1
    assert {p['fingerprint'] for p in rec['parents']} == {weights_hash(models/n) for n in ('base', 'ft1', 'ft2')}
    merge([models/'ft1', models/'ft2'], method='linear', weight=[0.5, 0.5], out=tmp_path/'lin')
    assert check_record(tmp_path/'lin', 'merge', 2)['params']['config']['merge_method'] == 'linear'
    assert (tmp_path/'m'/'mergekit_config.yml').is_file()        # the merge's own files are still written

def test_transfer_records(models, tmp_path):
    from model_ops.transfer import transfer
    transfer(models/'base', models/'ft1', models/'ft2', out=tmp_path/'t', alpha=0.5)
    rec = check_record(tmp_path/'t', 'transfer', 3)
    assert rec['params']['alpha'] == 0.5 and [p['role'] for p in rec['parents']] == ['src_base', 'src_tuned', 'tgt_base']

def test_prune_cli_records_and_reverts(models, tmp_path):
    from model_ops.prune import cli_prune
    cli_prune.__wrapped__(str(models/'ft1'), str(tmp_path/'p'), method='magnitude', sparsity=0.3)
    rec = check_record(tmp_path/'p', 'prune', 1)
    assert rec['params']['method'] == 'magnitude' and rec['undo']
    revert(tmp_path/'p', tmp_path/'back', 0)
    assert weights_hash(tmp_path/'back') == weights_hash(models/'ft1')
    r = reproduce(tmp_path/'p', tmp_path/'again')                 # the CLI's parameters are enough to rerun it
    assert r['identical'], r

def test_save_pretrained_in_memory_steps_revert_exactly(models, tmp_path):
    from model_ops.nn import load_model
    m, _ = load_model(str(models/'ft1'))
    with torch.no_grad(): m.model.layers[0].mlp.down_proj.weight[2, :5] += 1          # an edit-like change
    save_pretrained(m, tmp_path/'e', op='edit', params={'rows': [2]}, parents=[models/'ft1'])
    with torch.no_grad(): m.model.layers[1].self_attn.q_proj.weight[:, ::2] = 0         # pruning-like zeros
    save_pretrained(m, tmp_path/'z', op='prune', params={}, parents=[tmp_path/'e'])
    with torch.no_grad():
        for p in m.parameters(): p.mul_(1.001)                                          # changes everything
    save_pretrained(m, tmp_path/'d', op='distill', params={}, parents={'student': tmp_path/'z', 'teacher': models/'base'})
    assert [r['op'] for r in history(tmp_path/'d')] == ['edit', 'prune', 'distill']
    assert [bool(r['undo']) for r in history(tmp_path/'d')] == [True, True, False]
    for k, want in ((2, tmp_path/'z'), (1, tmp_path/'e'), (0, models/'ft1')):
        revert(tmp_path/'d', tmp_path/f'r{k}', k)
        assert weights_hash(tmp_path/f'r{k}') == weights_hash(want), k
    shutil.rmtree(tmp_path/'z')           # the distillation stored no undo data: without its parent it cannot be undone
    assert 'not revertible' in revert_plan(tmp_path/'d', 2)[0][1]
    with pytest.raises(LineageError, match='step 3 \\(distill\\) is not revertible'): revert(tmp_path/'d', tmp_path/'no', 2)
    assert not (tmp_path/'no').exists()
    revert(tmp_path/'e', tmp_path/'still', 0)               # steps that stored undo data still go back without it
    assert weights_hash(tmp_path/'still') == weights_hash(models/'ft1')

RECIPE = """
steps:
  - op: merge
    config:
      merge_method: task_arithmetic
      base_model: {base}
      dtype: float32
      models:
        - {{model: {ft1}, parameters: {{weight: 0.7}}}}
        - {{model: {ft2}, parameters: {{weight: 0.3}}}}
  - op: edit
    method: rome
    requests: [{{prompt: "The capital of France is", subject: France, target_new: " Rome"}}]
    mom2: false
    steps: 3
  - op: prune
    method: magnitude
    sparsity: 0.3
  - op: distill
    teacher: start
    steps: 1
    batch_size: 2
    seqlen: 16
"""

def test_chain_tampered_parent_and_resume(models, tmp_path):
    work = tmp_path/'in'; shutil.copytree(models, work)
    recipe = RECIPE.format(base=work/'base', ft1=work/'ft1', ft2=work/'ft2')
    real, logs = OPS['distill'], []
    OPS['distill'] = lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt())
    try:
        with pytest.raises(KeyboardInterrupt): run_chain(recipe, tmp_path/'out', log=logs.append)
    finally: OPS['distill'] = real
    assert len(logs) == 3 and not (tmp_path/'out').exists()
    logs = []
    rec = run_chain(recipe, tmp_path/'out', log=logs.append)
    assert ['skipped' in l for l in logs] == [True, True, True, False]
    assert [r['op'] for r in history(tmp_path/'out')] == ['merge', 'edit', 'prune', 'distill']
    assert reproduce(tmp_path/'out', tmp_path/'rep')['identical']
    # a tampered input of the merge: bytes changed in place, header (and its stored checksums) untouched
    f = work/'ft2'/'model.safetensors'; raw = bytearray(f.read_bytes()); raw[-4:] = b'\x00\x00\x80\x3f'; f.write_bytes(bytes(raw))
    with pytest.raises(LineageError, match='changed since the step ran'): reproduce(chain_dir(tmp_path/'out')/'01-merge', tmp_path/'rep2')
    assert not (tmp_path/'rep2').exists()
    logs = []
    run_chain(recipe, tmp_path/'out', log=logs.append)           # the chain notices it too, and reruns from the merge
    assert not any('skipped' in l for l in logs)
    assert read_lineage(tmp_path/'out')['fingerprint'] != rec['fingerprint']

def test_cli_commands(models, tmp_path):
    from model_ops.cli import COMMANDS
    assert {'log', 'revert', 'reproduce', 'run', 'diff'} <= set(COMMANDS)
    (tmp_path/'r.yml').write_text("model: %s\nsteps:\n  - {op: prune, method: magnitude, sparsity: 0.5}\n" % (models/'ft1'))
    run = lambda *a: subprocess.run(['model-ops', *map(str, a)], capture_output=True, text=True, timeout=600)
    r = run('run', tmp_path/'r.yml', tmp_path/'o'); assert r.returncode == 0, r.stderr
    r = run('log', tmp_path/'o'); assert r.returncode == 0 and 'step 1 prune' in r.stdout, r.stderr
    r = run('revert', tmp_path/'o', tmp_path/'b', '--to', '0'); assert r.returncode == 0, r.stderr
    assert weights_hash(tmp_path/'b') == weights_hash(models/'ft1')
    r = run('reproduce', tmp_path/'o', tmp_path/'n'); assert r.returncode == 0 and 'bit-identical' in r.stdout, r.stderr
    r = run('log', models/'ft1'); assert r.returncode == 2 and 'no lineage record' in r.stderr and 'Traceback' not in r.stderr
    r = run('run', tmp_path/'nope.yml', tmp_path/'o2'); assert r.returncode == 2 and 'no such file' in r.stderr
