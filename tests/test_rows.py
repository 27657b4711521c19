"""The row table is the one definition of the rows: trainers, twins and the benchmark's map follow it."""
import pytest

import nnunetv2_csa.training.trainers as trainers
from nnunetv2_csa.tools.benchmark import rows as benchmark_rows
from nnunetv2_csa.training.nnUNetTrainerCSA import nnUNetTrainerCSA, nnUNetTrainerCSA_BN
from nnunetv2_csa.training.rows import MAX_SINGLE_MODALITIES, PAPER_LAMBDA, ROW_TABLE, ROWS_BY_NAME, Row

CSA_ROWS = [row for row in ROW_TABLE if row.kind == "csa"]


@pytest.mark.parametrize("row", CSA_ROWS, ids=lambda r: r.name)
def test_every_csa_row_has_a_trainer_and_a_batchnorm_twin_with_exactly_its_settings(row):
    for suffix, base in (("", nnUNetTrainerCSA), ("_BN", nnUNetTrainerCSA_BN)):
        trainer = getattr(trainers, f"nnUNetTrainer{row.name}{suffix}")
        assert issubclass(trainer, base)
        for attribute in ("consistency_kind", "paper_lambda", "lambda_rampup_fraction", "area_normalization",
                          "affinity_reading", "affinity_layers", "distillation_temperature"):
            expected = row.settings.get(attribute, getattr(nnUNetTrainerCSA, attribute))
            assert getattr(trainer, attribute) == expected, (trainer.__name__, attribute)
        # and every short-budget variant inherits them
        variant = getattr(trainers, f"nnUNetTrainer{row.name}{suffix}_2epochs_5its")
        assert issubclass(variant, trainer)


def test_the_stock_rows_have_their_trainers_for_every_modality_index():
    from nnunetv2.training.nnUNetTrainer.variants.network_architecture.nnUNetTrainerBN import nnUNetTrainerBN
    assert issubclass(trainers.nnUNetTrainerJoint_BN, nnUNetTrainerBN)
    for index in range(MAX_SINGLE_MODALITIES):
        single = getattr(trainers, f"nnUNetTrainerSingleModality{index}")
        assert single.single_modality_index == index and not issubclass(single, nnUNetTrainerBN)
        assert issubclass(getattr(trainers, f"nnUNetTrainerSingleModality{index}_BN"), nnUNetTrainerBN)


def test_the_benchmark_rows_are_the_tables_and_every_one_resolves_to_a_trainer():
    assert benchmark_rows.ROWS == ("Single", "Joint", "MSBN", "Affinity", "UMMKD", "CSA")
    assert set(benchmark_rows.LAMBDA_ROWS) == {r.name for r in ROW_TABLE if r.benchmark == "lambda"}
    assert set(benchmark_rows.CSA_FAMILY) == {r for r in benchmark_rows.ALL_ROWS if ROWS_BY_NAME[r].kind == "csa"}
    for row in benchmark_rows.ALL_ROWS:
        for norm in ("instance", "bn"):
            assert hasattr(trainers, benchmark_rows.trainer_name(row, norm, (1, 5))), (row, norm)
    # the ablations of Eq. 3 and 4 are trainers, not benchmark rows
    assert "CSA_Literal" not in benchmark_rows.ALL_ROWS and hasattr(trainers, "nnUNetTrainerCSA_Literal")


def test_which_rows_train_with_the_consistency_term():
    training = {r.name for r in ROW_TABLE if r.trains_with_consistency}
    assert {"CSA", "Affinity", "UMMKD", "CSA_RampUp", "CSA_Lambda1"} <= training
    assert not {"MSBN", "Joint", "Single"} & training
    assert ROWS_BY_NAME["CSA"].paper_lambda == PAPER_LAMBDA == 0.5
    assert ROWS_BY_NAME["Joint"].paper_lambda == 0.0


def test_a_new_row_is_one_line_of_the_table():
    row = Row("CSA_Lambda2", "csa", "CSA with λ = 2.", {"paper_lambda": 2.0}, "lambda",
              ("nnUNetTrainerCSA_Lambda2", "nnUNetTrainerCSA_Lambda2_BN"))
    plain, twin = trainers.row_trainers(row)
    assert (plain.__name__, twin.__name__) == ("nnUNetTrainerCSA_Lambda2", "nnUNetTrainerCSA_Lambda2_BN")
    assert plain.paper_lambda == twin.paper_lambda == 2.0
    assert plain.paper_lambda == 2.0  # its weight on nnU-Net's loss is λ/N: tests/test_trainer_units.py
    assert issubclass(twin, nnUNetTrainerCSA_BN) and plain.__doc__ == "CSA with λ = 2."


@pytest.mark.parametrize("bad, match", [
    (dict(name="X", kind="paired", doc=""), "kind must be one of"),
    (dict(name="X", kind="joint", doc="", settings={"paper_lambda": 1.0}), "only rows of kind 'csa'"),
    (dict(name="X", kind="csa", doc="", benchmark="extra"), "benchmark must be one of"),
])
def test_malformed_rows_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        Row(**bad)


def test_a_row_setting_an_attribute_the_trainer_lacks_is_refused():
    with pytest.raises(AttributeError, match="paper_lamda"):
        trainers.row_trainers(Row("CSA_Typo", "csa", "", {"paper_lamda": 1.0},
                                  trainers=("nnUNetTrainerCSA_Typo", "nnUNetTrainerCSA_Typo_BN")))


def test_a_grep_for_any_trainer_name_lands_on_the_table_line_that_makes_it():
    import inspect

    import nnunetv2_csa.training.rows as rows_module
    from nnunetv2_csa.training.trainers import BASE_TRAINERS

    source = inspect.getsource(rows_module)
    for trainer in BASE_TRAINERS:
        assert f'"{trainer.__name__}"' in source, trainer.__name__
    with pytest.raises(ValueError, match=r"trainers must be \('nnUNetTrainerX', 'nnUNetTrainerX_BN'\)"):
        Row("X", "csa", "", trainers=("nnUNetTrainerX", "nnUNetTrainerY_BN"))


def test_any_short_budget_resolves_on_demand_and_pickles_by_name():
    import pickle

    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    assert "nnUNetTrainerCSA_2epochs_5its" not in trainers.__all__  # no grid of globals
    variant = trainers.nnUNetTrainerMSBN_BN_7epochs_13its  # not a budget of the old grid
    assert issubclass(variant, trainers.nnUNetTrainerMSBN_BN) and variant is trainers.nnUNetTrainerMSBN_BN_7epochs_13its
    assert pickle.loads(pickle.dumps(variant)) is variant
    for missing in ("nnUNetTrainerBogus_2epochs_5its", "nnUNetTrainerCSA_0epochs_5its", "nnUNetTrainerCSA_2epochs"):
        assert not hasattr(trainers, missing), missing
    # nnU-Net's own search, through the nnUNet_extTrainer shim, as nnUNetv2_train -tr does
    import os
    from nnunetv2_csa.ext_trainers import TRAINER_DIR
    saved = os.environ.get("nnUNet_extTrainer")
    os.environ["nnUNet_extTrainer"] = TRAINER_DIR
    try:
        found = recursive_find_trainer_class_by_name("nnUNetTrainerUMMKD_3epochs_11its")
    finally:
        os.environ.pop("nnUNet_extTrainer") if saved is None else os.environ.__setitem__("nnUNet_extTrainer", saved)
    assert found is trainers.nnUNetTrainerUMMKD_3epochs_11its
