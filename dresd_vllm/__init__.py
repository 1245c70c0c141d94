"""DReSD for vLLM: speculative decoding that drafts by dense retrieval of the target model's hidden states.

The subpackages, each importing only those listed below it:

- ``rest``: REST's proposer.
- ``spec``: DReSD's proposer (drafting, retrieval, context, scoring) and the base both proposers share.
- ``patches`` and ``config``: the patches of vLLM and the speculative config (``plugin``, vLLM's entry point,
  applies the patches).
- ``online``: the online store, keys learned from served traffic, and its spool.
- ``store``: the datastore on disk.
- ``index``: FAISS indexes and the search backends.

Two imports go upward, both inside a function: ``config`` checks a REST datastore with ``rest.suffix_array``,
and the patched runner reads the strict mode from ``spec.proposer_base``.
"""

__version__ = "0.1.0"
