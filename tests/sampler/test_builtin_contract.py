"""The MD engine contract for the built-in NumPy engine."""

from .contract import EngineContract


class TestBuiltinEngine(EngineContract):
    engine = "builtin"
    ensembles = ("nve", "nvt_langevin", "nvt_berendsen", "nvt_csvr", "npt_berendsen", "npt_langevin")
