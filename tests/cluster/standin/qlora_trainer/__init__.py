"""A stand-in for the trainer in cluster tests of the operator (tests/cluster/test_operator.py, test_helm.py).

Its image (tests/cluster/standin/Containerfile: the operator image, which holds the trainer's torch-free config
models, with this folder first on PYTHONPATH) makes the Job's command `python -m qlora_trainer --config FILE` run
`__main__` here instead of the real trainer.
"""
