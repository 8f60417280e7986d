"""Serving a bundle: the prediction service (``stage1 serve``), its client, and the miner submission.

``model`` loads the bundle (verified, id pinned) and swaps it atomically on reload; ``batcher``
groups concurrent requests into bounded batches; ``inputs`` turns request bodies into images or a
4xx; ``app`` is the FastAPI service; ``server`` runs it with uvicorn; ``client`` is the
standard-library client shipped to miners; ``miner`` writes the submission folder.
Import the submodules directly (``app`` and ``server`` need FastAPI and uvicorn).
"""
