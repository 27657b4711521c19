import os

import pytest

REAL_DATA_ENV = "NNUNETV2_CSA_REAL_DATA"
REQUIRE_REAL_DATA_ENV = "NNUNETV2_CSA_REQUIRE_REAL_DATA"


@pytest.fixture(scope="session")
def real_data_root():
    """The folder holding ``myops2020/``; a skip (or, in CI, a failure) when it is not there."""
    root = os.environ.get(REAL_DATA_ENV)
    reason = None
    if not root:
        reason = f"{REAL_DATA_ENV} is not set (it points at the folder that holds myops2020/)"
    elif not os.path.isdir(os.path.join(root, "myops2020", "train")):
        reason = f"{REAL_DATA_ENV}={root} has no myops2020/train folder"
    if reason:
        if os.environ.get(REQUIRE_REAL_DATA_ENV) == "1":
            pytest.fail(f"real data required ({REQUIRE_REAL_DATA_ENV}=1): {reason}")
        pytest.skip(reason)
    return root
