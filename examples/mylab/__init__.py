"""An example plugin package: a lab's own regime, model and attack for aerl-ray.

Importing it registers ``logit_squeeze`` (regime), ``mlp2`` (model) and ``mifgsm``
(attack) into aerl-ray's registries; list it in a space file (``plugins: [./mylab]``) or
pass ``--plugin ./mylab`` to ``python -m aerl_ray.train|evaluate|sweep``.
"""
from mylab import attacks, models, regimes  # noqa: F401  (registration on import)
