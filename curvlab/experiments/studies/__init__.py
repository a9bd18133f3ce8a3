"""The registered studies (one module per paper or question), built on
:mod:`curvlab.experiments.harness`.

:mod:`curvlab.experiments` imports every module named in
:data:`curvlab.experiments.EXPERIMENT_MODULES` from here, which registers its experiments.
"""
