"""exl2.quant_kernels"""
