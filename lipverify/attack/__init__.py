"""The sampled lower bound on the Lipschitz constant, computed on the user's file.

``lower_bound`` searches with proposals from the extracted graph and the user's torch module and
reports only difference quotients of the file itself (see ``engine``); ``radius`` holds the PGD check
of certified radii, decided by the file's predictions.
"""

from lipverify.attack.engine import LowerBound, Plan, decode, encode, lower_bound, recompute

__all__ = ["LowerBound", "Plan", "decode", "encode", "lower_bound", "recompute"]
