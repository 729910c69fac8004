"""DSV4 checkpoints: tensor names (``names``), what each format stores (``layout``), streaming
loading with named errors (``loader``), writing the released format (``writer``) and building
small checkpoints in both formats (``make``). Quantized packing lives in
:mod:`sglang_dsv4.ref.weight_quant`."""
