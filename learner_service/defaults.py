"""The one set of default start hyperparameters and the hyperparameters' units.

No heavy imports (no numba, no scipy): the coordinator's config and report read this module.

``epicycle fit`` and ``epicycle run`` (and a learner server started without
``--hyperparameters``) start from these values; the MAP search
(:mod:`learner_service.model_selection`) also restarts from the data-derived prior centre.
Units: sig2, sig3 eV; ls2, ls3 Å; noise eV/Å.
"""

DEFAULT_HYPERPARAMETERS = {"sig2": 1.0, "ls2": 1.0, "sig3": 0.1, "ls3": 1.0, "noise": 0.05}

#: unit of every hyperparameter a model can have (the GP, the servicer's replies, the report)
HYPERPARAMETER_UNITS = {
    "sig2": "eV",
    "ls2": "Å",
    "sig3": "eV",
    "ls3": "Å",
    "noise": "eV/Å",
    "energy_noise": "eV",
    "stress_noise": "eV/Å³",
}
