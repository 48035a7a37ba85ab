"""Workflows: the work done on behalf of a command, over the library packages.

``workdir`` owns the work-dir conventions (where manifests, encoders, stores, staged splits, runs
and reports go); ``data`` builds manifests, the synthetic world's encoder and the token stores;
``runs`` trains, evaluates and re-ranks one model and writes each run's resolved config;
``experiments`` runs the demo, the stage-one comparison and the stage-two ablation. ``cli.py`` is a
thin layer of options and messages over these functions.
"""
