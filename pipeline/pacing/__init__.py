"""Pacing: how one worker spaces its calls, and the loops that tune it from what it measures.

Every module here is plain Python with no Dagster import, and every
controller is a pure object driven by the samples and the clock it is
handed, so it is tested on simulated time and runs unchanged on Burla.
"""
