"""Dataset preparation: a folder of photos -> datasets/<name>/ (crops, captions, manifest, report).

`finetune.data.prepare.prepare` is the stage function; the modules beside it each do one step:
sources (finding inputs), images (decoding), faces, buckets, quality, process (one photo, in a worker),
captions and report.
"""
