"""Helpers shared by the test folders (importable: pyproject's `pythonpath = ["tests"]`); fixtures stay in
tests/conftest.py.

- `paths`: the repository root and the optional real-size assets in ../shared/
- `images`: generated test images
- `torch_reference`: the tiny PyTorch reference models and how their numbers are compared with ours
- `programs`: shape-only arguments of the generation program, and readers of jaxprs and compiled HLO
"""
