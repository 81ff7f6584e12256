"""MeZO-SGD (Malladi et al. 2023) in seed form: the names the paper's users look for.

One step with q queries: seeds s_1..s_q; probes ``[(s_i, +eps), (s_i, -eps)]`` (two-sided) or
``[(None, 0), (s_i, +eps) ...]`` (one-sided);
g_i = (L(w + eps z_i) - L(w - eps z_i)) / (2 eps)   (one-sided: (L(w + eps z_i) - L(w)) / eps);
update ``w <- (1 - lr wd) w - (lr / q) sum_i g_i z_i`` (decay only where weight decay applies).
Logged loss: mean of L(w + eps z_i), as MeZO logs L+.

The implementation is ``zoft.optim.zo_sgd.ZOSGD`` (registered as ``mezo-sgd``), the base of the
ZO-SGD family; ``tests/test_mezo.py`` checks it against a hand-written step of the published
algorithm.
"""
from zoft.optim.zo_sgd import ZOSGD as MeZOSGD
from zoft.optim.zo_sgd import ZOConfig as MeZOConfig

__all__ = ["MeZOConfig", "MeZOSGD"]
