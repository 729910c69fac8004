"""DSV4 cache memory: the per-layer schema (``schema``) and id allocators (``allocator``).
Pools and the per-layer cache handle arrive with the SGLang integration."""
