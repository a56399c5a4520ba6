"""fastprompt's kernels as torch ops, and the attention backend dispatcher.

    from fastprompt.ops.attention import attention, prefix_varlen_attention, prefix_stream_attention
    from fastprompt.ops.layer_norm import layer_norm
    from fastprompt.ops.mlp import linear_act, frozen_mlp
    from fastprompt.ops.grouped_mlp import grouped_linear, grouped_bottleneck_mlp
    from fastprompt.ops.backends import explain_backend, set_backend_order

Each op module registers its torch.library ops on import. The package itself imports nothing, so
`import fastprompt` works where triton is missing (the PyTorch backends still do).
"""
