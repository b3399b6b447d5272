"""Running measurements for many callers: executors and process pools, dynamic batching,
the exposure cache, repository path safety, the job store and its runner.

Builds on :mod:`forcedphot.photometry`; knows nothing of HTTP.
"""
