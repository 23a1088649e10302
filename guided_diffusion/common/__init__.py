"""
Small helpers below ADM's modules, which import some of them: atomic writes, errors, file digests, the launcher's
rank and world, the non-finite guard, per-sample random streams, the attention-kernel choice, the state-dict check,
the flag help table, the released files' catalogue and the digits data. They import nothing else of the package.
"""
