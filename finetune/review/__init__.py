"""Review: rate a run's sample images in the browser; ratings in <run>/feedback.sqlite become preference pairs.

`review(run)` serves the page (server.py), `Store` keeps the ratings (finetune.ratings, below review
and training), `export_pairs(run, out)` writes the pairs JSONL that preference training reads,
`scan_run(run)` lists the images (images.py).
"""

from finetune.review.images import ReviewImage, scan_run
from finetune.review.server import review
from finetune.ratings import DB_NAME, Store, export_pairs

__all__ = ["DB_NAME", "ReviewImage", "Store", "export_pairs", "review", "scan_run"]
