"""SGLang plugin entry point (``sglang.srt.plugins`` group in pyproject.toml).

SGLang calls :func:`register` in the launcher before arguments are parsed, in ``Engine`` and at
the start of every scheduler process (not in the detokenizer, which needs nothing of ours).
This is the only module that touches SGLang's registries (see docs/design/sglang_0517_seams.md):

* model resolution (``get_model_architecture``): our ``DeepseekV4ForCausalLM`` over the
  built-in one, without importing SGLang's ModelRegistry (every model module);
* attention backends: ``dsv4_plugin`` registered and added to the CLI choices;
* a model override for ``DeepseekV4ForCausalLM`` (last writer wins over upstream's):
  our backend, page size = block (128), the KV dtype our pools read (``--kv-cache-dtype``:
  FP8 rows by default on the GPU, ``bfloat16`` for bf16 rows; always bf16 on CPU, where the
  pools keep plain rows in the model dtype) and upstream's swa / full slot ratio;
* HookRegistry: our pool sizing, pools and allocator for DSV4 models (others fall through), no
  SGLang quantization config for DSV4 (our loader reads the released FP8 / MXFP4 format itself),
  ``support_triton`` false for our backend on machines without CUDA, model-name resolution
  (``--model dsv4``) plus the CPU device default, the released config keys SGLang reads
  (``compress_ratios``) added to configs saved by HF transformers, before any Hugging Face
  access, and every generate request checked in the tokenizer manager before it can reach the
  scheduler
  (:mod:`sglang_dsv4.request_checks`: what would kill the scheduler gets a 400 instead);
* the HTTP app: a JSON body that is not an object gets a 400 on the request routes
  (:mod:`sglang_dsv4.http_body`; SGLang 0.5.17 answers some of them with a 500);
* structured output on CPU: xgrammar's token bitmask unpinned without CUDA and applied to CPU
  logits by xgrammar's CPU kernel (SGLang 0.5.17 has GPU paths only for both);
* ``--tp N`` (docs/multi_gpu.md): layouts the model cannot split refused at startup; on CPU no
  PyNccl, each rank's cores, and no head padding of the DSV4 config.

SGLang logs and swallows exceptions from plugins and would then serve the built-in DSV4 model;
a failure here must stop the server instead, so it is re-raised as ``SystemExit``.
"""

import logging

logger = logging.getLogger(__name__)

__all__ = ["register"]

# What the server-args hook decided for a CPU server, logged once logging is configured.
_CPU_NOTES: list[str] = []

_ARCH = "DeepseekV4ForCausalLM"
_NEXTN = "DeepseekV4ForCausalLMNextN"  # SGLang's name for a DSV4 speculative draft (MTP)
_DRAFT = "sglang.srt.speculative.draft_utils.DraftBackendFactory"
_EAGLE = "sglang.srt.speculative.eagle_utils"
_KVC = "sglang.srt.mem_cache.kv_cache_configurator.KVCacheConfigurator"
_TM = "sglang.srt.managers.tokenizer_manager.TokenizerManager"
_MR = "sglang.srt.model_executor.model_runner"
_PS = "sglang.srt.distributed.parallel_state"
_FB = "sglang.srt.model_executor.forward_batch_info"


def register() -> None:
    try:
        _register()
    except Exception as e:  # any failure must stop the server, loudly
        raise SystemExit(f"sglang-dsv4 plugin failed to register: {type(e).__name__}: {e}") from e


def _register() -> None:
    from sglang.srt.arg_groups.overrides import register_model_override
    from sglang.srt.layers.attention.attention_registry import register_attention_backend
    from sglang.srt.plugins.hook_registry import HookRegistry
    from sglang.srt.server_args import add_attention_backend_choices

    # The model module is imported here so that a broken one stops the server at startup.
    import sglang_dsv4.model.deepseek_v4  # noqa: F401
    from sglang_dsv4.attention.backend import BACKEND_NAME, DSV4AttnBackend

    add_attention_backend_choices([BACKEND_NAME])
    register_attention_backend(BACKEND_NAME)(DSV4AttnBackend)
    register_model_override(_ARCH)(_dsv4_server_args)
    for target, fn, kind in _hooks():
        HookRegistry.register(target, fn, kind)


def _dsv4_server_args(server_args, hf_config) -> dict:
    """Server arguments of a DSV4 model (a model override: ours is registered last, so it wins)."""
    from sglang_dsv4.attention.backend import BACKEND_NAME

    overrides = {"attention_backend": BACKEND_NAME, "page_size": 128}
    # Upstream accepts fp8_e4m3 / bfloat16 here; mem.sizing.row_format maps it to our rows.
    if server_args.device == "cpu" or server_args.kv_cache_dtype in ("bf16", "bfloat16"):
        overrides["kv_cache_dtype"] = "bfloat16"
    elif server_args.kv_cache_dtype == "auto":
        overrides["kv_cache_dtype"] = "fp8_e4m3"
    if server_args.swa_full_tokens_ratio == type(server_args).swa_full_tokens_ratio:
        # As upstream DSV4: swa slots (raw rows of every layer) cost 6-7x a full slot.
        overrides["swa_full_tokens_ratio"] = 0.1
    return overrides


def _hooks() -> list[tuple]:
    """(SGLang function, our hook, HookType) of every hook (the module docstring says why each)."""
    from sglang.srt.plugins.hook_registry import HookType

    hooks = [
        (
            "sglang.srt.server_args.ServerArgs.__post_init__",
            _resolve_model_and_device,
            HookType.BEFORE,
        ),
        ("sglang.srt.utils.common.support_triton", _support_triton, HookType.AROUND),
        (
            "sglang.srt.utils.hf_transformers.config.HfModelConfigParser.parse",
            _released_spelling,
            HookType.AFTER,
        ),
        (
            "sglang.srt.model_executor.pool_configurator.create_memory_pool_configurator",
            _pool_configurator,
            HookType.AROUND,
        ),
        (f"{_KVC}._build_token_to_kv_pool", _build_pool, HookType.AROUND),
        (f"{_KVC}._build_token_to_kv_pool_allocator", _build_allocator, HookType.AROUND),
        (
            "sglang.srt.model_loader.loader._get_quantization_config",
            _quantization_config,
            HookType.AROUND,
        ),
        (
            "sglang.srt.entrypoints.engine._set_envs_and_config",
            _cpu_processes,
            HookType.AFTER,
        ),
        (f"{_DRAFT}.create_decode_backend", _draft_decode_backend, HookType.AROUND),
        ("sglang.srt.mem_cache.allocation.get_last_loc", _last_loc, HookType.AROUND),
        (f"{_EAGLE}.build_tree_kernel_efficient", _build_tree, HookType.AROUND),
        (
            "sglang.kernels.ops.speculative.cache_locs.assign_extend_cache_locs_func",
            _extend_cache_locs,
            HookType.AROUND,
        ),
        (f"{_EAGLE}.verify_tree_greedy_func", _verify_greedy, HookType.AROUND),
        (f"{_DRAFT}.create_draft_extend_backend", _draft_extend_backend, HookType.AROUND),
        (f"{_TM}.generate_request", _check_request, HookType.BEFORE),
        (f"{_TM}._validate_one_request", _check_prompt, HookType.BEFORE),
        (f"{_TM}.create_abort_task", _abort_task, HookType.AROUND),
        (
            "sglang.srt.entrypoints.http_server._setup_and_run_http_server",
            _json_object_bodies,
            HookType.BEFORE,
        ),
        (
            "sglang.srt.constrained.xgrammar_backend._allocate_token_bitmask",
            _grammar_bitmask,
            HookType.AROUND,
        ),
        (
            "sglang.srt.constrained.base_grammar_backend.GrammarMask.apply",
            _apply_grammar_mask,
            HookType.AROUND,
        ),
        (f"{_MR}.adjust_config_with_unaligned_cpu_tp", _cpu_tp_config, HookType.AROUND),
        (f"{_FB}.ForwardBatch.init_new", _host_slots, HookType.AFTER),
        (f"{_PS}.init_model_parallel_group", _group_without_cuda, HookType.AROUND),
    ]
    # ModelRegistry imports every SGLang model module (~half of a process's start-up time and
    # ~0.1 GB each in the launcher and the scheduler): DSV4 is resolved before it is touched, in
    # each module that bound get_model_architecture at import.
    for module in ("sglang.srt.model_loader.utils", "sglang.srt.model_loader.loader"):
        hooks.append((f"{module}.get_model_architecture", _model_architecture, HookType.AROUND))
    return hooks


def _model_architecture(original, model_config):
    """Our ``DeepseekV4ForCausalLM`` for DSV4 configs (``--model-impl`` auto / sglang), without
    importing SGLang's ModelRegistry; other models and implementations fall through."""
    impl = getattr(model_config.model_impl, "value", model_config.model_impl)
    if not _is_dsv4(model_config.hf_config) or impl not in ("auto", "sglang"):
        return original(model_config)
    from sglang.srt.configs.model_config import ModelImpl

    if _NEXTN in _archs(model_config.hf_config):
        from sglang_dsv4.model.mtp import DeepseekV4ForCausalLMNextN as cls

        arch = _NEXTN
    else:
        from sglang_dsv4.model.deepseek_v4 import DeepseekV4ForCausalLM as cls

        arch = _ARCH
    model_config._resolved_model_arch = arch
    model_config._resolved_model_impl = ModelImpl.SGLANG
    return cls, arch


def _archs(hf_config) -> list[str]:
    return list(getattr(hf_config, "architectures", None) or [])


def _is_dsv4(hf_config) -> bool:
    """The DSV4 model or its MTP draft (SGLang renames a draft's architecture)."""
    return bool({_ARCH, _NEXTN} & set(_archs(hf_config)))


def _resolve_model_and_device(self, *args, **kwargs):
    """Before ServerArgs resolves (it is read-only after): ``--model dsv4`` -> the embedded
    checkpoint; for DSV4 models, SGLang's DSV4 reasoning and tool-call parsers, CPU when there is
    no CUDA device, with CPU defaults."""
    from sglang_dsv4.arg_rules import check_startup, is_local_dsv4, whole_block_chunk_size
    from sglang_dsv4.embedded import EMBEDDED, PUBLIC, resolve_model_name

    name = self.model_path
    resolved = resolve_model_name(name) if isinstance(name, str) else None
    if resolved is not None:
        self.model_path = resolved
        if self.tokenizer_path in (None, name):
            self.tokenizer_path = resolved
        if self.served_model_name in (None, name):
            self.served_model_name = name
    if not (name == EMBEDDED or name in PUBLIC or is_local_dsv4(self.model_path)):
        return None
    check_startup(self)  # --tp / --ep / DP attention / speculation it can serve, or a clear error
    # DSV4's own output formats (<think>...</think>, DSML tool calls) parsed into the OpenAI
    # API's reasoning_content / tool_calls; --reasoning-parser / --tool-call-parser win.
    if self.reasoning_parser is None:
        self.reasoning_parser = "deepseek-v4"
    if self.tool_call_parser is None:
        self.tool_call_parser = "deepseekv4"
    if self.device is None:
        import torch

        if not torch.cuda.is_available():
            self.device = "cpu"
    chunk = whole_block_chunk_size(self.chunked_prefill_size)
    if chunk is not None:  # a DSV4 page is a 128-token block (sglang_dsv4.arg_rules)
        size = self.chunked_prefill_size
        logger.warning(
            "DSV4: --chunked-prefill-size %d rounded up to %d (whole blocks)", size, chunk
        )
        self.chunked_prefill_size = chunk
    if self.device == "cpu":
        from sglang_dsv4.cpu_serving import cpu_defaults

        if note := cpu_defaults(self, embedded=name == EMBEDDED):
            _CPU_NOTES[:] = [note]
    return None


def _cpu_tp_config(original, model_config, load_config, tp_size):
    """On CPU SGLang pads heads ``--tp`` does not divide (DSV4's one K=V head would become
    ``tp``); DSV4 splits its own dims or refuses at startup, so its config stays as released."""
    if _is_dsv4(model_config.hf_config):
        return model_config
    return original(model_config, load_config, tp_size)


def _group_without_cuda(original, *args, **kwargs):
    """Without CUDA no PyNccl (it loads torch's NCCL library, then fails entering a CUDA device
    context for CPU): SGLang's CPU all-reduce is then gloo's."""
    import torch

    if not torch.cuda.is_available():
        kwargs["use_pynccl"] = False
    return original(*args, **kwargs)


def _cpu_processes(result, server_args, *args, **kwargs):
    """After SGLang's process set-up, before the scheduler and detokenizer start: for DSV4 on
    CPU, one torch thread per process for a small checkpoint, and then ``fork`` instead of
    ``spawn`` (each spawned child re-imports SGLang and torch: ~10 s per process on an idle
    2-core machine, several times that under load; forked, they start from the launcher's
    modules, shared copy-on-write). Why these defaults: :mod:`sglang_dsv4.cpu_serving`."""
    from sglang_dsv4.arg_rules import serves_dsv4

    if server_args.device != "cpu" or not serves_dsv4(server_args.model_path):
        return result
    from sglang_dsv4.cpu_serving import cpu_threads

    notes = _CPU_NOTES.copy() or [f"context length {server_args.context_length} (--context-length)"]
    if cpu_threads(server_args.model_path) == 1:
        import multiprocessing

        import torch

        torch.set_num_threads(1)
        notes.append("1 torch thread per process (a small checkpoint; OMP_NUM_THREADS=N for more)")
        # speculative decoding needs Triton's interpreter (_cpu_speculative_env), which a
        # process must have from its first Triton import on: spawned, not forked
        if server_args.speculative_algorithm is None:
            multiprocessing.set_start_method("fork", force=True)
            notes.append("scheduler and detokenizer forked from the launcher")
    logger.info("DSV4 on CPU: %s", "; ".join(notes))
    return result


def _host_slots(forward_batch, cls, batch, *args, **kwargs):
    """``ForwardBatch.init_new``, after: a prefill's request slots on the host (each request's
    ``req_pool_idx``, what ``req_pool_indices`` holds on the device) ride on its host prefix
    lengths (``attention.plan_facts.SlottedLens``), so that the extend plan reads nothing back.
    SGLang's forward batch keeps the device tensor only, and ``ScheduleBatch.
    req_pool_indices_cpu`` is stale in the speculative draft window: draft modes keep the read."""
    lens = forward_batch.extend_prefix_lens_cpu
    if lens is None:  # decode (every step): no imports, nothing to carry
        return
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    from sglang_dsv4.attention.plan_facts import SlottedLens

    if forward_batch.forward_mode in (ForwardMode.EXTEND, ForwardMode.MIXED):
        slots = [r.req_pool_idx for r in batch.reqs]
        if None not in slots:
            forward_batch.extend_prefix_lens_cpu = SlottedLens(lens, slots)


def _released_spelling(config, *args, **kwargs):
    """A config saved by HF transformers (``DeepseekV4ForCausalLM.save_pretrained``) spells the
    schedule ``layer_types`` + ``compress_rates``; SGLang's ``ModelConfig`` reads
    ``compress_ratios`` (AttributeError otherwise, before our model is built). Add the released
    keys, derived by our parser (a bad config stops startup naming the field)."""
    if getattr(config, "model_type", None) != "deepseek_v4" or getattr(
        config, "compress_ratios", None
    ):
        return None
    from sglang_dsv4.config import DSV4Config, released_fields

    fields = released_fields(DSV4Config.from_dict(config.to_dict()))
    logger.info("DSV4: HF-transformers config spelling; derived %s", fields)
    config.update(fields)
    return config


def _support_triton(original, backend: str) -> bool:
    from sglang_dsv4.attention.backend import BACKEND_NAME

    if backend == BACKEND_NAME:
        import torch

        return torch.cuda.is_available()
    return original(backend)


def _quantization_config(original, model_config, load_config):
    """DSV4 reads its checkpoint format (released FP8 / MXFP4) from config.json itself and
    dequantizes or keeps the weights in its own loader, so SGLang's Fp8Config (bf16-only, fused
    FP8 layers we do not use) is not built for it."""
    if _is_dsv4(model_config.hf_config):
        return None
    return original(model_config, load_config)


def _request_limits(tm):
    """What :mod:`sglang_dsv4.request_checks` checks a request against, read from the
    tokenizer manager ``tm`` (None when the served model is not DSV4)."""
    if not _is_dsv4(tm.model_config.hf_config):
        return None
    from sglang_dsv4.request_checks import Limits

    args = tm.server_args
    return Limits(
        vocab_size=tm.model_config.vocab_size,
        context_len=tm.context_len,
        has_grammar=not args.skip_tokenizer_init and args.grammar_backend != "none",
        greedy_only=args.speculative_algorithm is not None and args.device == "cpu",
    )


def _check_request(self, obj, *args, **kwargs):
    """The whole generate request, before SGLang normalizes it, batches and all: what the
    scheduler cannot survive (or decode) is refused with a 400 naming the field
    (:func:`sglang_dsv4.request_checks.check_generate_request`; docs/robustness.md)."""
    from sglang.srt.managers.io_struct import GenerateReqInput

    limits = _request_limits(self) if isinstance(obj, GenerateReqInput) else None
    if limits is not None:
        from sglang_dsv4.request_checks import check_generate_request

        check_generate_request(obj, limits)
    return None


def _json_object_bodies(server_args, tokenizer_manager=None, *args, **kwargs):
    """Before uvicorn starts (the app's middleware stack is built on the first request): JSON
    bodies that are not objects get a 400 on the request routes (:mod:`sglang_dsv4.http_body`).
    SGLang 0.5.17's OpenAI request models call ``.get`` on the body in ``mode="before"``
    validators while FastAPI parses it, before any route or tokenizer-manager hook runs, so the
    app is the first place that sees the body. Innermost (appended), so that SGLang's CORS and
    decompression middleware still wrap the answer and the body."""
    hf_config = getattr(getattr(tokenizer_manager, "model_config", None), "hf_config", None)
    if hf_config is None or not _is_dsv4(hf_config):
        return None
    from sglang.srt.entrypoints.http_server import app
    from starlette.middleware import Middleware

    from sglang_dsv4.http_body import JsonObjectBody

    if all(m.cls is not JsonObjectBody for m in app.user_middleware):
        app.user_middleware.append(Middleware(JsonObjectBody))
    return None


def _check_prompt(self, obj, input_ids, *args, **kwargs):
    """Each request once tokenized: token ids inside ``[0, vocab)`` (an embedding lookup past
    the table kills the scheduler, a device assert on GPU; SGLang 0.5.17 defines
    ``_validate_input_ids_in_vocab`` but never calls it, and it would let negative ids through)
    and the logprob start inside the prompt."""
    limits = _request_limits(self)
    if limits is not None:
        from sglang_dsv4.request_checks import check_prompt

        check_prompt(obj, input_ids, limits)
    return None


def _abort_task(original, self, obj):
    """A streamed request's disconnect watcher reads ``obj.is_single`` two seconds after the
    response started, and that attribute only exists once SGLang has normalized the request:
    for a request refused before (by our checks or SGLang's own input checks) it raised an
    ``AttributeError`` into the ASGI log. Nothing of such a request reached the scheduler, so
    the watcher then has nothing to abort."""
    from starlette.background import BackgroundTasks

    guarded = BackgroundTasks()
    for task in original(self, obj).tasks:

        async def run(task=task):
            if hasattr(obj, "is_single"):
                await task()

        guarded.add_task(run)
    return guarded


def _grammar_bitmask(original, vocab_size: int, batch_size: int):
    """xgrammar's token bitmask is allocated in pinned memory for a fast copy to the GPU, which
    fails without a CUDA driver ("Found no NVIDIA driver"): unpinned where there is no CUDA."""
    import torch

    if torch.cuda.is_available():
        return original(vocab_size, batch_size)
    from xgrammar import allocate_token_bitmask

    return allocate_token_bitmask(batch_size, vocab_size)


def _apply_grammar_mask(original, self, logits):
    """SGLang applies a grammar's packed int32 bitmask (xgrammar, llguidance: bit ``t % 32`` of
    word ``t // 32`` allows token ``t``) with GPU kernels only and raises for CPU logits; on
    CPU, xgrammar's own CPU kernel applies it, on the logits' device."""
    import torch

    if logits.device.type != "cpu" or self.vocab_mask.dtype != torch.int32:
        return original(self, logits)
    from xgrammar import apply_token_bitmask_inplace

    apply_token_bitmask_inplace(logits, self.vocab_mask.to(logits.device))
    return None


def _pool_configurator(original, kvc):
    if not _is_dsv4(kvc.model_config.hf_config):
        return original(kvc)
    from sglang_dsv4.mem.sizing import DSV4PoolConfigurator

    return DSV4PoolConfigurator.from_kv_cache_configurator(kvc)


def _build_pool(original, self, *, sizes, is_dsa_model, is_dsv4_model, req_to_token_pool):
    if not is_dsv4_model:
        return original(
            self,
            sizes=sizes,
            is_dsa_model=is_dsa_model,
            is_dsv4_model=is_dsv4_model,
            req_to_token_pool=req_to_token_pool,
        )
    from sglang_dsv4.mem.pools import DSV4KVPool
    from sglang_dsv4.mem.sizing import schema_for

    schema, row_dtype = schema_for(self.model_config, self.server_args, self.device)
    return DSV4KVPool(
        schema,
        n_full_slots=sizes.full_max_total_num_tokens,
        n_swa_slots=sizes.swa_max_total_num_tokens,
        n_req_slots=req_to_token_pool.req_to_token.shape[0],
        row_dtype=row_dtype,
        device=self.device,
    )


def _build_allocator(original, self, *, sizes, token_to_kv_pool, **kwargs):
    from sglang_dsv4.mem.allocator import DSV4SWAAllocator
    from sglang_dsv4.mem.pools import DSV4KVPool

    # a speculative draft shares the target's allocator: SGLang registers its full -> swa
    # mapping with the draft pool
    shared = kwargs.get("token_to_kv_pool_allocator") is not None
    if not isinstance(token_to_kv_pool, DSV4KVPool) or shared:
        return original(self, sizes=sizes, token_to_kv_pool=token_to_kv_pool, **kwargs)
    return DSV4SWAAllocator(
        sizes.full_max_total_num_tokens,
        sizes.swa_max_total_num_tokens,
        page_size=token_to_kv_pool.page_size,
        dtype=self.kv_cache_dtype,
        device=self.device,
        kvcache=token_to_kv_pool,
        need_sort=False,
    )


def _ours(factory, backend_name: str) -> bool:
    """Whether the draft's ``backend_name`` phase resolves to our backend (as SGLang's
    ``DraftBackendFactory._create_backend`` resolves it)."""
    from sglang_dsv4.attention.backend import BACKEND_NAME

    args = factory.server_args
    chosen = factory.draft_attn_backend or getattr(args, backend_name, None)
    return (chosen or args.attention_backend) == BACKEND_NAME


def _draft_decode_backend(original, self):
    """The MTP draft's decode steps on our backend (SGLang's table names built-in backends
    only): one backend per step (:class:`sglang_dsv4.attention.speculative.DraftDecodeSteps`)."""
    if not _ours(self, "decode_attention_backend"):
        return original(self)
    if self.speculative_num_steps <= 1:
        return None
    from sglang_dsv4.attention.speculative import DraftDecodeSteps

    return DraftDecodeSteps(self.draft_model_runner, self.topk, self.speculative_num_steps)


def _draft_extend_backend(original, self):
    """The MTP draft's extend batches (after prefill, after each verify) on our backend."""
    from sglang.srt.runtime_context import get_spec

    mode = get_spec().speculative_attention_mode
    phase = "decode_attention_backend" if mode == "decode" else "prefill_attention_backend"
    if not _ours(self, phase):
        return original(self)
    from sglang_dsv4.attention.backend import DSV4AttnBackend

    return DSV4AttnBackend(self.draft_model_runner)


def _last_loc(original, req_to_token, req_pool_indices, prefix_lens):
    """SGLang picks a Triton kernel for every backend but two (speculative decoding's slot
    allocation calls it); without CUDA its torch twin."""
    import torch

    if torch.cuda.is_available():
        return original(req_to_token, req_pool_indices, prefix_lens)
    from sglang.srt.mem_cache.allocation import get_last_loc_torch

    return get_last_loc_torch(req_to_token, req_pool_indices, prefix_lens)


def _named(original, args, kwargs) -> dict:
    """The arguments of a call of ``original`` by parameter name, defaults included."""
    import inspect

    bound = inspect.signature(original).bind(*args, **kwargs)
    bound.apply_defaults()
    return bound.arguments


def _build_tree(original, *args, **kwargs):
    """Without CUDA, SGLang 0.5.17 builds the verify tree only with its CPU kernel build
    (``SGLANG_USE_CPU_ENGINE``): our torch twin for the top-k 1 chain."""
    import torch

    a = {} if torch.cuda.is_available() else _named(original, args, kwargs)
    if a.get("topk") != 1:
        return original(*args, **kwargs)
    from sglang.srt.speculative.eagle_utils import TreeMaskMode

    from sglang_dsv4.spec_torch import build_chain

    full = a["tree_mask_mode"] == TreeMaskMode.FULL_MASK
    tokens = (a["bonus_tokens"], a["draft_tokens"], a["seq_lens"], a["num_verify_tokens"])
    return build_chain(*tokens, full)


def _verify_greedy(original, *args, **kwargs):
    """Greedy verify without CUDA (see :func:`_build_tree`): the chain's torch twin."""
    import torch

    a = {} if torch.cuda.is_available() else _named(original, args, kwargs)
    if a.get("topk") != 1:
        return original(*args, **kwargs)
    from sglang_dsv4.spec_torch import verify_chain_greedy

    names = ("predicts", "accept_index", "accept_token_num", "candidates", "target_predict")
    return verify_chain_greedy(*(a[n] for n in names))


def _extend_cache_locs(original, *args, **kwargs):
    """The verify tokens' cache slots (``req_to_token[r, start:end]`` of each request, in batch
    order): SGLang 0.5.17 returns None on a CPU-only machine without its CPU kernel build."""
    import torch

    if torch.cuda.is_available():
        return original(*args, **kwargs)
    from sglang_dsv4.spec_torch import extend_cache_locs

    a = _named(original, args, kwargs)
    names = ("req_pool_indices", "req_to_token", "start_offset", "end_offset")
    return extend_cache_locs(*(a[n] for n in names))
