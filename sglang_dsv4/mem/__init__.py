"""DSV4 cache memory: ``schema`` (what each layer keeps per block), ``pools`` (the tensors,
addressed by SGLang page = block), ``allocator`` (token slots in pages), ``sizing`` (pool size
from the measured memory budget)."""
