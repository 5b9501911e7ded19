"""The functional core: plain Python, no Dagster. One package per pipeline stage, in the order
the data flows, and the shared plumbing beside them:

    catalog -> downloads -> wsi | roi -> manifest -> training (-> training/ssl)

A stage imports only earlier stages and the plumbing (`layout`, `stage`, `fsutil`, `parallel`,
`schema`, `digests`, `synthetic`), never a later stage (`cpia_assets_tests/test_architecture.py`).
"""
