"Every notebook runs top to bottom the way its reader's Jupyter runs it: a real kernel, all cells, RUN_SLOW off, no GPU needed."
import re, time
from pathlib import Path

import nbformat, pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

_ANSI, _ARROW = re.compile(r'\x1b\[[0-9;]*m'), re.compile(r'^\s*---->\s*(\d+)\s(.*)$', re.M)
NBS = sorted((Path(__file__).resolve().parent.parent/'nbs').glob('*.ipynb'))

def _is_export(cell):
    "The `import nbdev; nbdev.nbdev_export()` cell at the end of a notebook."
    return cell.cell_type == 'code' and 'nbdev_export()' in cell.source

class _Client(NotebookClient):
    "Remembers which cell ran last, so a failure names it."
    started = None
    async def async_execute_cell(self, cell, cell_index, **kwargs):
        self.started = cell_index
        return await super().async_execute_cell(cell, cell_index, **kwargs)

@pytest.mark.parametrize('path', NBS, ids=[p.stem for p in NBS])
def test_notebook_runs_for_a_reader(path, monkeypatch):
    monkeypatch.delenv('IN_TEST', raising=False)     # nbdev_test sets it and so turns RUN_SLOW on; a reader's kernel has none
    monkeypatch.setenv('OMP_NUM_THREADS', '1')        # the kernel inherits it: one intra-op thread, as in tests/run.sh
    nb = nbformat.read(path, as_version=4)
    # Skip the `nbdev_export()` cell: run here it would rewrite model_ops/ (every module and _modidx.py) while the other
    # tests import it; CI checks separately that exporting changes nothing.
    keep = [i for i, c in enumerate(nb.cells) if not _is_export(c)]
    nb.cells = [nb.cells[i] for i in keep]
    client = _Client(nb, timeout=900, kernel_name='python3', resources={'metadata': {'path': str(path.parent)}})
    t0, err = time.time(), None
    try: client.execute()
    except Exception as e: err = e
    if err is None: return
    if client.started is None: pytest.fail(f"{path.name}: the kernel did not start: {type(err).__name__}: {err}", pytrace=False)
    first = nb.cells[client.started].source.split('\n')[0]
    if isinstance(err, CellExecutionError):   # name the failing line too: a bare `assert` has an empty message
        at = _ARROW.findall(_ANSI.sub('', str(err)))   # IPython marks the failing line of each frame `----> N code`
        msg = err.ename + (f": {err.evalue}" if err.evalue else "") + (f" (line {at[0][0]}: {at[0][1].strip()})" if at else "")
    else: msg = f"{type(err).__name__}: {str(err)[-2000:]}"
    pytest.fail(f"{path.name}, cell {keep[client.started]} ({first!r}), after {time.time() - t0:.0f} s: {msg}", pytrace=False)
