"""The house rules of DESIGN.md ("Layers"), checked on the exported library: no import cycle inside model_ops, lower
layers never import higher ones, techniques do not import each other (but for the allowed pairs), and only model_ops.io
writes a safetensors header."""
import ast, re
from pathlib import Path
import pytest

LIB = Path(__file__).resolve().parent.parent / 'model_ops'
# DESIGN.md's rows, top to bottom: a module may import its own row's package or a row above it, never one below.
RANK = {'io': 0, 'nn': 1, 'delta': 2, 'eval': 3, 'lineage': 4,
        'merge': 5, 'edit': 5, 'unlearn': 5, 'prune': 5, 'distill': 5, 'compress': 5, 'transfer': 5, 'checkpoint': 5,
        'cli': 9, 'chain': 9}   # chain (the recipe runner) calls the techniques: it sits with the CLI
ALLOWED = {('prune', 'distill'), ('compress', 'distill'), ('compress', 'prune'), ('merge', 'distill')}   # DESIGN.md's exceptions

def modules() -> dict:
    "Dotted module name -> path, for every exported module but the nbdev index."
    out = {}
    for p in LIB.rglob('*.py'):
        if p.name == '_modidx.py': continue
        out['.'.join(p.relative_to(LIB.parent).with_suffix('').parts).removesuffix('.__init__')] = p
    return out

def imports(name:str, path:Path, mods:dict) -> set:
    "The model_ops modules that `name` imports anywhere (also inside functions), relative imports resolved."
    pkg = name if path.name == '__init__.py' else name.rpartition('.')[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ''
            if node.level:
                parts = pkg.split('.'); parts = parts[:len(parts) - node.level + 1]
                base = '.'.join(parts + ([base] if base else []))
            cands = [base] + [f'{base}.{a.name}' for a in node.names]
        elif isinstance(node, ast.Import): cands = [a.name for a in node.names]
        else: continue
        found |= {c for c in cands if c in mods and c != name}
    return found

MODS = modules()
GRAPH = {m: imports(m, p, MODS) for m, p in MODS.items()}

def top(m:str) -> str: return m.split('.')[1] if '.' in m else ''

def test_no_import_cycle():
    state, cycles = {}, []
    def visit(u, stack):
        state[u] = 1; stack.append(u)
        for v in sorted(GRAPH[u]):
            if state.get(v) == 1: cycles.append(' -> '.join(stack[stack.index(v):] + [v]))
            elif not state.get(v): visit(v, stack)
        stack.pop(); state[u] = 2
    for m in sorted(GRAPH):
        if not state.get(m): visit(m, [])
    assert not cycles, f"import cycles inside model_ops: {cycles}"

def test_layers_import_only_upward():
    bad = []
    for m, deps in GRAPH.items():
        a = top(m)
        for d in deps:
            b = top(d)
            if not a or not b or a == b: continue          # the package root, or inside one package
            ra, rb = RANK.get(a), RANK.get(b)
            assert ra is not None and rb is not None, f"{m} or {d} is in no row of DESIGN.md's layer table: add it to RANK"
            if rb > ra or (rb == ra and (a, b) not in ALLOWED): bad.append(f"{m} imports {d}")
    assert not bad, "lower layers may import higher ones only (DESIGN.md, Layers): " + '; '.join(sorted(bad))

# The bytes that start a safetensors file (its 8-byte little-endian header length), however a module would write them.
HEADER_WRITE = re.compile(r"""pack\(\s*['"]<Q|to_bytes\(\s*8\s*,\s*['"]little|['"]<Q['"]""")

def test_only_io_writes_safetensors_headers():
    writers = sorted(m for m, p in MODS.items() if HEADER_WRITE.search(p.read_text()))
    assert writers == ['model_ops.io.format'], f"safetensors headers are written only by model_ops.io.format, found in {writers}"

@pytest.mark.parametrize('name', sorted(MODS))
def test_module_size(name):
    n = sum(1 for _ in open(MODS[name]))
    assert n <= 1200, f"{name} has {n} lines; split it (DESIGN.md: one notebook per submodule, readable in one sitting)"
