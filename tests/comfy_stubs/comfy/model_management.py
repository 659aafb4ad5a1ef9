"""Stand-in for `comfy.model_management`: CPU device, interrupt flag, and a record of `load_models_gpu` calls."""

import torch

LOAD_CALLS: list[list] = []  # the patchers passed to each load_models_gpu call
FREE_CALLS: list[tuple] = []  # (memory_required, device) of each free_memory call
_interrupt = False


class InterruptProcessingException(Exception):
    pass


def interrupt_current_processing(value=True):
    global _interrupt
    _interrupt = value


def processing_interrupted():
    return _interrupt


def throw_exception_if_processing_interrupted():
    global _interrupt
    if _interrupt:
        _interrupt = False
        raise InterruptProcessingException()


def get_torch_device():
    return torch.device("cpu")


def unet_offload_device():
    return torch.device("cpu")


def intermediate_device():
    return torch.device("cpu")


def should_use_bf16(device=None, model_params=0, prioritize_performance=True, manual_cast=False):
    return False


def load_models_gpu(models, memory_required=0, force_patch_weights=False, minimum_memory_required=None,
                    force_full_load=False):
    LOAD_CALLS.append(list(models))
    for patcher in models:
        patcher.model.to(patcher.load_device)
        patcher.model.device = patcher.load_device


def soft_empty_cache(force=False):
    pass


def free_memory(memory_required, device, keep_loaded=[]):
    FREE_CALLS.append((memory_required, device))
    return []
