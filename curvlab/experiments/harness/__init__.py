"""The experiment harness: everything a study uses, nothing specific to one study.

* :mod:`~curvlab.experiments.harness.registry` — ``@register``, :class:`Context`,
  :class:`Outcome`, :class:`Claim`;
* :mod:`~curvlab.experiments.harness.runner` — resumable :func:`run_all` with tidy CSVs;
* :mod:`~curvlab.experiments.harness.reproduce` — ``python -m curvlab reproduce`` and its summary;
* :mod:`~curvlab.experiments.harness.provenance` — commit, versions, device, time of a row;
* :mod:`~curvlab.experiments.harness.plotting` — line and heat-map panels saved as PNG;
* :mod:`~curvlab.experiments.harness.threads` — one-thread pinning for reproducible numbers;
* :mod:`~curvlab.experiments.harness.training` — the training loop with traces;
* :mod:`~curvlab.experiments.harness.optimizers` — the one optimizer factory and :class:`Method`;
* :mod:`~curvlab.experiments.harness.selection` — best-setting selection, time to target;
* :mod:`~curvlab.experiments.harness.comparison` — methods × grids × seeds sweeps.

The studies live in :mod:`curvlab.experiments.studies`.
"""
