"""The tools: commands around the library (benchmark, demo, timing, evaluation and statistics,
phantom data, held-out cases, export of one modality).

Nothing that ``nnUNetv2_train -tr`` imports lives here: the library (norms, sampler, feature
taps, losses, trainers) is the rest of ``nnunetv2_csa`` and never imports a tool
(``tests/test_layout.py``), so a trained model needs none of this folder.
"""
