"""REST as a vLLM speculative method: `{"method": "rest", "datastore": FILE, ...}`.

Drafts from the longest suffix of each request's context that occurs in a corpus suffix array
(`dresd-build rest`), the same corpus DReSD's datastore is built from, for a side-by-side baseline.
"""

import numpy as np
from vllm.config import VllmConfig

from dresd_vllm import patches
from dresd_vllm.config import RestConfig
from dresd_vllm.rest.drafting import RestDrafter
from dresd_vllm.spec.proposer_base import GuardedProposer, model_tokenizer_fingerprint


class RestProposer(GuardedProposer):
    """Drafts by exact suffix match of the context in a corpus (REST, He et al. 2024)."""

    method = "rest"

    def __init__(self, vllm_config: VllmConfig):
        # The plugin-free custom_class form gets the CPU sampler fix and dresd_stats here (none is required).
        patches.apply()
        super().__init__(vllm_config)
        self.config = RestConfig.from_dict(self.options)
        if not self.output_rank:
            return
        self.drafter = RestDrafter(self.config)
        self.drafter.check_model(model_tokenizer_fingerprint(vllm_config.model_config), self.vocab_size)

    def _draft(
        self,
        sampled_token_ids: list[list[int]],
        num_tokens: np.ndarray,
        token_ids_cpu: np.ndarray,
        max_len: np.ndarray,
    ) -> list[list[int]]:
        return self.drafter.step(sampled_token_ids, num_tokens, token_ids_cpu, max_len)
