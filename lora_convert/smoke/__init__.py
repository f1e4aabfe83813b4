"""The smoke check: the stacked tensors through the Triton kernels against PEFT's reference."""
