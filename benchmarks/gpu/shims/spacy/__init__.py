"""Stand-in for spacy on the GPU machine (run.sh puts it on the path only where spacy is
missing). LAVIS's img2prompt_vqa imports spacy at module level, so ``import lavis`` needs the
name; spacy and its dependencies (~40 MB) would not fit the carried wheels, and no GPU check
lemmatises answers. Loading a pipeline fails loudly instead of returning something wrong."""


def load(name, *args, **kwargs):
    raise ImportError(f"spacy.load({name!r}): this is benchmarks/gpu's import stand-in, not "
                      "spacy; the GPU checks do not lemmatise (apply_lemmatizer: false)")
