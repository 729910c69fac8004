"""DSV4 cache memory and how prefix caching works on it.

Modules: ``schema`` (what each layer keeps per block), ``pools`` (the tensors, addressed by the
two SGLang page kinds), ``allocator`` (full + swa token slots in pages of 128), ``sizing`` (pool
sizes from the measured memory budget).

Prefix caching (design)
-----------------------
We do not keep a tree of our own. DSV4 is served as an SGLang hybrid-SWA model, so SGLang
0.5.17 builds its ``UnifiedRadixCache`` with a FULL and an SWA component over our pools; the
tree stores full slots per cached token and the SWA component stores swa slots, with LRU and
lock counts per component. Everything DSV4 needs at a hit is reachable from those two:

* A hit of ``L`` tokens happens at page ends, and pages are 128 tokens, so ``L`` is a multiple
  of 128 (a block end). Per layer it restores
  - the c4 / c128 entries and c4 indexer keys of every complete window below ``L``: they live in
    the full pages of the prefix (entry ``i`` at the page of token ``i*r``);
  - the raw KV of tokens ``L-128 .. L-1`` (the ``swa_window`` of the first new query): the swa
    slots of the prefix's last page;
  - the compressor state at ``L``: c128 and the c4 current window are empty at a block end; the
    c4 previous window's a-halves (main and indexer, kv + score) are the ``boundary`` rows kept
    with the swa page of token ``L-1`` (written when that block end was first computed). The
    backend plan marks such a request ``rebuild`` and seeds its tail from them.
* Matching: SGLang's SWA validator accepts a match end only if at least ``sliding_window``
  (128) live swa tokens end there, i.e. the prefix's last page still has its swa slots. With
  page = window = 128 that is exactly "the block end's window (and boundary) is resident".
  The longest such prefix wins; the rest is prefilled.
* Eviction: SGLang evicts by component priority (FULL 2 > SWA 1): swa pages of cached blocks
  are tombstoned (and their boundary rows die with them) long before the full pages of the same
  blocks, which is what we want since swa slots are 6-7x larger per token. A tombstoned block
  end is no longer a match point; older entries stay shared. Leaves go whole, LRU per
  component; nodes locked by running requests (FULL over the whole prefix, SWA over the window
  segment) are never evicted. A running request frees the swa slots of its own tokens once they
  fall 128+ tokens behind its decode position (SGLang's ``free_swa_out_of_window_slots``).
* Retraction under pressure frees the request's slots; it comes back later with a new request
  slot and, usually, a prefix hit at a block end: the ``rebuild`` path above. A tail is reused
  only by the request that wrote it (owner generation + position, see ``attention.plan``).
* Not supported: HiCache (host offload of these pools), disaggregated transfer of DSV4 state.
"""
