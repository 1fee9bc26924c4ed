"""Deployment tooling: find and run tritonserver, write model repositories, the `paged-triton`
launcher, the tiny random model builder. Imports: serving/ and the engine; nothing imports deploy/.
"""
