"""A toy plug-in for fltk: its own datamodule and a DCN-v2 model, named by class_path.

Importable as `plugin` once `examples/` is on the Python path (`PYTHONPATH=examples`).
"""
