"""Choosing settings on validation: `cnnlab tune` (an Optuna study over the config's own keys, tune.py and
study.py) and `cnnlab lr-find` (the learning-rate range test, lr_find.py). cli.py is their command line;
importing this package imports neither torch nor Optuna.
"""
