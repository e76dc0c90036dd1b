"""CapFilt: bootstrap captions for pre-training data with a captioner and a filter (BLIP, BLIP-2).

For each image of a caption dataset, a captioner writes synthetic captions by nucleus sampling, a
filter model (ITM probability and/or ITC similarity) scores them together with the image's web
caption(s), and the top-k and/or those above an ITM threshold are kept. The pieces:

- :mod:`~lavis_plugins.capfilt.config`: every setting (``run.capfilt:`` of a YAML) and its checks;
- :mod:`~lavis_plugins.capfilt.candidates`: generation, scoring and selection of one batch;
- :mod:`~lavis_plugins.capfilt.clip_ranker`: the CLIP model of the ``clip`` score (BLIP-2's ranker);
- :mod:`~lavis_plugins.capfilt.shard_input`: input read from webdataset shards, and the shard set
  written from it;
- :mod:`~lavis_plugins.capfilt.parts`: per-rank partial outputs, resume, and the merged files;
- :mod:`~lavis_plugins.capfilt.report`: counts, score histogram and example grid.

The registered task ``lp_capfilt`` (:mod:`lavis_plugins.tasks.capfilt`) runs them under the
runner, and ``lavis-plugins capfilt`` (:mod:`lavis_plugins.cli.capfilt`) is its command.
"""
