"""The source corpus: packaged images -> ``data/`` and the readers of it.

- ``sources/``: one reader per packaged source, registered in ``nds._registry.SOURCES``;
- ``build``: profiles (``nds._registry.PROFILES``) and ``build_corpus`` (sources -> ``data/``);
- ``read``: the catalog, images by (array, row) or uri, the S3 object cache, ``image_sha256``;
- ``publish``: ``publish_corpus`` (arrays to S3, catalog pointed at them);
- ``holdout``: client target tasks from held-out images.
"""
