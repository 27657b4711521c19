"""The paper's comparison as one command: train every row on one fold or on several
(cross-validation), evaluate the held-out cases, time each trainer, and write a report
folder (Table 1 layout, per-fold table, Wilcoxon with bootstrap intervals and Holm's
correction, plots).

Rows (trainer names of this package, found by stock ``nnUNetv2_train -tr``):

====== ===================================================================
Single ``nnUNetTrainerSingleModality{k}``, one model per modality k
Joint  ``nnUNetTrainerJoint`` (stock nnU-Net on both modalities)
MSBN   ``nnUNetTrainerMSBN``
Affinity ``nnUNetTrainerAffinity``
UMMKD  ``nnUNetTrainerUMMKD``
CSA    ``nnUNetTrainerCSA``
====== ===================================================================

``--norm bn`` takes the ``_BN`` twins; ``--budget E I`` the short-budget variants
``<name>_<E>epochs_<I>its``; ``--full-budget`` the plain names (nnU-Net's 1000 x 250).
Ablation rows (not run by default): ``CSA_Lambda0p25``, ``CSA_Lambda1`` and ``UMMKD_Lambda1``
(half and double the paper's weight, in the paper's units), ``CSA_RampUp`` (λ ramped up
linearly over the first quarter of the epochs). ``--single-budget equal-data`` trains Single
for 1/n of the iterations, so that it sees as many slices of its modality as the joint rows.

``--folds 0 1 2 3 4`` (or ``all``) trains every row on every fold (resumable per row and
fold) and scores each held-out patient once, with the models of the fold that holds it out;
means, stds and tests pool all folds, and a per-fold table shows the spread between folds.

Per row: training runs as the stock command in a subprocess, its output in
``logs/train_<trainer>.log`` of the report folder. A model whose ``checkpoint_final.pth``
and ``validation/summary.json`` exist is reused (``--rerun`` trains it again); a model with
an interrupted training (a checkpoint but no final validation) is continued with ``--c``.

Test cases: the held-out (validation) cases of the chosen fold in ``splits_final.json``;
each is scored from the row's own final-validation prediction (nnU-Net's sliding-window
predictor with mirroring), for Single from the model of the case's modality. A dataset
converted with ``--unpaired`` also holds the modality each patient did not contribute
(``imagesOtherModality``); those of the fold's held-out patients are test cases too, as
unseen as the validation cases, and are predicted here with nnU-Net's own predictor at
``nnUNetv2_predict``'s defaults, in the benchmark's process (``nnUNet_csa_modality`` set for
the CSA family). This doubles the test patients per modality, which the patient-level
Wilcoxon test needs. A row whose training fails or whose predictions are missing is
reported as FAILED with its error; the other rows still run.

The stages live in modules of their own: ``rows`` (rows, trainer names, budgets), ``runner``
(training, prediction and timing with nnU-Net), ``scoring`` (test cases and their scores),
``tables``, ``plots``, ``report``; ``pipeline.run_benchmark`` reads as the four stages;
``cli`` is the command.
"""
