"""SynthHR: the synthetic high-resolution VQA task (``task``), and the training of the mini
LLaVA-FlexAttn on it: the data stream (``data``), the losses (``losses``), the recipe as data
(``config``, ``configs/mini.toml``), the trainer and its one command (``train``), evaluation
(``evaluate``), threshold calibration (``calibrate``) and export (``export``).

It depends on ``flexattn`` (the model) one way: nothing in ``flexattn`` or ``pipeline``
imports it (``tests/synthhr/test_imports.py``)."""
