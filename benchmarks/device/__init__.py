"""Parts of the one-command GPU suite ``benchmarks/device_suite.py`` (not a test).

* :mod:`device.config`: the full (H200) and smoke (CPU, < 1 min) configurations;
* :mod:`device.budget`: the global clock, per-part alarms and child processes with deadlines;
* :mod:`device.resnet`: a ResNet-18 (CIFAR variant) for the benchmarks;
* :mod:`device.bench`: environment record and benchmark parts (reusing ``products.py``,
  ``optimizers.py`` and ``kfac_step.py``);
* :mod:`device.experiments`: GPU tests and full-size experiments through ``python -m curvlab``;
* :mod:`device.report`: ``summary.json``, ``summary.md`` and ``results.tar.gz``.
"""
