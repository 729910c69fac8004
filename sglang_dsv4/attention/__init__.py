"""DSV4 attention backend for SGLang: a per-batch plan and one wrapper per layer kind."""
