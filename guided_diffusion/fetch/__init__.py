"""
The file fetcher behind scripts/fetch_assets.py: downloads with resume, and the checks a downloaded copy must pass
(the catalogue of released files is common/assets.py, which the other scripts read for their hints).
"""
