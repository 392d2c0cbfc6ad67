"""Serving captions at scale: the HTTP API, batch jobs on Ray Data, worker processes.

``app`` (``create_app``, ``serve``) with ``config``, ``routes``, ``schemas``, ``batcher``,
``errors`` and ``limits``; ``loadtest`` (``bench-serve``); ``ray_batch`` (``batch``) with
``batch_files``; ``procs`` (``caption --procs``); ``loading`` (the served captioner).
"""
