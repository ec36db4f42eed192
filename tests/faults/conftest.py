"""The faults suite (issue 19; docs/reliability.md): faults that a GPU cluster really has, made to happen on
the local cluster's real node while the real trainer runs the demo's fine-tune. The end-to-end fixtures
(tests/e2e/conftest.py) serve here too."""

from tests.cluster.operator_fixture import crd  # noqa: F401 (fixture)
from tests.e2e.conftest import demo_inputs, tiny_model, trainer_image  # noqa: F401 (fixtures)
