"""A stand-in for the trainer in cluster tests of the operator (tests/cluster/test_operator.py).

The node agent runs images named `qlora-standin*` with this folder first on PYTHONPATH, so the Job's command
`python -m qlora_trainer --config FILE` runs `__main__` here instead of the real trainer.
"""
