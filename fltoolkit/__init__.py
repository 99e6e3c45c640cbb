"""fltk: federated training of CTR models on TorchRec and Lightning.

`fltoolkit.fit("experiments/taobao.yaml", federated={"rounds": 50})` runs an experiment from
Python as `fltk fit` does from the shell (see fltoolkit.run.fit). It is imported on first use,
so `import fltoolkit` stays light.
"""

from typing import Any


def __getattr__(name: str) -> Any:
    if name in ("fit", "FitResult"):
        from fltoolkit.run import fit as module

        return getattr(module, name)
    raise AttributeError(f"module 'fltoolkit' has no attribute {name!r}")
