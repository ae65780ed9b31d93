"""The saved notebooks show their figures inline, whatever the environment's matplotlib backend."""
import nbformat

from pocketgpt.pipeline import run_notebook

CELL = '''
import pocketgpt_utils as pg
from pathlib import Path
log = Path("log.csv")
log.write_text("step,tokens,train_loss,val_loss\\n10,1000,5.0,5.1\\n20,2000,4.0,4.2\\n")
pg.plot_losses({"pretrain": log});
'''
QUALITY = 'pg.plot_quality({m: {"greedy_rougeL": 0.2, "greedy_eos_share": 0.5, "rows": 8} for m in ["SFT", "DPO"]});'


def test_figures_stay_inline_under_a_headless_mplbackend(tmp_path, monkeypatch):
    """A headless server exports MPLBACKEND=Agg and the kernel inherits it: 04's loss and quality figures must
    still be in the saved notebook (as image/png outputs), as they are without it."""
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("PYTHONPATH", str(__import__("pocketgpt_utils").__file__.rsplit("/", 1)[0]))
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(CELL), nbformat.v4.new_code_cell(QUALITY)])
    nbformat.write(nb, tmp_path / "plots.ipynb")
    run_notebook(tmp_path / "plots.ipynb", tmp_path / "plots.out.ipynb", {}, log_output=False)
    cells = nbformat.read(tmp_path / "plots.out.ipynb", as_version=4).cells
    assert [sum("image/png" in o.get("data", {}) for o in c.outputs) for c in cells] == [1, 1]
