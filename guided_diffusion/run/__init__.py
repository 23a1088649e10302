"""
The run machinery the sampling and training scripts share: flags and guidance specs, flag files, checkpoints,
the resumable run store with its locks and records, image output and the precision policy.
"""
